"""Fold adapters into the base weights: `merge`, `unmerge`, `merge_and_unload`; and `unload` (the base model back).

(The module is `merging`, not `merge`: a submodule named like the function would replace
`flexlora.merge` by the module as soon as it is imported.)

merge:   W ← cast(W₃₂ + ΔW₃₂),  ΔW = s·P·diag(λ⊙mask)·Q computed in float32 whatever W's dtype.
unmerge: W ← cast(W'₃₂ − ΔW₃₂) with the ΔW that merge added: merge keeps copies of P, λ, Q and the
mask (r_max·(in + out + 1) values, not a copy of W), so a mask flip, a λ edit or an optimizer step
while merged does not change what is subtracted. In float32 this restores W to rounding (~1e-7
relative). In bf16/fp16 the merged weight was rounded once, so subtracting cannot give W back
bit-exactly (errors up to half an ulp of |W + ΔW|, ~0.2 % relative in bf16);
``merge(model, keep_original=True)`` keeps a copy of each original W (same device; one extra weight
per module) and ``unmerge`` then restores it bit-exactly.

A base weight shared with another module (tied weights) is refused: adding ΔW to it would change
that module too.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn

from .layers.flex_linear import FlexLinear, masked_delta
from .layers.wrap import carry_hooks, check_unsharded, flex_modules, named_modules_all, parameter_owners, tied_names, unwrap_model

_ORIGINAL = "_flexlora_unmerged_weight"
_MERGED_ADAPTER = "_flexlora_merged_adapter"


def _factors(m: FlexLinear) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(P, λ, Q, mask, scaling) of ``m`` as they are now (detached, not copied)."""
    return (m.P.detach(), m.lam.detach(), m.Q.detach(), m.mask, m.scaling)


