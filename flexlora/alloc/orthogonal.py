"""Orthogonality regulariser of FlexLoRA, over active slots, batched across modules.

For one module with P [out, R], Q [R, in], mask m [R] and M = m mᵀ:

    L = ‖(PᵀP − I) ⊙ M‖²_F + ‖(QQᵀ − I) ⊙ M‖²_F

so only the Gram entries between two active slots count. With E = (PᵀP − I) ⊙ M and
F = (QQᵀ − I) ⊙ M (both symmetric, and E ⊙ M = E):

    ∂L/∂P = 4·P·E        ∂L/∂Q = 4·F·Q

Column j of E (row j of F) is zero for an inactive slot j, so P[:, j] and Q[j, :] get exactly
0.0. The total over modules is multiplied by γ. Modules are grouped by shape and each group is
one stacked bmm (the Gram matrices are computed in fp32 whatever the parameters' dtype).

Two equivalent ways to use it: add ``orthogonal_loss(modules, γ)`` to the task loss before
``backward()``, or call ``add_orthogonal_grad_(modules, γ)`` after it (no autograd graph, one
fused pass; same gradients).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._batch import shape_groups


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
        raise ValueError(f"orthogonality: gamma must be a number >= 0, got {gamma!r}")
    return float(gamma)


def _masked_grams(P: torch.Tensor, Q: torch.Tensor, mask: torch.Tensor):
    """P [b, out, R], Q [b, R, in], mask [b, R] -> E, F [b, R, R] fp32 (E = (PᵀP − I)⊙mmᵀ)."""
    Pf, Qf = P.float(), Q.float()
    mf = mask.float()
    M = mf[:, :, None] * mf[:, None, :]
    eye = torch.eye(P.shape[-1], device=P.device, dtype=torch.float32)
    E = (torch.bmm(Pf.transpose(1, 2), Pf) - eye) * M
    F = (torch.bmm(Qf, Qf.transpose(1, 2)) - eye) * M
    return E, F


def orthogonal_loss(modules: Sequence, gamma: float) -> torch.Tensor:
    """γ·Σ_modules (‖(PᵀP − I)⊙mmᵀ‖²_F + ‖(QQᵀ − I)⊙mmᵀ‖²_F), differentiable w.r.t. every P, Q.

    Args:
        modules: FlexLinear modules (P [out, R], Q [R, in], mask [R]).
        gamma: the weight γ (>= 0).

    Returns:
        a 0-d float32 tensor (0 when gamma is 0 or there are no modules).
    """
    gamma = _check_gamma(gamma)
    if len(modules) == 0:
        return torch.zeros(())
    dev = modules[0].P.device
    if gamma == 0.0:
        return torch.zeros((), device=dev)
    total = torch.zeros((), device=dev)
    for idx in shape_groups(modules):
        P = torch.stack([modules[i].P for i in idx])
        Q = torch.stack([modules[i].Q for i in idx])
        mask = torch.stack([modules[i].mask for i in idx])
        E, F = _masked_grams(P, Q, mask)
        total = total + E.square().sum() + F.square().sum()
    return total * gamma


@torch.no_grad()
def add_orthogonal_grad_(modules: Sequence, gamma: float) -> None:
    """Add γ·∂L/∂P = 4γ·P·E and γ·∂L/∂Q = 4γ·F·Q to every module's ``P.grad`` / ``Q.grad`` in
    place (a zero grad is created where it is None), i.e. the gradient ``orthogonal_loss`` would
    contribute, without building an autograd graph. Call it after ``backward()`` and before the
    optimizer step. Parameters with ``requires_grad=False`` are left alone."""
    gamma = _check_gamma(gamma)
    if gamma == 0.0 or len(modules) == 0:
        return
    for idx in shape_groups(modules):
        P = torch.stack([modules[i].P for i in idx])
        Q = torch.stack([modules[i].Q for i in idx])
        mask = torch.stack([modules[i].mask for i in idx])
        E, F = _masked_grams(P, Q, mask)
        gP = torch.bmm(P.float(), E).mul_(4.0 * gamma)
        gQ = torch.bmm(F, Q.float()).mul_(4.0 * gamma)
        params, grads = [], []
        for k, i in enumerate(idx):
            for p, g in ((modules[i].P, gP[k]), (modules[i].Q, gQ[k])):
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = g.to(p.dtype).clone()
                else:
                    params.append(p.grad)
                    grads.append(g.to(p.grad.dtype))
        if params:
            torch._foreach_add_(params, grads)
