"""Fold adapters into the base weights: `merge`, `unmerge`, `merge_and_unload`.

(The module is `merging`, not `merge`: a submodule named like the function would replace
`flexlora.merge` by the module as soon as it is imported.)

merge:   W ← cast(W₃₂ + ΔW₃₂),  ΔW = s·P·diag(λ⊙mask)·Q computed in float32 whatever W's dtype.
unmerge: W ← cast(W'₃₂ − ΔW₃₂). In float32 this restores W to rounding (~1e-7 relative). In
bf16/fp16 the merged weight was rounded once, so subtracting cannot give W back bit-exactly (errors
up to half an ulp of |W + ΔW|, ~0.2 % relative in bf16); ``merge(model, keep_original=True)`` keeps a
copy of each original W (same device; one extra weight per module) and ``unmerge`` then restores it
bit-exactly.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from .layers.wrap import unwrap_model
from .layers.flex_linear import FlexLinear
from .layers.wrap import flex_modules

_ORIGINAL = "_flexlora_unmerged_weight"


def _delta_fp32(m: FlexLinear) -> torch.Tensor:
    """ΔW in float32: [out_features, in_features]."""
    g = m.lam.detach().float() * m.mask.float() * m.scaling
    return (m.P.detach().float() * g) @ m.Q.detach().float()


def _modules(model: nn.Module) -> List[FlexLinear]:
    mods = [m for _, m in flex_modules(unwrap_model(model))]
    if not mods:
        raise ValueError("model holds no FlexLinear modules (not wrapped by flexlora.wrap?)")
    return mods


@torch.no_grad()
def merge(model: nn.Module, keep_original: bool = False) -> nn.Module:
    """Fold every adapter into its base weight and set ``merged=True`` (forward then runs the plain
    linear). Already merged modules are left as they are. Returns the model.

    Args:
        keep_original: keep a copy of each W so :func:`unmerge` restores it bit-exactly (useful
            in bf16/fp16, where subtracting ΔW again is lossy); costs one weight copy per module.
    """
    for m in _modules(model):
        if m.merged:
            continue
        if keep_original:
            setattr(m, _ORIGINAL, m.weight.detach().clone())
        m.weight.copy_((m.weight.float() + _delta_fp32(m)).to(m.weight.dtype))
        m.merged = True
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: restore each W (bit-exactly when merged with ``keep_original=True``,
    else by subtracting ΔW in float32, see the module docstring) and set ``merged=False``."""
    for m in _modules(model):
        if not m.merged:
            continue
        original = getattr(m, _ORIGINAL, None)
        if original is not None:
            m.weight.copy_(original)
            delattr(m, _ORIGINAL)
        else:
            m.weight.copy_((m.weight.float() - _delta_fp32(m)).to(m.weight.dtype))
        m.merged = False
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and replace each FlexLinear by a plain ``nn.Linear`` holding the merged
    weight (the same Parameter, no copy) and bias; ``model.flexlora_config`` is removed. The base
    weights stay frozen (``requires_grad=False``). Returns the model, modified in place."""
    merge(model)
    given, model = model, unwrap_model(model)
    for name, m in flex_modules(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = m.weight
        if m.bias is not None:
            linear.bias = m.bias
        linear.train(m.training)
        if hasattr(m, _ORIGINAL):
            delattr(m, _ORIGINAL)
        setattr(parent, child, linear)
    if hasattr(model, "flexlora_config"):
        del model.flexlora_config
    return given
