"""The Triton kernels compiled for a real GPU, against float64 references (CUDA machines only).

Collected only where CUDA is visible and the Triton interpreter is off (tests/conftest.py):

    TRITON_INTERPRET=0 python -m pytest -q tests/kernels/test_kernels_cuda.py

The CPU test-suite runs the same kernels under the interpreter (test_flex_linear_op.py,
test_spectral_entropy.py), which cannot see what only compiled code does: tensor-core dots in
bf16/fp16, the autotuned block configs, real strides and block edges at LLaMA sizes, multi-warp
reductions. The float64 references are the ones of those files (the op's defining formula by
autograd; the entropy row by row from its definition), computed on the CPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_flex_linear_op import (  # the CPU file's float64 reference and its tolerance rule
    DTYPES,
    GRAD_NAMES,
    assert_inactive_zero,
    assert_matches,
    formula,
    make_inputs,
    reference,
    rel_err,
)
from test_spectral_entropy import check as check_entropy
from test_spectral_entropy import make_mask as entropy_mask
from test_spectral_entropy import reference as entropy_reference

from flexlora.kernels import flex_linear, spectral_entropy_and_slots

fl = importlib.import_module("flexlora.kernels.flex_linear")
DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def fixed_config(monkeypatch, request):
    """Most tests here run many shapes once each: the fixed block config, not the autotuner
    (tests marked `autotuned` keep it on)."""
    if "autotuned" not in request.keywords:
        monkeypatch.setenv("FLEXLORA_TRITON_AUTOTUNE", "0")


def on_cuda(inp, dtype, adapter_dtype=torch.float32, grad_weight=False):
    """CUDA leaf copies of a problem: x, W, b in `dtype`, P, λ, Q in `adapter_dtype`."""
    out = {}
    for k, v in inp.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
        elif k == "mask":
            out[k] = v.to(DEV)
        else:
            dt = adapter_dtype if k in ("P", "lam", "Q") else dtype
            out[k] = v.detach().to(DEV, dt).requires_grad_(k != "weight" or grad_weight)
    return out


def grads_of(y, dy, ins):
    y.backward(dy.to(DEV, y.dtype))
    res = {"y": y.detach().cpu()}
    for k in GRAD_NAMES:
        t = ins.get(k)
        if t is not None and t.requires_grad:
            res[k] = t.grad.cpu()
    return res


def rms_of_terms(inp, dy, grad_weight=False):
    """float64, per output entry: the root-sum-square of the elementary products it sums. The
    formula is multilinear (each term holds each input once), so the formula and its gradients
    evaluated on squared inputs (and s², dy²) give the sums of the squared terms.

    It sets the tolerance floor on the GPU (assert_matches(..., rms=)): each term carries up to
    four operand roundings (x, Q or W, dy, P in the dot dtype), so a sum whose terms cancel
    loses that much relative accuracy whatever the order of summation, and plain PyTorch may
    round luckily on one tiny tensor (dλ at r_max = 1, a 44-term dP) and set a bar no other
    order meets."""
    sq = {k: (v.square() if isinstance(v, torch.Tensor) and k != "mask" else v) for k, v in inp.items()}
    sq["scaling"] = inp["scaling"] ** 2
    return {k: v.sqrt() for k, v in reference(sq, dy.square(), grad_weight=grad_weight).items()}


def check_cuda(M, K, N, R, dtype, mask_mode="random", adapter_dtype=torch.float32, backend="triton", **kw):
    """The op on the GPU (the Triton kernels, or the torch path on cuBLAS) vs float64 (see
    rms_of_terms for the tolerance); inactive-slot gradients exactly 0.
    Adapter factors stored in a low precision are rounded to it before every reference: the
    op's function is that of the stored values."""
    grad_weight = kw.pop("grad_weight", False)
    inp, dy = make_inputs(M, K, N, R, mask_mode, **kw)
    for k in ("P", "lam", "Q"):
        inp[k] = inp[k].to(adapter_dtype).double()
    ref = reference(inp, dy, grad_weight=grad_weight)
    ins = on_cuda(inp, dtype, adapter_dtype, grad_weight)
    plain_ins = on_cuda(inp, dtype, dtype, grad_weight)
    plain = grads_of(formula(**plain_ins), dy, plain_ins)
    args = {k: v for k, v in ins.items() if k != "x_lora"}
    out = grads_of(flex_linear(**args, x_lora=ins["x_lora"], backend=backend), dy, ins)
    tag = f"cuda {backend} M{M}-K{K}-N{N}-r{R}-{dtype}-{mask_mode}"
    assert_matches(out, ins, ref, plain, dtype, tag, rms=rms_of_terms(inp, dy, grad_weight))
    assert_inactive_zero(out, inp["mask"], tag)
    return out


