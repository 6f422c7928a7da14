"""Importance metrics against float64 references written from the math (explicit ΔW, its
singular values via torch.linalg.svdvals, per-element AdaLoRA EMAs in Python loops)."""

import math

import pytest
import torch

from flexlora.alloc import _batch
from flexlora.alloc.importance import (
    ElementEnergyEntropy,
    EntropyImportance,
    NormImportance,
    SensitivityImportance,
    SpectrumEntropy,
    make_importance,
)
from flexlora.config import IMPORTANCE_METRICS, FlexLoRAConfig
from flexlora.layers.flex_linear import FlexLinear

EPS = 1e-12


def make_modules(seed=0, orthonormal=False):
    """Mixed shapes (a same-shape group, out < r_max, r_max = 1), masks all-on / random / all-off /
    one slot / all λ = 0."""
    torch.manual_seed(seed)
    specs = [(12, 10, 8), (12, 10, 8), (12, 10, 8), (12, 10, 8), (9, 5, 8), (6, 6, 1), (7, 3, 4), (12, 10, 8)]
    mods = []
    for k, (i, o, R) in enumerate(specs):
        m = FlexLinear(i, o, R, min(R, 2), 4.0)
        with torch.no_grad():
            if orthonormal and o >= R and i >= R:
                m.P.copy_(torch.linalg.qr(torch.randn(o, R))[0])
                m.Q.copy_(torch.linalg.qr(torch.randn(i, R))[0].t())
            else:
                m.P.normal_(0, 0.4)
                m.Q.normal_(0, 0.4)
            m.lam.normal_()
        m.mask.copy_(torch.rand(R) < 0.6)
        if k == 0:
            m.mask.fill_(True)
        if k == 2:
            m.mask.fill_(False)
        if k == 3:
            m.mask.fill_(False)
            m.mask[4] = True
        if k == 7:
            m.mask.fill_(True)
            with torch.no_grad():
                m.lam.zero_()
        mods.append(m)
    return mods


def ref_entropy(values, eps=EPS):
    """Normalized entropy of a list of non-negative energies (float)."""
    r = len(values)
    tot = sum(values)
    if r < 2 or tot == 0:
        return 0.0
    return -sum(v / tot * math.log(v / tot + eps) for v in values) / math.log(r)


def delta_w(m):
    g = m.lam.detach().double() * m.mask.double() * m.scaling
    return m.P.detach().double() @ torch.diag(g) @ m.Q.detach().double()


def assert_scores(got, ref, what, atol):
    ref = torch.tensor(ref, dtype=torch.float64)
    assert got.dtype == torch.float32 and got.shape == ref.shape, f"{what}: {got.dtype} {tuple(got.shape)}"
    assert not torch.isnan(got).any(), f"{what}: NaN score {got}"
    err = (got.double() - ref).abs()
    assert (err <= atol + 1e-5 * ref.abs()).all(), f"{what}: got {got.tolist()}, expected {ref.tolist()}"


def test_entropy_metric():
    mods = make_modules()
    ref = [ref_entropy([m.lam[j].item() ** 2 for j in m.mask.nonzero().flatten().tolist()]) for m in mods]
    assert_scores(EntropyImportance(EPS).scores(mods), ref, "entropy", 2e-6)


@pytest.mark.parametrize("kind", ["nuclear", "frobenius"])
def test_norm_metrics_equal_true_norms_when_factors_are_orthonormal(kind):
    # with orthonormal P, Q, λ are ΔW's singular values (up to s and sign): the metric equals the
    # true nuclear / Frobenius norm of the explicit ΔW, divided by n = number of active slots
    mods = make_modules(orthonormal=True)
    ref = []
    for m in mods:
        n = int(m.mask.sum())
        if m.out_features >= m.r_max and m.in_features >= m.r_max:
            norm = torch.linalg.matrix_norm(delta_w(m), ord="nuc" if kind == "nuclear" else "fro").item()
        else:  # not orthonormal: the metric is defined through λ
            a = [abs(m.lam[j].item()) * m.scaling for j in m.mask.nonzero().flatten().tolist()]
            norm = sum(a) if kind == "nuclear" else math.sqrt(sum(x * x for x in a))
        ref.append(norm / n if n else 0.0)
    assert_scores(NormImportance(kind).scores(mods), ref, kind, 1e-5)


