"""RankAllocator: scripted prune/expand, ties, clamping, budget invariant, optimizer surgery,
zero impact, weight decay on inactive slots, orthogonality, history/CSV/heat map, resume, guard."""

import io
import math
import warnings

import pytest
import torch
import torch.nn as nn

import flexlora
from flexlora import FlexLinear, FlexLoRAConfig, RankAllocator
from flexlora.alloc.allocator import event_seed, plan_event

# Most tests drive events directly, without an optimizer; that warning has its own test.
pytestmark = pytest.mark.filterwarnings("ignore:RankAllocator.step. no optimizer was given")


def entropy64(lams):
    """Normalized spectral entropy from the math, float64 (independent of the code under test)."""
    e = [float(v) ** 2 for v in lams]
    r, tot = len(e), sum(e)
    if r < 2 or tot == 0:
        return 0.0
    return -sum((x / tot) * math.log(x / tot + 1e-12) for x in e) / math.log(r)


class Bank(nn.Module):
    """n FlexLinear modules side by side (each may have its own r_max)."""

    def __init__(self, r_maxes, r_init, in_f=5, out_f=7, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(
            FlexLinear(in_f, out_f, r_max=r, r_init=min(r_init, r), alpha=4.0) for r in r_maxes
        )

    def forward(self, x):
        return sum(layer(x) for layer in self.layers)


def config(**kw):
    base = dict(r_init=3, r_max=6, target_modules=["x"], total_steps=100, t_warmup=10, t_final=20,
                delta_t=5, b0=2, r_min=1, orth_reg=0.0)
    base.update(kw)
    return FlexLoRAConfig(**base)


def script(bank, spec):
    """spec: per module {slot: λ} of its ACTIVE slots; every other slot becomes inactive."""
    with torch.no_grad():
        for m, slots in zip(bank.layers, spec):
            m.mask.zero_()
            m.lam.zero_()
            for j, v in slots.items():
                m.mask[j] = True
                m.lam[j] = v


def masks(bank):
    return [sorted(torch.nonzero(m.mask).flatten().tolist()) for m in bank.layers]


SPEC = [
    {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0},            # m0: uniform -> 1.0, rank 4 < 6: expands first
    {0: 2.0, 1: 1.0, 2: 1.0},                    # m1: 0.79, expands second
    {j: 1.0 for j in range(6)},                  # m2: uniform but full (rank 6 = r_max): never expands
    {1: 5.0, 3: 0.1},                            # m3: ~0.003, lowest prunable -> loses slot 3
    {2: 0.7},                                    # m4: rank 1 = r_min: never pruned despite score 0
    {0: 3.0, 1: 0.2, 2: 0.05, 3: 0.2, 4: 1.0},   # m5: ~0.28, second lowest prunable -> loses slot 2
]


def test_scripted_prune_expand():
    bank = Bank([6] * 6, r_init=3)
    script(bank, SPEC)
    al = RankAllocator(bank, config())
    # The order the expected flips rely on, from the float64 reference:
    ref = [entropy64(s.values()) for s in SPEC]
    assert ref[3] < ref[5] < ref[1] < ref[0] and ref[4] == 0.0
    got = [r["score"] for r in al.history if r["step"] == 0]
    assert got == pytest.approx(ref, abs=1e-5)

    ev = al._event(10, 2)
    assert ev.pruned == [("layers.3", 3), ("layers.5", 2)]
    assert ev.expanded == [("layers.0", 4), ("layers.1", 3)]
    assert masks(bank) == [[0, 1, 2, 3, 4], [0, 1, 2, 3], list(range(6)), [1], [2], [0, 1, 3, 4]]
    assert ev.total_rank == al.total_rank == 4 + 3 + 6 + 2 + 1 + 5
    # Pruned slots are zeroed; expanded slots start with λ = 0 and a fresh non-zero P column / Q row.
    m3, m0 = bank.layers[3], bank.layers[0]
    assert m3.lam[3] == 0 and not m3.P[:, 3].any() and not m3.Q[3].any()
    assert m0.lam[4] == 0 and m0.P[:, 4].abs().min() > 0 and m0.Q[4].abs().min() > 0


def test_ties_go_by_module_order_and_lowest_slot():
    bank = Bank([4] * 4, r_init=2)
    same = {0: 1.0, 1: 0.5, 2: 0.5}  # equal |λ| in slots 1, 2: slot 1 goes
    script(bank, [same, same, same, same])
    al = RankAllocator(bank, config(r_max=4))
    ev = al._event(10, 1)
    assert ev.pruned == [("layers.0", 1)]
    assert ev.expanded == [("layers.1", 3)]  # layers.0 is taken by the prune side (disjoint)
    assert masks(bank) == [[0, 2], [0, 1, 2, 3], [0, 1, 2], [0, 1, 2]]


def test_plan_event_rules():
    # Clamping: only one module is above r_min, so only one pair moves even with b = 3.
    assert plan_event([0.1, 0.2, 0.3, 0.9], [1, 1, 3, 1], [4] * 4, 1, 3) == ([2], [3])
    # Expand side clamps too: every module but the pruned one is full.
    assert plan_event([0.1, 0.2, 0.3], [2, 4, 4], [4, 4, 4], 1, 2) == ([], [])
    assert plan_event([0.1, 0.2, 0.3], [3, 4, 2], [4, 4, 4], 1, 2) == ([0], [2])
    # Ties: stable, lower index first on both sides.
    assert plan_event([0.5, 0.5, 0.5, 0.5], [2] * 4, [4] * 4, 1, 1) == ([0], [1])
    # Modes.
    assert plan_event([0.1, 0.2, 0.3], [2, 2, 2], [4] * 3, 1, 2, "prune_only") == ([0, 1], [])
    assert plan_event([0.1, 0.2, 0.3], [2, 2, 2], [4] * 3, 1, 2, "expand_only") == ([], [2, 1])
    assert plan_event([0.1, 0.2], [2, 2], [4, 4], 1, 0) == ([], [])
    with pytest.raises(ValueError, match="mode must be"):
        plan_event([0.1], [2], [4], 1, 1, "both")


def _plan_brute_force(scores, ranks, r_max, r_min, b):
    """The rule written out: the largest k <= b for which the k lowest-scoring prunable modules
    and the k highest-scoring expandable modules outside them exist (ties: lower index first)."""
    n = len(scores)
    low = sorted((i for i in range(n) if ranks[i] > r_min), key=lambda i: (scores[i], i))
    for k in range(min(b, len(low)), 0, -1):
        high = sorted((i for i in range(n) if ranks[i] < r_max[i] and i not in low[:k]), key=lambda i: (-scores[i], i))
        if len(high) >= k:
            return low[:k], high[:k]
    return [], []


def test_plan_event_budget_beyond_half_the_modules_moves_the_most_it_can():
    # 4 modules, all movable both ways: b = 1 moves one pair, any b >= 2 moves two (it used to
    # move fewer as b grew: 1 pair at b = 3, none at b >= 4)
    for b, k in [(1, 1), (2, 2), (3, 2), (4, 2), (5, 2), (100, 2)]:
        pruned, expanded = plan_event([0.1, 0.2, 0.3, 0.4], [2] * 4, [4] * 4, 1, b)
        assert pruned == [0, 1][:k] and expanded == [3, 2][:k], (b, pruned, expanded)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3000):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        r_max = torch.randint(1, 5, (n,), generator=gen).tolist()
        ranks = [int(torch.randint(0, r + 1, (1,), generator=gen)) for r in r_max]
        scores = (torch.randint(0, 4, (n,), generator=gen) / 4).tolist()  # ties on purpose
        r_min, b = int(torch.randint(0, 2, (1,), generator=gen)), int(torch.randint(0, 10, (1,), generator=gen))
        got = plan_event(scores, ranks, r_max, r_min, b)
        assert got == _plan_brute_force(scores, ranks, r_max, r_min, b), (scores, ranks, r_max, r_min, b, got)


