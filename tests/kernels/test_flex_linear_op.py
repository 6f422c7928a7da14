"""flex_linear: Triton kernels (under TRITON_INTERPRET=1) and the torch path vs a float64 reference.

The reference is the op's defining formula, y = x Wᵀ + b + s·((x_lora Qᵀ) ⊙ (λ⊙mask)) Pᵀ,
differentiated by autograd in float64: it never calls flexlora. A low-precision result passes
when its error against float64 is at most 2× the error of the same formula run by plain PyTorch
in the same dtype, plus a small floor (the interpreter sums in a different order).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.kernels import flex_linear

# the module (flexlora.kernels re-exports the function under the same name)
fl = importlib.import_module("flexlora.kernels.flex_linear")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Floor of the tolerance rule, relative to the largest reference entry of each tensor: one unit
# roundoff of the dtype (a single rounding of the result), which matters for tiny tensors such as
# dλ at r_max = 1, where "2× plain PyTorch" compares one lucky or unlucky rounding to another.
FLOOR = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
GRAD_NAMES = ("x", "x_lora", "weight", "bias", "P", "lam", "Q")


# --------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# --------------------------------------------------------------------------------------------
def make_mask(R: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    if mode == "on":
        return torch.ones(R, dtype=torch.bool)
    if mode == "off":
        return torch.zeros(R, dtype=torch.bool)
    if mode == "prefix":  # the usual layout: the first slots active, a whole tail block inactive
        m = torch.zeros(R, dtype=torch.bool)
        m[: max(1, R // 4)] = True
        return m
    m = torch.rand(R, generator=gen) < 0.5
    if R > 1:  # random, but with at least one slot on and one off
        m[0], m[-1] = True, False
    return m


def make_inputs(M, K, N, R, mask_mode="random", *, bias=True, x_lora=False, seed=0, lead=None):
    """float64 leaves of one problem; `lead` replaces (M,) as x's leading dims."""
    gen = torch.Generator().manual_seed(seed)
    lead = (M,) if lead is None else lead

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    inp = {
        "x": rnd(*lead, K),
        "x_lora": rnd(*lead, K) if x_lora else None,
        "weight": rnd(N, K, scale=K**-0.5),
        "bias": rnd(N) if bias else None,
        # adapter of the same size as the base branch, so its rounding errors show
        "P": rnd(N, R, scale=max(R, 1) ** -0.5),
        "lam": rnd(R),
        "Q": rnd(R, K, scale=K**-0.5),
        "mask": make_mask(R, mask_mode, gen),
        "scaling": 0.75,
    }
    dy = rnd(*lead, N)
    return inp, dy


def formula(x, x_lora, weight, bias, P, lam, Q, mask, scaling):
    xl = x if x_lora is None else x_lora
    g = lam * mask.to(lam.dtype) * scaling
    y = x @ weight.t() + ((xl @ Q.t()) * g) @ P.t()
    return y if bias is None else y + bias


def leaves(inp, dtype, adapter_dtype=None, grad_weight=False):
    """Copies of the inputs in `dtype` (adapter factors in `adapter_dtype`), requiring grad."""
    adapter_dtype = adapter_dtype or dtype
    out = {}
    for k, v in inp.items():
        if not isinstance(v, torch.Tensor) or k == "mask":
            out[k] = v
            continue
        dt = adapter_dtype if k in ("P", "lam", "Q") else dtype
        out[k] = v.detach().to(dt, copy=True).requires_grad_(k != "weight" or grad_weight)
    return out


def collect(y, dy, ins):
    y.backward(dy.to(y.dtype))
    res = {"y": y.detach()}
    for k in GRAD_NAMES:
        t = ins[k]
        if t is not None and t.requires_grad:
            res[k] = t.grad
    return res


def reference(inp, dy, dtype=torch.float64, grad_weight=False):
    """The formula by autograd in `dtype` (float64: the reference; else: plain PyTorch)."""
    ins = leaves(inp, dtype, grad_weight=grad_weight)
    return collect(formula(**ins), dy, ins)