SHAPES = [  # M = 1; K, N below a block; odd sizes across blocks; r_max 1..256
    (1, 70, 45, 8),
    (7, 9, 5, 1),
    (37, 33, 70, 64),
    (300, 257, 130, 256),
    (1000, 200, 333, 17),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mask_mode", ["random", "on", "off", "prefix"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
def test_cuda_matches_float64(shape, dtype, mask_mode, backend):
    out = check_cuda(*shape, dtype, mask_mode, backend=backend)
    if mask_mode == "off":
        for k in ("P", "lam", "Q"):
            assert torch.count_nonzero(out[k]) == 0, f"all slots off but d{k} != 0"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", ["x_lora", "no_bias", "grad_weight", "adapter_bf16", "leading_dims"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_variants(variant, dtype, backend):
    kw = {
        "x_lora": dict(x_lora=True),
        "no_bias": dict(bias=False),
        "grad_weight": dict(grad_weight=True),
        "adapter_bf16": dict(adapter_dtype=torch.bfloat16),
        "leading_dims": dict(lead=(2, 3, 5), x_lora=True),
    }[variant]
    check_cuda(30, 48, 40, 16, dtype, backend=backend, **kw)


def test_cuda_non_contiguous_x_and_broadcast_dy():
    inp, _ = make_inputs(65, 40, 24, 8)
    ref = reference(inp, torch.ones(65, 24, dtype=torch.float64))
    ins = on_cuda(inp, torch.float32)
    base = ins["x"].detach().t().contiguous().requires_grad_(True)  # x as a [M, K] view of [K, M]
    x = base.t()
    assert not x.is_contiguous()
    y = flex_linear(x, ins["weight"], ins["bias"], ins["P"], ins["lam"], ins["Q"], ins["mask"], 0.75, backend="triton")
    y.sum().backward()  # dy with strides (0, 0)
    assert rel_err(y.cpu(), ref["y"]) < 1e-5
    assert rel_err(base.grad.t().cpu(), ref["x"]) < 1e-5
    for k in ("P", "lam", "Q", "bias"):
        assert rel_err(ins[k].grad.cpu(), ref[k]) < 1e-5, f"d{k} with a broadcast dy"


def test_cuda_empty_batch():
    inp, _ = make_inputs(1, 8, 6, 4)
    ins = on_cuda(inp, torch.float32)
    x = torch.zeros(0, 8, device=DEV, requires_grad=True)
    y = flex_linear(x, ins["weight"], ins["bias"], ins["P"], ins["lam"], ins["Q"], ins["mask"], 0.75, backend="triton")
    assert y.shape == (0, 6)
    y.sum().backward()
    assert torch.count_nonzero(ins["P"].grad) == 0 and ins["lam"].grad.shape == (4,)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("x_lora", [False, True], ids=["x", "x_lora"])
def test_cuda_zero_in_features(backend, x_lora):
    """K = 0 (no input features) on the GPU: y = b, db = Σ dy, nothing reaches the adapter."""
    gen = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)
    inp = {
        "x": torch.zeros(6, 0, **f64), "x_lora": torch.zeros(6, 0, **f64) if x_lora else None,
        "weight": torch.zeros(5, 0, **f64), "bias": torch.randn(5, generator=gen, **f64),
        "P": torch.randn(5, 4, generator=gen, **f64), "lam": torch.randn(4, generator=gen, **f64),
        "Q": torch.zeros(4, 0, **f64), "mask": torch.tensor([True, False, True, True]), "scaling": 0.75,
    }
    dy = torch.randn(6, 5, generator=gen, **f64)
    ins = on_cuda(inp, torch.float32)
    args = {k: v for k, v in ins.items() if k != "x_lora"}
    y = flex_linear(**args, x_lora=ins["x_lora"], backend=backend)
    assert torch.equal(y.detach().cpu(), inp["bias"].float().expand(6, 5)), "y must be the bias"
    out = grads_of(y, dy, ins)
    assert rel_err(out["bias"], dy.sum(0)) < 1e-6
    for k in ("P", "lam"):
        assert torch.count_nonzero(out[k]) == 0, k
    assert out["x"].shape == (6, 0) and out["Q"].shape == (4, 0)