def test_norm_metrics_do_not_overflow():
    m = FlexLinear(4, 4, 4, 4, 1.0)
    with torch.no_grad():
        m.lam.fill_(3e38)
    for kind in ("nuclear", "frobenius"):
        s = NormImportance(kind).scores([m])
        assert torch.isfinite(s).all(), f"{kind}: {s}"


@pytest.mark.parametrize(
    "name,dtype,atol", [("exact_entropy", torch.float64, 1e-6), ("energy_entropy_matrix", torch.float32, 2e-4)]
)
def test_spectrum_entropy_matches_svd_of_explicit_delta_w(name, dtype, atol):
    mods = make_modules()
    ref = []
    for m in mods:
        r = int(m.mask.sum())
        sig = torch.linalg.svdvals(delta_w(m))[:r]  # rank(ΔW) ≤ r: the rest are 0
        ref.append(ref_entropy((sig**2).tolist()) if r >= 2 else 0.0)
    got = make_importance(FlexLoRAConfig(importance=name)).scores(mods)
    assert_scores(got, ref, name, atol)


def test_exact_entropy_equals_lambda_entropy_for_orthonormal_factors():
    mods = [m for m in make_modules(orthonormal=True) if m.out_features >= m.r_max and m.in_features >= m.r_max]
    exact = SpectrumEntropy("exact_entropy", torch.float64, EPS).scores(mods)
    lam = EntropyImportance(EPS).scores(mods)
    assert torch.allclose(exact, lam, atol=1e-5), (exact, lam)


def test_element_energy_entropy():
    mods = make_modules()
    ref = []
    for m in mods:
        P, Q = m.P.detach().double(), m.Q.detach().double()
        e = [
            (m.scaling * m.lam[j].item() * P[:, j].norm().item() * Q[j].norm().item()) ** 2
            for j in m.mask.nonzero().flatten().tolist()
        ]
        ref.append(ref_entropy(e))
    assert_scores(ElementEnergyEntropy(EPS).scores(mods), ref, "energy_entropy_element", 2e-6)


def set_random_grads(mods, gen, drop=()):
    for k, m in enumerate(mods):
        for name in ("P", "lam", "Q"):
            p = getattr(m, name)
            p.grad = None if (k, name) in drop else torch.randn(p.shape, generator=gen)


def sensitivity_reference(history, b1, b2, mods):
    """history: list over steps of [(P, lam, Q values, their grads or None)] per module, in
    float64, element by element as AdaLoRA defines it."""
    state = {}
    for step in history:
        for k, params in enumerate(step):
            for name, (w, g) in params.items():
                if g is None:
                    continue
                ipt_bar, unc_bar = state.get((k, name), (torch.zeros_like(w), torch.zeros_like(w)))
                ipt = (w * g).abs()
                ipt_bar = b1 * ipt_bar + (1 - b1) * ipt
                unc_bar = b2 * unc_bar + (1 - b2) * (ipt - ipt_bar).abs()
                state[(k, name)] = (ipt_bar, unc_bar)
    ref = []
    for k, m in enumerate(mods):
        act = m.mask.nonzero().flatten().tolist()
        if not act:
            ref.append(0.0)
            continue

        def s(name):
            if (k, name) not in state:
                return None
            a, b = state[(k, name)]
            return a * b

        sP, sl, sQ = s("P"), s("lam"), s("Q")
        slots = []
        for j in act:
            v = 0.0
            v += sl[j].item() if sl is not None else 0.0
            v += sP[:, j].mean().item() if sP is not None else 0.0
            v += sQ[j].mean().item() if sQ is not None else 0.0
            slots.append(v)
        ref.append(sum(slots) / len(slots))
    return ref


