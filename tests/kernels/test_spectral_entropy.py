"""spectral_entropy / spectral_entropy_and_slots against a float64 reference written from the math.

Both backends: "torch" and "triton" (the kernel runs under TRITON_INTERPRET=1, set by conftest).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexlora.kernels.spectral_entropy import spectral_entropy, spectral_entropy_and_slots

BACKENDS = ["torch", "triton"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = 1e-12


def reference(lam: torch.Tensor, mask: torch.Tensor, eps: float = EPS):
    """Row by row, in float64, straight from the definition."""
    ent, min_slot, free_slot, rank = [], [], [], []
    for row, m in zip(lam.double().tolist(), mask.tolist()):
        act = [j for j, on in enumerate(m) if on]
        r = len(act)
        tot = sum(row[j] ** 2 for j in act)
        if r < 2 or tot == 0.0:
            ent.append(0.0)
        else:
            s = [row[j] ** 2 / tot for j in act]
            ent.append(-sum(si * math.log(si + eps) for si in s) / math.log(r))
        min_slot.append(min(act, key=lambda j: (abs(row[j]), j)) if act else -1)
        free = [j for j, on in enumerate(m) if not on]
        free_slot.append(free[0] if free else -1)
        rank.append(r)
    return (
        torch.tensor(ent, dtype=torch.float64),
        torch.tensor(min_slot, dtype=torch.int64),
        torch.tensor(free_slot, dtype=torch.int64),
        torch.tensor(rank, dtype=torch.int64),
    )


def make_mask(kind: str, n: int, R: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "all_on":
        return torch.ones(n, R, dtype=torch.bool)
    if kind == "all_off":
        return torch.zeros(n, R, dtype=torch.bool)
    return torch.rand(n, R, generator=gen) < 0.6


def check(out, ref, atol=2e-6, rtol=2e-6):
    ent, min_slot, free_slot, rank = out
    r_ent, r_min, r_free, r_rank = ref
    assert ent.dtype == torch.float32 and ent.shape == r_ent.shape
    assert torch.isfinite(ent).all(), f"non-finite entropy: {ent}"
    err = (ent.double() - r_ent).abs()
    bad = err > atol + rtol * r_ent.abs()
    assert not bad.any(), f"entropy off at rows {bad.nonzero().flatten().tolist()}: max err {err.max():.3g}"
    assert torch.equal(min_slot, r_min), f"min_slot {min_slot.tolist()} != {r_min.tolist()}"
    assert torch.equal(free_slot, r_free), f"free_slot {free_slot.tolist()} != {r_free.tolist()}"
    assert torch.equal(rank, r_rank), f"rank {rank.tolist()} != {r_rank.tolist()}"
    for t in (min_slot, free_slot, rank):
        assert t.dtype == torch.int64


CASES = [
    (n, R, kind, dt)
    for R in (1, 8, 64, 256)
    for n in (1, 7, 33)
    for kind in ("all_on", "all_off", "random")
    for dt in ("fp32", "bf16", "fp16")
    if not (dt != "fp32" and (n != 7 or R == 1))  # low precision: fewer shapes, same coverage of R
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,R,kind,dt", CASES, ids=[f"n{n}-R{R}-{k}-{d}" for n, R, k, d in CASES])
def test_matches_float64_reference(backend, n, R, kind, dt):
    gen = torch.Generator().manual_seed(1000 * n + R)
    lam = torch.randn(n, R, generator=gen).to(DTYPES[dt])
    mask = make_mask(kind, n, R, gen)
    out = spectral_entropy_and_slots(lam, mask, EPS, backend=backend)
    # the reference sees exactly the λ values the op sees (after rounding to dt); the op itself
    # computes in fp32, so the tolerance is fp32's for every input dtype
    check(out, reference(lam, mask), atol=2e-6 * max(1.0, math.log2(R)), rtol=2e-6)
    assert torch.equal(spectral_entropy(lam, mask, EPS, backend=backend), out[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend):
    R = 8
    rows, masks = [], []

    def add(lam, mask):
        rows.append(torch.tensor(lam, dtype=torch.float32))
        masks.append(torch.tensor(mask, dtype=torch.bool))

    on = [True] * R
    add([3.0] + [0.0] * 7, [True] + [False] * 7)                 # 0: rank 1
    add([0.0] * 8, on)                                           # 1: all λ = 0
    add([0.0, 0.0, -2.5, 0.0, 0.0, 0.0, 0.0, 0.0], on)           # 2: one non-zero λ
    add([0.7, -0.7, 0.7, -0.7, 0.7, -0.7, 0.7, -0.7], on)        # 3: uniform |λ|
    add([5.0, 1.0, 1.0, 2.0, 9.0, 1.0, 1.0, 1.0], [False, True, True, True, True, False, True, True])  # 4: ties
    add([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], [False] * 8)   # 5: all off
    add([0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [True, True] + [False] * 6)  # 6: rank 2, one zero λ
    add([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [True, True] + [False] * 6)  # 7: rank 2 uniform
    lam, mask = torch.stack(rows), torch.stack(masks)
    ent, min_slot, free_slot, rank = spectral_entropy_and_slots(lam, mask, EPS, backend=backend)
    assert ent[0].item() == 0.0 and ent[1].item() == 0.0 and ent[2].item() == 0.0 and ent[5].item() == 0.0
    assert ent[6].item() == 0.0
    assert abs(ent[3].item() - 1.0) < 1e-6 and abs(ent[7].item() - 1.0) < 1e-6
    assert min_slot.tolist() == [0, 0, 0, 0, 1, -1, 0, 0]
    assert free_slot.tolist() == [1, -1, -1, -1, 0, 0, 2, 2]
    assert rank.tolist() == [1, 8, 8, 8, 6, 0, 2, 2]
    check((ent, min_slot, free_slot, rank), reference(lam, mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e30, 1e-30, 2e38, 1e-40], ids=["1e30", "1e-30", "2e38", "1e-40-subnormal"])
def test_no_nan_on_huge_and_tiny_lambda(backend, scale):
    gen = torch.Generator().manual_seed(7)
    lam = (torch.rand(5, 16, generator=gen) + 0.5) * scale  # |λ| in [0.5, 1.5]·scale (fp32)
    mask = torch.rand(5, 16, generator=gen) < 0.7
    mask[0] = True
    ent, *_ = out = spectral_entropy_and_slots(lam, mask, EPS, backend=backend)
    assert torch.isfinite(ent).all() and (ent >= 0).all() and (ent <= 1 + 1e-6).all(), ent
    if scale >= 1e-30:  # normal fp32 numbers: the normalization keeps full accuracy
        check(out, reference(lam, mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    gen = torch.Generator().manual_seed(3)
    lam = torch.randn(16, 9, generator=gen).t()  # [9, 16], strides (1, 9)
    mask = (torch.rand(16, 9, generator=gen) < 0.5).t()
    check(spectral_entropy_and_slots(lam, mask, EPS, backend=backend), reference(lam, mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    out = spectral_entropy_and_slots(torch.zeros(0, 8), torch.zeros(0, 8, dtype=torch.bool), backend=backend)
    assert [t.shape for t in out] == [torch.Size([0])] * 4


def test_reads_lambda_detached():
    lam = torch.randn(3, 4, requires_grad=True)
    ent = spectral_entropy(lam, torch.ones(3, 4, dtype=torch.bool), backend="torch")
    assert not ent.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_enters_the_formula(backend):
    lam = torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    got = spectral_entropy(lam, mask, eps=0.5, backend=backend).item()
    assert abs(got - (-math.log(1.0)) / math.log(2)) < 1e-6  # s = 0.5, log(0.5 + 0.5) = 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_eps_matches_float64_reference(backend):
    """eps reaches every backend's formula, not only its default (the allocator passes
    config.entropy_eps): a large eps moves the entropies far from their eps = 1e-12 values."""
    g = torch.Generator().manual_seed(3)
    lam = torch.randn(6, 8, generator=g)
    mask = torch.rand(6, 8, generator=g) < 0.7
    mask[:, :2] = True
    got = spectral_entropy_and_slots(lam, mask, 1e-2, backend=backend)
    check(got, reference(lam, mask, 1e-2))
    assert (got[0] - reference(lam, mask)[0]).abs().max() > 1e-3  # eps made a difference


@pytest.mark.parametrize(
    "lam,mask,eps,match",
    [
        (torch.zeros(8), torch.ones(8, dtype=torch.bool), EPS, "lam must be a 2-D floating"),
        (torch.zeros(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.bool), EPS, "lam must be a 2-D floating"),
        (torch.zeros(2, 8), torch.ones(2, 8), EPS, "mask must be a bool tensor"),
        (torch.zeros(2, 8), torch.ones(2, 7, dtype=torch.bool), EPS, "mask must be a bool tensor"),
        (torch.zeros(2, 8), torch.ones(2, 8, dtype=torch.bool), 0.0, "eps must be a finite number > 0"),
        (torch.zeros(2, 8), torch.ones(2, 8, dtype=torch.bool), float("inf"), "eps must be a finite number > 0"),
    ],
    ids=["lam-1d", "lam-int", "mask-float", "mask-shape", "eps-zero", "eps-inf"],
)
def test_bad_input(lam, mask, eps, match):
    with pytest.raises(ValueError, match=match):
        spectral_entropy_and_slots(lam, mask, eps)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    R=st.integers(1, 130),
    p_on=st.floats(0.0, 1.0),
    log_scale=st.integers(-20, 20),
    zeros=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_triton_against_reference(n, R, p_on, log_scale, zeros, seed):
    gen = torch.Generator().manual_seed(seed)
    lam = torch.randn(n, R, generator=gen) * 10.0**log_scale
    lam[torch.rand(n, R, generator=gen) < zeros] = 0.0  # exact zeros: ties for min_slot
    mask = torch.rand(n, R, generator=gen) < p_on
    check(spectral_entropy_and_slots(lam, mask, EPS, backend="triton"), reference(lam, mask), atol=2e-6 * max(1.0, math.log2(R)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_lambda_is_reported_not_hidden(backend):
    lam = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    lam[1, 2] = float("nan")
    mask = torch.ones(3, 8, dtype=torch.bool)
    ent = spectral_entropy(lam, mask, backend=backend)
    assert torch.isnan(ent[1]) and torch.isfinite(ent[[0, 2]]).all(), ent
    mask[1, 2] = False  # an inactive NaN slot does not matter
    ent = spectral_entropy(lam, mask, backend=backend)
    assert torch.isfinite(ent).all(), ent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_lambda_gives_nan_at_every_rank(backend, bad):
    # rows of rank 1 and 2 (where a finite row scores 0 or by formula), each with one bad active λ,
    # beside finite rows of the same ranks, and a bad λ in an inactive slot
    lam = torch.tensor([[bad, 0.0, 0.0], [bad, 1.0, 0.0], [2.0, 0.0, 0.0], [2.0, 1.0, 0.0], [1.0, 0.0, bad]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    ent = spectral_entropy(lam, mask, backend=backend)
    assert torch.isnan(ent[:2]).all(), ent
    s = torch.tensor([4.0, 1.0], dtype=torch.float64) / 5.0
    want = float(-(s * torch.log(s + EPS)).sum() / math.log(2))
    assert ent[2].item() == 0.0 and abs(ent[3].item() - want) < 1e-6 and ent[4].item() == 0.0, ent


def test_interpreter_switched_on_after_import_falls_back_to_torch():
    """TRITON_INTERPRET=1 set after flexlora was imported: the kernel was defined compiled, and
    CPU tensors used to reach it ("0 active drivers"). backend=None now takes the torch path (with
    the reference's numbers), and backend="triton" says what to do."""
    import json

    from _fresh_python import run_python

    code = (
        "import json, os, torch\n"
        "from flexlora.kernels.spectral_entropy import spectral_entropy_and_slots\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "lam = torch.randn(5, 8, generator=g); mask = torch.rand(5, 8, generator=g) < 0.6\n"
        "out = [t.tolist() for t in spectral_entropy_and_slots(lam, mask)]\n"
        "try:\n"
        "    spectral_entropy_and_slots(lam, mask, backend='triton'); err = None\n"
        "except RuntimeError as e:\n"
        "    err = str(e)\n"
        "print(json.dumps({'lam': lam.tolist(), 'mask': mask.tolist(), 'out': out, 'err': err}))\n"
    )
    done = run_python(code, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    lam, mask = torch.tensor(res["lam"]), torch.tensor(res["mask"])
    ent, *slots = res["out"]
    check((torch.tensor(ent, dtype=torch.float32), *(torch.tensor(t, dtype=torch.int64) for t in slots)), reference(lam, mask))
    assert res["err"] and "TRITON_INTERPRET=1 must be set before flexlora is imported" in res["err"], res["err"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_below_fp32_range_gives_no_nan(backend):
    # s + eps rounded to 0 for an s = 0 slot (a just-opened λ = 0): 0·log(0) = NaN, which the
    # allocator reads as a diverged module
    lam = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    got = spectral_entropy_and_slots(lam, mask, 1e-46, backend=backend)
    check(got, reference(lam, mask, 1e-300))
    assert abs(got[0][0].item() - math.log(2) / math.log(3)) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("R", [2, 3, 6, 7, 64, 256])
def test_uniform_spectrum_is_exactly_one(backend, R):
    # rounding put a uniform spectrum at 1.0000001, outside the documented [0, 1]
    ent = spectral_entropy(torch.ones(1, R), torch.ones(1, R, dtype=torch.bool), backend=backend)
    assert 0.0 <= ent.item() <= 1.0 and abs(ent.item() - 1.0) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e300, 1e-300, 1e-320], ids=["1e300", "1e-300", "1e-320-subnormal"])
def test_float64_lambda_beyond_fp32_range(backend, scale):
    # cast to fp32 first, λ = 1e300 became inf (read as diverged) and 1e-300 became 0 (score 0)
    g = torch.Generator().manual_seed(3)
    lam = (torch.rand(4, 8, generator=g, dtype=torch.float64) + 0.1) * scale
    mask = torch.rand(4, 8, generator=g) < 0.7
    mask[:, :2] = True
    got = spectral_entropy_and_slots(lam, mask, backend=backend)
    check(got, reference(lam / scale, mask))
    assert (got[0] > 0.1).all()
