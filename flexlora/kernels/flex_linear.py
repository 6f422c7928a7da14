"""Masked FlexLoRA linear: y = x Wᵀ + b + s·((x_lora Qᵀ) ⊙ (λ⊙mask)) Pᵀ.

Shapes (after flattening leading dims): x, x_lora: [M, K]; W: [N, K]; b: [N]; P: [N, R];
λ, mask: [R]; Q: [R, K]; R = r_max. g = s·λ⊙mask: [R] is the only place the mask enters, so
inactive slots get exactly zero gradient in P[:, j], λ[j] and Q[j, :] (every gradient of slot
j is a product with g[j] = 0 or with mask[j] = 0).

The torch path below is used on CPU (and by the tests as the op under test, never as their
reference): the small [M, R] factor u ⊙ g absorbs s·λ⊙mask and is added into the base output
in place by ``addmm_``, so no [M, N] temporary and no [M, N] scaling pass is made.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ._backend import choose_backend

Scaling = Union[float, torch.Tensor]


def _check_inputs(x, weight, bias, P, lam, Q, mask, x_lora) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"flex_linear: x must be a floating-point tensor, got dtype {x.dtype}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(
            f"flex_linear: x has last dimension {x.shape[-1]}, expected in_features={K} "
            f"(x.shape={tuple(x.shape)})"
        )
    R = lam.shape[0]
    if lam.dim() != 1 or P.shape != (N, R) or Q.shape != (R, K) or mask.shape != (R,):
        raise ValueError(
            "flex_linear: expected P [N, R], lam [R], Q [R, K], mask [R] with N={}, K={}, R={}; "
            "got P {}, lam {}, Q {}, mask {}".format(
                N, K, R, tuple(P.shape), tuple(lam.shape), tuple(Q.shape), tuple(mask.shape)
            )
        )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"flex_linear: bias must have shape ({N},), got {tuple(bias.shape)}")
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(
            f"flex_linear: x_lora must have x's shape {tuple(x.shape)}, got {tuple(x_lora.shape)}"
        )


def _gate(lam: torch.Tensor, mask: torch.Tensor, scaling: Scaling) -> torch.Tensor:
    """g = s·λ⊙mask, [R], in λ's dtype."""
    g = lam * mask.to(lam.dtype)
    return g * scaling


def _torch_fwd(x2, xl2, weight, bias, P, lam, Q, mask, scaling):
    """Torch-path forward on 2-D inputs.

    x2: [M, K]; xl2: [M, K] or None (then x2 feeds the adapter); weight: [N, K]; bias: [N] or
    None; P: [N, R]; lam, mask: [R]; Q: [R, K]; scaling: float or 0-d tensor.
    Returns (y [M, N] in x2's dtype, u = xl2·Qᵀ [M, R], saved for backward).
    """
    dt = x2.dtype
    xl = x2 if xl2 is None else xl2
    g = _gate(lam, mask, scaling)
    u = xl @ Q.to(dt).t()  # [M, R]
    y = F.linear(x2, weight.to(dt), None if bias is None else bias.to(dt))
    y.addmm_(u * g.to(dt), P.to(dt).t())
    return y, u


def _torch_bwd(dy, x2, xl2, weight, P, lam, Q, mask, u, scaling, needs):
    """Torch-path backward on 2-D inputs.

    dy: [M, N]; the other tensors as in :func:`_torch_fwd` (u from it); needs: 7 bools, whether
    a gradient is wanted for (x, x_lora, weight, bias, P, lam, Q).
    Returns (dx, dx_lora, dweight, dbias, dP, dlam, dQ), None where not needed.
    """
    s = scaling
    dt = dy.dtype
    xl = x2 if xl2 is None else xl2
    maskf = mask.to(lam.dtype)
    g = (lam * maskf * s).to(dt)
    dy = dy.contiguous()
    dv = dy @ P.to(dt)  # [M, R]
    dvg = dv * g
    dx = dxl = dW = db = dP = dlam = dQ = None
    if needs[0]:
        dx = dy @ weight.to(dt)
        if xl2 is None:
            dx.addmm_(dvg, Q.to(dt))
    if needs[1] and xl2 is not None:
        dxl = dvg @ Q.to(dt)
    if needs[2]:
        dW = (dy.t() @ x2).to(weight.dtype)
    if needs[3]:
        db = dy.sum(0).to(weight.dtype)
    if needs[4]:
        dP = (dy.t() @ (u * g)).to(P.dtype)
    if needs[5]:
        # dλ_j = s·mask_j·Σ_m u[m, j]·dv[m, j], reduced in fp32 for low-precision inputs.
        dlam = ((u.float() * dv.float()).sum(0) * (maskf.float() * s)).to(lam.dtype)
    if needs[6]:
        dQ = (dvg.t() @ xl).to(Q.dtype)
    return dx, dxl, dW, db, dP, dlam, dQ


class _FlexLinearTorch(torch.autograd.Function):
    """Torch-path autograd for 2-D inputs. Saves x, x_lora and u = x_lora Qᵀ ([M, R]), nothing [M, N]."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, P, lam, Q, mask, scaling):
        y, u = _torch_fwd(x, x_lora, weight, bias, P, lam, Q, mask, scaling)
        ctx.save_for_backward(x, x_lora, weight, P, lam, Q, mask, u)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x_lora, weight, P, lam, Q, mask, u = ctx.saved_tensors
        grads = _torch_bwd(dy, x, x_lora, weight, P, lam, Q, mask, u, ctx.scaling, ctx.needs_input_grad[:7])
        return (*grads, None, None)


def flex_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    P: torch.Tensor,
    lam: torch.Tensor,
    Q: torch.Tensor,
    mask: torch.Tensor,
    scaling: Scaling,
    x_lora: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Torch path of :func:`flex_linear` (same arguments, no checks)."""
    lead = x.shape[:-1]
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    xl2 = None if x_lora is None else x_lora.reshape(-1, K)
    y = _FlexLinearTorch.apply(x2, xl2, weight, bias, P, lam, Q, mask, scaling)
    return y.reshape(*lead, weight.shape[0])


def flex_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    P: torch.Tensor,
    lam: torch.Tensor,
    Q: torch.Tensor,
    mask: torch.Tensor,
    scaling: Scaling,
    *,
    x_lora: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Masked FlexLoRA linear.

    Args:
        x: [..., K] input (fp32, fp16 or bf16; any leading dims; need not be contiguous).
        weight: [N, K] frozen base weight; bias: [N] or None.
        P: [N, R], lam: [R], Q: [R, K] adapter factors (fp32 by default; computed in x's dtype).
        mask: [R] bool, active slots.
        scaling: s, a float or 0-d tensor.
        x_lora: optional [..., K] input of the adapter branch only (e.g. dropout(x)); x is used
            when None.
        backend: "triton", "torch" or None (Triton on CUDA or under TRITON_INTERPRET=1).

    Returns:
        y: [..., N] in x's dtype.
    """
    _check_inputs(x, weight, bias, P, lam, Q, mask, x_lora)
    if choose_backend(x, backend) == "triton":
        from . import flex_linear_triton  # noqa: F401  (filled in by the kernels issue)

        return flex_linear_triton.flex_linear_triton(x, weight, bias, P, lam, Q, mask, scaling, x_lora)
    return flex_linear_torch(x, weight, bias, P, lam, Q, mask, scaling, x_lora)