def test_allocator_with_a_large_b0_still_moves_rank():
    # b0 = 4 on a 4-module model: two pairs move at the first event (none moved before the fix)
    bank = Bank([4] * 4, r_init=2)
    with torch.no_grad():
        for k, m in enumerate(bank.layers):
            m.lam[:2] = torch.tensor([1.0, 0.1 + 0.3 * k])  # entropies increase with k
    al = RankAllocator(bank, config(r_max=4, b0=4))
    ev = al._event(10, 4)
    assert [name for name, _ in ev.pruned] == ["layers.0", "layers.1"]
    assert [name for name, _ in ev.expanded] == ["layers.3", "layers.2"]
    assert [int(m.mask.sum()) for m in bank.layers] == [1, 1, 3, 3]


def test_a_diverged_rank_1_module_is_reported_not_pruned():
    bank = Bank([4] * 3, r_init=1)
    with torch.no_grad():
        for m in bank.layers:
            m.lam[0] = 1.0
    al = RankAllocator(bank, config(r_max=4, r_min=0))
    with torch.no_grad():
        bank.layers[1].lam[0] = float("nan")  # its score was 0.0 (rank 1), lowest: it was pruned
    with pytest.raises(FloatingPointError, match="layers.1"):
        al._event(10, 1)
    assert [int(m.mask.sum()) for m in bank.layers] == [1, 1, 1]  # nothing acted on


@pytest.mark.parametrize("mode,delta", [("prune_only", -1), ("expand_only", +1)], ids=["prune_only", "expand_only"])
def test_ablation_modes_change_the_budget_by_design(mode, delta):
    bank = Bank([6] * 4, r_init=3)
    al = RankAllocator(bank, config(allocation_mode=mode))
    ev = al._event(10, 2)
    assert al.total_rank == 12 + 2 * delta == sum(len(m) for m in masks(bank))
    assert (len(ev.pruned), len(ev.expanded)) == ((2, 0) if delta < 0 else (0, 2))


def test_budget_invariant_over_1000_random_events():
    r_maxes = [2, 3, 4, 5, 6, 6, 4, 3, 8, 5, 2, 7]
    bank = Bank(r_maxes, r_init=2, in_f=3, out_f=4)
    al = RankAllocator(bank, config(r_min=1, r_max=8, r_init=2))
    budget = al.total_rank
    g = torch.Generator().manual_seed(1)
    moved = 0
    for k in range(1000):
        with torch.no_grad():
            for m in bank.layers:
                lam = torch.randn(m.r_max, generator=g)
                lam[torch.rand(m.r_max, generator=g) < 0.2] = 0.0  # some exact zeros and ties
                m.lam.copy_(lam * m.mask)
        b = int(torch.randint(0, 6, (1,), generator=g))
        ev = al._event(10 + k, b)
        ranks = [len(s) for s in masks(bank)]
        assert sum(ranks) == budget == al.total_rank == ev.total_rank, f"event {k}"
        assert all(1 <= r <= rm for r, rm in zip(ranks, r_maxes)), f"event {k}: {ranks}"
        assert len(ev.pruned) == len(ev.expanded) <= b
        assert not {n for n, _ in ev.pruned} & {n for n, _ in ev.expanded}
        moved += len(ev.pruned)
    assert moved > 500
    for m in bank.layers:  # inactive slots hold exact zeros
        off = ~m.mask
        assert not m.P[:, off].any() and not m.lam[off].any() and not m.Q[off].any()


ADAMW_IMPLS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def _trained_bank(steps=5, wd=0.1, expand_init="zero_impact", mode="prune_expand", impl="for-loop"):
    bank = Bank([6] * 4, r_init=3, seed=3)
    al = RankAllocator(bank, config(expand_init=expand_init, allocation_mode=mode))
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-2, weight_decay=wd, **ADAMW_IMPLS[impl])
    g = torch.Generator().manual_seed(0)
    for t in range(1, steps + 1):
        x = torch.randn(16, 5, generator=g)
        (bank(x) ** 2).mean().backward()
        opt.step()
        al.step(t, opt)
        opt.zero_grad()
    return bank, al, opt