def _snapshot(m: FlexLinear) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Copies of the factors merge folds in: a rank change or an optimizer step (weight decay)
    between merge and unmerge must not change what unmerge subtracts. r_max·(in + out) values,
    small beside W; the full buffers, so unmerge recomputes bit for bit the ΔW merge added."""
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in _factors(m))


def _forget_merge(m: FlexLinear) -> None:
    """Drop what merge kept to undo itself (the original W or the factors' snapshot)."""
    for attr in (_ORIGINAL, _MERGED_ADAPTER):
        if hasattr(m, attr):
            delattr(m, attr)


def _delta_fp32(adapter, device) -> torch.Tensor:
    """ΔW in float32 from :func:`_factors` or :func:`_snapshot`: [out_features, in_features]."""
    P, lam, Q, mask, scaling = (t.to(device) if isinstance(t, torch.Tensor) else t for t in adapter)
    return masked_delta(P.float(), lam.float(), Q.float(), mask, scaling)


def delta_weight_fp32(m: FlexLinear) -> torch.Tensor:
    """m's current ΔW = s·P·diag(λ⊙mask)·Q in float32: [out_features, in_features] (the same math
    merge folds in)."""
    return _delta_fp32(_factors(m), m.weight.device)


def _modules(model: nn.Module, caller: str) -> List[Tuple[str, FlexLinear]]:
    mods = flex_modules(unwrap_model(model))
    if not mods:
        raise ValueError("model holds no FlexLinear modules (not wrapped by flexlora.wrap?)")
    check_unsharded(mods, caller, unwrap_model(model))
    return mods


def _check_untied(model: nn.Module, mods: List[Tuple[str, FlexLinear]]) -> None:
    owners = parameter_owners(unwrap_model(model))
    for name, m in mods:
        tied = [] if m.merged else tied_names(owners, m, m.weight)
        if tied:
            raise ValueError(
                f"merge: the base weight of {name!r} is shared with {tied} (tied weights): merging would "
                f"add its ΔW to {tied[0]!r} too. Untie it first, e.g. "
                f"model.get_submodule({name!r}).weight = nn.Parameter(model.get_submodule({name!r}).weight"
                ".detach().clone(), requires_grad=False) (for a Hugging Face model also set "
                "config.tie_word_embeddings=False before saving it)"
            )


@torch.no_grad()
def merge(model: nn.Module, keep_original: bool = False) -> nn.Module:
    """Fold every adapter into its base weight and set ``merged=True`` (forward then runs the plain
    linear). Already merged modules are left as they are. Returns the model.

    Args:
        keep_original: keep a copy of each W so :func:`unmerge` restores it bit-exactly (useful
            in bf16/fp16, where subtracting ΔW again is lossy); costs one weight copy per module.

    Raises ``ValueError`` (before changing anything) when a base weight is tied to another
    module's parameter, e.g. an lm_head tied to the input embeddings.
    """
    return _merge(model, keep_original, "merge")


def _merge(model: nn.Module, keep_original: bool, caller: str) -> nn.Module:
    """:func:`merge`, refusing under the name of ``caller``."""
    mods = _modules(model, caller)
    _check_untied(model, mods)
    for _, m in mods:
        if m.merged:
            continue
        if keep_original:  # W itself is kept: the factors need no copy
            adapter = _factors(m)
            setattr(m, _ORIGINAL, m.weight.detach().clone())
        else:
            adapter = _snapshot(m)
            setattr(m, _MERGED_ADAPTER, adapter)
        m.weight.copy_((m.weight.float() + _delta_fp32(adapter, m.weight.device)).to(m.weight.dtype))
        m.merged = True
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: restore each W (bit-exactly when merged with ``keep_original=True``,
    else by subtracting, in float32, the ΔW that merge added, whatever changed in the adapter
    since; see the module docstring) and set ``merged=False``."""
    return _unmerge(model, "unmerge")


def _unmerge(model: nn.Module, caller: str) -> nn.Module:
    """:func:`unmerge`, refusing under the name of ``caller``."""
    for _, m in _modules(model, caller):
        if not m.merged:
            continue
        original = getattr(m, _ORIGINAL, None)
        if original is not None:
            m.weight.copy_(original)
        else:
            # merge's snapshot; without one (merged=True set by hand, or a merged module deep-copied
            # without it) the current adapter is the best guess of what was added
            adapter = getattr(m, _MERGED_ADAPTER, None) or _factors(m)
            m.weight.copy_((m.weight.float() - _delta_fp32(adapter, m.weight.device)).to(m.weight.dtype))
        _forget_merge(m)
        m.merged = False
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and replace each FlexLinear by a plain ``nn.Linear`` holding the merged
    weight (the same Parameter, no copy) and bias; ``model.flexlora_config`` is removed. The base
    weights stay frozen (``requires_grad=False``). Returns the model, modified in place."""
    _merge(model, False, "merge_and_unload")
    return _to_plain_linears(model)


@torch.no_grad()
def unload(model: nn.Module) -> nn.Module:
    """The base model back, without the adapters: merged modules are unmerged first, then each
    FlexLinear is replaced by a plain ``nn.Linear`` holding its base weight and bias (the same
    Parameters, no copy); ``model.flexlora_config`` is removed. The adapters are dropped (save
    them first if you need them). Returns the model, modified in place. PEFT's ``unload()``."""
    _unmerge(model, "unload")
    return _to_plain_linears(model)


def _to_plain_linears(model: nn.Module) -> nn.Module:
    """Every FlexLinear of ``model`` replaced by an nn.Linear with its weight and bias, as they are."""
    given, model = model, unwrap_model(model)
    plain = {}  # id(FlexLinear) -> its nn.Linear: one per module, set under each of its names
    for name, m in named_modules_all(model):
        if not isinstance(m, FlexLinear):
            continue
        if id(m) not in plain:
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            linear.weight = m.weight
            if m.bias is not None:
                linear.bias = m.bias
            linear.train(m.training)
            carry_hooks(m, linear)
            _forget_merge(m)
            plain[id(m)] = linear
        model.set_submodule(name, plain[id(m)])
    if hasattr(model, "flexlora_config"):
        del model.flexlora_config
    return given
