"""FlexLinear against a float64 reference written from the math (not from the layer)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flexlora import FlexLinear

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reference(x, W, b, P, lam, Q, mask, s, x_lora=None):
    """float64: y = x Wᵀ + b + s·((x_lora Qᵀ) ⊙ (λ⊙mask)) Pᵀ, written out term by term."""
    x, W, P, lam, Q = (t.double() for t in (x, W, P, lam, Q))
    xl = x if x_lora is None else x_lora.double()
    y = torch.einsum("...k,nk->...n", x, W)
    if b is not None:
        y = y + b.double()
    g = lam * mask.double() * s
    u = torch.einsum("...k,rk->...r", xl, Q)
    return y + torch.einsum("...r,nr->...n", u * g, P)


def make_layer(K, N, r_max, r_init, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = FlexLinear(K, N, r_max=r_max, r_init=r_init, alpha=2.0 * max(r_init, 1), bias=bias, dtype=dtype)
    with torch.no_grad():  # non-zero λ so the adapter term and every gradient are exercised
        layer.lam.normal_()
        layer.P.normal_()
        layer.Q.normal_()
        if bias:
            layer.bias.normal_()
    return layer


def set_mask(layer, kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    R = layer.r_max
    if kind == "on":
        m = torch.ones(R, dtype=torch.bool)
    elif kind == "off":
        m = torch.zeros(R, dtype=torch.bool)
    else:
        m = torch.rand(R, generator=g) < 0.5
        m[0], m[-1] = True, False if R > 1 else True
    layer.mask.copy_(m)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


SHAPES = [  # (leading dims, K, N, r_max)
    ((1,), 7, 5, 4),
    ((13,), 70, 45, 8),
    ((2, 3), 33, 17, 6),
    ((4,), 16, 64, 1),
]


def shape_id(s):
    lead, K, N, R = s
    return f"M{'x'.join(map(str, lead))}-K{K}-N{N}-r{R}"


@pytest.mark.parametrize("mask_kind", ["on", "mixed", "off"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dname", list(DTYPES))
def test_forward_and_grads_match_float64(shape, mask_kind, dname):
    lead, K, N, R = shape
    dtype = DTYPES[dname]
    layer = make_layer(K, N, R, R // 2 or 1, dtype)
    set_mask(layer, mask_kind)
    x = torch.randn(*lead, K, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*lead, N)
    dy = torch.randn_like(y)
    y.backward(dy)

    # float64 reference and its gradients (autograd over the reference expression)
    x64 = x.detach().double().requires_grad_()
    P64, lam64, Q64 = (t.detach().double().requires_grad_() for t in (layer.P, layer.lam, layer.Q))
    y64 = reference(x64, layer.weight, layer.bias, P64, lam64, Q64, layer.mask, layer.scaling)
    y64.backward(dy.double())

    # plain PyTorch in the same dtype (autograd over the naive expression): the error budget
    # for low precision is 2x its error against float64, plus a small floor.
    xp = x.detach().clone().requires_grad_()
    Pp, lamp, Qp = (t.detach().clone().requires_grad_() for t in (layer.P, layer.lam, layer.Q))
    g = (lamp * layer.mask * layer.scaling).to(dtype)
    y_plain = xp @ layer.weight.t() + layer.bias + ((xp @ Qp.to(dtype).t()) * g) @ Pp.to(dtype).t()
    y_plain.backward(dy)

    def budget(plain, want):
        if dtype == torch.float32:
            return 1e-5
        return 2 * rel_err(plain, want) + 2e-3

    tol = budget(y_plain, y64)
    assert rel_err(y, y64) <= tol, f"forward rel err {rel_err(y, y64):.3g} > {tol:.3g}"
    for name, got, plain, want in [
        ("x", x.grad, xp.grad, x64.grad),
        ("P", layer.P.grad, Pp.grad, P64.grad),
        ("lam", layer.lam.grad, lamp.grad, lam64.grad),
        ("Q", layer.Q.grad, Qp.grad, Q64.grad),
    ]:
        assert got.dtype == (dtype if name == "x" else torch.float32)
        if want.abs().max() == 0:
            assert torch.count_nonzero(got) == 0, f"d{name} should be exactly zero"
        else:
            tol = budget(plain, want)
            assert rel_err(got, want) <= tol, f"d{name} rel err {rel_err(got, want):.3g} > {tol:.3g}"
    inactive = ~layer.mask
    assert torch.count_nonzero(layer.P.grad[:, inactive]) == 0
    assert torch.count_nonzero(layer.lam.grad[inactive]) == 0
    assert torch.count_nonzero(layer.Q.grad[inactive, :]) == 0
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("dname", list(DTYPES))
def test_output_equals_base_at_init(dname):
    dtype = DTYPES[dname]
    torch.manual_seed(0)
    base = nn.Linear(37, 23, dtype=dtype)
    layer = FlexLinear.from_linear(base, r_max=8, r_init=4, alpha=8.0)
    x = torch.randn(3, 5, 37, dtype=dtype)
    assert torch.equal(layer(x), base(x))
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad
    assert layer.P.dtype == torch.float32 and torch.count_nonzero(layer.lam) == 0


def test_from_linear_reuses_storage_and_shapes():
    base = nn.Linear(11, 9, bias=False)
    ptr = base.weight.data_ptr()
    layer = FlexLinear.from_linear(base, r_max=6, r_init=2, alpha=4.0)
    assert layer.weight.data_ptr() == ptr and layer.bias is None
    assert layer.P.shape == (9, 6) and layer.lam.shape == (6,) and layer.Q.shape == (6, 11)
    assert layer.mask.dtype == torch.bool and layer.mask.tolist() == [True, True, False, False, False, False]
    assert layer.rank == 2 and layer.scaling == 2.0
    assert "rank=2" in repr(layer) and "r_max=6" in repr(layer)


def test_delta_weight_matches_reference():
    layer = make_layer(10, 7, 5, 3, torch.float32)
    set_mask(layer, "mixed")
    want = (layer.P.double() * (layer.lam.double() * layer.mask.double() * layer.scaling)) @ layer.Q.double()
    got = layer.delta_weight()
    assert got.shape == (7, 10)
    assert rel_err(got, want) < 1e-6
    # ΔW is the whole adapter: base + ΔW reproduces the layer's output
    x = torch.randn(4, 10, dtype=torch.float64)
    y = x @ (layer.weight.double() + want).t() + layer.bias.double()
    assert rel_err(layer(x.float()), y) < 1e-5


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = FlexLinear(6, 5, r_max=4, r_init=3, alpha=3.0, dtype=torch.float64, adapter_dtype=torch.float64)
    with torch.no_grad():
        layer.lam.normal_()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def f(x, P, lam, Q):
        return torch.func.functional_call(layer, {"P": P, "lam": lam, "Q": Q}, (x,))

    params = tuple(getattr(layer, n).detach().clone().requires_grad_() for n in ("P", "lam", "Q"))
    assert torch.autograd.gradcheck(f, (x, *params))


def test_dropout_applies_to_adapter_branch_only():
    layer = make_layer(12, 8, 4, 4, torch.float32)
    layer.dropout = nn.Dropout(0.5)
    x = torch.randn(6, 12)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    x_drop = nn.functional.dropout(x, 0.5, training=True)
    want = reference(x, layer.weight, layer.bias, layer.P, layer.lam, layer.Q, layer.mask, layer.scaling, x_lora=x_drop)
    assert rel_err(y, want) < 1e-5
    layer.eval()
    want_eval = reference(x, layer.weight, layer.bias, layer.P, layer.lam, layer.Q, layer.mask, layer.scaling)
    assert rel_err(layer(x), want_eval) < 1e-5


def test_non_contiguous_input():
    layer = make_layer(9, 4, 3, 3, torch.float32)
    x = torch.randn(9, 5).t()  # [5, 9], not contiguous
    assert not x.is_contiguous()
    want = reference(x, layer.weight, layer.bias, layer.P, layer.lam, layer.Q, layer.mask, layer.scaling)
    assert rel_err(layer(x), want) < 1e-6


def test_bad_input_errors():
    layer = FlexLinear(8, 4, r_max=4, r_init=2, alpha=4.0)
    with pytest.raises(ValueError, match=r"in_features=8, got 7"):
        layer(torch.randn(2, 7))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 8, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r_max=4, r_init=5), "r_init"),
        (dict(r_max=0, r_init=0), "r_max"),
        (dict(r_max=4, r_init=2, alpha=0.0), "alpha"),
        (dict(r_max=4, r_init=2, dropout=1.0), "dropout"),
        (dict(r_max=4, r_init=2, init_std=-1.0), "init_std"),
        (dict(r_max=4, r_init=2, alpha=float("nan")), "alpha must be a finite number"),
        (dict(r_max=4, r_init=2, alpha=float("inf")), "alpha must be a finite number"),
        (dict(r_max=4, r_init=2, init_std=float("nan")), "init_std must be a finite number"),
        (dict(r_max=4, r_init=2, init_std=float("inf")), "init_std must be a finite number"),
        # s = alpha / r_init = 5e38 is inf in float32: every output was NaN (s·0) at init
        (dict(r_max=4, r_init=2, alpha=1e39), r"alpha / r_init must fit in float32"),
        (dict(r_max=4, r_init=2, in_features=-1), "in_features must be an int >= 0, got -1"),
        (dict(r_max=4, r_init=2, out_features=4.0), "out_features must be an int >= 0, got 4.0"),
    ],
    ids=["r_init>r_max", "r_max<1", "alpha0", "dropout1", "init_std<0", "alpha-nan", "alpha-inf",
         "init_std-nan", "init_std-inf", "alpha-overflows-float32", "in_features<0", "out_features-float"],
)
def test_bad_constructor_args(kwargs, match):
    kw = dict(in_features=8, out_features=4, alpha=4.0)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FlexLinear(**kw)


@pytest.mark.parametrize("name", ["adapter_dtype", "dtype"])
@pytest.mark.parametrize("bad", [torch.int64, torch.bool, torch.complex64, "float16"])
def test_a_dtype_that_is_not_floating_is_refused_by_name(name, bad):
    # an int / bool adapter_dtype failed inside randn, "float16" with randn's signature, and
    # complex64 only at the first forward
    with pytest.raises(TypeError, match=f"FlexLinear: {name} must be None or a floating-point torch.dtype"):
        FlexLinear(8, 4, r_max=4, r_init=2, alpha=4.0, **{name: bad})
    if name == "adapter_dtype":
        with pytest.raises(TypeError, match="adapter_dtype must be None or a floating-point torch.dtype"):
            FlexLinear.from_linear(nn.Linear(8, 4), r_max=4, r_init=2, alpha=4.0, adapter_dtype=bad)


@pytest.mark.parametrize("adapter_dtype", [None, torch.bfloat16])
def test_reset_parameters_after_meta_init_draws_what_the_constructor_draws(adapter_dtype):
    # Meta-device init: build on meta, to_empty, reset_parameters() on every module. FlexLinear
    # had no reset_parameters, so mask, λ, P and Q kept uninitialized memory (a mask of all
    # True with r_init 2, λ ~1e37: outputs off by thousands, or NaN).
    kw = dict(r_max=6, r_init=2, alpha=4.0, adapter_dtype=adapter_dtype)
    torch.manual_seed(5)
    want = FlexLinear(9, 7, **kw)
    with torch.device("meta"):
        got = FlexLinear(9, 7, **kw)
    got.to_empty(device="cpu")
    with torch.no_grad():
        for t in (got.weight, got.bias, got.P, got.lam, got.Q):
            t.fill_(float("nan"))  # what to_empty may leave
        got.mask.fill_(True)
    torch.manual_seed(5)
    got.reset_parameters()
    for name in ("weight", "bias", "P", "lam", "Q", "mask"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.rank == 2 and (got.lam == 0).all() and got.P.dtype == (adapter_dtype or torch.float32)
    x = torch.randn(3, 9)
    assert torch.equal(got(x), F.linear(x, got.weight, got.bias))  # λ = 0: the base output


def test_reset_parameters_clears_the_merged_flag_and_trained_slots():
    layer = make_layer(6, 5, r_max=4, r_init=3, dtype=torch.float32)
    layer.mask[3] = True
    layer.merged = True
    layer.reset_parameters()
    assert not layer.merged and layer.mask.tolist() == [True, True, True, False]
    assert (layer.lam == 0).all() and layer.P.std() < 0.05 and layer.Q.std() < 0.05


def test_merged_flag_skips_adapter():
    layer = make_layer(6, 3, 2, 2, torch.float32)
    x = torch.randn(2, 6)
    layer.merged = True
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("dname", ["bf16", "fp16"])
def test_merged_layer_with_fp32_weights_computes_in_the_input_dtype(dname):
    # the unmerged op casts W and b to x's dtype; the merged path must too (F.linear on a bf16 x
    # and fp32 W raises a dtype mismatch)
    from flexlora.merging import merge

    dtype = DTYPES[dname]
    layer = make_layer(24, 10, 4, 4, torch.float32)
    want_w = layer.weight.double() + layer.delta_weight().double()
    merge(nn.Sequential(layer))
    assert layer.merged and layer.weight.dtype == torch.float32
    x = torch.randn(3, 24).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 10)
    want = x.double() @ want_w.t() + layer.bias.double()
    plain = nn.functional.linear(x, layer.weight.to(dtype), layer.bias.to(dtype))  # same dtype, by hand
    assert rel_err(y, want) <= 2 * rel_err(plain, want) + 2e-3


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_from_linear_keeps_the_linears_training_mode(mode):
    # a new nn.Module starts in training mode: wrapping an eval model must not switch adapter
    # dropout on at inference
    base = nn.Linear(12, 8).train(mode == "train")
    layer = FlexLinear.from_linear(base, r_max=4, r_init=4, alpha=4.0, dropout=0.5)
    assert layer.training == (mode == "train")
    assert layer.dropout.training == (mode == "train")
    with torch.no_grad():
        layer.lam.normal_()
        layer.P.normal_()
        layer.Q.normal_()
    x = torch.randn(6, 12)
    y1, y2 = layer(x), layer(x)
    want = reference(x, layer.weight, layer.bias, layer.P, layer.lam, layer.Q, layer.mask, layer.scaling)
    if mode == "eval":
        assert torch.equal(y1, y2) and rel_err(y1, want) < 1e-5
    else:  # the premise: in training mode dropout does change the output
        assert not torch.equal(y1, y2)


def test_repr_on_meta_device():
    # extra_repr read the rank with .item(), which a meta tensor cannot give
    layer = FlexLinear(16, 8, r_max=4, r_init=2, alpha=4.0, device="meta")
    text = repr(layer)
    assert "in_features=16" in text and "r_max=4" in text and "rank=" not in text
    lin = FlexLinear.from_linear(nn.Linear(16, 8, device="meta"), r_max=4, r_init=2, alpha=4.0)
    assert "r_max=4" in repr(lin)


def test_autocast_computes_in_the_autocast_dtype_like_nn_linear():
    # A custom op is opaque to autocast: FlexLinear must cast its input itself, or the base GEMM
    # silently runs in fp32 under mixed precision (HF Trainer's bf16=True).
    layer = make_layer(24, 10, 4, 4, torch.float32)
    x = torch.randn(3, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_base = nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == torch.bfloat16 == y_base.dtype
    want = reference(x.detach(), layer.weight, layer.bias, layer.P, layer.lam, layer.Q, layer.mask, layer.scaling)
    xb = x.detach().bfloat16()  # the error budget: the same math with bf16 inputs
    plain = reference(xb, layer.weight.bfloat16(), layer.bias.bfloat16(), layer.P.bfloat16(),
                      layer.lam.bfloat16(), layer.Q.bfloat16(), layer.mask, layer.scaling)
    assert rel_err(y, want) <= 2 * rel_err(plain.bfloat16(), want) + 2e-3
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lam.grad.dtype == torch.float32


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("mask_kind", ["on", "random"])
def test_activation_checkpointing_matches_float64(use_reentrant, mask_kind):
    """torch.utils.checkpoint recomputes the forward in backward: output and every gradient equal
    the float64 reference (and the un-checkpointed run), with the op's compact saved state
    (active-slot u, gathered factors) rebuilt by the recomputation."""
    from torch.utils.checkpoint import checkpoint

    layer = make_layer(19, 23, 8, 8, torch.float32)
    set_mask(layer, mask_kind)
    x = torch.randn(5, 19, dtype=torch.float64)
    dy = torch.randn(5, 23, dtype=torch.float64)

    def grads(use_ckpt):
        xi = x.float().requires_grad_()
        for p in (layer.P, layer.lam, layer.Q):
            p.grad = None
        y = checkpoint(layer, xi, use_reentrant=use_reentrant) if use_ckpt else layer(xi)
        y.backward(dy.float())
        return y.detach(), xi.grad, layer.P.grad, layer.lam.grad, layer.Q.grad

    leaves = [x.clone().requires_grad_()] + [t.detach().double().requires_grad_() for t in (layer.P, layer.lam, layer.Q)]
    xr, Pr, lr, Qr = leaves
    yr = reference(xr, layer.weight, layer.bias, Pr, lr, Qr, layer.mask, layer.scaling)
    yr.backward(dy)
    ref = (yr.detach(), xr.grad, Pr.grad, lr.grad, Qr.grad)
    ckpt, plain = grads(True), grads(False)
    for name, c, p, r in zip(("y", "x", "P", "lam", "Q"), ckpt, plain, ref):
        assert rel_err(c, r) < 1e-5, f"checkpointed d{name} vs float64"
        assert torch.equal(c, p), f"checkpointed d{name} differs from the plain run"
    inactive = ~layer.mask
    assert torch.equal(ckpt[2][:, inactive], torch.zeros_like(ckpt[2][:, inactive]))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_with_dropout_and_a_zero_lambda_slot(use_reentrant):
    """Recomputation under checkpoint draws the same dropout mask (RNG state preserved) and takes
    the same live/idle split for an active λ = 0 slot: bit-equal to the plain run, and that slot's
    dλ is non-zero while its dP column is exactly 0."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = FlexLinear(19, 23, r_max=8, r_init=6, alpha=12.0, dropout=0.3)
    with torch.no_grad():
        layer.lam.normal_()
        layer.lam[2] = 0.0  # active (r_init 6), λ = 0: just expanded
    layer.train()
    x = torch.randn(5, 19)
    dy = torch.randn(5, 23)

    def run(use_ckpt):
        xi = x.clone().requires_grad_()
        for p in (layer.P, layer.lam, layer.Q):
            p.grad = None
        torch.manual_seed(7)
        y = checkpoint(layer, xi, use_reentrant=use_reentrant) if use_ckpt else layer(xi)
        y.backward(dy)
        return y.detach(), xi.grad, layer.P.grad.clone(), layer.lam.grad.clone(), layer.Q.grad.clone()

    plain, ckpt = run(False), run(True)
    for name, a, b in zip(("y", "x", "P", "lam", "Q"), plain, ckpt):
        assert torch.equal(a, b), f"checkpointed d{name} differs from the plain run"
    assert ckpt[3][2] != 0 and torch.equal(ckpt[2][:, 2], torch.zeros(23))
    torch.manual_seed(8)
    assert not torch.equal(layer(x), plain[0]), "another dropout mask must change y (the test sees dropout)"


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_hf_gradient_checkpointing_on_a_wrapped_llama():
    """model.gradient_checkpointing_enable() on a FlexLoRA-wrapped LLaMA: same loss and adapter
    gradients as without it."""
    import flexlora
    from _tiny_hf import llama_model

    def run(ckpt):
        model = llama_model(layers=2, seed=3)
        cfg = flexlora.FlexLoRAConfig(r_init=4, r_max=8, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
        flexlora.wrap(model, cfg)
        mods = flexlora.flex_modules(model)
        torch.manual_seed(5)
        with torch.no_grad():
            for _, m in mods:
                m.lam.normal_()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        calls = []
        mods[0][1].register_forward_hook(lambda *_: calls.append(1))
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [(n, m.P.grad.clone(), m.Q.grad.clone(), m.lam.grad.clone()) for n, m in mods], len(calls)

    (l0, g0, calls0), (l1, g1, calls1) = run(False), run(True)
    assert (calls0, calls1) == (1, 2), "with checkpointing the layer's forward must run again in backward"
    assert torch.allclose(l0, l1, rtol=1e-6, atol=0)
    assert len(g0) == 6
    for (n, *a), (_, *b) in zip(g0, g1):
        for t0, t1 in zip(a, b):
            assert t0.abs().max() > 0, n
            assert rel_err(t1, t0) < 1e-5, n


def test_init_draws_p_and_q_on_the_cpu_generator_whatever_the_default_device():
    """One seed, one init: P and Q come from the CPU generator even inside a default-device
    context (where an unpinned randn would draw on that device, or fail on 'meta')."""
    torch.manual_seed(0)
    plain = FlexLinear(8, 4, r_max=3, r_init=2, alpha=1.0)
    torch.manual_seed(0)
    with torch.device("meta"):
        inside = FlexLinear(8, 4, r_max=3, r_init=2, alpha=1.0, device="cpu")
    assert inside.P.device.type == "cpu"
    assert torch.equal(inside.P, plain.P) and torch.equal(inside.Q, plain.Q)


def test_zero_d_input_is_a_clear_error():
    layer = FlexLinear(4, 3, r_max=2, r_init=1, alpha=2.0)
    with pytest.raises(ValueError, match="last dimension in_features=4, got a 0-d tensor"):
        layer(torch.tensor(1.0))  # was an IndexError


@pytest.mark.parametrize("where", ["lam", "P", "Q"])
def test_delta_weight_ignores_non_finite_inactive_slots(where):
    torch.manual_seed(0)
    layer = FlexLinear(5, 4, r_max=3, r_init=2, alpha=2.0)
    with torch.no_grad():
        layer.lam.normal_()
        layer.lam[2] = 0
    ref = (layer.P.detach().double()[:, :2] * (layer.lam.detach().double()[:2] * layer.scaling)) @ layer.Q.detach().double()[:2]
    with torch.no_grad():
        {"lam": lambda: layer.lam.__setitem__(2, float("nan")),
         "P": lambda: layer.P[:, 2].fill_(float("inf")),
         "Q": lambda: layer.Q[2].fill_(float("nan"))}[where]()
    dw = layer.delta_weight()
    assert torch.isfinite(dw).all()
    assert (dw.double() - ref).abs().max() < 1e-6


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["x1d", "x2d", "x3d"])
def test_output_is_no_view_as_nn_linear_s_is(lead):
    # FSDP2 warns about a module returning a view (an in-place `out += residual` on it would drop
    # its pre-backward hook), and nn.Linear's output is none; the values stay those of the base +
    # adapter, and the gradient still reaches x through the reshape
    torch.manual_seed(0)
    layer = FlexLinear(6, 4, r_max=3, r_init=2, alpha=2.0)
    with torch.no_grad():
        layer.lam.fill_(0.5)
    x = torch.randn(*lead, 6, dtype=torch.float64, requires_grad=True)
    y = layer.double()(x)
    assert not y._is_view() and y.shape == (*lead, 4)
    assert nn.functional.linear(x, layer.weight)._is_view() is False
    ref = x @ (layer.weight + layer.delta_weight()).t() + layer.bias
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (layer.weight + layer.delta_weight()).sum(0).expand_as(x), rtol=1e-12, atol=1e-12)