@pytest.fixture
def legacy_tf32_switch():
    """Tests below flip torch's legacy TF32 switch: put it back (new-API reads reflect it)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_fp32_follows_the_tf32_switch(backend, legacy_tf32_switch):
    """fp32 on the GPU: IEEE dots by default (error ~1e-7 of float64); with torch's TF32 switch
    on, both backends round the operands to TF32's 10-bit mantissa (error ~1e-4), as nn.Linear does."""
    inp, dy = make_inputs(256, 512, 192, 16, "random")
    ref = reference(inp, dy)
    errs = {}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ins = on_cuda(inp, torch.float32)
        args = {k: v for k, v in ins.items() if k != "x_lora"}
        out = grads_of(flex_linear(**args, x_lora=ins["x_lora"], backend=backend), dy, ins)
        errs[tf32] = max(rel_err(out[k], ref[k]) for k in ("y", "x", "P", "lam", "Q"))
    assert errs[False] < 1e-5, errs
    assert 3e-5 < errs[True] < 1e-2, errs


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    M=st.integers(1, 300),
    K=st.integers(1, 200),
    N=st.integers(1, 200),
    R=st.sampled_from([1, 3, 8, 17, 64, 100]),
    dtype=st.sampled_from(list(DTYPES.values())),
    seed=st.integers(0, 2**16),
)
def test_cuda_shape_fuzz(M, K, N, R, dtype, seed):
    check_cuda(M, K, N, R, dtype, seed=seed)  # every example inside the fixed_config fixture


