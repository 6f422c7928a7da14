"""Stacking FlexLinear modules for batched math: λ/mask into [n, R], P/Q grouped by shape.

A Python loop that only gathers tensors into a stack is fine; the math then runs once per
stack (one bmm / eigh / reduction for a whole group of same-shaped modules), not per module.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator, List, Optional, Sequence, Tuple

import torch


def full_precision(device: torch.device):
    """A context with autocast off on ``device``: the allocator's Grams, spectra and the
    orthogonality penalty measure PᵀP − I and σ² to ~1e-4 and below, which bf16 matmuls (under
    a user's ``torch.autocast``) would round away (the penalty's gradient off by ~40 %)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# Upper bound on the elements of one stacked chunk of P plus Q (fp32: 256 MiB): bounds the
# temporary memory of the grouped ops on big models without changing their results.
MAX_CHUNK_ELEMS = 1 << 26


def stack_lam_mask(modules: Sequence) -> Tuple[torch.Tensor, torch.Tensor]:
    """lam [n, R] (detached, λ's dtype) and mask [n, R] bool of n FlexLinear modules, R = the
    largest r_max; rows of modules with a smaller r_max are padded with λ = 0, mask = False."""
    if len(modules) == 0:
        raise ValueError("stack_lam_mask: modules is empty; expected at least one FlexLinear")
    R = max(m.lam.shape[0] for m in modules)
    if all(m.lam.shape[0] == R for m in modules):
        return torch.stack([m.lam.detach() for m in modules]), torch.stack([m.mask for m in modules])
    lam = modules[0].lam.new_zeros(len(modules), R)
    mask = torch.zeros(len(modules), R, dtype=torch.bool, device=lam.device)
    for i, m in enumerate(modules):
        r = m.lam.shape[0]
        lam[i, :r] = m.lam.detach()
        mask[i, :r] = m.mask
    return lam, mask


def shape_groups(modules: Sequence, max_elems: Optional[int] = None) -> Iterator[List[int]]:
    """Indices of modules sharing (out, in, r_max, dtype, device), in module order, split into
    chunks whose stacked P and Q hold at most ``max_elems`` elements (default MAX_CHUNK_ELEMS,
    read at call time; at least one module per chunk)."""
    if max_elems is None:
        max_elems = MAX_CHUNK_ELEMS
    groups: "OrderedDict[tuple, List[int]]" = OrderedDict()
    for i, m in enumerate(modules):
        key = (tuple(m.P.shape), tuple(m.Q.shape), m.P.dtype, m.Q.dtype, m.P.device)
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        m = modules[idx[0]]
        per = m.P.numel() + m.Q.numel()
        step = max(1, max_elems // max(per, 1))
        for k in range(0, len(idx), step):
            yield idx[k : k + step]
