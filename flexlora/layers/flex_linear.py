"""`FlexLinear`: a drop-in `nn.Linear` with a FlexLoRA adapter over a max-rank buffer.

ΔW = s·P·diag(λ⊙mask)·Q with P [out, r_max], λ [r_max], Q [r_max, in] allocated once; a rank
change flips ``mask`` (a bool buffer), so parameters, optimizer state and compiled graphs stay
valid. The scaling s = alpha / r_init is fixed for the module's life: rescaling by the current
rank (as plain LoRA would) moves the output at every rank change and hurts (AdaLoRA and the
authors' code keep it fixed too).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._sharded import copy_whole_
from ..config import is_finite_number, is_int, scaling_fits_float32
from ..kernels.flex_linear import flex_linear


def own_forward(linear: nn.Linear) -> bool:
    """Whether ``linear`` is an nn.Linear subclass whose forward computes something other than
    x·Wᵀ + b (quantized layers: bitsandbytes' Linear4bit, transformers' FP8Linear, ...), which
    FlexLinear, computing x·Wᵀ + b from the weight, would silently skip.

    A subclass that overrides forward with the same math (transformers' FalconLinear) is found
    out by running its forward once against F.linear (its forward hooks bypassed, torch's random
    stream and the module's buffers untouched): on one-hot rows (16 columns spread over all
    inputs) and a zero row, where both give a weight column plus the bias with at most one
    rounding, the two must agree exactly (a scale of 1.01 or a dropped bias shows in bf16 too;
    NaN where both are NaN, as 0·inf gives); on random rows, to a few ulps (a forward that is not
    linear). A weight that is not a 2-D float tensor of 2 bytes or more (packed, int8,
    float8) is quantized; on the meta device nothing can be checked, so an overridden forward
    counts as custom there."""
    if type(linear).forward is nn.Linear.forward:
        return False
    w, b = linear.weight, linear.bias
    if isinstance(w, nn.parameter.UninitializedParameter):
        return False  # a lazy Linear: wrap asks for one forward pass first
    if not w.dtype.is_floating_point or w.element_size() < 2 or w.dim() != 2 or w.device.type == "meta":
        return True
    k = linear.in_features
    gen = torch.Generator().manual_seed(0)
    # one-hot rows at 16 columns spread over all k (a forward that treats later columns apart
    # shows), built without a k x k eye (Falcon-40B's 32768 inputs: 4 GiB)
    cols = torch.linspace(0, max(k - 1, 0), steps=min(16, k)).round().long().unique()
    exact = torch.zeros(cols.numel() + 1, k)
    exact[torch.arange(cols.numel()), cols] = 1.0
    x = torch.cat([exact, torch.randn(3, k, generator=gen)]).to(device=w.device, dtype=w.dtype)
    try:
        with torch.no_grad(), _rng_kept(w.device), _buffers_kept(linear):
            got = type(linear).forward(linear, x)
            want = F.linear(x, w, b)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return True
        n = exact.shape[0]
        if not torch.allclose(got[:n], want[:n], rtol=0.0, atol=0.0, equal_nan=True):  # inf weights: 0·inf
            return True
        eps = torch.finfo(w.dtype).eps
        scale = max(float(want[n:].abs().max().float()) if want[n:].numel() else 0.0, 1e-30)
        return not torch.allclose(got[n:].float(), want[n:].float(), rtol=4 * eps, atol=4 * eps * scale,
                                  equal_nan=True)
    except Exception:  # a forward that cannot take a plain input is not x·Wᵀ + b
        return True


@contextlib.contextmanager
def _rng_kept(device: torch.device):
    """torch's random streams (CPU, and the device's) as they were after the block."""
    with contextlib.ExitStack() as stack:
        if device.type == "cpu":
            stack.enter_context(torch.random.fork_rng(devices=[]))
        else:
            try:
                stack.enter_context(torch.random.fork_rng(devices=[device], device_type=device.type))
            except Exception:  # a backend fork_rng does not know: its stream may move
                stack.enter_context(torch.random.fork_rng(devices=[]))
        yield


@contextlib.contextmanager
def _buffers_kept(module: nn.Module):
    """Put every buffer of ``module`` back as it was after the block: a probing forward must not
    leave a trace (a QAT Linear's observers record the min / max of what they see)."""
    saved = [(owner, name, t, t.detach().clone()) for owner in module.modules()
             for name, t in owner._buffers.items() if t is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, t, copy in saved:
                if owner._buffers.get(name) is t and t.shape == copy.shape:
                    t.copy_(copy)
                else:  # replaced or resized by the forward
                    owner._buffers[name] = copy


def own_forward_message(name: str, linear: nn.Linear) -> str:
    """The refusal of ``linear`` (called ``name`` in it) for :func:`own_forward`, with a hint
    when its weight is on the meta device."""
    cls = type(linear)
    return (
        f"{name} is a {cls.__module__}.{cls.__qualname__}, an nn.Linear subclass whose forward computes something "
        "other than x·Wᵀ + b (a quantized or otherwise customised layer): FlexLinear computes x·Wᵀ + b from the "
        "weight and would skip that forward, so flexlora cannot adapt it (load a quantized model unquantized)"
        + (" -- on the meta device its forward cannot be checked: wrap once the weights are materialized"
           if linear.weight.device.type == "meta" else "")
    )


class FlexLinear(nn.Module):
    """``y = x Wᵀ + b + s·((dropout(x) Qᵀ) ⊙ (λ⊙mask)) Pᵀ``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r_max: buffer rank (>= 1); r_init: slots active at start (0..r_max, the first ones).
        alpha: s = alpha / r_init (alpha when r_init = 0).
        bias: whether the base layer has a bias.
        dropout: dropout probability on the adapter input.
        init_std: std of the Gaussian init of P and Q (λ starts at 0, so the output equals the
            base layer's at init). Drawn from torch's CPU generator on every device, so a seed
            gives the same P and Q on the CPU and on a GPU.
        device, dtype: of the base weight; adapter parameters are float32 unless
            ``adapter_dtype`` says otherwise.

    Attributes:
        weight: [out_features, in_features], bias: [out_features] or None: the frozen base.
        P: [out_features, r_max], lam: [r_max], Q: [r_max, in_features]: the adapter factors
            (trainable; every slot allocated once).
        mask: [r_max] bool buffer, the active slots (pruning and expanding flip it).
        scaling: s = alpha / r_init (alpha when r_init = 0), a float fixed for the module's life.
        backend: None (the library's choice: cuBLAS-backed torch path on CUDA and CPU, the
            Triton kernels under TRITON_INTERPRET=1; see
            :func:`flexlora.kernels.flex_linear`), or "triton" / "torch" to force this layer's
            path, e.g. ``layer.backend = "torch"`` to compare the two on a GPU.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r_max: int,
        r_init: int,
        alpha: float,
        bias: bool = True,
        dropout: float = 0.0,
        init_std: float = 0.02,
        device=None,
        dtype=None,
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not is_int(v) or v < 0:
                raise ValueError(f"FlexLinear: {name} must be an int >= 0, got {v!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"FlexLinear: dtype must be None or a floating-point torch.dtype, got {dtype!r}")
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_adapter(base.weight, base.bias, r_max, r_init, alpha, dropout, init_std, adapter_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r_max: int,
        r_init: int,
        alpha: float,
        dropout: float = 0.0,
        init_std: float = 0.02,
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> "FlexLinear":
        """Wrap an existing ``nn.Linear``: its weight and bias tensors are reused (frozen, not copied)
        and its training/eval mode is kept."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FlexLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        if own_forward(linear):
            raise ValueError(f"FlexLinear.from_linear: {own_forward_message('linear', linear)}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_adapter(linear.weight, linear.bias, r_max, r_init, alpha, dropout, init_std, adapter_dtype)
        # A new module starts in training mode; an eval model (HF from_pretrained, load_adapter)
        # must not start running adapter dropout at inference.
        self.train(linear.training)
        return self

    def _init_adapter(self, weight, bias, r_max, r_init, alpha, dropout, init_std, adapter_dtype) -> None:
        _check_args(r_max, r_init, alpha, dropout, init_std, adapter_dtype)
        out_features, in_features = weight.shape
        self.in_features = in_features
        self.out_features = out_features
        self.backend: Optional[str] = None
        self.r_max = int(r_max)
        self.r_init = int(r_init)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r_init if self.r_init > 0 else self.alpha
        self.init_std = float(init_std)
        self.merged = False
        self.register_state_dict_post_hook(_warn_if_merged_state)

        weight.requires_grad_(False)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            bias.requires_grad_(False)
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)

        dev = weight.device
        adt = adapter_dtype or torch.float32
        self.P = nn.Parameter(torch.empty(out_features, self.r_max, device=dev, dtype=adt))
        self.lam = nn.Parameter(torch.empty(self.r_max, device=dev, dtype=adt))
        self.Q = nn.Parameter(torch.empty(self.r_max, in_features, device=dev, dtype=adt))
        self.register_buffer("mask", torch.empty(self.r_max, dtype=torch.bool, device=dev))
        self._reset_adapter()
        self.dropout = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()

    def reset_parameters(self) -> None:
        """Initialize the layer as a new one starts: the base weight and bias as
        ``nn.Linear.reset_parameters`` does, P and Q Gaussian (std ``init_std``), λ = 0, the first
        ``r_init`` slots active, not merged.

        This is PyTorch's hook for meta-device initialization: build (or wrap) the model on the
        meta device, ``model.to_empty(device=...)``, call ``reset_parameters()`` on every module
        that has one, then load the pretrained base weights (``to_empty`` leaves P, λ, Q and the
        mask uninitialized memory until then). With the same seed it draws what the constructor
        draws."""
        with torch.no_grad():
            nn.Linear.reset_parameters(self)
            self._reset_adapter()
        self.merged = False

    @torch.no_grad()
    def _reset_adapter(self) -> None:
        # P and Q are drawn by the CPU generator whatever the device (or default device): one
        # seed, one init on the CPU and on a GPU (the allocator's expansions draw from the CPU too)
        adt = self.P.dtype
        copy_whole_(self.P, torch.randn(self.out_features, self.r_max, dtype=adt, device="cpu") * self.init_std)
        copy_whole_(self.lam, torch.zeros(self.r_max, dtype=adt, device="cpu"))
        copy_whole_(self.Q, torch.randn(self.r_max, self.in_features, dtype=adt, device="cpu") * self.init_std)
        self.mask.copy_(torch.arange(self.r_max, device="cpu") < self.r_init)

    @property
    def rank(self) -> int:
        """Number of active slots (a host sync on GPU)."""
        return int(self.mask.sum().item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features], in x's dtype."""
        if not torch.is_floating_point(x):
            raise TypeError(f"FlexLinear expects a floating-point input, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"FlexLinear expected input with last dimension in_features={self.in_features}, "
                f"got {x.shape[-1] if x.dim() else 'a 0-d tensor'} (input shape {tuple(x.shape)})"
            )
        if self.merged:
            # as the unmerged op does: compute in x's dtype whatever the (fp32) base weights' dtype
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        x_lora = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
        return flex_linear(
            x, self.weight, self.bias, self.P, self.lam, self.Q, self.mask, self.scaling, x_lora=x_lora,
            backend=self.backend,
        )

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·P·diag(λ⊙mask)·Q: [out_features, in_features], in the adapter dtype. Inactive
        slots contribute exactly nothing, whatever their P column, λ and Q row hold."""
        return masked_delta(self.P, self.lam, self.Q, self.mask, self.scaling)

    def extra_repr(self) -> str:
        # a meta tensor has no values: its rank cannot be read (before to_empty / loading)
        rank = "" if self.mask.is_meta else f"rank={self.rank}, "
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{rank}r_max={self.r_max}, bias={self.bias is not None}"
        )


def _warn_if_merged_state(module: "FlexLinear", state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: a merged layer's state holds W + ΔW *and* P, λ, Q, and nothing in it
    says it is merged; loaded into an unmerged (freshly wrapped) model, ΔW would apply twice."""
    if module.merged:
        warnings.warn(
            "state_dict() of a merged FlexLinear: its weight holds W + ΔW and P, lam, Q are in the state too, "
            "so loading it into an unmerged (freshly wrapped) model applies ΔW twice; call "
            "flexlora.unmerge(model) before saving, or flexlora.merge_and_unload(model) for a plain model",
            UserWarning,
            stacklevel=_caller_stacklevel(),
        )


def masked_delta(P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, mask: torch.Tensor, scaling) -> torch.Tensor:
    """ΔW = s·P·diag(λ⊙mask)·Q: [out, in] from P [out, R], λ [R], Q [R, in], mask [R] bool, in
    the factors' dtype. An inactive slot contributes exactly nothing, whatever its P column, λ and
    Q row hold (λ·0 and 0·inf would keep a NaN)."""
    g = torch.where(mask, lam * scaling, 0.0)
    return torch.where(mask, P * g, 0.0) @ torch.where(mask[:, None], Q, 0.0)


def _caller_stacklevel() -> int:
    """The warnings.warn stacklevel, seen from the caller of this function, of the first frame
    outside torch.nn and flexlora: the user's own call (here, their state_dict() call)."""
    inside = (os.path.join("torch", "nn", ""), os.path.join("flexlora", ""))
    frame, level = sys._getframe(1), 1
    while frame is not None and any(part in frame.f_code.co_filename for part in inside):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1


def _check_args(r_max, r_init, alpha, dropout, init_std, adapter_dtype=None) -> None:
    if not is_int(r_max) or r_max < 1:
        raise ValueError(f"FlexLinear: r_max must be an int >= 1, got {r_max!r}")
    if not is_int(r_init) or not 0 <= r_init <= r_max:
        raise ValueError(f"FlexLinear: r_init must be an int in [0, r_max={r_max}], got {r_init!r}")
    if not is_finite_number(alpha) or alpha <= 0:
        raise ValueError(f"FlexLinear: alpha must be a finite number > 0, got {alpha!r}")
    if not scaling_fits_float32(alpha, r_init):
        raise ValueError(f"FlexLinear: alpha / r_init must fit in float32, got alpha={alpha!r} with r_init={r_init}")
    if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
        raise TypeError(f"FlexLinear: adapter_dtype must be None or a floating-point torch.dtype, got {adapter_dtype!r}")
    if not is_finite_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"FlexLinear: dropout must be in [0, 1), got {dropout!r}")
    if not is_finite_number(init_std) or init_std <= 0:
        raise ValueError(f"FlexLinear: init_std must be a finite number > 0, got {init_std!r}")
