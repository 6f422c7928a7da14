"""Exact resume under DDP: two CPU processes (gloo) with adapter dropout, whose masks come from each
rank's own torch RNG. 8 steps straight must equal 4 steps, ``save_checkpoint(distributed=True)``,
a load into fresh objects on every rank, and 4 more; a checkpoint holding only rank 0's RNG
(``distributed=False``, the old way) must not."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from _ddp import run_workers

WORLD = 2
STEPS, HALF = 8, 4


def _build():
    import flexlora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    cfg = flexlora.FlexLoRAConfig(r_init=3, r_max=4, alpha=4.0, dropout=0.3, target_modules=["0", "2"],
                                  total_steps=STEPS, t_warmup=2, t_final=2, delta_t=2, b0=1)
    flexlora.wrap(model, cfg)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=3e-2)
    return model, ddp, opt, flexlora.RankAllocator(ddp, cfg)


def _train(ddp, opt, alloc, rank, start, stop):
    for step in range(start + 1, stop + 1):
        g = torch.Generator().manual_seed(100 * rank + step)  # the data: not from the global RNG
        x = torch.randn(16, 6, generator=g)
        loss = ((ddp(x) - torch.sin(x[:, :3])) ** 2).mean() + alloc.orthogonal_loss()
        loss.backward()
        opt.step()
        alloc.step(step, opt)
        opt.zero_grad()


def _flat(model):
    import flexlora

    return torch.cat([t.detach().flatten().float() for _, m in flexlora.flex_modules(model) for t in (m.P, m.lam, m.Q, m.mask)])


def _body(rank, out_dir):
    import flexlora

    res = {}
    torch.manual_seed(1234 + rank)  # each rank's own random streams
    model, ddp, opt, alloc = _build()
    torch.manual_seed(1234 + rank)
    _train(ddp, opt, alloc, rank, 0, STEPS)
    res["straight"] = _flat(model)
    for mode in ("distributed", "rank0-only"):
        ckpt = os.path.join(out_dir, mode)
        model, ddp, opt, alloc = _build()
        torch.manual_seed(1234 + rank)
        _train(ddp, opt, alloc, rank, 0, HALF)
        if mode == "distributed":
            flexlora.save_checkpoint(ckpt, ddp, allocator=alloc, optimizer=opt, step=HALF, distributed=True)
        elif rank == 0:
            flexlora.save_checkpoint(ckpt, ddp, allocator=alloc, optimizer=opt, step=HALF)
        dist.barrier()
        torch.manual_seed(999)  # a fresh process's streams
        model, ddp, opt, alloc = _build()
        step = flexlora.load_checkpoint(ckpt, ddp, allocator=alloc, optimizer=opt)
        _train(ddp, opt, alloc, rank, step, STEPS)
        res[mode] = _flat(model)
    # rank 0 cannot write (the target is a file): every rank raises, none hangs
    bad = os.path.join(out_dir, "a-file")
    if rank == 0:
        open(bad, "w").close()
    dist.barrier()
    try:
        flexlora.save_checkpoint(bad, ddp, allocator=alloc, optimizer=opt, step=STEPS, distributed=True)
    except Exception as e:
        res["failed_save"] = f"{type(e).__name__}: {e}"

    class Unsaveable:  # fails while rank 0 builds the state, before anything is written
        def state_dict(self):
            raise RuntimeError("cannot serialize this scheduler")

    try:
        flexlora.save_checkpoint(os.path.join(out_dir, "never"), ddp, scheduler=Unsaveable(), step=STEPS,
                                 distributed=True)
    except Exception as e:
        res["failed_state"] = f"{type(e).__name__}: {e}"
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_resume")
    run_workers(_body, out, WORLD)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_distributed_checkpoint_resumes_every_rank_exactly(results):
    _, res = results
    for r in res:
        torch.testing.assert_close(r["distributed"], r["straight"], rtol=1e-6, atol=1e-7)


def test_rank0_only_checkpoint_does_not(results):
    # rank 1 continues with rank 0's dropout stream: the averaged gradients, and so every
    # rank's parameters, move away from the straight run
    _, res = results
    assert all((r["rank0-only"] - r["straight"]).abs().max() > 1e-4 for r in res)


def test_failed_distributed_save_raises_on_every_rank(results):
    _, res = results
    assert res[0]["failed_save"].startswith("NotADirectoryError") and "a-file" in res[0]["failed_save"]
    assert res[1]["failed_save"].startswith("RuntimeError: save_checkpoint to") and "failed on rank 0" in res[1]["failed_save"]
    assert "NotADirectoryError" in res[1]["failed_save"]
    # an error while rank 0 gathers the states reaches rank 1 too (it must not wait for a timeout)
    assert res[0]["failed_state"] == "RuntimeError: cannot serialize this scheduler"
    assert res[1]["failed_state"].endswith("failed on rank 0: RuntimeError: cannot serialize this scheduler")


def test_other_world_size_warns_and_takes_rank0_streams(results):
    import flexlora

    out, _ = results
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    flexlora.wrap(model, flexlora.FlexLoRAConfig(r_init=3, r_max=4, alpha=4.0, dropout=0.3, target_modules=["0", "2"],
                                                 total_steps=STEPS, t_warmup=2, t_final=2, delta_t=2, b0=1))
    state = torch.load(out / "distributed" / "training_state.pt", weights_only=True)
    assert len(state["rng_per_rank"]) == WORLD
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])
    with pytest.warns(UserWarning, match="RNG states of 2 ranks, this run has 1"):
        assert flexlora.load_checkpoint(out / "distributed", model) == HALF
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    assert torch.equal(state["rng"]["torch"], state["rng_per_rank"][0]["torch"])


def _zero_body(rank, out_dir):
    """The same resume with torch's ZeroRedundancyOptimizer: each rank holds part of the AdamW
    state, so the save gathers it (consolidate_state_dict, inside save_checkpoint(distributed=True))
    and each rank's load takes its part back."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import flexlora

    def build():
        model, ddp, _, alloc = _build()
        opt = ZeroRedundancyOptimizer([p for p in ddp.parameters() if p.requires_grad],
                                      optimizer_class=torch.optim.AdamW, lr=3e-2)
        return model, ddp, opt, alloc

    res = {}
    torch.manual_seed(1234 + rank)
    model, ddp, opt, alloc = build()
    torch.manual_seed(1234 + rank)
    _train(ddp, opt, alloc, rank, 0, STEPS)
    res["straight"] = _flat(model)
    ckpt = os.path.join(out_dir, "zero")
    model, ddp, opt, alloc = build()
    torch.manual_seed(1234 + rank)
    _train(ddp, opt, alloc, rank, 0, HALF)
    try:  # rank 0 alone cannot gather the shards: a clear error, before anything is written
        flexlora.save_checkpoint(os.path.join(out_dir, "alone"), ddp, allocator=alloc, optimizer=opt, step=HALF)
    except ValueError as e:
        res["alone"] = str(e)
    flexlora.save_checkpoint(ckpt, ddp, allocator=alloc, optimizer=opt, step=HALF, distributed=True)
    torch.manual_seed(999)
    model, ddp, opt, alloc = build()
    step = flexlora.load_checkpoint(ckpt, ddp, allocator=alloc, optimizer=opt)
    _train(ddp, opt, alloc, rank, step, STEPS)
    res["resumed"] = _flat(model)
    torch.save(res, os.path.join(out_dir, f"zero{rank}.pt"))


def test_a_zero_redundancy_optimizer_checkpoint_resumes_every_rank_exactly(tmp_path):
    run_workers(_zero_body, tmp_path, WORLD)
    for r in range(WORLD):
        res = torch.load(tmp_path / f"zero{r}.pt", weights_only=True)
        assert "distributed=True" in res["alone"], res.get("alone")
        assert torch.allclose(res["resumed"], res["straight"], rtol=1e-6, atol=1e-7), f"rank {r}"
    assert not (tmp_path / "alone").exists()