# --------------------------------------------------------------------------------------------
# The autotuned configs at LLaMA-like sizes, and no recompiles across rank changes
# --------------------------------------------------------------------------------------------
@pytest.mark.autotuned
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("MKN", [(1000, 1024, 2816), (777, 2816, 1024)], ids=["up", "down"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_autotuned_llama_sizes(MKN, dtype, backend):
    """Every autotune entry that wins at these sizes computes the op (and so does cuBLAS through
    the torch path): M not a block multiple, r_max 64 with a random half of the slots active."""
    check_cuda(*MKN, 64, dtype, "random", backend=backend, seed=3)


def _compiled_variants() -> int:
    return sum(len(c[0]) for k in (fl._skinny_kernel, fl._fused_kernel) for c in k.device_caches.values())


def test_cuda_rank_changes_never_recompile():
    """Mask flips, λ changes (prune, expand, retune) and new token counts reuse the compiled kernels."""
    inp, dy = make_inputs(64, 96, 80, 32, "prefix")
    ins = on_cuda(inp, torch.bfloat16)
    args = {k: v for k, v in ins.items() if k != "x_lora"}
    flex_linear(**args, backend="triton").backward(dy.to(DEV, torch.bfloat16))
    before = _compiled_variants()
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        with torch.no_grad():
            ins["mask"].copy_((torch.rand(32, generator=gen) < 0.5).to(DEV))
            ins["lam"].normal_()
        M = 64 + 37 * step  # the token count changes every batch
        x = torch.randn(M, 96, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        y = flex_linear(x, *(args[k] for k in ("weight", "bias", "P", "lam", "Q", "mask", "scaling")), backend="triton")
        y.backward(torch.randn_like(y))
    torch.cuda.synchronize()
    assert _compiled_variants() == before, "a rank change or a new M compiled a new kernel variant"


@pytest.mark.parametrize("gpu_backend", ["triton", None])
def test_cuda_and_cpu_agree_on_a_training_step(gpu_backend):
    """FlexLinear on the GPU (Triton, or the default cuBLAS path) and on the CPU (torch path),
    fp32: same output and grads."""
    from flexlora.layers.flex_linear import FlexLinear

    torch.manual_seed(0)
    cpu = FlexLinear(48, 40, r_max=16, r_init=8, alpha=16.0)
    with torch.no_grad():
        cpu.lam.normal_()
        cpu.mask[[1, 5, 12]] = ~cpu.mask[[1, 5, 12]]
    gpu = FlexLinear(48, 40, r_max=16, r_init=8, alpha=16.0).to(DEV)
    gpu.load_state_dict(cpu.state_dict())
    cpu.backend, gpu.backend = "torch", gpu_backend
    x = torch.randn(3, 11, 48)
    out = {}
    for name, layer, xin in (("cpu", cpu, x.clone()), ("gpu", gpu, x.to(DEV))):
        xin.requires_grad_(True)
        y = layer(xin)
        (y.square().sum()).backward()
        out[name] = [y.detach().cpu(), xin.grad.cpu()] + [p.grad.cpu() for p in (layer.P, layer.lam, layer.Q)]
    for a, b, n in zip(out["cpu"], out["gpu"], ("y", "x", "P", "lam", "Q")):
        assert rel_err(b, a.double()) < 1e-5, f"GPU and CPU disagree on {n}"


# --------------------------------------------------------------------------------------------
# Spectral entropy: one launch for every module
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", ["all_on", "all_off", "random"])
@pytest.mark.parametrize("n,R", [(1, 1), (7, 8), (224, 64), (33, 256), (500, 100)])
def test_cuda_spectral_entropy(n, R, kind, dt):
    gen = torch.Generator().manual_seed(n * 1000 + R)
    lam = torch.randn(n, R, generator=gen, dtype=torch.float64)
    lam[lam.abs() < 0.1] = 0.0  # exact zeros among the active slots
    mask = entropy_mask(kind, n, R, gen)
    lam_dt = lam.to(DTYPES[dt])
    ref = entropy_reference(lam_dt, mask)
    out = spectral_entropy_and_slots(lam_dt.to(DEV), mask.to(DEV), backend="triton")
    assert all(t.device.type == "cuda" for t in out)
    check_entropy(tuple(t.cpu() for t in out), ref, atol=5e-6, rtol=5e-6)


# --------------------------------------------------------------------------------------------
# torch.compile on the GPU (inductor): one graph, no recompiles across rank changes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [None, "reduce-overhead"], ids=["inductor", "cuda-graphs"])
def test_cuda_compile_no_recompiles_across_rank_changes(mode):
    """torch.compile (inductor) of a FlexLinear model: prune / expand / retune flip the mask and
    change λ in place between steps, which the compiled code reads as data: same numbers as eager
    at every step, no recompile, no graph break. mode="reduce-overhead": the fwd+bwd is recorded
    as CUDA graphs (warm-up, record, then replays), none skipped, and the replays see the changes."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from flexlora.layers.flex_linear import FlexLinear

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        FlexLinear(64, 48, r_max=16, r_init=8, alpha=16.0), torch.nn.GELU(), FlexLinear(48, 32, r_max=16, r_init=4, alpha=8.0)
    ).to(DEV)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lam.normal_()
    compiled = torch.compile(model, mode=mode)
    counters.clear()
    x = torch.randn(4, 10, 64, device=DEV)
    for step in range(6):
        with torch.no_grad():  # prune / expand / retune: mask flips and λ changes only
            model[0].mask[step + 3] = not bool(model[0].mask[step + 3])
            model[2].mask[step + 4] = True
            model[2].lam.add_(0.3)
        grads = {}
        for name, fn in (("eager", model), ("compiled", compiled)):
            for p in model.parameters():
                p.grad = None
            y = fn(x)
            y.square().sum().backward()
            # clones: a CUDA graph's next replay overwrites its outputs
            grads[name] = [y.detach().clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
        for a, b in zip(grads["eager"], grads["compiled"]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"step {step}: compiled ({mode}) != eager")
    assert sum(counters["recompiles"].values()) == 0, f"rank changes caused recompiles: {dict(counters['recompiles'])}"
    assert sum(counters["graph_break"].values()) == 0, "graph break inside flex_linear"
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, "inductor skipped CUDA graphs for the model"
    torch._dynamo.reset()
