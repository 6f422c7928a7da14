"""Put FlexLinear adapters into a model: `wrap`, `flex_modules`, `count_parameters`."""

from __future__ import annotations

import re
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..config import FlexLoRAConfig
from .flex_linear import FlexLinear, own_forward, own_forward_message


def name_matches(name: str, patterns: Union[str, Sequence[str]]) -> bool:
    """PEFT-style matching: a str is a regex matched against the whole qualified name; a list
    holds names that must equal the qualified name or be its last dotted components."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


# Hooks that fire around a module's forward/backward: carried from the replaced nn.Linear to its
# FlexLinear (and back by merge_and_unload), so user and library hooks keep firing. The dicts
# are shared, not copied, so the RemovableHandles returned at registration still remove them.
_HOOK_ATTRS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
)


def carry_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Make ``dst`` run the forward / backward hooks registered on ``src``."""
    for attr in _HOOK_ATTRS:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))


def named_modules_all(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(qualified name, module) for the root and every registration of a submodule: a module held
    under two names appears under both (``named_modules()`` reports only the first). Unlike
    ``named_modules(remove_duplicate=False)`` it ends on a module graph with a cycle (a child
    holding its parent), since each distinct parent is visited once; a name is then its parent's
    first name plus the attribute."""
    out: List[Tuple[str, nn.Module]] = [("", model)]
    for parent_name, parent in model.named_modules():
        for attr, child in parent._modules.items():
            if child is not None:
                out.append((f"{parent_name}.{attr}" if parent_name else attr, child))
    return out


def memory_key(p: torch.Tensor) -> tuple:
    """What identifies a parameter's memory: two Parameter objects over the same storage, offset,
    shape and strides (``nn.Parameter(other.weight.detach())``, a tied state dict loaded with
    ``assign=True``) are as tied as one Parameter held twice. Tensors without storage (meta): the
    object itself."""
    try:
        ptr = p.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        ptr = 0
    if ptr == 0:
        return ("object", id(p))
    return (str(p.device), ptr, p.storage_offset(), tuple(p.shape), tuple(p.stride()), p.element_size())


def _span(key: tuple) -> Tuple[int, int]:
    """[first byte, past the last byte) of the memory a memory_key's tensor reaches."""
    _, _, offset, shape, stride, size = key
    if 0 in shape:
        return 0, 0
    last = sum((n - 1) * s for n, s in zip(shape, stride))
    return offset * size, (offset + last + 1) * size


class ParameterOwners(dict):
    """memory_key -> [(id(owning module), qualified parameter name)], plus ``by_storage``: the
    keys of each (device, storage), so an overlap search looks at one storage's keys only."""

    def __init__(self):
        super().__init__()
        self.by_storage: Dict[tuple, List[tuple]] = {}


def parameter_owners(model: nn.Module) -> ParameterOwners:
    """memory_key(parameter) -> [(id(owning module), qualified parameter name)] over every name a
    module or parameter is registered under (tied weights appear under each owner)."""
    owners = ParameterOwners()
    for name, mod in named_modules_all(model):
        for pname, p in mod._parameters.items():
            if p is not None:
                key = memory_key(p)
                if key not in owners and key[0] != "object":
                    owners.by_storage.setdefault(key[:2], []).append(key)
                owners.setdefault(key, []).append((id(mod), f"{name}.{pname}" if name else pname))
    return owners


def overlap(a: tuple, b: tuple) -> bool:
    """Whether two memory_keys' tensors share memory: the same key, or byte ranges of one storage
    that intersect (a transpose, a slice)."""
    if a == b:
        return True
    if a[0] == "object" or b[0] == "object" or a[:2] != b[:2]:
        return False
    (alo, ahi), (blo, bhi) = _span(a), _span(b)
    return alo < bhi and blo < ahi


def tied_names(owners: ParameterOwners, module: nn.Module, param) -> List[str]:
    """Names under which modules other than ``module`` hold memory that ``param``'s overlaps: the
    same tensor, or a view over part of it or across it (a transpose, a slice); empty when it is
    not tied. Row blocks of one fused buffer do not overlap: not tied. Overlap is judged by byte
    ranges, so views that interleave without sharing an element (column blocks, alternate
    columns) count as tied too: merge refuses them, to be safe."""
    key = memory_key(param)
    keys = [key]
    if key[0] != "object":
        keys += [k for k in owners.by_storage.get(key[:2], ()) if k != key and overlap(key, k)]
    return sorted({n for k in keys for mid, n in owners.get(k, []) if mid != id(module)})


def _warn_unmatched_targets(model: nn.Module, config: FlexLoRAConfig, linear_names: List[str]) -> None:
    """Warn about entries of a target_modules list that match no nn.Linear (a typo, or a name of
    a block rather than of a Linear), while others do: they are ignored, and a run would
    otherwise adapt fewer modules than asked with no sign of it."""
    if isinstance(config.target_modules, str):
        return
    unmatched = [t for t in config.target_modules if not any(name_matches(n, [t]) for n in linear_names)]
    if not unmatched:
        return
    what = []
    for t in unmatched:
        other = next(((n, m) for n, m in model.named_modules() if n and name_matches(n, [t])), None)
        what.append(f"{t!r} (matches {other[0]!r}, a {type(other[1]).__name__}, not an nn.Linear)" if other else repr(t))
    warnings.warn(
        f"wrap: target_modules entries {', '.join(what)} match no nn.Linear and are ignored; the other "
        "entries are adapted (a name is the Linear's qualified name or its last dotted components)",
        UserWarning,
        stacklevel=3,
    )


def _compiled_parent(model: nn.Module, name: str) -> bool:
    """Whether the module called ``name`` in ``model`` is the ``_orig_mod`` of a torch.compile
    wrapper (an OptimizedModule)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    return attr == "_orig_mod" and type(parent).__name__ == "OptimizedModule"


def wrap(model: nn.Module, config: FlexLoRAConfig) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose name matches ``config.target_modules`` with a
    :class:`FlexLinear` (reusing its weight), freeze every other parameter except those of
    ``config.modules_to_save``, and return the model (``model.flexlora_config`` holds the config).

    A Linear registered under several names is matched by any of them and replaced under all of
    them by one FlexLinear. The FlexLinear keeps the Linear's training/eval mode and its forward
    and backward hooks. Linear children of ``nn.MultiheadAttention`` are skipped with a warning
    (it reads their weights directly, so an adapter there would never run); a target whose weight
    is tied to another module's gets a warning (``merge`` refuses it).

    Raises ``ValueError`` when no module matches, listing some that exist, when a Linear matches
    both target_modules and modules_to_save, and when a target was already dispatched by
    accelerate (its forward is replaced: wrap before dispatching).
    """
    if not isinstance(model, nn.Module):
        got = f"the class {model.__name__}" if isinstance(model, type) else type(model).__name__
        raise TypeError(f"wrap: model must be an nn.Module instance, got {got}")
    if not isinstance(config, FlexLoRAConfig):
        raise TypeError(f"wrap: config must be a FlexLoRAConfig, got {type(config).__name__}")
    config.validate()  # fields may have been changed since construction
    if any(isinstance(m, FlexLinear) for m in model.modules()):
        raise ValueError("wrap: the model already holds FlexLinear modules (wrapped twice?)")
    from .._sharded import fsdp_managed

    if fsdp_managed(model):
        # its Linears' weights are DTensor shards between steps: a FlexLinear built on one would
        # mix plain adapter tensors with them (the forward failed in addmm)
        raise ValueError("wrap: the model is already sharded by fully_shard; wrap it first, then call fully_shard")
    peft_layer = next(((n, m) for n, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"), None)
    if peft_layer is not None:
        # target patterns would reach PEFT's base_layer and its lora_A / lora_B Linears: an
        # adapter inside an adapter, with PEFT's own weights frozen
        cls = type(peft_layer[1])
        raise ValueError(
            f"wrap: the model holds PEFT adapter layers (first: {repr(peft_layer[0]) if peft_layer[0] else 'the model itself'}, a "
            f"{cls.__module__}.{cls.__qualname__}); fold or drop them before wrapping with flexlora: "
            "peft_model.merge_and_unload() or unload()"
        )

    # Every name of every Linear: named_modules() would report a module registered twice only
    # under its first name, so a target given by its second name would match nothing.
    names_of: Dict[int, List[str]] = {}
    linear_of: Dict[int, nn.Linear] = {}
    mha_children = set()
    for name, m in named_modules_all(model):
        if isinstance(m, nn.MultiheadAttention):
            mha_children |= {id(c) for c in m.children() if isinstance(c, nn.Linear)}
        if name and isinstance(m, nn.Linear):
            names_of.setdefault(id(m), []).append(name)
            linear_of[id(m)] = m
    targets: List[Tuple[List[str], nn.Linear]] = []
    skipped_mha: List[str] = []
    for key, names in names_of.items():
        if not any(name_matches(n, config.target_modules) for n in names):
            continue
        if key in mha_children:
            skipped_mha.append(names[0])
        else:
            targets.append((names, linear_of[key]))
    why_mha = (
        "nn.MultiheadAttention reads its out_proj's weight and bias directly and never calls its "
        "forward, so an adapter there would do nothing"
    )
    if not targets:
        linears = [n for key, names in names_of.items() if key not in mha_children for n in names]
        skipped = f" (matched only {skipped_mha}, skipped: {why_mha})" if skipped_mha else ""
        other = next(((n, m) for n, m in model.named_modules() if n and name_matches(n, config.target_modules)), None)
        if other is not None and not skipped:  # e.g. GPT-2's attention and MLP are Conv1D
            skipped = f" (it matches {other[0]!r}, a {type(other[1]).__name__}, not an nn.Linear)"
        exist = (
            f"some that exist: {linears[:8]}{' ...' if len(linears) > 8 else ''}" if linears else
            "the model has no nn.Linear submodule (for a bare nn.Linear use FlexLinear.from_linear)"
        )
        hint = ""
        if isinstance(config.target_modules, str) and any(name_matches(n, [config.target_modules]) for n in linears):
            # "q_proj" as a string is one regex over the whole name; as a list it is a suffix
            hint = (f" (a string is one regex matched against the full module name; for name suffixes pass a "
                    f"list: target_modules=[{config.target_modules!r}])")
        raise ValueError(
            f"wrap: target_modules={config.target_modules!r} matches no nn.Linear of the model{skipped}{hint}; {exist}"
        )
    save = [(n, m) for n, m in model.named_modules() if n and name_matches(n, config.modules_to_save)]
    if config.modules_to_save and not save:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"wrap: modules_to_save={list(config.modules_to_save)!r} matches no module; "
            f"some that exist: {names[-8:]}"
        )
    if not isinstance(config.modules_to_save, str):
        unmatched = [e for e in config.modules_to_save if not any(name_matches(n, [e]) for n, _ in save)]
        if unmatched:  # a typo beside entries that match: that module would silently stay frozen
            warnings.warn(
                f"wrap: modules_to_save entries {unmatched} match no module and are ignored; the other entries "
                "are trained in full",
                UserWarning,
                stacklevel=2,
            )
    target_ids = {id(linear): names[0] for names, linear in targets}
    for save_name, m in save:
        if id(m) in target_ids:
            # its base weight would have to be both frozen (an adapter's) and trained in full
            raise ValueError(
                f"wrap: {save_name!r} matches both target_modules and modules_to_save; a Linear is either "
                "adapted (target_modules) or trained in full (modules_to_save), not both"
            )
    custom = [(names[0], linear) for names, linear in targets if own_forward(linear)]
    if custom:
        more = f" ({len(custom)} such targets: {[n for n, _ in custom[:4]]}{' ...' if len(custom) > 4 else ''})"
        raise ValueError(f"wrap: {own_forward_message(repr(custom[0][0]), custom[0][1])}{more if len(custom) > 1 else ''}")
    for names, linear in targets:
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"wrap: module {names[0]!r} is a lazy Linear whose weight is not materialized yet; run one "
                "forward pass before wrapping"
            )
        compiled = next((n for n in names if _compiled_parent(model, n)), None)
        if compiled is not None:
            # torch.compile(linear) calls the Linear it was built with: a FlexLinear put in its
            # _orig_mod would never run (the output stayed the base's, P and Q got no gradient)
            holder = compiled.rpartition(".")[0]
            raise ValueError(
                f"wrap: module {compiled!r} is the Linear inside a torch.compile'd module "
                f"({repr(holder) if holder else 'the model itself'}), which keeps calling the Linear it was compiled from, so an "
                "adapter there would never run; wrap the model before compiling it (or compile the whole model "
                "after wrap)"
            )
        if hasattr(linear, "_hf_hook"):
            # accelerate replaced this module's forward by one that calls the Linear's original
            # forward: a FlexLinear in its place would be bypassed or lose the device moves
            raise ValueError(
                f"wrap: module {names[0]!r} carries an accelerate hook (_hf_hook): the model was "
                "dispatched with accelerate (device_map / cpu_offload); wrap before dispatching with accelerate"
            )

    if skipped_mha:
        warnings.warn(f"wrap: not adapting {skipped_mha}: {why_mha}", UserWarning, stacklevel=2)
    _warn_unmatched_targets(model, config, [n for key, names in names_of.items() for n in names])
    owners = parameter_owners(model)
    for names, linear in targets:
        tied = tied_names(owners, linear, linear.weight)
        if tied:
            warnings.warn(
                f"wrap: the weight of {names[0]!r} is tied to {tied}: the adapter trains normally, but "
                "flexlora.merge will refuse this module (it would change the tied module too); untie it "
                "before wrapping if you need to merge",
                UserWarning,
                stacklevel=2,
            )

    for p in model.parameters():
        p.requires_grad_(False)
    for names, linear in targets:
        flex = FlexLinear.from_linear(
            linear,
            r_max=config.r_max,
            r_init=config.r_init,
            alpha=config.alpha,
            dropout=config.dropout,
            init_std=config.init_std,
        )
        carry_hooks(linear, flex)
        for name in names:
            model.set_submodule(name, flex)
    # A tied base weight may sit in a modules_to_save module outside its FlexLinear (an input
    # embedding tied to an adapted lm_head): it stays frozen, as every base weight does.
    base = [(memory_key(p), flex_name) for flex_name, m in flex_modules(model) for p in (m.weight, m.bias)
            if p is not None]
    for save_name, m in save:
        inside = {memory_key(sub.weight) for sub in m.modules() if isinstance(sub, FlexLinear)}
        inside |= {memory_key(sub.bias) for sub in m.modules() if isinstance(sub, FlexLinear) and sub.bias is not None}
        for pname, p in m.named_parameters():
            key = memory_key(p)
            owner = next((flex_name for k, flex_name in base if overlap(key, k)), None)
            if owner is None:
                p.requires_grad_(True)
            elif key not in inside:
                warnings.warn(
                    f"wrap: modules_to_save parameter '{save_name}.{pname}' stays frozen: it is the base "
                    f"weight of the FlexLinear {owner!r} (tied weights); untie them before "
                    "wrapping to train it",
                    UserWarning,
                    stacklevel=2,
                )
    model.flexlora_config = config
    return model


def flex_modules(model: nn.Module) -> List[Tuple[str, FlexLinear]]:
    """(qualified name, FlexLinear) pairs in ``named_modules`` order (stable across runs)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FlexLinear)]


def check_unsharded(named: Sequence[Tuple[str, FlexLinear]], caller: str, model: Optional[nn.Module] = None) -> None:
    """Raise NotImplementedError when an adapter's P, λ or Q is a DTensor shard (FSDP2's
    ``fully_shard``, tensor parallelism), or ``model`` is under ``fully_shard`` at all (between
    a forward and its backward FSDP2 holds whole parameters, which are still not the model's to
    change), for the calls that need the whole model on one process (load_adapter, merge, export;
    the checkpoints refuse tensor-parallel layouts through here). Rank allocation,
    :func:`flexlora.save_adapter` and the checkpoints handle FSDP2 shards themselves."""
    dist = torch.distributed
    if not dist.is_available():
        return
    from .._sharded import fsdp_managed, is_sharded

    advice = {
        "load_adapter": "load the adapter before fully_shard (wrap, load_adapter, then fully_shard)",
        "save_checkpoint": "flexlora handles adapters sharded by FSDP2's fully_shard, not tensor-parallel layouts",
        "load_checkpoint": "flexlora handles adapters sharded by FSDP2's fully_shard, not tensor-parallel layouts",
    }.get(caller, f"save it with flexlora.save_adapter(model, dir) on every rank (rank 0 writes), then "
                  f"load it into an unsharded model and call {caller} there")
    def refuse(what: str):
        return NotImplementedError(
            f"{caller}: {what} (a DTensor between steps, as FSDP2's fully_shard or tensor parallelism leave it) and "
            f"{caller} needs whole tensors on one process: {advice} (or train with DistributedDataParallel)"
        )

    managed = model is not None and fsdp_managed(model)
    for name, m in named:
        for key in ("P", "lam", "Q"):
            if managed or is_sharded(getattr(m, key)):
                raise refuse(f"the adapter of {name!r} is sharded ({key})")
    if managed:
        raise refuse("the model is sharded by fully_shard")


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