def test_sensitivity_matches_elementwise_reference_and_resumes():
    mods = make_modules()
    gen = torch.Generator().manual_seed(5)
    b1, b2 = 0.8, 0.6
    imp = SensitivityImportance(b1, b2)
    assert (imp.scores(mods) == 0).all(), "no update yet: every score is 0"
    history = []
    for step in range(4):
        set_random_grads(mods, gen, drop={(1, "Q"), (4, "P")} if step == 1 else ())
        history.append(
            [
                {
                    n: (getattr(m, n).detach().double().clone(), None if getattr(m, n).grad is None else getattr(m, n).grad.double().clone())
                    for n in ("P", "lam", "Q")
                }
                for m in mods
            ]
        )
        imp.update(mods)
        if step == 1:
            resumed = SensitivityImportance(b1, b2)
            resumed.load_state_dict(imp.state_dict())
        if step >= 2:
            resumed.update(mods)
        with torch.no_grad():  # parameters move between steps, as in training
            for m in mods:
                m.P.add_(0.01)
    ref = sensitivity_reference(history, b1, b2, mods)
    got = imp.scores(mods)
    assert_scores(got, [r for r in ref], "sensitivity", 1e-9)
    has = torch.tensor([bool(m.mask.any()) for m in mods])
    assert (got[has] > 0).all() and (got[~has] == 0).all(), got
    assert torch.equal(resumed.scores(mods), got), "state_dict round trip must resume exactly"


def _snapshot(mods):
    """float64 copies of every (P, λ, Q) value and gradient, as sensitivity_reference reads them."""
    def copy(t):
        return None if t is None else t.detach().double().clone()

    return [{n: (copy(getattr(m, n)), copy(getattr(m, n).grad)) for n in ("P", "lam", "Q")} for m in mods]


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_sensitivity_skips_an_update_with_non_finite_gradients(bad):
    # an fp16 overflow: GradScaler skips optimizer.step(), and the EMAs must skip it too, or they
    # turn NaN for good and every later event reports a divergence that never happened
    mods = make_modules()
    gen = torch.Generator().manual_seed(2)
    b1, b2 = 0.8, 0.6
    imp = SensitivityImportance(b1, b2)
    history = []
    for step in range(4):
        set_random_grads(mods, gen)
        if step == 2:
            mods[4].Q.grad[1, 0] = bad  # one element of one module's gradient
            before = [t.clone() for t in imp.ipt + imp.unc]
            imp.update(mods)
            assert all(torch.equal(a, b) for a, b in zip(imp.ipt + imp.unc, before)), "skipped update changed the EMAs"
            assert (imp.steps, imp.skipped) == (2, 1)
            continue
        history.append(_snapshot(mods))
        imp.update(mods)
    assert (imp.steps, imp.skipped) == (3, 1)
    got = imp.scores(mods)
    assert_scores(got, sensitivity_reference(history, b1, b2, mods), "sensitivity", 1e-9)
    resumed = SensitivityImportance(b1, b2)
    resumed.load_state_dict(imp.state_dict())
    assert (resumed.steps, resumed.skipped) == (3, 1)