def run_op(inp, dy, dtype, backend, adapter_dtype=None, grad_weight=False):
    ins = leaves(inp, dtype, adapter_dtype or (torch.float32 if dtype != torch.float64 else None), grad_weight)
    args = {k: v for k, v in ins.items() if k != "x_lora"}
    y = flex_linear(**args, x_lora=ins["x_lora"], backend=backend)
    return collect(y, dy, ins), ins


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (a.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_matches(out, ins, ref, plain, dtype, tag="", rms=None):
    """Every output within 2x plain PyTorch's error (same dtype) of float64, plus a floor: one
    unit roundoff, or with `rms` (per tensor, the root-sum-square of each entry's elementary
    products, see test_kernels_cuda.rms_of_terms) 4·u·max(rms)/max|ref|, widened where terms cancel."""
    assert set(out) == set(ref), f"{tag}: got values for {sorted(out)}, expected {sorted(ref)}"
    for k, r in ref.items():
        got = out[k]
        assert got.shape == r.shape, f"{tag} {k}: shape {tuple(got.shape)} != {tuple(r.shape)}"
        want_dtype = dtype if k == "y" else ins[k].dtype
        assert got.dtype == want_dtype, f"{tag} {k}: dtype {got.dtype}, expected {want_dtype}"
        assert torch.isfinite(got).all(), f"{tag} {k}: non-finite values"
        floor = FLOOR[dtype]
        if rms is not None:
            u = max(FLOOR[dtype], FLOOR[got.dtype])  # a gradient stored in bf16 is rounded to it
            floor = max(u, 4.0 * u * rms[k].max().item() / (r.abs().max().item() or 1.0))
        err = rel_err(got, r)
        tol = 2.0 * rel_err(plain[k], r) + floor
        assert err <= tol, f"{tag} {k}: relative error {err:.3e} > allowed {tol:.3e} ({dtype})"


def assert_inactive_zero(out, mask, tag=""):
    off = ~mask
    for k, sl in (("P", (slice(None), off)), ("lam", (off,)), ("Q", (off,))):
        if k in out and off.any():
            g = out[k][sl]
            assert torch.equal(g, torch.zeros_like(g)), f"{tag} d{k} of inactive slots is not exactly 0"


def check_case(M, K, N, R, dtype, backend, mask_mode="random", **kw):
    inp, dy = make_inputs(M, K, N, R, mask_mode, bias=kw.pop("bias", True), x_lora=kw.pop("x_lora", False),
                          seed=kw.pop("seed", 0), lead=kw.pop("lead", None))
    grad_weight = kw.pop("grad_weight", False)
    ref = reference(inp, dy, grad_weight=grad_weight)
    plain = reference(inp, dy, dtype, grad_weight=grad_weight)
    out, ins = run_op(inp, dy, dtype, backend, grad_weight=grad_weight, **kw)
    tag = f"{backend} M{M}-K{K}-N{N}-r{R}-{dtype}-{mask_mode}"
    assert_matches(out, ins, ref, plain, dtype, tag)
    assert_inactive_zero(out, inp["mask"], tag)
    return out


# --------------------------------------------------------------------------------------------
# Triton kernels under the interpreter
# --------------------------------------------------------------------------------------------
SHAPES = [  # M, K, N, R: M = 1; K, N below one block; odd sizes across blocks; r_max 1..256
    (1, 70, 45, 8),
    (7, 9, 5, 1),
    (37, 33, 70, 64),
    (3, 5, 7, 256),
]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
def test_triton_matches_float64(shape, dtype):
    check_case(*shape, dtype, "triton")


@pytest.mark.parametrize("mask_mode", ["on", "off", "prefix"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_triton_mask_modes(mask_mode, dtype):
    out = check_case(19, 40, 24, 64, dtype, "triton", mask_mode)
    if mask_mode == "off":
        for k in ("P", "lam", "Q"):
            assert torch.count_nonzero(out[k]) == 0, f"all slots off but d{k} != 0"


@pytest.mark.parametrize(
    "variant", ["x_lora", "no_bias", "grad_weight", "adapter_bf16"]
)
def test_triton_variants(variant):
    kw = {
        "x_lora": dict(x_lora=True),
        "no_bias": dict(bias=False),
        "grad_weight": dict(grad_weight=True),
        "adapter_bf16": dict(adapter_dtype=torch.bfloat16),
    }[variant]
    dtype = torch.bfloat16 if variant == "adapter_bf16" else torch.float32
    check_case(10, 24, 18, 8, dtype, "triton", **kw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adapter_bf16_under_fp32_compute(backend):
    """λ, P, Q stored in bf16, x in fp32: the op computes the function of the stored values with
    fp32 rounding only (s·λ is not rounded to bf16 on the way); the bf16 gradients of P, λ, Q
    carry one bf16 rounding."""
    inp, dy = make_inputs(10, 24, 18, 8)
    for k in ("P", "lam", "Q"):
        inp[k] = inp[k].to(torch.bfloat16).double()
    ref, plain = reference(inp, dy), reference(inp, dy, torch.float32)
    out, ins = run_op(inp, dy, torch.float32, backend, adapter_dtype=torch.bfloat16)
    for k in ("y", "x", "bias"):
        tol = 2.0 * rel_err(plain[k], ref[k]) + FLOOR[torch.float32]
        assert rel_err(out[k], ref[k]) <= tol, f"{backend} {k}: {rel_err(out[k], ref[k]):.2e} > {tol:.2e}"
    for k in ("P", "lam", "Q"):
        assert out[k].dtype == torch.bfloat16
        # one rounding to bf16: 2^-8 to nearest; the interpreter's stores truncate (2^-7)
        assert rel_err(out[k], ref[k]) <= 2.0 ** -7, f"{backend} d{k}: {rel_err(out[k], ref[k]):.2e}"


def test_triton_leading_dims_with_x_lora():
    check_case(6, 20, 12, 8, torch.float32, "triton", lead=(2, 3), x_lora=True)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_x(layout, backend):
    inp, dy = make_inputs(9, 20, 11, 8)
    ref = reference(inp, dy)
    x64 = inp["x"]
    if layout == "transposed":  # [M, K] view of a [K, M] buffer
        base = x64.t().contiguous().float().requires_grad_(True)
        x = base.t()
    else:  # every other column of a [M, 2K] buffer
        base = torch.zeros(9, 40, dtype=torch.float32)
        base[:, ::2] = x64.float()
        base.requires_grad_(True)
        x = base[:, ::2]
    assert not x.is_contiguous()
    ins = leaves(inp, torch.float32)
    y = flex_linear(x, ins["weight"], ins["bias"], ins["P"], ins["lam"], ins["Q"], ins["mask"], 0.75, backend=backend)
    y.backward(dy.float())
    gx = base.grad.t() if layout == "transposed" else base.grad[:, ::2]
    assert rel_err(y, ref["y"]) < 1e-5, "y of non-contiguous x"
    assert rel_err(gx, ref["x"]) < 1e-5, "dx of non-contiguous x"
    assert rel_err(ins["Q"].grad, ref["Q"]) < 1e-5, "dQ of non-contiguous x"
    if layout == "strided":
        assert torch.count_nonzero(base.grad[:, 1::2]) == 0, "gradient leaked into skipped columns"


def _strided_view(t64: torch.Tensor, how: str) -> torch.Tensor:
    """A non-contiguous fp32 leaf view holding t64's values: a transposed view of the transposed
    buffer, or every other column of a buffer twice as wide."""
    if how == "transposed":
        return t64.t().contiguous().float().t().detach().requires_grad_(True)
    wide = torch.zeros(t64.shape[0], 2 * t64.shape[1], dtype=torch.float32)
    wide[:, ::2] = t64.float()
    return wide[:, ::2].detach().requires_grad_(True)


@pytest.mark.parametrize("how", ["transposed", "strided"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_weight_factors_and_x_lora(how, backend):
    """Every tensor argument may be a strided view: weight, P, Q and x_lora too (the kernels take
    each tensor's strides; a stride mixed up between them would read the wrong entries)."""
    inp, dy = make_inputs(9, 20, 11, 8, x_lora=True)
    ref = reference(inp, dy)
    ins = leaves(inp, torch.float32)
    for k in ("weight", "P", "Q", "x_lora"):
        ins[k] = _strided_view(inp[k], how)
        assert not ins[k].is_contiguous(), k
    ins["weight"].requires_grad_(False)
    out = collect(flex_linear(ins["x"], ins["weight"], ins["bias"], ins["P"], ins["lam"], ins["Q"], ins["mask"], 0.75,
                              x_lora=ins["x_lora"], backend=backend), dy, ins)
    for k in ("y", "x", "x_lora", "bias", "P", "lam", "Q"):
        assert rel_err(out[k], ref[k]) < 1e-5, f"{backend} {k} with {how} weight / P / Q / x_lora"
    assert_inactive_zero(out, inp["mask"], f"{backend} {how}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_broadcast_dy_from_sum(backend):
    """y.sum().backward() hands the op a dy with strides (0, 0): the kernels must read it as ones."""
    inp, _ = make_inputs(6, 20, 11, 8)
    ref = reference(inp, torch.ones(6, 11, dtype=torch.float64))
    ins = leaves(inp, torch.float32)
    args = {k: v for k, v in ins.items() if k != "x_lora"}
    flex_linear(**args, backend=backend).sum().backward()
    for k in ("x", "P", "lam", "Q", "bias"):
        assert rel_err(ins[k].grad, ref[k]) < 1e-5, f"{backend} d{k} with a broadcast dy"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    inp, _ = make_inputs(1, 8, 6, 4)
    ins = leaves(inp, torch.float32)
    x = torch.zeros(0, 8, requires_grad=True)
    y = flex_linear(x, ins["weight"], ins["bias"], ins["P"], ins["lam"], ins["Q"], ins["mask"], 0.75, backend=backend)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    for k in ("P", "lam", "Q", "bias"):  # sums over no rows: exactly 0
        g = ins[k].grad
        assert g.shape == ins[k].shape and torch.equal(g, torch.zeros_like(g)), f"{backend} d{k} of an empty batch: {g}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch_with_x_lora(backend):
    inp, _ = make_inputs(1, 8, 6, 4, x_lora=True)
    ins = leaves(inp, torch.float32)
    x, xl = torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 8, requires_grad=True)
    y = flex_linear(x, ins["weight"], ins["bias"], ins["P"], ins["lam"], ins["Q"], ins["mask"], 0.75, x_lora=xl,
                    backend=backend)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and xl.grad.shape == (0, 8)
    for k in ("P", "lam", "Q", "bias"):
        g = ins[k].grad
        assert torch.equal(g, torch.zeros_like(g)), f"{backend} d{k} of an empty batch with x_lora"


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    M=st.integers(1, 24),
    K=st.integers(1, 40),
    N=st.integers(1, 40),
    R=st.sampled_from([1, 3, 8, 17]),
    seed=st.integers(0, 2**16),
)
def test_triton_shape_fuzz(M, K, N, R, seed):
    check_case(M, K, N, R, torch.float32, "triton", seed=seed)


# --------------------------------------------------------------------------------------------
# Torch path against the same reference
# --------------------------------------------------------------------------------------------
TORCH_SHAPES = [(1, 70, 45, 8), (7, 9, 5, 1), (37, 33, 70, 64), (5, 12, 9, 256)]


@pytest.mark.parametrize("mask_mode", ["random", "on", "off"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", TORCH_SHAPES, ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
def test_torch_matches_float64(shape, dtype, mask_mode):
    check_case(*shape, dtype, "torch", mask_mode)


@pytest.mark.parametrize("active", [1, 8, 15, 16, 17, 32, 48])
def test_torch_thin_widths(active):
    """The CPU path runs its thin products transposed or not by their width (active slots, a
    multiple of 16 or not) and gathers the active slots out of r_max = 48: every width agrees
    with float64, with inactive gradients exactly 0."""
    inp, dy = make_inputs(40, 24, 36, 48)
    inp["mask"] = torch.zeros(48, dtype=torch.bool)
    inp["mask"][torch.randperm(48, generator=torch.Generator().manual_seed(active))[:active]] = True
    ref, plain = reference(inp, dy), reference(inp, dy, torch.float32)
    out, ins = run_op(inp, dy, torch.float32, "torch")
    assert_matches(out, ins, ref, plain, torch.float32, f"active={active}")
    assert_inactive_zero(out, inp["mask"], f"active={active}")


def test_torch_active_slot_with_zero_lambda():
    """An active slot with λ = 0 (just expanded) is left out of the output products but still
    gets its dλ (the only gradient that is not 0 there) from u."""
    inp, dy = make_inputs(20, 16, 12, 24, "on")
    inp["lam"][[3, 7, 20]] = 0.0
    inp["mask"][[5, 6]] = False
    ref, plain = reference(inp, dy), reference(inp, dy, torch.float32)
    out, ins = run_op(inp, dy, torch.float32, "torch")
    assert_matches(out, ins, ref, plain, torch.float32, "zero-lambda slots")
    assert out["lam"][[3, 7, 20]].abs().min() > 0, "dλ of an active λ = 0 slot must not vanish"
    assert torch.equal(out["P"][:, [3, 7, 20]], torch.zeros(12, 3)), "dP of a λ = 0 slot is s·λ·(...) = 0"


def _count_applies(monkeypatch, cls, calls):
    real = cls.apply
    monkeypatch.setattr(cls, "apply", lambda *a: calls.append(cls.__name__) or real(*a))


def test_eager_calls_take_the_autograd_function(monkeypatch):
    """Eager calls go through the one-piece autograd.Function (no custom-op dispatch, no argument
    binding); the same numbers as the registered op (which widens u to all r_max slots) and as the
    torch.func-safe split Function, also with an active λ = 0."""
    inp, dy = make_inputs(6, 10, 7, 8)
    assert inp["mask"][0] and not inp["mask"].all()
    inp["lam"][0] = 0.0
    calls = []
    _count_applies(monkeypatch, fl._FastEagerFlexLinear, calls)
    _count_applies(monkeypatch, fl._EagerFlexLinear, calls)
    out, _ = run_op(inp, dy, torch.float32, "torch")
    assert calls == ["_FastEagerFlexLinear"]
    monkeypatch.setattr(fl, "_functorch_active", lambda: True)  # as inside torch.func.grad
    split, _ = run_op(inp, dy, torch.float32, "torch")
    assert calls == ["_FastEagerFlexLinear", "_EagerFlexLinear"]
    for k in ("y", "x", "P", "lam", "Q", "bias"):
        assert torch.equal(out[k], split[k]), f"{k}: the two eager Functions differ"
    ins = leaves(inp, torch.float32)
    y, _ = torch.ops.flexlora.flex_linear(ins["x"], None, ins["weight"], ins["bias"], ins["P"], ins["lam"],
                                          ins["Q"], ins["mask"], 0.75, None, "torch")
    via_op = collect(y, dy, ins)
    for k in ("y", "x", "P", "lam", "Q", "bias"):
        assert torch.equal(out[k], via_op[k]), f"{k}: eager Function and custom op differ"


def test_torch_func_grad_matches_float64(monkeypatch):
    """torch.func.grad (functorch) through the eager op gives the float64 reference gradients
    (through the split Function: the one-piece one cannot run under a transform)."""
    calls = []
    _count_applies(monkeypatch, fl._FastEagerFlexLinear, calls)
    _count_applies(monkeypatch, fl._EagerFlexLinear, calls)
    inp, dy = make_inputs(9, 11, 7, 8)
    ref = reference(inp, dy)
    ins = leaves(inp, torch.float32)
    names = ("x", "bias", "P", "lam", "Q")

    def objective(*ts):
        args = {**ins, **dict(zip(names, ts))}
        args.pop("x_lora")
        return (flex_linear(**args, backend="torch") * dy.float()).sum()

    grads = torch.func.grad(objective, argnums=tuple(range(len(names))))(*(ins[k].detach() for k in names))
    for k, g in zip(names, grads):
        assert rel_err(g, ref[k]) < 1e-5, f"torch.func.grad d{k}"
    assert calls and set(calls) == {"_EagerFlexLinear"}  # functorch re-enters apply at its own level


@pytest.mark.parametrize("variant", ["x_lora", "no_bias", "grad_weight", "leading_dims"])
def test_torch_variants(variant):
    kw = {
        "x_lora": dict(x_lora=True),
        "no_bias": dict(bias=False),
        "grad_weight": dict(grad_weight=True),
        "leading_dims": dict(lead=(2, 2, 3), x_lora=True),
    }[variant]
    check_case(12, 24, 18, 8, torch.float32, "torch", **kw)


def test_scaling_as_tensor_equals_float():
    inp, dy = make_inputs(5, 12, 10, 8)
    ref = reference(inp, dy)
    for backend in ("torch", "triton"):
        ins = leaves(inp, torch.float32)
        args = {k: v for k, v in ins.items() if k not in ("x_lora", "scaling")}
        y = flex_linear(**args, scaling=torch.tensor(0.75), backend=backend)
        out = collect(y, dy, ins)
        for k in ("y", "x", "P", "lam", "Q"):
            assert rel_err(out[k], ref[k]) < 1e-5, f"{backend} {k} with tensor scaling"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_custom_op(backend):
    """Schema, fake implementation (shapes and dtypes, e.g. fp32 u on Triton) and autograd agree."""
    inp, _ = make_inputs(6, 10, 7, 8, x_lora=True)
    ins = leaves(inp, torch.float32)
    args = (ins["x"], ins["x_lora"], ins["weight"], ins["bias"], ins["P"], ins["lam"], ins["Q"], ins["mask"],
            0.75, None, backend)
    torch.library.opcheck(torch.ops.flexlora.flex_linear.default, args)


@pytest.mark.parametrize("mask_mode", ["on", "off", "random"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_op_matches_float64(backend, mask_mode):
    """The torch.library op (what torch.compile runs) against float64, forward and every
    gradient: its backward takes other branches than the eager Function's (u at full width, the
    mask entering through the gate and dλ's factor when every slot is active)."""
    inp, dy = make_inputs(7, 10, 9, 8, mask_mode, x_lora=True)
    ref = reference(inp, dy)
    plain = reference(inp, dy, torch.float32)
    ins = leaves(inp, torch.float32)
    y, u = torch.ops.flexlora.flex_linear(ins["x"], ins["x_lora"], ins["weight"], ins["bias"], ins["P"], ins["lam"],
                                          ins["Q"], ins["mask"], 0.75, None, backend)
    assert u.shape == (7, 8)
    out = collect(y, dy, ins)
    tag = f"custom op {backend} {mask_mode}"
    assert_matches(out, ins, ref, plain, torch.float32, tag)
    assert_inactive_zero(out, inp["mask"], tag)


@pytest.mark.parametrize("mask_mode", ["random", "on"])  # gathered active slots / all slots
def test_float64_dlam_is_summed_in_float64(mask_mode):
    # dλ used to be summed in fp32 for every dtype: ~1e-8 relative error for float64 inputs
    inp, dy = make_inputs(33, 20, 17, 8, mask_mode)
    inp["scaling"] = 1.0 / 3.0  # not exact in fp32 either
    out, _ = run_op(inp, dy, torch.float64, "torch")
    x, P, Q, mask, s = inp["x"], inp["P"], inp["Q"], inp["mask"], inp["scaling"]
    # closed form: dλ_j = s·mask_j·Σ_m (x·Qᵀ)[m, j]·(dy·P)[m, j], term by term in float64
    want = torch.tensor([s * float(mask[j]) * sum(float((x[m] @ Q[j]) * (dy[m] @ P[:, j])) for m in range(33))
                         for j in range(8)], dtype=torch.float64)
    assert out["lam"].dtype == torch.float64
    assert rel_err(out["lam"], want) < 1e-12, f"dλ relative error {rel_err(out['lam'], want):.2e}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("x_lora", [False, True], ids=["x", "x_lora"])
def test_zero_in_features(backend, x_lora):
    """K = 0 with M > 0: y = b, as F.linear gives (reshape(-1, 0) used to fail)."""
    gen = torch.Generator().manual_seed(0)
    R, N, lead = 4, 5, (2, 3)
    f64 = dict(dtype=torch.float64)
    inp = {
        "x": torch.zeros(*lead, 0, **f64),
        "x_lora": torch.zeros(*lead, 0, **f64) if x_lora else None,
        "weight": torch.zeros(N, 0, **f64),
        "bias": torch.randn(N, generator=gen, **f64),
        "P": torch.randn(N, R, generator=gen, **f64),
        "lam": torch.randn(R, generator=gen, **f64),
        "Q": torch.zeros(R, 0, **f64),
        "mask": torch.tensor([True, False, True, True]),
        "scaling": 0.75,
    }
    dy = torch.randn(*lead, N, generator=gen, dtype=torch.float64)
    ref = reference(inp, dy)
    out, ins = run_op(inp, dy, torch.float32, backend)
    assert out["y"].shape == (*lead, N)
    assert torch.equal(out["y"], inp["bias"].float().expand(*lead, N)), "y must be the bias"
    assert torch.equal(out["y"], torch.nn.functional.linear(ins["x"], ins["weight"].float(), ins["bias"]).detach())
    assert rel_err(out["bias"], ref["bias"]) < 1e-6, "db = Σ dy"
    for k in ("x", "Q") + (("x_lora",) if x_lora else ()):
        assert out[k].shape == ref[k].shape and out[k].numel() == 0, k
    for k in ("P", "lam"):  # u = x·Qᵀ = 0: no gradient reaches the adapter
        assert torch.equal(out[k], torch.zeros_like(out[k])), k


@pytest.fixture
def restore_tf32():
    """_precision tests change PyTorch's global TF32 setting: put it back for later tests."""
    matmul = torch.backends.cuda.matmul
    saved = (matmul.fp32_precision, torch.backends.fp32_precision)
    yield
    torch.backends.fp32_precision = saved[1]
    matmul.fp32_precision = saved[0]


@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_precision_follows_the_new_tf32_api(setting, monkeypatch, restore_tf32):
    # after the new API set TF32, reading the legacy allow_tf32 raises (mixed APIs), so every
    # fp32 Triton launch on CUDA would have crashed
    monkeypatch.setattr(fl, "_INTERPRETED", False)  # as on a GPU
    torch.backends.cuda.matmul.fp32_precision = setting
    assert fl._precision(torch.float32) == setting
    assert fl._precision(torch.bfloat16) == "tf32"  # low precision: tensor cores whatever the switch


@pytest.mark.parametrize("allow", [True, False])
def test_precision_falls_back_to_the_legacy_switch(allow, monkeypatch):
    import types

    # a torch without fp32_precision (< 2.9): only allow_tf32 exists
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=allow))
    monkeypatch.setattr(fl, "_INTERPRETED", False)
    assert fl._precision(torch.float32) == ("tf32" if allow else "ieee")


# --------------------------------------------------------------------------------------------
# torch.compile: one graph, zero recompiles across rank changes (torch path; the interpreter
# cannot be compiled)
# --------------------------------------------------------------------------------------------
def test_compile_no_recompiles_across_rank_changes(monkeypatch):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from flexlora.layers.flex_linear import FlexLinear

    monkeypatch.setenv("FLEXLORA_BACKEND", "torch")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        FlexLinear(12, 10, r_max=8, r_init=4, alpha=8.0), torch.nn.GELU(), FlexLinear(10, 6, r_max=8, r_init=2, alpha=4.0)
    )
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lam.normal_()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    torch._dynamo.utils.counters.clear()
    x = torch.randn(2, 5, 12)
    for step in range(4):
        with torch.no_grad():  # prune / expand / retune: mask flips and λ changes only
            model[0].mask[step + 2] = not bool(model[0].mask[step + 2])
            model[2].mask[step] = True
            model[2].lam.add_(0.3)
        for p in model.parameters():
            p.grad = None
        y_eager = model(x)
        y_eager.square().sum().backward()
        grads_eager = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        for p in model.parameters():
            p.grad = None
        y_comp = compiled(x)
        y_comp.square().sum().backward()
        grads_comp = [p.grad for p in model.parameters() if p.requires_grad]
        torch.testing.assert_close(y_comp, y_eager, rtol=1e-6, atol=1e-6, msg=f"step {step}: compiled y != eager")
        for ge, gc in zip(grads_eager, grads_comp):
            torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-6, msg=f"step {step}: compiled grad != eager")
    assert counter.frame_count == 1, f"expected one compiled frame, got {counter.frame_count}"
    recompiles = sum(torch._dynamo.utils.counters["recompiles"].values())
    assert recompiles == 0, f"rank changes caused {recompiles} recompiles"
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0, "graph break inside flex_linear"
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# Bad input and backend choice
# --------------------------------------------------------------------------------------------
def _good(**over):
    inp, _ = make_inputs(4, 6, 5, 3)
    args = {k: (v.float() if isinstance(v, torch.Tensor) and k != "mask" else v) for k, v in inp.items()}
    args.pop("x_lora")
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, exc, words",
    [
        (dict(x=torch.ones(4, 6, dtype=torch.long)), TypeError, "x must be a floating-point"),
        (dict(x=torch.randn(4, 7)), ValueError, "in_features=6"),
        (dict(P=torch.randn(5, 4)), ValueError, "P must have shape [N, R] = (5, 3) (N=5, K=6 from weight, R=3 from lam), got (5, 4)"),
        (dict(Q=torch.randn(3, 5)), ValueError, "Q must have shape [R, K] = (3, 6)"),
        (dict(lam=torch.randn(3, 1)), ValueError, "lam must be 1-D"),
        (dict(mask=torch.ones(3)), TypeError, "mask must be a bool"),
        (dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask must have shape [R] = (3,)"),
        (dict(bias=torch.randn(6)), ValueError, "bias must have shape (5,)"),
        (dict(weight=torch.randn(5, 6, 1)), ValueError, "weight must be 2-D"),
        (dict(scaling=torch.ones(2)), ValueError, "scaling must be a float or a 0-d tensor"),
        (dict(scaling="2"), TypeError, "scaling must be a float"),
        (dict(P=torch.randn(5, 3, device="meta")), ValueError, "P is on meta"),
        (dict(x=torch.tensor(1.0)), ValueError, "x must have at least 1 dimension"),
        (dict(lam=torch.ones(3, dtype=torch.long)), TypeError, "lam must be a floating-point tensor, got dtype torch.int64"),
        (dict(Q=torch.ones(3, 6, dtype=torch.int32)), TypeError, "Q must be a floating-point tensor"),
        (dict(weight=None), TypeError, "weight must be a tensor, got NoneType"),  # was an AttributeError
        (dict(lam=[1.0, 2.0, 3.0]), TypeError, "lam must be a tensor, got list"),
        (dict(bias=1.0), TypeError, "bias must be a tensor or None, got float"),
    ],
    ids=["x-int", "x-width", "P-shape", "Q-shape", "lam-2d", "mask-float", "mask-shape", "bias-shape",
         "weight-3d", "scaling-vector", "scaling-str", "P-device", "x-0d", "lam-int", "Q-int", "weight-none",
         "lam-list", "bias-float"],
)
def test_bad_input_raises_clearly(over, exc, words):
    args = _good(**over)
    with pytest.raises(exc, match=None) as info:
        flex_linear(**args, backend="torch")
    assert words in str(info.value), f"message {str(info.value)!r} lacks {words!r}"


def test_bad_x_lora_and_backend_name():
    args = _good()
    with pytest.raises(ValueError, match="x_lora must have x's shape"):
        flex_linear(**args, x_lora=torch.randn(4, 5))
    with pytest.raises(TypeError, match="x_lora must have x's dtype"):
        flex_linear(**args, x_lora=torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend must be one of"):
        flex_linear(**args, backend="cuda")
    with pytest.raises(TypeError, match="x_lora must be a tensor or None, got ndarray"):
        flex_linear(**args, x_lora=args["x"].numpy())


def test_bad_backend_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("FLEXLORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="the environment variable FLEXLORA_BACKEND must be one of"):
        flex_linear(**_good())


class _FakeCuda:
    """Just enough of a CUDA tensor for the backend rule (no GPU here)."""

    is_cuda = True
    dtype = torch.bfloat16

    class device:  # noqa: N801 - mimics torch.device's attribute
        type = "cuda"


def test_backend_rule(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.delenv("FLEXLORA_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fl._resolve_backend(x, None) == "triton", "CPU + interpreter defaults to Triton"
    assert fl._resolve_backend(x, "torch") == "torch", "explicit torch wins"
    assert fl._resolve_backend(_FakeCuda(), None) == "torch", "CUDA defaults to the torch path (cuBLAS)"
    assert fl._resolve_backend(_FakeCuda(), "triton") == "triton", "explicit Triton on CUDA"
    assert fl._resolve_backend(x.double(), None) == "torch", "fp64 falls back to torch by default"
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        fl._resolve_backend(x.double(), "triton")
    monkeypatch.setenv("FLEXLORA_BACKEND", "torch")
    assert fl._resolve_backend(x, None) == "torch", "env FLEXLORA_BACKEND sets the default"
    assert fl._resolve_backend(x, "triton") == "triton", "explicit argument beats the env"
    monkeypatch.delenv("FLEXLORA_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fl._resolve_backend(x, None) == "torch", "CPU without interpreter defaults to torch"
    assert fl._resolve_backend(_FakeCuda(), "triton") == "triton", "CUDA needs no interpreter"
    monkeypatch.setenv("FLEXLORA_BACKEND", "triton")
    assert fl._resolve_backend(_FakeCuda(), None) == "triton", "env FLEXLORA_BACKEND=triton on CUDA"
    monkeypatch.delenv("FLEXLORA_BACKEND")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fl._resolve_backend(x, "triton")
    # interpreter switched on after import: kernels were built for a GPU, so CPU cannot run them
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fl, "_INTERPRETED", False)
    assert fl._resolve_backend(x, None) == "torch"
    with pytest.raises(RuntimeError, match="before flexlora is imported"):
        fl._resolve_backend(x, "triton")


def test_backend_dispatch_reaches_the_chosen_path(monkeypatch):
    calls = []
    for name in ("_torch_fwd", "_triton_fwd"):
        real = getattr(fl, name)
        monkeypatch.setattr(fl, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    args = _good()
    monkeypatch.setenv("FLEXLORA_BACKEND", "torch")
    flex_linear(**args)
    flex_linear(**args, backend="triton")
    monkeypatch.delenv("FLEXLORA_BACKEND")
    flex_linear(**args)
    assert calls == ["_torch_fwd", "_triton_fwd", "_triton_fwd"], calls


def test_import_does_not_need_triton():
    """flexlora imports and runs the torch path where triton is missing."""
    from _fresh_python import run_python

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, flexlora\n"
        "from flexlora.kernels import flex_linear\n"
        "y = flex_linear(torch.ones(2, 3), torch.ones(4, 3), None, torch.ones(4, 2), torch.ones(2), "
        "torch.ones(2, 3), torch.tensor([True, False]), 0.5)\n"
        "assert y.shape == (2, 4) and float(y[0, 0]) == 4.5, y\n"
    )
    done = run_python(code, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# Review fixes: compiled backward layout, strided bias, non-finite values in inactive slots,
# torch.func on the Triton path, float64 scaling, float64 under autocast
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r_max, r_init", [(8, 8), (12, 6)], ids=["full-from-start", "filled-later"])
def test_inductor_backward_with_every_slot_active(monkeypatch, r_max, r_init):
    """Every slot active and r_max not a multiple of 16: the torch path computes dP transposed, a
    transposed view that the compiled custom op returned as it was, against the contiguous layout
    its fake declares; inductor checks strides at run time ("expected ... stride 1==8") and a
    compiled run died as soon as the allocator filled a module (aot_eager never checks)."""
    import torch._dynamo

    from flexlora.layers.flex_linear import FlexLinear

    monkeypatch.setenv("FLEXLORA_BACKEND", "torch")
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = FlexLinear(8, 12, r_max=r_max, r_init=r_init, alpha=8.0)
    with torch.no_grad():
        layer.lam.normal_()
    compiled = torch.compile(layer)
    x = torch.randn(4, 8)
    for fill in (False, True):
        if fill:
            with torch.no_grad():
                layer.mask.fill_(True)
                layer.lam.normal_()
        grads = []
        for fn in (layer, compiled):
            layer.zero_grad(set_to_none=True)
            fn(x).square().sum().backward()
            grads.append([layer.P.grad.clone(), layer.lam.grad.clone(), layer.Q.grad.clone()])
        for name, ge, gc in zip(("P", "lam", "Q"), *grads):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6, msg=f"compiled d{name} != eager")
    torch._dynamo.reset()


def test_triton_reads_a_strided_bias():
    inp, dy = make_inputs(3, 5, 4, 2, "on")
    ref = reference(inp, dy)
    ins = leaves(inp, torch.float32)
    wide = torch.zeros(8, dtype=torch.float32)
    wide[::2] = ins["bias"].detach()
    ins["bias"] = wide[::2].requires_grad_(True)  # stride 2
    args = {k: v for k, v in ins.items() if k != "x_lora"}
    out = collect(flex_linear(**args, backend="triton"), dy, ins)
    assert rel_err(out["y"], ref["y"]) < 1e-5  # read with stride 1 it was 1.5 off
    assert rel_err(out["bias"], ref["bias"]) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", ["lam", "P", "Q"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_values_in_inactive_slots_change_nothing(backend, where, value):
    """An inactive slot adds nothing, whatever it holds: λ·mask kept a NaN λ (NaN·0 = NaN) and
    the Triton kernels multiplied an inactive P column / Q row by a zero gate."""
    inp, dy = make_inputs(5, 9, 7, 4)
    inp["mask"] = torch.tensor([True, False, True, False])
    ref = reference(inp, dy)
    bad = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    if where == "lam":
        bad["lam"][1] = value
    elif where == "P":
        bad["P"][:, 3] = value
    else:
        bad["Q"][1, :] = value
    out, _ = run_op(bad, dy, torch.float32, backend)
    for k in ("y", "x", "bias", "P", "lam", "Q"):
        got, r = out[k], ref[k]
        active = {"P": (slice(None), inp["mask"]), "lam": (inp["mask"],), "Q": (inp["mask"],)}.get(k, ())
        assert torch.isfinite(got[active]).all(), f"{backend} {k}: non-finite with {value} in an inactive {where}"
        assert rel_err(got[active], r[active]) < 1e-5, f"{backend} {k}"
    assert_inactive_zero(out, inp["mask"], f"{backend} {where}={value}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inactive_gradients_stay_zero_with_inf_in_x(backend):
    """inf in x (an fp16 overflow upstream) makes the active gradients non-finite, as for any
    layer; the inactive slots' gradients stay exactly 0.0 (0·inf gave NaN on the Triton path)."""
    inp, dy = make_inputs(4, 6, 5, 4)
    inp["mask"] = torch.tensor([True, False, True, False])
    inp["x"][1, 2] = float("inf")
    out, _ = run_op(inp, dy, torch.float32, backend)
    assert_inactive_zero(out, inp["mask"], f"{backend} inf in x")


def test_torch_func_grad_on_the_triton_backend():
    """torch.func with the Triton backend chosen (by name or by default under the interpreter)
    runs the torch path: a Triton launch cannot read functorch's wrapped tensors."""
    inp, dy = make_inputs(5, 7, 6, 4)
    ref = reference(inp, dy)
    ins = leaves(inp, torch.float32)

    def objective(lam):
        args = {**ins, "lam": lam}
        args.pop("x_lora")
        return (flex_linear(**args, backend="triton") * dy.float()).sum()

    g = torch.func.grad(objective)(ins["lam"].detach())
    assert rel_err(g, ref["lam"]) < 1e-5


def test_float64_scaling_tensor_keeps_float64_precision():
    inp, dy = make_inputs(5, 9, 7, 4, "on")
    inp["scaling"] = 1.0 / 3.0
    ref = reference(inp, dy)
    ins = leaves(inp, torch.float64)
    args = {k: v for k, v in ins.items() if k not in ("x_lora", "scaling")}
    y = flex_linear(**args, scaling=torch.tensor(1.0 / 3.0, dtype=torch.float64), backend="torch")
    out = collect(y, dy, ins)
    for k in ("y", "x", "P", "lam", "Q"):
        assert rel_err(out[k], ref[k]) < 1e-13, f"d{k}: the float64 scaling was rounded to fp32"


def test_float64_input_is_left_alone_by_autocast():
    inp, _ = make_inputs(3, 6, 5, 4)
    args = {k: v for k, v in inp.items() if k != "x_lora"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = flex_linear(**args, backend="torch")
        y_lin = torch.nn.functional.linear(args["x"], args["weight"])
    assert y.dtype == y_lin.dtype == torch.float64  # autocast does not touch float64 (was bf16)
    assert rel_err(y, formula(**inp)) < 1e-13


def test_torch_dlam_of_fp16_compute_is_summed_beyond_fp16_range():
    # dλ_j = s·Σ_m u[m, j]·dv[m, j] over M = 4096 positive fp16 products of ~100 each: the sum
    # (~4e5) is past fp16's 65504, so a dλ summed and returned in the compute dtype is inf; summed
    # in fp32 and stored in λ's fp32 it is the float64 value up to the rounding of u and dv
    g = torch.Generator().manual_seed(0)
    M, K, N, R = 4096, 16, 8, 4
    x = (torch.rand(M, K, generator=g) + 0.5).to(torch.float16).requires_grad_()
    w = torch.rand(N, K, generator=g).to(torch.float16)
    P = (torch.rand(N, R, generator=g) + 0.5).requires_grad_()
    Q = (torch.rand(R, K, generator=g) + 0.5).requires_grad_()
    lam = (torch.rand(R, generator=g) + 0.5).requires_grad_()
    mask = torch.ones(R, dtype=torch.bool)
    dy = (torch.rand(M, N, generator=g) + 0.5).to(torch.float16)
    flex_linear(x, w, None, P, lam, Q, mask, 0.5, backend="torch").backward(dy)
    u64 = x.detach().double() @ Q.detach().double().t()
    dv64 = dy.double() @ P.detach().double()
    want = 0.5 * (u64 * dv64).sum(0)
    assert want.min() > 2 * 65504 and lam.grad.dtype == torch.float32
    assert rel_err(lam.grad.double(), want) <= 1e-2