@pytest.mark.parametrize("impl", list(ADAMW_IMPLS))
def test_optimizer_state_surgery_is_exact(impl):
    bank, al, opt = _trained_bank(impl=impl)
    before = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in bank.parameters() if p in opt.state}
    ptrs = [(m.P.data_ptr(), m.lam.data_ptr(), m.Q.data_ptr(), m.mask.data_ptr()) for m in bank.layers]
    ev = al._event(10, 2)
    assert ev.pruned and ev.expanded
    assert ptrs == [(m.P.data_ptr(), m.lam.data_ptr(), m.Q.data_ptr(), m.mask.data_ptr()) for m in bank.layers]
    touched = {}
    for name, j in ev.pruned + ev.expanded:
        touched.setdefault(int(name.split(".")[1]), set()).add(j)
    for i, m in enumerate(bank.layers):
        slots = sorted(touched.get(i, ()))
        for p, index in ((m.P, lambda s: (slice(None), s)), (m.lam, lambda s: s), (m.Q, lambda s: (s, slice(None)))):
            st, old = opt.state[p], before[id(p)]
            assert torch.equal(st["step"], old["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                expect = old[key].clone()
                for s in slots:
                    expect[index(s)] = 0
                assert torch.equal(st[key], expect), f"layer {i} {key} slots {slots}"
    # The pruned slot had non-zero moments before (else this test could not fail).
    pruned_layer, pruned_slot = int(ev.pruned[0][0].split(".")[1]), ev.pruned[0][1]
    m = bank.layers[pruned_layer]
    assert before[id(m.P)]["exp_avg"][:, pruned_slot].abs().sum() > 0
    assert before[id(m.lam)]["exp_avg_sq"][pruned_slot] > 0


@pytest.mark.parametrize("impl", list(ADAMW_IMPLS))
def test_inactive_slots_do_not_move_under_adamw_weight_decay(impl):
    bank, al, opt = _trained_bank(steps=3, wd=0.5, impl=impl)
    al._event(10, 2)  # pruned slots now inactive too
    snap = [(m.mask.clone(), m.P.detach().clone(), m.lam.detach().clone(), m.Q.detach().clone()) for m in bank.layers]
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        x = torch.randn(16, 5, generator=g)
        (bank(x) ** 2).mean().backward()
        for m in bank.layers:  # the op gives exactly zero gradient to inactive slots
            off = ~m.mask
            assert not m.P.grad[:, off].any() and not m.lam.grad[off].any() and not m.Q.grad[off].any()
        opt.step()
        opt.zero_grad()
    for m, (mask, P, lam, Q) in zip(bank.layers, snap):
        off = ~mask
        assert torch.equal(m.P[:, off], P[:, off]) and torch.equal(m.lam[off], lam[off]) and torch.equal(m.Q[off], Q[off])
        assert not torch.equal(m.P[:, mask], P[:, mask])  # active slots did train


@pytest.mark.parametrize("init", ["zero_impact", "zero", "orthogonal"])
def test_expansion_has_zero_impact(init):
    # expand_only: a prune removes a trained direction, which does move the output (by design).
    bank, al, opt = _trained_bank(expand_init=init, mode="expand_only")
    x = torch.randn(9, 5)
    with torch.no_grad():
        y0 = bank(x)
    ev = al._event(10, 2)
    assert ev.expanded
    with torch.no_grad():
        y1 = bank(x)
    assert torch.equal(y0, y1)
    if init == "orthogonal":
        for name, j in ev.expanded:
            m = bank.layers[int(name.split(".")[1])]
            others = m.mask.clone()
            others[j] = False
            p, q = m.P[:, j].double(), m.Q[j].double()
            assert abs(p.norm().item() - 1) < 1e-6 and abs(q.norm().item() - 1) < 1e-6
            assert (m.P[:, others].double().t() @ p).abs().max() < 1e-5
            assert (m.Q[others].double() @ q).abs().max() < 1e-5
    if init == "zero":
        for name, j in ev.expanded:
            m = bank.layers[int(name.split(".")[1])]
            assert not m.P[:, j].any() and not m.Q[j].any() and m.lam[j] == 0 and m.mask[j]


@pytest.mark.parametrize("in_f,out_f", [(64, 64), (128, 96), (37, 200), (256, 256)], ids=lambda v: str(v))
def test_expansion_is_bit_identical_across_shapes_and_ranks(in_f, out_f):
    # BLAS picks its blocking by matrix shape: a forward whose GEMM widths follow the number of
    # active slots can move the last bit when a λ = 0 slot switches on (on this x86 box, ranks
    # 1, 3, 7, 11 -> +1 at these shapes did); zero impact means bit-identical, so it must not.
    torch.manual_seed(0)
    layers = nn.ModuleList(FlexLinear(in_f, out_f, r_max=16, r_init=r, alpha=8.0) for r in (1, 3, 7, 11, 15))
    with torch.no_grad():
        for m in layers:
            m.lam[: m.r_init] = torch.randn(m.r_init)
    holder = nn.Module()
    holder.layers = layers
    al = RankAllocator(holder, config(r_max=16, r_init=3, allocation_mode="expand_only", b0=5))
    x = torch.randn(17, in_f)
    with torch.no_grad():
        before = [m(x) for m in layers]
    ev = al._event(10, 5)
    assert len(ev.expanded) == 5
    with torch.no_grad():
        for m, y0 in zip(layers, before):
            y1 = m(x)
            assert torch.equal(y0, y1), f"r {m.r_init} -> {m.r_init + 1}: max diff {(y0 - y1).abs().max().item():.3g}"


def test_small_init_moves_the_output():
    bank, al, opt = _trained_bank(expand_init="small", mode="expand_only")
    x = torch.randn(9, 5)
    with torch.no_grad():
        y0 = bank(x)
    ev = al._event(10, 2)
    for name, j in ev.expanded:
        assert bank.layers[int(name.split(".")[1])].lam[j].item() == pytest.approx(0.02)
    with torch.no_grad():
        assert not torch.equal(y0, bank(x))


def test_new_directions_depend_only_on_seed_and_step():
    a, b = Bank([6] * 4, r_init=3), Bank([6] * 4, r_init=3)
    for bank in (a, b):
        script(bank, [{0: 1.0, 1: 1.0}, {0: 1.0, 1: 0.1}, {0: 1.0, 1: 1.0, 2: 1.0}, {0: 2.0, 1: 1.5}])
    ea = RankAllocator(a, config())._event(10, 1)
    eb = RankAllocator(b, config())._event(10, 1)
    assert ea.expanded == eb.expanded
    for ma, mb in zip(a.layers, b.layers):
        assert torch.equal(ma.P, mb.P) and torch.equal(ma.Q, mb.Q)
    name, j = ea.expanded[0]
    i = int(name.split(".")[1])
    g = torch.Generator().manual_seed(event_seed(0, 10))
    assert torch.equal(a.layers[i].P[:, j], torch.randn(7, generator=g) * 0.02)
    assert event_seed(0, 10) != event_seed(0, 15) and event_seed(0, 10) != event_seed(1, 10)


def test_orthogonal_loss_and_grad_add_agree():
    bank = Bank([6] * 3, r_init=4, seed=7)
    al = RankAllocator(bank, config(orth_reg=0.3))
    x = torch.randn(8, 5)
    (bank(x).sum() + al.orthogonal_loss()).backward()
    g_loss = [p.grad.clone() for p in bank.parameters() if p.grad is not None]
    bank.zero_grad()
    bank(x).sum().backward()
    al.add_orthogonal_grad_()
    g_add = [p.grad.clone() for p in bank.parameters() if p.grad is not None]
    assert len(g_loss) == len(g_add) > 0
    for a, b in zip(g_loss, g_add):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert al.orthogonal_loss().item() > 0
    al0 = RankAllocator(bank, config(orth_reg=0.0))
    assert al0.orthogonal_loss().item() == 0.0


def test_step_schedule_history_csv_and_heatmap(tmp_path):
    bank, al, opt = _trained_bank(steps=30)
    events = [r["step"] for r in al.history]
    assert sorted(set(events)) == [0, 10, 15, 20, 25, 30]
    assert all(events.count(s) == 4 for s in set(events))
    assert al.num_events == 5
    last = [r for r in al.history if r["step"] == 30]
    assert [r["rank"] for r in last] == [len(m) for m in masks(bank)]
    assert al.step(30, opt) is None  # repeated step ignored
    assert al.step(31, opt) is None  # not an event step

    path = al.history_csv(tmp_path / "h.csv")
    lines = open(path).read().splitlines()
    assert lines[0] == "step,module,rank,score"
    assert len(lines) == 1 + len(al.history)
    first = al.history[0]
    assert lines[1] == f"0,layers.0,3,{first['score']!r}"
    assert flexlora.alloc.read_history_csv(path) == al.history

    png = flexlora.plot_rank_heatmap(al.history, tmp_path / "ranks.png")
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert flexlora.plot_rank_heatmap(path, tmp_path / "from_csv.png")  # from the CSV too
    with pytest.raises(ValueError, match="history is empty"):
        flexlora.plot_rank_heatmap([], tmp_path / "x.png")


def _run(bank, al, opt, steps, g):
    for t in steps:
        x = torch.randn(16, 5, generator=g)
        ((bank(x) - 1) ** 2).mean().backward()
        opt.step()
        al.step(t, opt)
        opt.zero_grad()


@pytest.mark.parametrize("importance", ["entropy", "sensitivity"])
def test_state_dict_exact_resume(importance):
    cfg = config(importance=importance, b0=2, delta_t=3, t_warmup=3)
    g = torch.Generator().manual_seed(0)
    a = Bank([6] * 4, r_init=3, seed=11)
    al_a = RankAllocator(a, cfg)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    _run(a, al_a, opt_a, range(1, 13), g)

    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict(), "alloc": al_a.state_dict()}, buf)
    g_state = g.get_state()
    _run(a, al_a, opt_a, range(13, 31), g)

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    b = Bank([6] * 4, r_init=3, seed=99)
    b.load_state_dict(ck["model"])
    al_b = RankAllocator(b, cfg)
    al_b.load_state_dict(ck["alloc"])
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b.load_state_dict(ck["opt"])
    g.set_state(g_state)
    _run(b, al_b, opt_b, range(13, 31), g)

    assert al_a.history == al_b.history
    assert al_a.num_events == al_b.num_events >= 8
    assert any(r["rank"] != 3 for r in al_a.history)
    for ma, mb in zip(a.layers, b.layers):
        for name in ("P", "lam", "Q", "mask"):
            assert torch.equal(getattr(ma, name), getattr(mb, name)), name


