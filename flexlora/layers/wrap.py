"""Put FlexLinear adapters into a model: `wrap`, `flex_modules`, `count_parameters`."""

from __future__ import annotations

import re
from typing import List, NamedTuple, Sequence, Tuple, Union

import torch.nn as nn

from ..config import FlexLoRAConfig
from .flex_linear import FlexLinear


def name_matches(name: str, patterns: Union[str, Sequence[str]]) -> bool:
    """PEFT-style matching: a str is a regex matched against the whole qualified name; a list
    holds names that must equal the qualified name or be its last dotted components."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def wrap(model: nn.Module, config: FlexLoRAConfig) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose name matches ``config.target_modules`` with a
    :class:`FlexLinear` (reusing its weight), freeze every other parameter except those of
    ``config.modules_to_save``, and return the model (``model.flexlora_config`` holds the config).

    Raises ``ValueError`` when no module matches, listing some that exist.
    """
    if not isinstance(config, FlexLoRAConfig):
        raise TypeError(f"wrap: config must be a FlexLoRAConfig, got {type(config).__name__}")
    if any(isinstance(m, FlexLinear) for m in model.modules()):
        raise ValueError("wrap: the model already holds FlexLinear modules (wrapped twice?)")

    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name and name_matches(name, config.target_modules)
    ]
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"wrap: target_modules={config.target_modules!r} matches no nn.Linear of the model; "
            f"some that exist: {linears[:8]}{' ...' if len(linears) > 8 else ''}"
        )
    save = [(n, m) for n, m in model.named_modules() if n and name_matches(n, config.modules_to_save)]
    if config.modules_to_save and not save:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"wrap: modules_to_save={list(config.modules_to_save)!r} matches no module; "
            f"some that exist: {names[-8:]}"
        )

    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        flex = FlexLinear.from_linear(
            linear,
            r_max=config.r_max,
            r_init=config.r_init,
            alpha=config.alpha,
            dropout=config.dropout,
            init_std=config.init_std,
        )
        setattr(parent, child, flex)
    for _, m in save:
        for p in m.parameters():
            if not _is_base_of_flex(m, p):
                p.requires_grad_(True)
    model.flexlora_config = config
    return model


def _is_base_of_flex(module: nn.Module, p) -> bool:
    return any(
        isinstance(sub, FlexLinear) and (p is sub.weight or p is sub.bias) for sub in module.modules()
    )


def flex_modules(model: nn.Module) -> List[Tuple[str, FlexLinear]]:
    """(qualified name, FlexLinear) pairs in ``named_modules`` order (stable across runs)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FlexLinear)]


class ParameterCount(NamedTuple):
    """What :func:`count_parameters` returns."""

    total_rank: int  # sum of active ranks over all FlexLinear modules
    adapter_params: int  # active adapter parameters: sum of rank·(in + out + 1)
    other_trainable_params: int  # trainable parameters outside the adapters (modules_to_save)

    @property
    def trainable_params(self) -> int:
        return self.adapter_params + self.other_trainable_params


def count_parameters(model: nn.Module) -> ParameterCount:
    """Active rank and active trainable parameters: only active slots count (the budget the
    paper compares at), not the preallocated r_max buffers."""
    mods = flex_modules(model)
    ranks = [m.mask.sum() for _, m in mods]
    total_rank = 0
    adapter = 0
    if ranks:
        import torch

        r = torch.stack(ranks).cpu().tolist()  # one host transfer for all modules
        total_rank = int(sum(r))
        adapter = int(sum(ri * (m.in_features + m.out_features + 1) for ri, (_, m) in zip(r, mods)))
    adapter_ids = {id(p) for _, m in mods for p in (m.P, m.lam, m.Q)}
    other = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids)
    return ParameterCount(total_rank, adapter, other)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model under DDP / DataParallel / torch.compile wrappers (their names carry a
    ``module.`` / ``_orig_mod.`` prefix that must not reach the files)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
