"""DDP: two CPU processes (gloo) train a wrapped model on different data; every rank must make the
same allocation decisions and draw the same new directions, so masks and parameters stay
bit-identical across ranks after the events."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from _ddp import run_workers

WORLD = 2
STEPS = 24


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.d = nn.Linear(16, 3)

    def forward(self, x):
        return self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def _body(rank, out_dir):
    for skew_scores in (False, True):
        _train(rank, out_dir, skew_scores)


def _train(rank, out_dir, skew_scores):
    import flexlora
    from flexlora import FlexLoRAConfig, RankAllocator

    torch.manual_seed(0)  # same initial model on every rank (DDP also broadcasts rank 0's)
    model = MLP()
    cfg = FlexLoRAConfig(
        r_init=3, r_max=6, alpha=6.0, target_modules=["a", "b", "c", "d"], total_steps=STEPS,
        t_warmup=4, t_final=4, delta_t=2, b0=2, orth_reg=0.05, seed=7,
    )
    flexlora.wrap(model, cfg)
    ddp = nn.parallel.DistributedDataParallel(model)
    allocator = RankAllocator(ddp, cfg)
    torch.manual_seed(1234 + rank)  # global RNGs differ across ranks: new directions must not use them
    if skew_scores and rank == 1:
        # Rank 1 sees different scores (as float noise or a rank-local metric could cause):
        # the decisions must still be rank 0's.
        orig = allocator.importance.scores
        allocator.importance.scores = lambda modules: -orig(modules)
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    moved = 0
    for step in range(1, STEPS + 1):
        x = torch.randn(32, 6, generator=g)
        y = torch.sin(x[:, :3] * (1 + rank))
        loss = ((ddp(x) - y) ** 2).mean() + allocator.orthogonal_loss()
        loss.backward()
        opt.step()
        event = allocator.step(step, opt)
        opt.zero_grad()
        if event is not None:
            moved += len(event.pruned)
    flat = torch.cat(
        [t.detach().float().flatten() for _, m in flexlora.flex_modules(model) for t in (m.P, m.lam, m.Q, m.mask)]
    )
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    torch.save(
        {
            "same_as_rank0": torch.equal(gathered[0], gathered[rank]),
            "moved": moved,
            "names": allocator.names,
            "history": allocator.history,
            "ranks": allocator.ranks(),
            "total_rank": allocator.total_rank,
        },
        os.path.join(out_dir, f"rank{rank}-skew{int(skew_scores)}.pt"),
    )


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_workers(_body, out, WORLD)
    return out


@pytest.mark.parametrize("skew_scores", [False, True], ids=["same-scores", "rank1-scores-skewed"])
def test_ddp_ranks_stay_identical(ddp_results, skew_scores):
    res = [torch.load(ddp_results / f"rank{r}-skew{int(skew_scores)}.pt", weights_only=True) for r in range(WORLD)]
    assert all(r["same_as_rank0"] for r in res)
    assert res[0]["names"] == ["a", "b", "c", "d"]  # DDP's "module." prefix is not in the names
    assert res[0]["history"] == res[1]["history"] or skew_scores  # scores column differs when skewed
    strip = [[(h["step"], h["module"], h["rank"]) for h in r["history"]] for r in res]
    assert strip[0] == strip[1]
    assert res[0]["ranks"] == res[1]["ranks"] and res[0]["moved"] == res[1]["moved"] >= 4
    assert res[0]["total_rank"] == res[1]["total_rank"] == 12 == sum(res[0]["ranks"].values())


def _zero_body(rank, out_dir):
    """ZeroRedundancyOptimizer keeps each rank's Adam state in its local .optim: the slots an
    event prunes or opens must have their moments zeroed there."""
    import json

    from torch.distributed.optim import ZeroRedundancyOptimizer

    import flexlora
    from flexlora import FlexLoRAConfig, RankAllocator

    torch.manual_seed(0)
    model = flexlora.wrap(MLP(), FlexLoRAConfig(r_init=3, r_max=6, alpha=4.0, target_modules=["a", "b", "c", "d"],
                                                total_steps=12, t_warmup=2, t_final=0, delta_t=2, b0=2))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-2)
    alloc = RankAllocator(model)
    touched, checked = [], 0
    for step in range(1, 9):
        model(torch.randn(8, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        event = alloc.step(step, opt)
        if event is None:
            continue
        for name, slot in [*event.pruned, *event.expanded]:
            m = dict(flexlora.flex_modules(model))[name]
            for p, sl in ((m.P, (slice(None), slot)), (m.lam, (slot,)), (m.Q, (slot,))):
                for key in ("exp_avg", "exp_avg_sq"):
                    t = opt.optim.state[p][key][sl]
                    touched.append(float(t.abs().max()))
                    checked += 1
    with open(os.path.join(out_dir, "zero.json"), "w") as f:
        json.dump({"touched": touched, "checked": checked}, f)


def test_zero_redundancy_optimizer_moments_of_touched_slots_are_reset(tmp_path):
    import json

    run_workers(_zero_body, tmp_path, 1)
    res = json.loads((tmp_path / "zero.json").read_text())
    assert res["checked"] >= 12 and max(res["touched"]) == 0.0, res