def test_sensitivity_reports_diverged_parameters_although_their_update_is_skipped():
    mods = make_modules()
    imp = SensitivityImportance()
    set_random_grads(mods, torch.Generator().manual_seed(4))
    imp.update(mods)
    with torch.no_grad():
        mods[1].P[0, 2] = float("inf")  # active slot 2 of module 1 diverged...
    mods[1].P.grad[0, 2] = float("inf")  # ...and so did its gradient: the update is skipped
    imp.update(mods)
    assert imp.skipped == 1
    s = imp.scores(mods)
    assert torch.isnan(s[1]) and not torch.isnan(s[[0, 2, 3, 4, 5, 6, 7]]).any(), s


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("in_f,out_f", [(0, 3), (3, 0)], ids=["no-inputs", "no-outputs"])
def test_sensitivity_of_a_module_with_an_empty_factor(in_f, out_f):
    # the mean over an empty Q row (or P column) was NaN: the allocator reported "diverged"
    m = FlexLinear(in_f, out_f, 2, 2, 1.0)
    with torch.no_grad():
        m.lam.copy_(torch.tensor([0.5, -2.0]))
    set_random_grads([m], torch.Generator().manual_seed(6))
    b1, b2 = 0.8, 0.6
    imp = SensitivityImportance(b1, b2)
    imp.update([m])
    # one update from zero EMAs, float64: Ī·Ū = (1-β₁)·I·(1-β₂)·β₁·I with I = |w·g|; an empty P
    # column / Q row adds nothing
    s = {n: ((1 - b1) * (1 - b2) * b1 * (getattr(m, n).detach().double() * getattr(m, n).grad.double()) ** 2)
         for n in ("P", "lam", "Q")}
    slots = [
        float(s["lam"][j]) + (float(s["P"][:, j].mean()) if out_f else 0.0) + (float(s["Q"][j].mean()) if in_f else 0.0)
        for j in range(2)
    ]
    assert_scores(imp.scores([m]), [sum(slots) / 2], "sensitivity", 1e-9)


def test_sensitivity_rejects_a_different_module_list():
    mods = make_modules()
    imp = SensitivityImportance()
    set_random_grads(mods, torch.Generator().manual_seed(0))
    imp.update(mods)
    with pytest.raises(ValueError, match="modules differ"):
        imp.update(mods[:-1])


@pytest.mark.parametrize("name", IMPORTANCE_METRICS)
def test_every_metric_is_finite_float32_and_batched(name, monkeypatch):
    mods = make_modules()
    imp = make_importance(FlexLoRAConfig(importance=name))
    set_random_grads(mods, torch.Generator().manual_seed(1))
    imp.update(mods)
    s = imp.scores(mods)
    assert s.shape == (len(mods),) and s.dtype == torch.float32
    assert torch.isfinite(s).all(), f"{name}: {s}"
    assert s[2].item() == 0.0, f"{name}: a module with no active slot must score 0, got {s[2].item()}"
    monkeypatch.setattr(_batch, "MAX_CHUNK_ELEMS", 1)  # one module per chunk: same scores
    assert torch.allclose(imp.scores(mods), s, rtol=1e-5, atol=1e-7)
    sd = imp.state_dict()
    fresh = make_importance(FlexLoRAConfig(importance=name))
    fresh.load_state_dict(sd)
    assert torch.allclose(fresh.scores(mods), s, rtol=1e-5, atol=1e-7)


def test_make_importance_passes_config_fields():
    imp = make_importance(FlexLoRAConfig(importance="sensitivity", sensitivity_beta=0.5, uncertainty_beta=0.25))
    assert (imp.beta1, imp.beta2) == (0.5, 0.25)
    assert make_importance(FlexLoRAConfig(entropy_eps=1e-6)).eps == 1e-6


def test_load_state_dict_of_another_metric_is_an_error():
    with pytest.raises(ValueError, match="expected 'entropy'"):
        make_importance(FlexLoRAConfig()).load_state_dict({"name": "sensitivity"})


@pytest.mark.parametrize("name", IMPORTANCE_METRICS)
def test_batched_scores_equal_one_module_at_a_time_with_mixed_r_max(name):
    mods = make_modules() + [FlexLinear(12, 10, 16, 5, 4.0)]  # r_max 16 beside r_max 8, 4, 1
    with torch.no_grad():
        mods[-1].lam.normal_()
    lam, mask = _batch.stack_lam_mask(mods)
    assert lam.shape == (len(mods), 16) and not mask[5, 1:].any(), "short rows are padded inactive"
    set_random_grads(mods, torch.Generator().manual_seed(3))
    batched = make_importance(FlexLoRAConfig(importance=name))
    batched.update(mods)
    together = batched.scores(mods)
    for k, m in enumerate(mods):
        alone = make_importance(FlexLoRAConfig(importance=name))
        alone.update([m])
        got = alone.scores([m])
        assert torch.allclose(together[k], got[0], rtol=1e-5, atol=1e-7), f"module {k}: {together[k]} vs {got[0]}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", IMPORTANCE_METRICS)