def test_load_state_dict_rejects_other_models():
    al = RankAllocator(Bank([6] * 3, r_init=3), config())
    other = RankAllocator(Bank([6] * 2, r_init=3), config())
    with pytest.raises(ValueError, match="saved for other modules"):
        other.load_state_dict(al.state_dict())
    with pytest.raises(ValueError, match="config.seed"):
        RankAllocator(Bank([6] * 3, r_init=3), config(seed=5)).load_state_dict(al.state_dict())
    with pytest.raises(ValueError, match="format"):
        al.load_state_dict({"step": 3})


def test_warns_once_when_step_is_never_called():
    bank = Bank([6] * 2, r_init=3)
    al = RankAllocator(bank, config(t_warmup=4, delta_t=3))  # limit: 4 + 2·3 = 10 steps
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-3)
    x = torch.randn(4, 5)

    def train(n):
        for _ in range(n):
            bank(x).sum().backward()
            opt.step()
            opt.zero_grad()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(10)  # at the limit: not yet
    with pytest.warns(RuntimeWarning, match=r"RankAllocator.step\(\) was never called.*FlexLoRACallback"):
        train(1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        train(20)
    assert [w for w in rec if "never called" in str(w.message)] == []
    assert al.state_dict()["warned"]["never_stepped"] is True


def test_no_warning_when_stepped_or_for_other_optimizers():
    bank = Bank([6] * 2, r_init=3)
    al = RankAllocator(bank, config(t_warmup=2, delta_t=2))
    other = nn.Linear(3, 3)
    opt_other = torch.optim.SGD(other.parameters(), lr=0.1)
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-3)
    x = torch.randn(4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(1, 30):
            other(torch.randn(2, 3)).sum().backward()
            opt_other.step()  # an optimizer without the adapters never counts
            bank(x).sum().backward()
            opt.step()
            al.step(t, opt)
            opt.zero_grad()


def test_warns_once_when_an_event_has_no_optimizer():
    al = RankAllocator(Bank([6] * 3, r_init=3), config())
    with pytest.warns(UserWarning, match="no optimizer was given"):
        al._event(10, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        al._event(15, 1)


def test_bad_input():
    with pytest.raises(ValueError, match="no FlexLinear"):
        RankAllocator(nn.Linear(3, 3), config())
    with pytest.raises(ValueError, match="flexlora_config"):
        RankAllocator(Bank([4], r_init=2))
    with pytest.raises(TypeError, match="FlexLoRAConfig"):
        RankAllocator(Bank([4], r_init=2), {"r_max": 4})
    al = RankAllocator(Bank([4], r_init=2), config())
    with pytest.raises(ValueError, match="global_step must be an int >= 0"):
        al.step(-1)
    with pytest.raises(TypeError, match="global_step must be an int"):
        al.step("ten")


def test_wrapped_model_and_config_from_wrap():
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    cfg = config(target_modules=["0", "2"])
    flexlora.wrap(model, cfg)
    al = RankAllocator(model)
    assert al.config is cfg and al.names == ["0", "2"] and al.total_rank == 6
    assert "RankAllocator(modules=2" in repr(al)


def _sensitivity_bank():
    torch.manual_seed(0)
    bank = nn.ModuleList([FlexLinear(5, 7, r_max=4, r_init=2, alpha=1.0) for _ in range(3)])
    with torch.no_grad():
        for m in bank:
            m.lam.normal_()
    cfg = FlexLoRAConfig(r_init=2, r_max=4, target_modules=["x"], importance="sensitivity", total_steps=20,
                         t_warmup=2, t_final=0, delta_t=2, b0=1)
    return bank, RankAllocator(bank, cfg)


def test_sensitivity_survives_a_step_that_gradscaler_skipped():
    # fp16-style overflow at step 1: GradScaler skips optimizer.step(), the allocator still runs;
    # its EMAs used to turn NaN, and the event at step 2 raised "training diverged"
    bank, al = _sensitivity_bank()
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for step in (1, 2):
        loss = sum(m(x).square().mean() for m in bank) * (1e6 if step == 1 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step == 1:
            assert not all(torch.isfinite(p.grad).all() for p in bank.parameters() if p.grad is not None)
        wg = [(p.detach().double() * p.grad.double()).abs() for m in bank for p in (m.P, m.lam, m.Q)]
        active = [m.mask.nonzero().flatten().tolist() for m in bank]
        event = al.step(step, opt)
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in bank.parameters()), "parameters stayed finite"
    assert event is not None and event.step == 2 and event.pruned and event.expanded
    assert (al.importance.steps, al.importance.skipped) == (1, 1)
    # one update from zero EMAs (float64): Ī = (1-β₁)·I, Ū = (1-β₂)·|I - Ī| = (1-β₂)·β₁·I, I = |w·g|
    b1, b2 = al.config.sensitivity_beta, al.config.uncertainty_beta
    scores = [r["score"] for r in al.history if r["step"] == 2]
    for k in range(3):
        sP, sl, sQ = ((1 - b1) * I * (1 - b2) * b1 * I for I in wg[3 * k: 3 * k + 3])
        ref = sum(float(sl[j] + sP[:, j].mean() + sQ[j].mean()) for j in active[k]) / len(active[k])
        assert abs(scores[k] - ref) <= 1e-6 * ref, f"module {k}: {scores[k]} != {ref}"


def test_a_repeated_step_does_not_update_importance_again():
    # step(s) twice fed the same gradients to sensitivity's EMAs twice (6 updates for 3 steps)
    bank, al = _sensitivity_bank()
    twin_bank, twin = _sensitivity_bank()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    for step in (1, 2, 3):
        for b in (bank, twin_bank):
            for p in b.parameters():
                p.grad = None
            sum(m(x).square().sum() for m in b).backward()
        assert al.step(step) == twin.step(step)
        assert al.step(step) is None  # repeated: ignored
    assert al.importance.steps == twin.importance.steps == 3
    for a, b in zip(al.importance.ipt + al.importance.unc, twin.importance.ipt + twin.importance.unc):
        assert torch.equal(a, b)


NO_ALLOCATION = {
    "only-event-has-b-0": (dict(total_steps=100, t_warmup=0, t_final=20, delta_t=80), r"b\(t\) rounds to 0"),
    "no-event-in-window": (dict(total_steps=100, t_warmup=0, t_final=20, delta_t=200), "no allocation event falls"),
    "b0-zero": (dict(b0=0), "b0=0"),
}


@pytest.mark.parametrize("case", list(NO_ALLOCATION))
@pytest.mark.parametrize("mode", ["prune_expand", "prune_only", "expand_only"])
def test_warns_when_the_config_allocates_nothing(case, mode):
    kw, why = NO_ALLOCATION[case]
    with pytest.warns(UserWarning, match=why) as rec:
        RankAllocator(Bank([6] * 2, r_init=3), config(allocation_mode=mode, **kw))
    msg = str(rec[0].message)
    for name in ("total_steps", "t_warmup", "t_final", "delta_t", "b0"):
        assert f"{name}=" in msg, f"{name} missing from {msg!r}"
    assert "fixed-rank LoRA" in msg


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(t_warmup=0, delta_t=5), dict(total_steps=100, t_warmup=0, t_final=20, delta_t=16, b0=4),
     dict(total_steps=2, t_warmup=1, t_final=0, delta_t=1, b0=1), dict(schedule="constant", t_warmup=0, delta_t=80)],
    ids=["default", "warmup-0", "b-rounds-to-1", "two-steps", "constant"],
)
def test_no_warning_when_some_event_moves_rank(kw):
    # b-rounds-to-1: the first event is at 16, p = 0.2, 4·0.8³ = 2.048 -> 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RankAllocator(Bank([6] * 2, r_init=3), config(**kw))