@pytest.mark.parametrize("mod,slot", [(1, 2), (3, 4)], ids=["rank-several", "rank-1"])
def test_non_finite_parameters_give_nan_not_a_crash(name, mod, slot, bad):
    # module 3 has one active slot: a finite module of rank 1 scores by the metric's rule (0 for
    # the entropies); a NaN there must still come out NaN, or the allocator would prune it. An
    # inf must too: nuclear / frobenius used to clamp it to fp32's max, the top score, so the
    # diverged module was expanded.
    mods = make_modules()
    assert mods[mod].mask[slot] and (mod != 3 or int(mods[3].mask.sum()) == 1)
    with torch.no_grad():
        if name in ("entropy", "nuclear", "frobenius"):  # metrics of λ only
            mods[mod].lam[slot] = bad
        else:
            mods[mod].P[0, slot] = bad
    s = make_importance(FlexLoRAConfig(importance=name)).scores(mods)
    assert torch.isnan(s[mod]), f"{name}: {s}"
    others = [i for i in [0, 1, 3, 4, 5, 6, 7] if i != mod]
    assert not torch.isnan(s[others]).any(), f"{name}: {s}"


@pytest.mark.parametrize("kind", ["nuclear", "frobenius"])
def test_norm_metrics_ignore_a_non_finite_inactive_slot(kind):
    mods = make_modules()
    m = mods[1]
    off = int((~m.mask).nonzero()[0])
    with torch.no_grad():
        m.lam[off] = float("inf")
    a = [abs(m.lam[j].item()) * m.scaling for j in m.mask.nonzero().flatten().tolist()]
    ref = (sum(a) if kind == "nuclear" else math.sqrt(sum(x * x for x in a))) / len(a)
    got = NormImportance(kind).scores(mods)[1].item()
    assert abs(got - ref) <= 1e-6 * ref, f"{kind}: {got} != {ref}"


SCALINGS = {
    "lam-1e30": (1e30, 1.0),
    "lam-1e-30": (1e-30, 1.0),
    "P-1e20-Q-1e-20": (1.0, 1e20),  # ΔW unchanged, but PᵀP ~ 1e40 and QQᵀ ~ 1e-40
}


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize(
    "name,atol",
    [("energy_entropy_matrix", 2e-4), ("exact_entropy", 1e-6), ("energy_entropy_element", 2e-6)],
)
def test_energy_entropies_of_huge_and_tiny_factors(name, atol, scaling):
    # the entropy of σ² does not depend on ΔW's scale; in fp32, λ ~ 1e30 made the Grams inf
    # (eigh raised LinAlgError) and λ ~ 1e-30 made them 0 (every module scored 0)
    lam_factor, pq_factor = SCALINGS[scaling]
    imp = make_importance(FlexLoRAConfig(importance=name))
    mods = make_modules()
    unscaled = imp.scores(mods)
    with torch.no_grad():
        for m in mods:
            m.lam.mul_(lam_factor)
            m.P.mul_(pq_factor)
            m.Q.div_(pq_factor)
    ref = []
    for m in mods:
        r = int(m.mask.sum())
        if name == "energy_entropy_element":
            P, Q = m.P.detach().double(), m.Q.detach().double()
            e = [(m.scaling * m.lam[j].item() * P[:, j].norm().item() * Q[j].norm().item()) ** 2
                 for j in m.mask.nonzero().flatten().tolist()]
            ref.append(ref_entropy(e))
        else:
            sig = torch.linalg.svdvals(delta_w(m))[:r]  # float64: 1e±60 is in range there
            ref.append(ref_entropy((sig**2).tolist()) if r >= 2 else 0.0)
    assert max(ref) > 0.5, f"the reference must have non-trivial entropies to compare against: {ref}"
    got = imp.scores(mods)
    assert_scores(got, ref, name, atol)
    assert torch.allclose(got, unscaled, rtol=0, atol=atol), f"{name}: {got} vs unscaled {unscaled}"