def test_a_zero_based_step_count_warns_once():
    bank = Bank([6, 6, 6], 3)
    alloc = RankAllocator(bank, config(t_warmup=1, delta_t=1))
    with pytest.warns(UserWarning, match=r"step\(0\) is ignored.*start=1"):
        assert alloc.step(0) is None
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*step\(0\)")
        alloc.step(0)  # once is enough
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no optimizer given: that warning is not under test)
        assert alloc.step(1) is not None  # the 1-based count works as before


RANKS_STUCK = {  # (r_maxes, r_init, config kw, words of the reason)
    "r_init-equals-r_max": ([6, 6, 6], 6, dict(), "no module can expand"),
    "r_init-0": ([6, 6, 6], 0, dict(r_init=0, r_min=0), "no module can be pruned"),
    "r_min-equals-r_init": ([6, 6, 6], 3, dict(r_min=3), "no module can be pruned"),
    "expand_only-full": ([6, 6], 6, dict(allocation_mode="expand_only"), "no module can expand"),
    "prune_only-at-r_min": ([6, 6], 1, dict(allocation_mode="prune_only", r_init=1), "no module can be pruned"),
    "one-module": ([6], 3, dict(), "the only module that could be pruned is the only one that could expand"),
}


@pytest.mark.parametrize("case", list(RANKS_STUCK))
def test_warns_when_the_ranks_leave_nothing_to_move(case):
    """The schedule allocates, but the ranks leave no move to make whatever the scores: the run
    would train as fixed-rank LoRA, so building the allocator says so; and indeed no event moves."""
    r_maxes, r_init, kw, why = RANKS_STUCK[case]
    bank = Bank(r_maxes, r_init=r_init)
    with pytest.warns(UserWarning, match="no rank can ever move") as rec:
        al = RankAllocator(bank, config(**{"r_init": min(r_init, 6), **kw}))
    assert why in str(rec[0].message) and "fixed-rank LoRA" in str(rec[0].message)
    before = masks(bank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moved = [al.step(s) for s in range(1, 101)]
    assert masks(bank) == before and all(not (e.pruned or e.expanded) for e in moved if e is not None)


@pytest.mark.parametrize(
    "r_init, kw",
    [(3, dict()), (6, dict(allocation_mode="prune_only")), (1, dict(allocation_mode="expand_only", r_init=1))],
    ids=["prune_expand", "prune_only-full", "expand_only-at-r_min"],
)
def test_no_stuck_warning_when_a_move_exists(r_init, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RankAllocator(Bank([6, 6, 6], r_init=r_init), config(**{"r_init": r_init, **kw}))


def _tiny_wrapped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    return flexlora.wrap(model, config(target_modules=["0", "2"], total_steps=20, t_warmup=1, t_final=0, delta_t=1))


def test_warns_when_the_optimizer_holds_no_adapter():
    """An optimizer built before wrap holds the old Linears' parameters only: the adapters would
    never train (while ranks still moved on scores of untrained adapters)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    early = torch.optim.AdamW(model.parameters(), lr=1e-2)
    flexlora.wrap(model, config(target_modules=["0", "2"], total_steps=20, t_warmup=1, t_final=0, delta_t=1))
    al = RankAllocator(model)
    with pytest.warns(UserWarning, match=r"optimizer \(AdamW\) holds none of the adapters' P, lam, Q.*after flexlora.wrap"):
        al.step(1, early)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        al.step(2, early)  # once per optimizer
        good = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        al.step(3, good)


def test_warns_when_the_adapters_are_frozen():
    model = _tiny_wrapped()
    al = RankAllocator(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for p in model.parameters():  # what wrapping by another library afterwards does
        p.requires_grad_(False)
    with pytest.warns(UserWarning, match="none of the adapters' P, lam, Q parameters requires grad"):
        al.step(1, opt)


def _train_steps(model, opt, al, steps, accumulate=1, per_micro=False, skip=()):
    """Optimizer steps over random data; allocator.step after each (or after each micro-step)."""
    g = torch.Generator().manual_seed(0)
    t = 0
    for s in range(1, steps + 1):
        for micro in range(accumulate):
            model(torch.randn(4, 6, generator=g)).square().mean().backward()
            if per_micro:
                t += 1
                if micro < accumulate - 1:
                    al.step(t, opt)
        if s not in skip:  # a GradScaler skips optimizer.step() on inf gradients
            opt.step()
        opt.zero_grad()
        al.step(t if per_micro else s, opt)


def test_warns_once_when_step_runs_per_micro_step():
    model = _tiny_wrapped()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    al = RankAllocator(model)
    with pytest.warns(UserWarning, match=r"advanced several times between optimizer steps.*once per optimizer step") as rec:
        _train_steps(model, opt, al, 15, accumulate=2, per_micro=True)
    assert sum("between optimizer steps" in str(w.message) for w in rec) == 1


@pytest.mark.parametrize("skip", [(), (1, 2, 3, 9), tuple(range(1, 11)), (3, 7, 11, 15)],
                         ids=["every-step", "scaler-skips", "ten-skips-at-start", "every-fourth-skipped"])
def test_no_pace_warning_when_stepped_once_per_optimizer_step(skip):
    """A GradScaler skipping optimizer steps (a burst while fp16's scale settles, or now and
    then) leaves step() called once per *attempted* step: no warning. Adopting the optimizer
    again (a resume) adds no second counter."""
    model = _tiny_wrapped()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    al = RankAllocator(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_steps(model, opt, al, 12, accumulate=2, skip=skip)
        for _ in range(3):
            al.load_state_dict(al.state_dict())
        al.step(13, opt)
        assert len(opt._optimizer_step_post_hooks) == 1


def test_warns_when_optimizer_state_is_not_per_element():
    """Adafactor keeps factored row/column statistics: the slot resets cannot reach them."""
    model = _tiny_wrapped()
    params = [p for p in model.parameters() if p.requires_grad]
    al = RankAllocator(model)
    opt = torch.optim.Adafactor(params, lr=1e-2)
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step()
    with pytest.warns(UserWarning, match=r"Adafactor\) keeps adapter state that is not per element \(col_var .*Adafactor's row/column"):
        al.step(1, opt)
    adam = torch.optim.AdamW(params, lr=1e-2)
    model(torch.randn(4, 6)).square().mean().backward()
    adam.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        al.step(2, adam)


def test_a_wrapper_of_a_non_torch_optimizer_neither_crashes_nor_warns():
    """accelerate's wrapper of a DeepSpeed optimizer is a torch Optimizer subclass that never ran
    Optimizer.__init__ (no hook lists) around an object holding flattened copies of the
    parameters: step() must work (it did before the pace check) and not claim the optimizer
    holds no adapter."""

    class FlatOptimizer:  # DeepSpeed-like: its own flattened fp32 partitions, stepped elsewhere
        def __init__(self, params):
            self.param_groups = [{"params": [torch.cat([p.detach().flatten() for p in params])]}]
            self.state = {}

        def step(self):
            pass

    class Wrapper(torch.optim.Optimizer):  # like accelerate.optimizer.AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        @property
        def state(self):
            return self.optimizer.state

        def step(self, closure=None):
            pass

    model = _tiny_wrapped()
    al = RankAllocator(model)
    opt = Wrapper(FlatOptimizer([p for p in model.parameters() if p.requires_grad]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s in range(1, 13):
            al.step(s, opt)
    assert al.num_events > 0


def test_warns_when_two_live_allocators_step_the_same_modules():
    model = _tiny_wrapped()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = RankAllocator(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first.step(1, opt)
        first.step(2, opt)
        second = RankAllocator(model)  # e.g. a notebook cell run again: the first one stops stepping
        warnings.filterwarnings("ignore", message=r"RankAllocator.step\(3\) after step\(0\): the event step")
        second.step(3, opt)  # (that it missed steps 1 and 2 is true, and warned)
        second.step(4, opt)
    with pytest.warns(UserWarning, match="another RankAllocator also steps these modules"):
        first.step(5, opt)  # both in use, in turn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first.step(6, opt)  # once


@pytest.mark.parametrize(
    "make, key, start",
    [
        (lambda ps: torch.optim.Adagrad(ps, lr=0.05, initial_accumulator_value=0.1), "sum", 0.1),
        # torch starts every sum at the constructor's value, a group's own value notwithstanding
        (lambda ps: torch.optim.Adagrad([{"params": ps, "initial_accumulator_value": 0.3}], lr=0.05,
                                        initial_accumulator_value=0.1), "sum", 0.1),
        (lambda ps: torch.optim.Rprop(ps, lr=0.01), "step_size", 0.01),
        (lambda ps: torch.optim.Adam(ps, lr=0.01), "exp_avg_sq", 0.0),
    ],
    ids=["adagrad", "adagrad-group-value", "rprop", "adam"],
)
def test_reset_slots_get_a_fresh_optimizers_state(make, key, start):
    # Reset to 0, an Adagrad sum (start initial_accumulator_value) made the new slot's first update
    # ~lr·sign(g), and a Rprop step size was clamped to step_size_min: the slot barely learnt.
    bank = Bank([6] * 4, r_init=3, seed=3)
    al = RankAllocator(bank, config())
    opt = make(list(bank.parameters()))
    if key == "sum":  # the start is what torch itself gives a fresh optimizer's state
        assert (opt.state[bank.layers[0].P]["sum"] == start).all()
    g = torch.Generator().manual_seed(0)
    for t in range(1, 4):
        (bank(torch.randn(16, 5, generator=g)) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    al.step(3, opt)  # first sight of the optimizer: inactive slots (3, 4, 5) reset
    for m in bank.layers:
        for p, sel in ((m.P, lambda t: t[:, 3:]), (m.lam, lambda t: t[3:]), (m.Q, lambda t: t[3:])):
            assert (sel(opt.state[p][key]) == start).all()
    before = {id(p): opt.state[p][key].clone() for p in bank.parameters() if p in opt.state}
    ev = al._event(10, 2)
    assert ev.pruned and ev.expanded
    for name, j in ev.pruned + ev.expanded:
        m = bank.layers[int(name.split(".")[1])]
        assert (opt.state[m.P][key][:, j] == start).all() and opt.state[m.lam][key][j] == start
        assert (opt.state[m.Q][key][j] == start).all()
        # and the slot did hold a trained value before (else the test could not fail)
        if name == ev.pruned[0][0] and j == ev.pruned[0][1]:
            assert not (before[id(m.lam)][j] == start)
    touched = {(int(n.split(".")[1]), j) for n, j in ev.pruned + ev.expanded}
    for i, m in enumerate(bank.layers):  # every other slot untouched
        keep = [j for j in range(6) if (i, j) not in touched]
        assert torch.equal(opt.state[m.lam][key][keep], before[id(m.lam)][keep])


def test_sensitivity_state_of_other_shapes_is_refused_before_anything_loads():
    # Saved with r_max 6, loaded with r_max 8: the load succeeded and the next step() failed with
    # "the modules differ", after the allocator's step count and history had been replaced.
    src = Bank([6] * 2, r_init=3, seed=1)
    al = RankAllocator(src, config(importance="sensitivity"))
    (src(torch.randn(4, 5)) ** 2).sum().backward()
    al.step(1)
    state = al.state_dict()
    dst = RankAllocator(Bank([8] * 2, r_init=3, seed=1), config(importance="sensitivity"))
    dst.step(1)
    hist = list(dst.history)
    with pytest.raises(ValueError, match=r"importance.*state tensor 0 has shape \(7, 6\), expected \(7, 8\)"):
        dst.load_state_dict(state)
    assert dst.history == hist and dst.importance.steps == 0
    with pytest.raises(ValueError, match=r"the state lacks \['modules'\]"):
        dst.load_state_dict({k: v for k, v in state.items() if k != "modules"})


@pytest.mark.parametrize("importance", ["energy_entropy_matrix", "exact_entropy", "entropy"])
def test_scores_inside_autocast_equal_those_outside(importance):
    bank = Bank([6] * 3, r_init=4, seed=2)
    with torch.no_grad():
        for m in bank.layers:
            m.lam.normal_()
    al = RankAllocator(bank, config(importance=importance))
    outside = al._score_bank()[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = al._score_bank()[0]
    assert inside == outside


def test_sensitivity_statistics_of_touched_slots_start_from_zero():
    bank = Bank([6] * 4, r_init=3, seed=4)
    al = RankAllocator(bank, config(importance="sensitivity"))
    opt = torch.optim.SGD(bank.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    for t in range(1, 6):
        (bank(torch.randn(16, 5, generator=g)) ** 2).mean().backward()
        opt.step()
        al.step(t, opt)
        opt.zero_grad()
    imp = al.importance
    before = [(a.clone(), u.clone()) for a, u in zip(imp.ipt, imp.unc)]
    ev = al._event(10, 2)
    assert ev.pruned and ev.expanded
    touched = {(int(n.split(".")[1]), j) for n, j in ev.pruned + ev.expanded}
    i0, j0 = int(ev.pruned[0][0].split(".")[1]), ev.pruned[0][1]
    assert before[3 * i0][0][:, j0].sum() > 0  # the pruned slot held statistics (else this could not fail)
    for i in range(4):
        for k, sel in ((0, lambda t, j: t[:, j]), (1, lambda t, j: t[j]), (2, lambda t, j: t[j])):
            for j in range(6):
                for stats, old in ((imp.ipt, before[3 * i + k][0]), (imp.unc, before[3 * i + k][1])):
                    if (i, j) in touched:
                        assert not sel(stats[3 * i + k], j).any()
                    else:
                        assert torch.equal(sel(stats[3 * i + k], j), sel(old, j))


def _looped(bank, al, opt, steps, gen, zero_grad_first=False):
    for t in steps:
        (bank(torch.randn(16, 5, generator=gen)) ** 2).mean().backward()
        opt.step()
        if zero_grad_first:
            opt.zero_grad()
            al.step(t, opt)
        else:
            al.step(t, opt)
            opt.zero_grad()


def test_a_step_count_that_restarts_warns_once():
    # enumerate(loader, start=1) inside an epoch loop: epochs 2+ were ignored without a word
    bank = Bank([6] * 4, r_init=3, seed=3)
    al = RankAllocator(bank, config(t_warmup=2, delta_t=2, total_steps=30, t_final=2))
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    _looped(bank, al, opt, range(1, 11), g)
    events = al.num_events
    with pytest.warns(UserWarning, match=r"step\(1\) after step\(10\) is ignored, and so is every step up to 10.*not restarted per epoch"):
        _looped(bank, al, opt, range(1, 11), g)
    assert al.num_events == events
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        al.step(10, opt)  # a repeated step: ignored quietly, as before
        _looped(bank, al, opt, range(1, 3), g)  # warned once only


def test_skipped_event_steps_warn_once():
    # step() every other optimizer step (or a micro-step count): events at odd steps never ran
    bank = Bank([6] * 4, r_init=3, seed=3)
    al = RankAllocator(bank, config(t_warmup=3, delta_t=2, total_steps=40, t_final=2))  # events 3, 5, 7, ...
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    _looped(bank, al, opt, [2], g)  # from 0 to 2: steps 1 and 2 hold no event, so no warning
    with pytest.warns(UserWarning, match=r"step\(4\) after step\(2\): the event step\(s\) \[3\] in between were never"):
        _looped(bank, al, opt, [4], g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _looped(bank, al, opt, [6, 8, 10], g)  # once
    assert al.num_events == 0


def test_a_gap_without_event_steps_does_not_warn():
    bank = Bank([6] * 4, r_init=3, seed=3)
    al = RankAllocator(bank, config(t_warmup=3, delta_t=4, total_steps=40, t_final=2))  # events 3, 7, 11
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _looped(bank, al, opt, [1, 2, 3, 5, 7], g)  # 4 and 6 skipped: neither is an event step
    assert al.num_events == 2


def test_sensitivity_without_gradients_warns_at_the_event():
    # zero_grad() before step(): every update found .grad None, all scores 0, and events moved
    # rank by module order (flip-flopping the same slots), without a word
    bank = Bank([6] * 4, r_init=3, seed=3)
    al = RankAllocator(bank, config(importance="sensitivity", t_warmup=2, delta_t=2, total_steps=30, t_final=2))
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match=r"importance 'sensitivity' received no gradients since the allocator was built"):
        _looped(bank, al, opt, [1, 2], g, zero_grad_first=True)
    assert al.importance.steps == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _looped(bank, al, opt, [3, 4], g, zero_grad_first=True)  # once


def test_sensitivity_fed_in_the_right_order_does_not_warn():
    bank = Bank([6] * 4, r_init=3, seed=3)
    al = RankAllocator(bank, config(importance="sensitivity", t_warmup=2, delta_t=2, total_steps=30, t_final=2))
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _looped(bank, al, opt, range(1, 11), g)
    assert al.num_events == 5 and al.importance.steps == 10


@pytest.mark.parametrize("jump_to, listed", [(8, r"\[2, 4, 6\] in between"), (10, r"\[2, 4, 6\] \.\.\. in between")])
def test_the_missed_event_list_says_when_there_are_more(jump_to, listed):
    al = RankAllocator(Bank([6] * 4, r_init=3, seed=3), config(t_warmup=2, delta_t=2, total_steps=30, t_final=2))
    with pytest.warns(UserWarning, match=listed):
        al.step(jump_to)


def test_total_rank_follows_masks_loaded_without_the_allocator():
    # load_adapter without allocator=, or model.load_state_dict: total_rank kept the old sum until
    # the next event
    src = Bank([6] * 3, r_init=3, seed=1)
    with torch.no_grad():
        src.layers[0].mask[1:] = False  # ranks 1, 3, 3
    dst = Bank([6] * 3, r_init=3, seed=2)
    al = RankAllocator(dst, config())
    assert al.total_rank == 9
    dst.load_state_dict(src.state_dict())
    assert al.total_rank == 7 == sum(al.ranks().values())
    dst.load_state_dict(Bank([6] * 3, r_init=2, seed=3).state_dict())
    assert al.state_dict()["total_rank"] == 6 and "total_rank=6" in repr(al)  # not read first


def test_new_directions_are_drawn_in_module_order_not_score_order():
    # two modules expand, the higher-scoring one later in module order: each module's draws must
    # not depend on how the scores ranked it (the draws run in module order)
    bank = Bank([6] * 4, r_init=3)
    script(bank, [{0: 2.0, 1: 1.0}, {0: 1.0, 1: 1.0}, {0: 5.0, 1: 0.1}, {0: 3.0, 1: 0.05, 2: 1.0}])
    ref = [entropy64(s) for s in ([2.0, 1.0], [1.0, 1.0], [5.0, 0.1], [3.0, 0.05, 1.0])]
    assert ref[1] > ref[0] > ref[3] > ref[2]
    ev = RankAllocator(bank, config())._event(10, 2)
    assert ev.expanded == [("layers.1", 2), ("layers.0", 2)]  # score order: layers.1 first
    g = torch.Generator().manual_seed(event_seed(0, 10))
    for i in (0, 1):  # drawn in module order: P column, then Q row, of layers.0, then layers.1
        assert torch.equal(bank.layers[i].P[:, 2], torch.randn(7, generator=g) * 0.02), i
        assert torch.equal(bank.layers[i].Q[2], torch.randn(5, generator=g) * 0.02), i


def test_an_expanded_slot_starts_from_fresh_moments_whatever_it_held():
    # inactive slots hold zero moments in normal runs, so a missing reset on expansion showed only
    # after an outside change: poison them, then every opened slot must start from zero
    bank, al, opt = _trained_bank()
    with torch.no_grad():
        for m in bank.layers:
            off = ~m.mask
            for p, sel in ((m.P, (slice(None), off)), (m.lam, off), (m.Q, off)):
                for key in ("exp_avg", "exp_avg_sq"):
                    opt.state[p][key][sel] = 1.0
    ev = al._event(10, 2)
    assert ev.expanded
    for name, j in ev.expanded:
        m = bank.layers[int(name.split(".")[1])]
        for key in ("exp_avg", "exp_avg_sq"):
            assert not opt.state[m.P][key][:, j].any() and opt.state[m.lam][key][j] == 0
            assert not opt.state[m.Q][key][j].any(), (name, j, key)


def test_first_sight_of_an_optimizer_zeroes_inactive_slots_and_their_moments():
    # slots trained while active, then switched off by hand: the allocator's first step with the
    # optimizer must zero their values and moments (weight decay would move them otherwise)
    bank = Bank([6] * 3, r_init=6, seed=1)
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        (bank(torch.randn(8, 5, generator=g)) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for m in bank.layers:
            m.mask[3:] = False
    assert opt.state[bank.layers[0].lam]["exp_avg_sq"][3:].abs().min() > 0  # they did hold state
    al = RankAllocator(bank, config(t_warmup=50))
    al.step(1, opt)  # no event: only the first sight
    for m in bank.layers:
        assert not m.P[:, 3:].any() and not m.lam[3:].any() and not m.Q[3:].any()
        for p, sel in ((m.P, (slice(None), slice(3, None))), (m.lam, slice(3, None)), (m.Q, slice(3, None))):
            for key in ("exp_avg", "exp_avg_sq"):
                assert not opt.state[p][key][sel].any(), key
        assert m.lam[:3].abs().min() > 0  # active slots untouched


def test_loading_a_state_zeroes_the_inactive_slots_again():
    bank = Bank([6] * 3, r_init=3, seed=2)
    al = RankAllocator(bank, config())
    with torch.no_grad():  # poisoned inactive slots, e.g. from a state dict written by hand
        for m in bank.layers:
            m.P[:, 4] = 3.0
            m.lam[5] = float("nan")
            m.Q[3] = -1.0
    al.load_state_dict(al.state_dict())
    for m in bank.layers:
        assert not m.P[:, 3:].any() and not m.lam[3:].isnan().any() and not m.lam[3:].any()
        assert not m.Q[3:].any()


def _split_optimizers(bank):
    """λ in one AdamW, P and Q in another, both trained 3 steps (every moment non-zero)."""
    lam = [m.lam for m in bank.layers]
    pq = [p for m in bank.layers for p in (m.P, m.Q)]
    opt_lam, opt_pq = torch.optim.AdamW(lam, lr=0.01), torch.optim.AdamW(pq, lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        (bank(torch.randn(16, 5, generator=g)) ** 2).mean().backward()
        opt_lam.step()
        opt_pq.step()
        opt_lam.zero_grad()
        opt_pq.zero_grad()
    return opt_lam, opt_pq


def test_step_resets_the_moments_in_every_optimizer_of_a_list():
    # P and Q in one optimizer, λ in another: step() took one, so the other's moments of pruned
    # slots kept moving the zeroed P column / Q row and a reopened slot inherited them.
    bank = Bank([6] * 4, r_init=3, seed=3)
    al = RankAllocator(bank, config())
    opt_lam, opt_pq = _split_optimizers(bank)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        al.step(3, [opt_lam, opt_pq])
    before = {id(p): opt_pq.state[p]["exp_avg"].clone() for m in bank.layers for p in (m.P, m.Q)}
    ev = al._event(10, 2)
    assert ev.pruned and ev.expanded
    for name, j in ev.pruned + ev.expanded:
        m = bank.layers[int(name.split(".")[1])]
        for key in ("exp_avg", "exp_avg_sq"):
            assert (opt_pq.state[m.P][key][:, j] == 0).all() and (opt_pq.state[m.Q][key][j] == 0).all()
            assert opt_lam.state[m.lam][key][j] == 0
    name, j = ev.pruned[0]
    m = bank.layers[int(name.split(".")[1])]
    assert before[id(m.P)][:, j].abs().sum() > 0  # it held moments (else the test could not fail)


def test_warns_when_trainable_adapters_are_outside_the_given_optimizers():
    bank = Bank([6] * 4, r_init=3, seed=3)
    al = RankAllocator(bank, config())
    opt_lam, opt_pq = _split_optimizers(bank)
    al.step(3, opt_lam)
    with pytest.warns(UserWarning, match=r"8 trainable adapter tensors \(layers.0.P, layers.0.Q, layers.1.P ...\) are "
                                         r"in none of the optimizers given to step\(\)"):
        al._event(10, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        al._event(15, 2)  # once


def test_step_rejects_an_empty_optimizer_list():
    al = RankAllocator(Bank([6] * 2, r_init=3), config())
    for bad in ([], (), [None]):
        with pytest.raises(ValueError, match="optimizer must be an optimizer or a non-empty list of optimizers"):
            al.step(1, bad)


def test_an_importance_changed_mid_run_takes_effect():
    # config.importance set after the allocator was built was validated but never used: the
    # metric made in __init__ kept scoring, and state_dict saved the old name.
    bank = Bank([6] * 4, r_init=3, seed=3)
    cfg = config()
    al = RankAllocator(bank, cfg)
    script(bank, [{0: 1.0, 1: 1.0, 2: 1.0}, {0: 3.0, 1: 0.1, 2: 0.1}, {0: 1.0, 1: 0.5}, {0: 2.0, 1: 2.0, 2: 0.2}])
    cfg.importance = "nuclear"
    al.step(1)
    assert al.importance.name == "nuclear"
    assert al.state_dict()["importance"]["name"] == "nuclear"
    # nuclear: Σ|s·λ| / rank, s = alpha / r_init = 4/3
    want = [4 / 3 * sum(v) / len(v) for v in ([1, 1, 1], [3, 0.1, 0.1], [1, 0.5], [2, 2, 0.2])]
    got = al._score_bank()[0]
    assert got == pytest.approx(want, rel=1e-6)
    # an allocator built from the changed config loads that state
    RankAllocator(Bank([6] * 4, r_init=3, seed=3), cfg).load_state_dict(al.state_dict())


def test_new_sensitivity_betas_keep_the_averages():
    bank = Bank([6] * 2, r_init=3, seed=3)
    cfg = config(importance="sensitivity")
    al = RankAllocator(bank, cfg)
    (bank(torch.randn(8, 5)) ** 2).mean().backward()
    al.step(1)
    metric, ipt = al.importance, [t.clone() for t in al.importance.ipt]
    cfg.sensitivity_beta = 0.5
    al.step(2)  # no gradients now: the averages are not updated, only the beta
    assert al.importance is metric and metric.beta1 == 0.5
    assert all(torch.equal(a, b) for a, b in zip(ipt, metric.ipt))
