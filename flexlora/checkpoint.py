"""Variable-rank adapters on disk: `save_adapter` / `load_adapter`, and exact training resume with
`save_checkpoint` / `load_checkpoint`.

An adapter directory holds

- ``adapter_model.safetensors``: for every FlexLinear ``<name>``, the full r_max buffers
  ``<name>.P`` [out, r_max], ``<name>.lam`` [r_max], ``<name>.Q`` [r_max, in] and ``<name>.mask``
  [r_max] bool (inactive slots too, so training resumes with the exact same state), plus the
  state of every ``modules_to_save`` module under ``modules_to_save.<name>.<key>``;
- ``flexlora_config.json``: the FlexLoRAConfig, library version, and per module the rank, r_max,
  r_init, alpha, scaling and in/out features;
- ``allocator_state.pt`` (only when an allocator is given): ``RankAllocator.state_dict()``.

A checkpoint directory holds the same plus ``training_state.pt`` (optimizer, LR scheduler, step,
RNG states of torch CPU/CUDA, python ``random`` and numpy: of the saving process, or of every
DDP rank with ``save_checkpoint(..., distributed=True)``; and the values of every other parameter
that trains, e.g. a norm unfrozen by hand, which an adapter save does not hold).

Every save is atomic (see :mod:`flexlora._atomic`): a failing save leaves the previous one intact.
"""

from __future__ import annotations

import copy
import json
import operator
import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ._atomic import atomic_directory
from ._sharded import check_placements, copy_whole_, fsdp_managed, fsdp_units, is_sharded, local_like, reshard, whole
from .config import FlexLoRAConfig
from .layers.flex_linear import FlexLinear
from .layers.wrap import check_unsharded, flex_modules, name_matches, named_modules_all, unwrap_model, wrap
from .version import __version__

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "flexlora_config.json"
ALLOCATOR_NAME = "allocator_state.pt"
TRAINING_STATE_NAME = "training_state.pt"
FORMAT_VERSION = 1
_OWNED = (WEIGHTS_NAME, CONFIG_NAME, ALLOCATOR_NAME, TRAINING_STATE_NAME)
# a PEFT adapter's folder (export_peft, PEFT's save_pretrained) names its weights as flexlora
# does: a save there would leave its adapter_config.json beside flexlora's weights
_CONFLICTS = (("adapter_config.json", "a PEFT adapter: export_peft or PEFT's save_pretrained"),)
_SLOT_TENSORS = ("P", "lam", "Q", "mask")
_SAVE_PREFIX = "modules_to_save."
_TRAINABLE_KEY = "trainable"  # training_state.pt: {name: value} of _other_trainables


# --------------------------------------------------------------------------------------------
# what is saved
# --------------------------------------------------------------------------------------------




def _model_config(model: nn.Module) -> FlexLoRAConfig:
    cfg = getattr(model, "flexlora_config", None)
    if not isinstance(cfg, FlexLoRAConfig):
        names = [n for n, _ in flex_modules(model)]
        if names:  # built from FlexLinear layers directly, never wrapped
            raise ValueError(
                f"model holds FlexLinear modules ({names[:4]}{' ...' if len(names) > 4 else ''}) but no "
                "model.flexlora_config: set model.flexlora_config = FlexLoRAConfig(r_init=..., r_max=..., alpha=..., "
                f"target_modules={names[:4]!r}{' + the rest' if len(names) > 4 else ''}) with the layers' own "
                "settings, on the model you save and the one you load into"
            )
        raise ValueError(
            "model is not wrapped by flexlora (no model.flexlora_config); call flexlora.wrap(model, config) first"
        )
    return cfg


def _saved_modules(model: nn.Module, cfg: FlexLoRAConfig) -> List[Tuple[str, nn.Module]]:
    if not cfg.modules_to_save:
        return []
    return [(n, m) for n, m in model.named_modules() if n and name_matches(n, cfg.modules_to_save)]


def _module_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """State of a modules_to_save module, without the frozen base weights of FlexLinears inside it
    (those belong to the base model, not to the adapter)."""
    skip = set()
    for sub_name, sub in module.named_modules():
        if isinstance(sub, FlexLinear):
            pre = f"{sub_name}." if sub_name else ""
            skip |= {pre + k for k in ("weight", "bias", *_SLOT_TENSORS)}
    return {k: v for k, v in module.state_dict().items() if k not in skip}


def _other_trainables(
    model: nn.Module, saved: List[Tuple[str, nn.Module]], optimizer=None, whole_saved: bool = False
) -> Dict[str, nn.Parameter]:
    """{name: parameter} of the unwrapped ``model``'s parameters that train (requires_grad, or
    with state in ``optimizer``: frozen after training a while) but that an adapter save does not
    hold: neither a FlexLinear's P, λ or Q nor saved with one of the ``saved`` (name, module)s
    (modules_to_save; ``whole_saved``: with the base weights of FlexLinears inside them, as
    export_peft writes them merged). Their optimizer state is in a checkpoint either way, so
    without their values a resume would continue them from the fresh model's. A frozen
    parameter the optimizer merely lists (``AdamW(model.parameters())``) never changes: not one."""
    covered = {id(getattr(m, key)) for _, m in flex_modules(model) for key in ("P", "lam", "Q")}
    for _, module in saved:
        state = None if whole_saved else _module_state(module)
        covered |= {id(p) for key, p in module.named_parameters() if state is None or key in state}
    stated = set() if optimizer is None else {id(p) for p, st in optimizer.state.items() if st}
    return {
        name: p for name, p in model.named_parameters()
        if (p.requires_grad or id(p) in stated) and id(p) not in covered
    }


def _warn_left_out(caller: str, model: nn.Module, saved: List[Tuple[str, nn.Module]], whole_saved: bool = False) -> None:
    """Warn (for the caller of ``caller``) when parameters train that an adapter file written with
    the ``saved`` modules does not hold: they would be lost with the process."""
    left_out = list(_other_trainables(model, saved, whole_saved=whole_saved))
    base = {f"{n}.{k}" for n, _ in flex_modules(model) for k in ("weight", "bias")}
    for names, plural, singular in (
        ([n for n in left_out if n in base],
         "are base weights of adapted modules, which an adapter never holds (its ΔW is P·diag(λ)·Q alone): save "
         "the base model's state_dict for them (save_checkpoint keeps them for resuming)",
         "is the base weight of an adapted module, which an adapter never holds (its ΔW is P·diag(λ)·Q alone): "
         "save the base model's state_dict for it (save_checkpoint keeps it for resuming)"),
        ([n for n in left_out if n not in base],
         "are neither adapter slots nor in modules_to_save, so the adapter does not hold them: list their modules "
         "in FlexLoRAConfig.modules_to_save to save them with it (save_checkpoint keeps them for resuming)",
         "is neither an adapter slot nor in modules_to_save, so the adapter does not hold it: list its module in "
         "FlexLoRAConfig.modules_to_save to save it with it (save_checkpoint keeps it for resuming)"),
    ):
        if names:
            n = len(names)
            warnings.warn(
                f"{caller}: {n} trainable parameter{'s' if n > 1 else ''} ({_names(names)}) "
                f"{plural if n > 1 else singular}",
                stacklevel=3,
            )


def _strays(model: nn.Module, optimizer) -> int:
    """How many of ``optimizer``'s parameters are not the model's (no name to save them under)."""
    if optimizer is None:
        return 0
    ours = {id(p) for p in model.parameters()}
    return len({id(p) for g in optimizer.param_groups for p in g["params"]} - ours)


def _names(names: List[str], shown: int = 3) -> str:
    return ", ".join(map(repr, names[:shown])) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _base_name(model: nn.Module) -> Optional[str]:
    """The base model's name or path as HF recorded it (a hub id, or a folder as it was given)."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _base_folder(name: Optional[str]) -> Optional[str]:
    """The absolute path of a base name that is a local folder here, else None."""
    return os.path.realpath(name) if name and os.path.isdir(name) else None


def _same_base(meta: Dict[str, Any], model: nn.Module) -> bool:
    """Whether the model is the base the adapter was saved from: the same recorded name (up to
    "./" and trailing slashes), or the same local folder however it was spelled (absolute,
    relative, from another working folder: compared by the absolute path recorded at save)."""
    saved, here = meta.get("base_model_name_or_path"), _base_name(model)
    if not saved or not here or saved == here or os.path.normpath(saved) == os.path.normpath(here):
        return True
    folder = _base_folder(here)
    return folder is not None and folder in (meta.get("base_model_folder"), _base_folder(saved))


def _adapter_tensors(model: nn.Module, cfg: FlexLoRAConfig) -> Dict[str, torch.Tensor]:
    """Every tensor save_adapter writes, whole and on the CPU (an FSDP2 shard is gathered: a
    collective, so every rank makes these calls in the same order; only the writing rank keeps
    the result, the others return an empty dict)."""
    keep = _writes_gathered(model)
    tensors: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, m in flex_modules(model):
            for key in _SLOT_TENSORS:
                t = whole(getattr(m, key))
                if keep:
                    tensors[f"{name}.{key}"] = t.detach().to("cpu").contiguous()
        for name, m in _saved_modules(model, cfg):
            for key, t in _module_state(m).items():
                t = whole(t)
                if keep:
                    tensors[f"{_SAVE_PREFIX}{name}.{key}"] = t.detach().to("cpu").contiguous()
    return _own_storage(tensors)


def _writes_gathered(model: nn.Module) -> bool:
    """False on the ranks that only take part in an FSDP2 save's gathers (all but rank 0): they
    keep no CPU copy of what rank 0 writes (an unfrozen embedding in modules_to_save is GBs)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        return True
    return not (fsdp_managed(model) or _holds_shards(model))


def _own_storage(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``tensors`` with a copy for each tensor whose memory an earlier one already holds:
    safetensors refuses shared memory, which tied weights saved under two names are (input
    embeddings and lm_head both in modules_to_save). Loading writes both names into the one
    tied tensor."""
    seen = set()
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            tensors[key] = t.clone()
        seen.add(ptr)
    return tensors


def _adapter_meta(model: nn.Module, cfg: FlexLoRAConfig) -> Dict[str, Any]:
    mods = flex_modules(model)
    ranks = torch.stack([m.mask.sum() for _, m in mods]).cpu().tolist() if mods else []
    return {
        "format_version": FORMAT_VERSION,
        "flexlora_version": __version__,
        "base_model_name_or_path": _base_name(model),
        "base_model_folder": _base_folder(_base_name(model)),
        "model_class": type(model).__name__,
        "config": cfg.to_dict(),
        "r_max": cfg.r_max,
        "total_rank": int(sum(ranks)),
        "modules": {
            name: {
                "rank": int(r),
                "r_max": m.r_max,
                "r_init": m.r_init,
                "alpha": m.alpha,
                "scaling": m.scaling,
                "in_features": m.in_features,
                "out_features": m.out_features,
            }
            for (name, m), r in zip(mods, ranks)
        },
        "modules_to_save": [n for n, _ in _saved_modules(model, cfg)],
    }


def _collect_adapter(model: nn.Module, allocator):
    """Everything save_adapter writes, gathered in memory first: bad input fails before any disk
    access. Returns (tensors, meta, allocator state or None)."""
    model = unwrap_model(model)
    cfg = _model_config(model)
    mods = flex_modules(model)
    check_placements(mods, "save_adapter")
    merged = [n for n, m in mods if m.merged]
    if merged:
        raise ValueError(
            f"cannot save an adapter while modules are merged (first: {merged[0]!r}); call flexlora.unmerge(model) first"
        )
    alloc_state = None if allocator is None else allocator.state_dict()
    return _adapter_tensors(model, cfg), _adapter_meta(model, cfg), alloc_state


def _write_adapter(tmp: Path, collected) -> None:
    import safetensors.torch

    tensors, meta, alloc_state = collected
    safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "library": "flexlora"})
    with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    if alloc_state is not None:
        torch.save(alloc_state, tmp / ALLOCATOR_NAME)


def save_adapter(model: nn.Module, directory, allocator=None) -> Path:
    """Save the adapter of a wrapped ``model`` into ``directory`` (created or atomically replaced).

    Args:
        model: a model wrapped by :func:`flexlora.wrap` (not merged).
        directory: target folder; files of other tools already in it are kept, flexlora's replaced.
        allocator: optional :class:`flexlora.RankAllocator`; its ``state_dict()`` goes to
            ``allocator_state.pt`` so that :func:`load_adapter` (``allocator=``) can restore it.

    Returns:
        the directory path. Raises ``PermissionError``/``OSError`` naming the path when it cannot be
        written; the previous content of ``directory`` survives any failure.

    Under FSDP2 (``fully_shard``) this is a collective: call it on every rank (on rank 0 alone it
    waits in its first gather until the process group times out). The units go back to their
    shards first (so it may run between a forward and its backward), every adapter and
    modules_to_save tensor is gathered, rank 0 writes, and if that write fails the other ranks
    raise ``RuntimeError("save_adapter to ... failed on rank 0: ...")``. Under DDP, call it on
    rank 0 only.
    """
    plain = unwrap_model(model)
    sharded = fsdp_managed(plain) or _holds_shards(plain)
    if sharded:
        # FSDP's working copies (whole after a forward, smaller-mesh with
        # reshard_after_forward=<int>) would gather freed memory or other values: back to the
        # shards first, as each unit does after its forward (backward gathers them again)
        reshard(fsdp_units(plain))
    collected = _collect_adapter(model, allocator)  # sharded: gathered on every rank
    rank = dist.get_rank() if sharded and dist.is_initialized() else 0
    if rank != 0:
        return _await_writer(Path(directory), "save_adapter")
    error = None
    try:  # sharded: any error of rank 0 must reach the ranks waiting in _await_writer
        _warn_left_out("save_adapter", plain, _saved_modules(plain, _model_config(plain)))
        with atomic_directory(directory, _OWNED, _CONFLICTS) as tmp:
            _write_adapter(tmp, collected)
    except BaseException as e:
        error = e
    _end_write(error, announce=sharded and dist.is_initialized() and dist.get_world_size() > 1)
    return Path(directory)


def _holds_shards(model: nn.Module) -> bool:
    """Whether an adapter or a modules_to_save tensor of ``model`` is a DTensor (FSDP2)."""
    cfg = getattr(model, "flexlora_config", None)
    saved = _saved_modules(model, cfg) if isinstance(cfg, FlexLoRAConfig) else []
    tensors = [getattr(m, k) for _, m in flex_modules(model) for k in _SLOT_TENSORS]
    tensors += [t for _, m in saved for t in _module_state(m).values()]
    return any(is_sharded(t) for t in tensors)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _read_meta(directory: Path) -> Dict[str, Any]:
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: {str(directory)!r} is not a flexlora adapter directory")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is corrupt (not valid JSON: {e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("modules"), dict) or "config" not in meta:
        raise ValueError(f"{str(path)!r} is corrupt: expected keys 'config' and 'modules'")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{str(path)!r} is corrupt: format_version must be an int, got {version!r}")
    if version > FORMAT_VERSION:  # before the fields: a newer layout says "upgrade", not "corrupt"
        raise ValueError(
            f"{str(path)!r} has format_version {version}, newer than this flexlora "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade flexlora"
        )
    _check_meta_types(meta, path)
    return meta


# What each module entry of flexlora_config.json holds, and of which type (bool is no int here)
_MODULE_FIELDS = {"out_features": int, "in_features": int, "r_max": int, "scaling": float}


def _check_meta_types(meta: Dict[str, Any], path: Path) -> None:
    """The fields the loaders read, of the types they expect: a hand-edited or damaged file is a
    ValueError naming the file and the field, not a TypeError / KeyError from deep inside."""
    def bad(what: str, expected: str, got: Any) -> ValueError:
        return ValueError(f"{str(path)!r} is corrupt: {what} must be {expected}, got {got!r}")

    saved = meta.get("modules_to_save", [])
    if not isinstance(saved, list) or not all(isinstance(n, str) for n in saved):
        raise bad("modules_to_save", "a list of module names", saved)
    for name, info in meta["modules"].items():
        if not isinstance(info, dict):
            raise bad(f"modules[{name!r}]", "an object", info)
        for field_name, kind in _MODULE_FIELDS.items():
            value = info.get(field_name)
            ok = (isinstance(value, (int, float)) if kind is float else isinstance(value, int)) and not isinstance(value, bool)
            if not ok:
                raise bad(f"modules[{name!r}][{field_name!r}]", "an int" if kind is int else "a number", value)


def _read_tensors(directory: Path) -> Dict[str, torch.Tensor]:
    import safetensors.torch
    from safetensors import SafetensorError

    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is corrupt or unreadable: {e}") from e


def _check_match(model: nn.Module, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor], directory: Path,
                 sharded_ok: bool = False) -> None:
    """Raise on the first difference between the saved adapter and the model's (sharded_ok:
    load_checkpoint restores into FSDP2 shards)."""
    where = f"adapter {str(directory)!r}"
    mods = dict(flex_modules(model))
    if not sharded_ok:
        check_unsharded(list(mods.items()), "load_adapter", model)
    merged = [n for n, m in mods.items() if m.merged]
    if merged:
        raise ValueError(
            f"cannot load {where} into merged modules (first: {merged[0]!r}): W holds the old ΔW; "
            "call flexlora.unmerge(model) first"
        )
    saved = meta["modules"]
    lookup = _flex_by_any_name(model)
    for name, info in saved.items():
        m = lookup.get(name)
        if m is None:
            raise ValueError(
                f"{where} does not match the model: saved module {name!r} has no FlexLinear in the model "
                f"(another base model or other target_modules?)"
            )
        if (m.out_features, m.in_features) != (info["out_features"], info["in_features"]):
            raise ValueError(
                f"{where} does not match the model: module {name!r} was saved with "
                f"[out, in] = [{info['out_features']}, {info['in_features']}], the model's is "
                f"[{m.out_features}, {m.in_features}] (another base model?)"
            )
        if m.r_max != info["r_max"]:
            raise ValueError(
                f"{where} does not match the model: module {name!r} was saved with r_max={info['r_max']}, "
                f"the model's has r_max={m.r_max}; wrap with the saved config (r_max={info['r_max']})"
            )
        if abs(m.scaling - info["scaling"]) > 1e-12 * max(1.0, abs(info["scaling"])):
            raise ValueError(
                f"{where} does not match the model: module {name!r} was saved with scaling "
                f"alpha/r_init={info['scaling']}, the model's is {m.scaling}; wrap with the saved alpha and r_init"
            )
        for key in _SLOT_TENSORS:
            t = tensors.get(f"{name}.{key}")
            want = tuple(getattr(m, key).shape)
            if t is None or tuple(t.shape) != want:
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                raise ValueError(
                    f"{str(directory / WEIGHTS_NAME)!r} is inconsistent: tensor {name}.{key} is {got}, expected {want}"
                )
            # a float mask of 0.5 or an integer P would otherwise be cast silently on load
            kind_ok = t.dtype == torch.bool if key == "mask" else t.is_floating_point()
            if not kind_ok:
                raise ValueError(
                    f"{str(directory / WEIGHTS_NAME)!r} is inconsistent: tensor {name}.{key} has dtype {t.dtype}, "
                    f"expected {'bool' if key == 'mask' else 'a floating dtype'}"
                )
    found = {id(lookup[n]) for n in saved}
    for name, m in mods.items():
        if id(m) not in found:
            raise ValueError(
                f"{where} does not match the model: the model's FlexLinear {name!r} is not in the save "
                f"(unexpected module; other target_modules?)"
            )
    cfg = _model_config(model)
    model_saved = dict(_saved_modules(model, cfg))
    for name in meta.get("modules_to_save", []):
        if name not in model_saved:
            raise ValueError(
                f"{where} does not match the model: saved modules_to_save entry {name!r} is not among the "
                f"model's modules_to_save ({sorted(model_saved)})"
            )
        state = _module_state(model_saved[name])
        for key, t in state.items():
            s = tensors.get(f"{_SAVE_PREFIX}{name}.{key}")
            if s is None or s.shape != t.shape:
                got = "missing" if s is None else f"shape {tuple(s.shape)}"
                raise ValueError(
                    f"{where} does not match the model: modules_to_save tensor {name}.{key} is {got}, "
                    f"the model's is {tuple(t.shape)}"
                )
    for name in model_saved:
        if name not in meta.get("modules_to_save", []):
            raise ValueError(
                f"{where} does not match the model: the model's modules_to_save module {name!r} is not in the save"
            )


def _flex_by_any_name(model: nn.Module) -> Dict[str, FlexLinear]:
    """{name: FlexLinear} under every name a module is registered by: a Linear held as both `enc`
    and `dec` was saved under whichever name came first in the saving model."""
    return {n: m for n, m in named_modules_all(model) if isinstance(m, FlexLinear)}


def _apply(model: nn.Module, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
    lookup = _flex_by_any_name(model)
    sharded = fsdp_managed(model)
    with torch.no_grad():
        for name in meta["modules"]:
            m = lookup[name]
            for key in _SLOT_TENSORS:
                copy_whole_(getattr(m, key), tensors[f"{name}.{key}"])  # a shard takes its part
        cfg = _model_config(model)
        for name, module in _saved_modules(model, cfg):
            state = _module_state(module)
            if sharded:  # its parameters are shards, which load_state_dict would not split
                params = dict(module.named_parameters())
                for k in state:
                    copy_whole_(params[k] if k in params else module.get_buffer(k), tensors[f"{_SAVE_PREFIX}{name}.{k}"])
                continue
            module.load_state_dict(
                {k: tensors[f"{_SAVE_PREFIX}{name}.{k}"] for k in state}, strict=False
            )


def _wrap_undoable(model: nn.Module, config: FlexLoRAConfig):
    """wrap(model, config), returning a function that puts the original nn.Linear modules and
    requires_grad flags back (a failed load must not leave a plain model wrapped)."""
    # every name: a Linear registered twice is replaced under both, and put back under both
    linears = {n: m for n, m in named_modules_all(model) if isinstance(m, nn.Linear)}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with torch.random.fork_rng(devices=[]):  # P and Q's init draws are overwritten by the load:
        wrap(model, config)  # they must not move the caller's random stream (a failed load neither)

    def undo() -> None:
        for name in [n for n, m in named_modules_all(model) if isinstance(m, FlexLinear)]:
            model.set_submodule(name, linears[name])
        for p, flag in flags:
            p.requires_grad_(flag)
        if hasattr(model, "flexlora_config"):
            del model.flexlora_config

    return undo


def _adapter_snapshot(model: nn.Module, device=None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, copy) of everything load_adapter may overwrite: the slot tensors of every
    FlexLinear and the trainable tensors of modules_to_save; the copies on ``device`` (None:
    where each tensor is)."""
    model = unwrap_model(model)

    def keep(t):
        return t.detach().clone() if device is None else t.detach().to(device, copy=True)

    out = [(getattr(m, key), keep(getattr(m, key))) for _, m in flex_modules(model) for key in _SLOT_TENSORS]
    cfg = _model_config(model) if hasattr(model, "flexlora_config") else None
    if cfg is not None:
        for _, module in _saved_modules(model, cfg):
            out += [(t, keep(t)) for t in _module_state(module).values()]
    return out


def _restore_snapshot(snapshot: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy an :func:`_adapter_snapshot` back into its tensors."""
    with torch.no_grad():
        for t, old in snapshot:
            t.copy_(old)


def load_adapter(model: nn.Module, directory, allocator=None, weights_only: bool = True) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` and return the model.

    ``model`` is either already wrapped (its config must produce the same modules, shapes, r_max and
    scaling as the save; allocation fields may differ), or a plain base model, which is then wrapped
    with the saved config first. Every check runs before anything is copied, so a failed load leaves
    the model untouched (a plain model is handed back plain). Masks (ranks) are restored exactly,
    as are the full r_max buffers.

    Args:
        model: the base model, wrapped or not.
        directory: folder written by :func:`save_adapter` or :func:`save_checkpoint`.
        allocator: optional RankAllocator whose state is restored from ``allocator_state.pt``
            (an error if the save has none).
        weights_only: passed to ``torch.load`` for ``allocator_state.pt`` (safetensors and JSON need
            no pickle); keep True unless a trusted file holds objects it refuses.

    Raises:
        FileNotFoundError / ValueError naming the path for missing or corrupt files, ValueError naming
        the first mismatching module (missing, unexpected, other shape, other r_max or scaling).
    """
    _load_adapter(model, directory, allocator, weights_only)
    return model


def _load_adapter(model: nn.Module, directory, allocator, weights_only: bool, sharded_ok: bool = False):
    """load_adapter's work; returns a function that unwraps the model again when it came in
    plain (load_checkpoint calls it should a later step fail), else None."""
    model = unwrap_model(model)
    if not sharded_ok:
        check_unsharded(flex_modules(model), "load_adapter", model)  # before anything is read
    directory = Path(directory)
    meta = _read_meta(directory)
    tensors = _read_tensors(directory)
    undo_wrap = None
    if not any(isinstance(m, FlexLinear) for m in model.modules()):
        try:
            cfg = FlexLoRAConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{str(directory / CONFIG_NAME)!r} holds an invalid config: {e}") from e
        try:
            undo_wrap = _wrap_undoable(model, cfg)
        except ValueError as e:
            raise ValueError(
                f"adapter {str(directory)!r} does not match the model (another base model?): {e}"
            ) from e
    try:
        if not _same_base(meta, model):
            warnings.warn(
                f"adapter {str(directory)!r} was saved from base model {meta.get('base_model_name_or_path')!r}, "
                f"loading into {_base_name(model)!r}",
                stacklevel=3,  # the caller of load_adapter / load_checkpoint
            )
        _check_match(model, meta, tensors, directory, sharded_ok)
        alloc_state = _read_allocator_state(directory, weights_only) if allocator is not None else None
        check = getattr(allocator, "_check_state", None)  # RankAllocator: other modules or seed
        if check is not None:
            check(alloc_state)
    except BaseException:
        if undo_wrap is not None:  # a plain model given: hand it back plain
            undo_wrap()
        raise
    snapshot = _adapter_snapshot(model) if allocator is not None else []
    _apply(model, meta, tensors)
    if allocator is not None:
        try:
            allocator.load_state_dict(alloc_state)
        except BaseException:  # checked above, so not expected: still, no half-loaded model
            _restore_snapshot(snapshot)
            if undo_wrap is not None:
                undo_wrap()
            raise
    return undo_wrap


def _torch_load(path: Path, what: str, weights_only: bool = True):
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # pickle/zip errors come in many types
        hint = ""
        # only a refused object (torch names it "Unsupported global"), not garbage bytes, which
        # the weights-only unpickler also reports as "Weights only load failed"
        if weights_only and "Unsupported global" in str(e):
            hint = (
                " -- it holds objects torch.load(weights_only=True) refuses (e.g. a custom scheduler's "
                "state); if you trust the file, pass weights_only=False"
            )
        raise ValueError(f"{str(path)!r} is corrupt or unreadable ({what}): {str(e)[:500]}{hint}") from e


def _read_allocator_state(directory: Path, weights_only: bool = True):
    return _torch_load(directory / ALLOCATOR_NAME, "allocator state: was the save made with allocator=?", weights_only)


# --------------------------------------------------------------------------------------------
# exact resume
# --------------------------------------------------------------------------------------------


def _rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # as a tensor + plain numbers, so torch.load(weights_only=True) can read it back
        state["numpy"] = (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    except ImportError:  # numpy is a dependency, but resume must not need it
        pass
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        saved, here = list(state["cuda"]), torch.cuda.device_count()
        if len(saved) != here:
            warnings.warn(
                f"the checkpoint holds the CUDA RNG states of {len(saved)} devices, this process sees {here}: "
                f"the first {min(len(saved), here)} are restored, so CUDA random streams may not continue exactly",
                stacklevel=3,
            )
        for i, s in enumerate(saved[:here]):  # set_rng_state_all would fail on a missing device
            torch.cuda.set_rng_state(s, i)
    if "numpy" in state:
        import numpy as np

        np.random.set_state(_numpy_state(state["numpy"]))


def _numpy_state(saved) -> tuple:
    """numpy's RNG state from its saved form (keys as an int64 tensor, for weights_only loads)."""
    import numpy as np

    name, keys, pos, has_gauss, gauss = saved
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)


def _check_training_state(state: Any, directory: Path) -> Dict[str, Any]:
    """``training_state.pt`` checked before anything is restored (its step, and this rank's RNG
    states tried on scratch generators): returns this rank's RNG states. A bad file must not
    fail after the model, optimizer and allocator were overwritten."""
    where = str(directory / TRAINING_STATE_NAME)
    if not isinstance(state, dict):
        raise ValueError(f"{where!r} holds a {type(state).__name__}, expected the dict save_checkpoint writes")
    missing = [k for k in ("step", "rng") if k not in state]
    if missing:
        raise ValueError(f"{where!r} lacks {missing}: was it written by save_checkpoint?")
    try:
        operator.index(state["step"])
    except TypeError:
        raise ValueError(f"{where!r}: step must be an int, got {state['step']!r}") from None
    rng = _this_ranks_rng(state, directory)
    try:
        torch.Generator().set_state(rng["torch"])
        random.Random().setstate(rng["python"])
        if "numpy" in rng:
            import numpy as np

            np.random.RandomState().set_state(_numpy_state(rng["numpy"]))
        if "cuda" in rng and torch.cuda.is_available():
            for i, s in enumerate(list(rng["cuda"])[: torch.cuda.device_count()]):
                want = torch.cuda.get_rng_state(i)
                if not torch.is_tensor(s) or s.dtype != want.dtype or s.shape != want.shape:
                    raise ValueError(f"CUDA device {i}'s state is not a {tuple(want.shape)} {want.dtype} tensor")
    except Exception as e:
        raise ValueError(f"{where!r} holds RNG states that cannot be restored ({type(e).__name__}: {e})") from None
    return rng


def _process_group():
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_checkpoint(
    directory,
    model: nn.Module,
    allocator=None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler=None,
    step: int = 0,
    *,
    distributed: bool = False,
    scaler=None,
) -> Path:
    """Save everything needed to continue training exactly: the adapter (as :func:`save_adapter`),
    the allocator, optimizer and LR-scheduler states, ``step``, the RNG states (torch CPU, CUDA
    when initialised, python ``random``, numpy) and the values of the model's other trainable
    parameters (requires_grad or in the optimizer, neither adapter slots nor modules_to_save: a
    norm unfrozen by hand). Atomic: a failed save keeps the previous checkpoint.

    Args:
        directory: target folder.
        model: wrapped model.
        allocator, optimizer, scheduler: optional; whatever is given is saved.
        step: optimizer steps done so far (returned by :func:`load_checkpoint`).
        distributed: False (default): call on one process (under DDP: rank 0); the file holds that
            process's RNG states. True: call on *every* rank of the default process group (a
            collective): each rank's RNG states are gathered and saved, rank 0 writes, and every
            rank returns once the checkpoint is written, or raises if writing failed; then
            :func:`load_checkpoint` on every rank restores each rank's own random streams
            (dropout masks differ per rank). Without a process group it is the same as False.
            Required under FSDP2 (``fully_shard``): the adapter, the other trained parameters
            and the optimizer's state (keyed by parameter name, every tensor whole) are
            gathered first, and :func:`load_checkpoint` on every rank gives each rank its parts
            back.
        scaler: optional ``torch.amp.GradScaler`` (fp16 training): its scale and growth tracker,
            so a resumed run skips and grows at the same steps.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    plain = unwrap_model(model)
    fsdp = fsdp_managed(plain)
    if fsdp:
        if not distributed:
            raise ValueError(
                "save_checkpoint: the model is sharded by fully_shard: call save_checkpoint(..., distributed=True) "
                "on every rank (it gathers the shards; rank 0 writes)"
            )
        check_placements(flex_modules(plain), "save_checkpoint")
        reshard(fsdp_units(plain))  # FSDP's working copies out of the way, as save_adapter does
    else:
        check_unsharded(flex_modules(plain), "save_checkpoint", plain)
    last = getattr(allocator, "_last_step", None)
    if isinstance(last, int) and getattr(allocator, "_stepped", False) and last < step:
        # the resumed run starts at step + 1: allocator.step(step) (an event, maybe) never happens
        warnings.warn(
            f"save_checkpoint(step={step}) but the allocator's last step is {last}: call "
            f"allocator.step({step}, optimizer) before saving, or the resumed run never runs it",
            stacklevel=2,
        )
    rank, world = _process_group() if distributed else (0, 1)
    if callable(getattr(optimizer, "consolidate_state_dict", None)):  # torch's ZeroRedundancyOptimizer
        if distributed and dist.is_available() and dist.is_initialized():
            optimizer.consolidate_state_dict(to=0)  # a collective: every rank is in this call
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "save_checkpoint: the optimizer is a ZeroRedundancyOptimizer, whose state is sharded over the "
                "ranks: call save_checkpoint(..., distributed=True) on every rank (it gathers the state on rank 0)"
            )
    rng = _rng_state()
    gathered = None
    if fsdp:  # the collectives every rank joins: the adapter, trained values, optimizer state
        gathered = _gather_sharded_training_state(model, allocator, optimizer)
    per_rank = None
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, rng)
        if rank != 0:
            return _await_writer(Path(directory))
    error = None
    try:  # everything rank 0 does from here on: any error must reach the waiting ranks
        state = {
            "step": step,
            "rng": rng,
            "optimizer": None if optimizer is None else gathered[2] if fsdp else optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "flexlora_version": __version__,
        }
        if per_rank is not None:
            state["rng_per_rank"] = per_rank
        if fsdp:
            collected, state[_TRAINABLE_KEY], _ = gathered
            state[_OPTIMIZER_FORMAT_KEY] = _NAMED
        else:
            collected = _collect_adapter(model, allocator)
            state[_TRAINABLE_KEY] = _trained_values(plain, optimizer)
            if optimizer is not None and hasattr(optimizer, "param_groups"):
                # the state is keyed by position: the names let a load refuse an optimizer built
                # over the same shapes in another order (every layer's q_proj has one shape)
                state[_OPTIMIZER_NAMES_KEY] = _group_names(plain, optimizer)
        strays = _strays(plain, optimizer)
        if strays:
            warnings.warn(
                f"save_checkpoint: the optimizer holds {strays} parameter{'s that are' if strays > 1 else ' that is'} "
                "not the model's: the checkpoint has their optimizer state but not their values, so a resume "
                "continues them from whatever the new process holds",
                stacklevel=2,
            )
        with atomic_directory(directory, _OWNED, _CONFLICTS) as tmp:
            _write_adapter(tmp, collected)
            torch.save(state, tmp / TRAINING_STATE_NAME)
    except BaseException as e:
        error = e
    _end_write(error, announce=world > 1)
    return Path(directory)


# training_state.pt of a save under FSDP2 marks its optimizer state as keyed by parameter name,
# every tensor whole (see _gather_optimizer): positions and shards would not survive a resume
# on another layout
_OPTIMIZER_FORMAT_KEY = "optimizer_format"
_NAMED = "flexlora.named/1"
# beside a position-keyed optimizer state (no fully_shard): the parameter names of each group
_OPTIMIZER_NAMES_KEY = "optimizer_param_names"


def _gather_sharded_training_state(model: nn.Module, allocator, optimizer):
    """(adapter as _collect_adapter gives it, {name: whole value} of the other trained
    parameters, the optimizer state from :func:`_gather_optimizer` or None) of an FSDP2 model:
    collectives, every rank calls this in the same order."""
    plain = unwrap_model(model)
    collected = _collect_adapter(model, allocator)
    trained = _trained_values(plain, optimizer)
    return collected, trained, None if optimizer is None else _gather_optimizer(plain, optimizer)


def _trained_values(model: nn.Module, optimizer) -> Dict[str, torch.Tensor]:
    """{name: value on the CPU} of the other trained parameters (:func:`_other_trainables`) a
    checkpoint keeps; an FSDP2 shard is gathered whole (a collective), and only the writing
    rank keeps the result."""
    keep = _writes_gathered(model)
    trained = {}
    with torch.no_grad():
        for name, p in _other_trainables(model, _saved_modules(model, _model_config(model)), optimizer).items():
            value = whole(p)
            if keep:
                trained[name] = value.detach().to("cpu")
    return trained


def _gather_optimizer(model: nn.Module, optimizer) -> Dict[str, Any]:
    """The optimizer's state keyed by parameter name, every tensor whole and on the CPU:
    {"state": {name: {key: value}}, "param_groups": [{hyperparameters..., "params": [names]}]}.
    A collective for sharded state (every rank walks the groups in the same order). Written
    here rather than with torch.distributed.checkpoint's get_optimizer_state_dict, which runs a
    zero-lr optimizer step on an optimizer without state (its step counts moved) and whose
    loading drops the state of parameters frozen after training."""
    strays = _strays(model, optimizer)
    if strays:
        raise ValueError(
            f"save_checkpoint: the optimizer holds {strays} parameter(s) that are not the model's; under "
            "fully_shard its state is saved by parameter name, so build the optimizer over model parameters only"
        )
    names = {id(p): n for n, p in model.named_parameters()}
    keep = _writes_gathered(model)  # the other ranks join the gathers and keep nothing
    groups, state = [], {}
    with torch.no_grad():
        for g in optimizer.param_groups:
            groups.append({**{k: copy.deepcopy(v) for k, v in g.items() if k != "params"},
                           "params": [names[id(p)] for p in g["params"]]})
            for p in g["params"]:
                st = optimizer.state.get(p)
                if not st:
                    continue
                entry = {}
                for k, v in st.items():
                    v = whole(v) if torch.is_tensor(v) else v  # a collective for a sharded moment
                    if keep:
                        entry[k] = v.detach().to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v)
                if keep:
                    state[names[id(p)]] = entry
    return {"state": state, "param_groups": groups}


def _check_named_optimizer(model: nn.Module, optimizer, saved, directory: Path) -> None:
    """Raise ValueError, before anything changes, unless ``optimizer`` holds the parameters the
    named state was saved for, group by group, in the same order."""
    saved_groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(saved_groups, list) or not isinstance(saved.get("state"), dict):
        raise ValueError(f"checkpoint {str(directory)!r}: its optimizer state is corrupt (no param_groups / state)")
    _check_group_names(_group_names(model, optimizer), [list(sg.get("params", ())) for sg in saved_groups], directory)


def _group_names(model: nn.Module, optimizer) -> List[List[str]]:
    """The model's names of the parameters of each of ``optimizer``'s groups, in order (a
    parameter that is not the model's: "<not the model's>")."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names.get(id(p), _NOT_THE_MODELS) for p in g["params"]] for g in optimizer.param_groups]


_NOT_THE_MODELS = "<not the model's>"


def _check_group_names(have_groups: List[List[str]], saved_groups: List[List[str]], directory: Path) -> None:
    """Raise ValueError unless the optimizer given holds, group by group, the parameters the
    checkpoint's optimizer held, in the same order."""
    if len(saved_groups) != len(have_groups):
        raise ValueError(
            f"checkpoint {str(directory)!r}: the optimizer state has {len(saved_groups)} parameter groups, "
            f"the optimizer given has {len(have_groups)} (build it over the same parameters, in the same groups)"
        )
    for i, (have, want) in enumerate(zip(have_groups, saved_groups)):
        if have != want:
            gone = [n for n in want if n not in have][:3]
            extra = [n for n in have if n not in want][:3]
            raise ValueError(
                f"checkpoint {str(directory)!r}: optimizer parameter group {i} holds {len(want)} parameters in the "
                f"checkpoint, {len(have)} in the optimizer given"
                + (f"; missing here: {gone}" if gone else "") + (f"; not in the checkpoint: {extra}" if extra else "")
                + (" (same parameters in another order)" if not gone and not extra else "")
                + " (build it over the same parameters, in the same groups and order)"
            )


def _scatter_optimizer(model: nn.Module, optimizer, saved) -> None:
    """Load :func:`_gather_optimizer`'s state (checked by :func:`_check_named_optimizer`): each
    group's hyperparameters, and each parameter's state, a sharded parameter's as a DTensor of
    this rank's part; ``step`` counts stay where torch keeps them (CPU float32 unless the group
    is fused or capturable)."""
    params = dict(model.named_parameters())
    for g, sg in zip(optimizer.param_groups, saved["param_groups"]):
        for k, v in sg.items():
            if k != "params":
                g[k] = copy.deepcopy(v)
    keep_step_on_device = {id(p) for g in optimizer.param_groups if g.get("fused") or g.get("capturable")
                           for p in g["params"]}
    with torch.no_grad():
        for name in [n for g in saved["param_groups"] for n in g["params"]]:
            p = params[name]
            optimizer.state.pop(p, None)
            st = saved["state"].get(name)
            if not st:
                continue
            new = {}
            for k, v in st.items():
                if not torch.is_tensor(v):
                    new[k] = copy.deepcopy(v)
                elif k == "step":
                    new[k] = v.to(p.device if id(p) in keep_step_on_device else "cpu", copy=True)
                else:
                    new[k] = local_like(p, v)
            optimizer.state[p] = new


def _end_write(error: Optional[BaseException], announce: bool) -> None:
    """Rank 0's end of a save: with ``announce``, tell the ranks waiting in :func:`_await_writer`
    how it went; then re-raise its error, if any."""
    if announce:
        dist.broadcast_object_list([None if error is None else f"{type(error).__name__}: {error}"], src=0)
    if error is not None:
        raise error


def _await_writer(directory: Path, caller: str = "save_checkpoint") -> Path:
    """A non-zero rank of a distributed save: wait for rank 0's outcome, raise if it failed."""
    word = [None]
    dist.broadcast_object_list(word, src=0)
    if word[0] is not None:
        raise RuntimeError(f"{caller} to {str(directory)!r} failed on rank 0: {word[0]}")
    return directory


def load_checkpoint(
    directory,
    model: nn.Module,
    allocator=None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler=None,
    weights_only: bool = True,
    *,
    scaler=None,
) -> int:
    """Restore a :func:`save_checkpoint` directory into freshly built objects and return ``step``.

    Build ``model`` (wrapped or not), ``allocator``, ``optimizer`` (over the same parameters, in the
    same order) and ``scheduler`` exactly as for a new run, then call this; training continues with
    the same parameters, ranks, optimizer moments, learning rate, allocator schedule and random
    streams (dropout masks, data shuffling through python/numpy/torch RNGs), and with ``scaler=``
    (a ``torch.amp.GradScaler``) the same loss scale. The saved values of the model's other
    trainable parameters (see :func:`save_checkpoint`) are restored by name, last. Everything is
    read and checked before anything is modified (and should loading the optimizer, scheduler or
    scaler state fail anyway, what was already restored is put back and a plain model is handed
    back plain). Resuming training (``optimizer=`` given) from a checkpoint holding a GradScaler
    state without ``scaler=`` warns. ``weights_only`` goes to ``torch.load`` of the ``.pt``
    files: the default (True) reads the states of torch's optimizers and schedulers and of the
    RankAllocator without unpickling arbitrary objects.
    """
    plain = unwrap_model(model)
    fsdp = fsdp_managed(plain)
    if fsdp:  # every rank calls this; each restores its own parts
        check_placements(flex_modules(plain), "load_checkpoint")
        reshard(fsdp_units(plain))
    else:
        check_unsharded(flex_modules(plain), "load_checkpoint", plain)  # before anything is read
    directory = Path(directory)
    _read_meta(directory)  # clear error first if this is not a flexlora directory
    state = _torch_load(
        directory / TRAINING_STATE_NAME, "training state: was it written by save_checkpoint?", weights_only
    )
    rng = _check_training_state(state, directory)
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
        if obj is not None and state.get(key) is None:
            raise ValueError(
                f"checkpoint {str(directory)!r} holds no {key} state, but load_checkpoint was given {key}=...: "
                f"pass {key}=None, or save with save_checkpoint(..., {key}=...)"
            )
    extras = _check_trainables(state, model, directory)
    full_optim = state.get(_OPTIMIZER_FORMAT_KEY) == _NAMED
    if optimizer is not None and fsdp and not full_optim:
        raise ValueError(
            f"checkpoint {str(directory)!r} was saved without fully_shard: its optimizer state is keyed by "
            "parameter position, which the shards of this model cannot take; resume it on an unsharded model"
        )
    if optimizer is not None and full_optim:
        _check_named_optimizer(plain, optimizer, state["optimizer"], directory)
    elif optimizer is not None:
        _check_optimizer_state(optimizer, state["optimizer"], directory, _missing_from(optimizer, extras))
        if isinstance(state.get(_OPTIMIZER_NAMES_KEY), list) and hasattr(optimizer, "param_groups"):
            _check_group_names(_group_names(plain, optimizer), state[_OPTIMIZER_NAMES_KEY], directory)
    if scaler is not None:
        _check_scaler_state(scaler, state["scaler"], directory)
    elif optimizer is not None and state.get("scaler"):  # resuming training, the loss scale left behind
        warnings.warn(
            f"checkpoint {str(directory)!r} holds a GradScaler state, but load_checkpoint was given no scaler=: "
            "pass scaler= to restore its loss scale (a fresh GradScaler starts again from its init_scale)",
            stacklevel=2,
        )
    snapshot = _adapter_snapshot(model)  # empty for a plain model
    alloc_before = allocator.state_dict() if allocator is not None else None
    # Optimizer.load_state_dict puts new state tensors in place and leaves the old ones as they
    # are, so the state_dict() references are a full snapshot (schedulers hold plain values)
    opt_holder, opt_before = _optimizer_snapshot(optimizer)
    sched_before = scheduler.state_dict() if hasattr(scheduler, "state_dict") else None
    scaler_before = scaler.state_dict() if scaler is not None else None
    rng_before = _rng_state()
    undo_wrap = _load_adapter(model, directory, allocator, weights_only, sharded_ok=fsdp)
    try:
        if optimizer is not None and full_optim:  # saved under FSDP2: keyed by parameter name
            _scatter_optimizer(plain, optimizer, state["optimizer"])
        elif optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"]:  # {}: a disabled scaler saved it, nothing to restore
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(rng)
        # last, once nothing after them can fail (names and shapes are checked): no spare copy of
        # them (an unfrozen embedding may be GBs) is held for a rollback
        with torch.no_grad():
            for _, p, value in extras:
                copy_whole_(p, value)  # checked above; inside the rollback all the same
    except BaseException:
        # what was already loaded goes back: a failed load leaves the objects as they were
        _restore_snapshot(snapshot)
        if allocator is not None:
            allocator.load_state_dict(alloc_before)
        if opt_holder is not None:
            opt_holder.load_state_dict(opt_before)
        if undo_wrap is not None:  # a plain model given: hand it back plain
            undo_wrap()
        if sched_before is not None:
            try:  # a scheduler whose load just failed may refuse its own state too
                scheduler.load_state_dict(sched_before)
            except Exception:
                pass  # the original error, raised below, is the one that explains
        if scaler_before:  # a disabled scaler has no state to put back
            scaler.load_state_dict(scaler_before)
        try:
            _set_rng_state(rng_before)
        except Exception:
            pass
        raise
    return int(state["step"])


def _check_scaler_state(scaler, saved: Any, directory: Path) -> None:
    """A GradScaler's saved state, checked before anything is restored: an enabled scaler cannot
    take the empty state of a disabled one (GradScaler.load_state_dict raises, after the rest)."""
    where = str(directory / TRAINING_STATE_NAME)
    if not isinstance(saved, dict):
        raise ValueError(f"{where!r}: the scaler state is a {type(saved).__name__}, expected a dict")
    if not saved and scaler.state_dict():
        raise ValueError(
            f"{where!r}: the scaler state is empty (saved from a disabled GradScaler), and scaler= is enabled; "
            "pass scaler=None or a disabled GradScaler"
        )


def _check_trainables(
    state: Dict[str, Any], model: nn.Module, directory: Path
) -> List[Tuple[str, nn.Parameter, torch.Tensor]]:
    """The checkpoint's other trainable parameters (see :func:`_other_trainables`) as (name, the
    model's parameter of that name, saved value), checked before anything is restored. A
    checkpoint from before they were saved has none."""
    saved = state.get(_TRAINABLE_KEY, {})
    where = str(directory / TRAINING_STATE_NAME)
    if not isinstance(saved, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in saved.items()):
        raise ValueError(f"{where!r}: {_TRAINABLE_KEY!r} must map parameter names to tensors")
    params = dict(unwrap_model(model).named_parameters())
    pairs = []
    for name, value in saved.items():
        p = params.get(name)
        if p is None:
            raise ValueError(
                f"{where!r} holds the trained value of {name!r}, which is not a parameter of the model "
                "(another model? build it as the saving run did)"
            )
        if p.shape != value.shape:
            raise ValueError(
                f"{where!r}: trained parameter {name!r} has shape {tuple(value.shape)}, the model's is {tuple(p.shape)}"
            )
        pairs.append((name, p, value))
    return pairs


def _this_ranks_rng(state: Dict[str, Any], directory: Path) -> Dict[str, Any]:
    """This rank's RNG states from a checkpoint: its own entry of a distributed save when the
    world size matches, else (with a warning) the saving rank's."""
    per_rank = state.get("rng_per_rank")
    if per_rank is None:
        return state["rng"]
    rank, world = _process_group()
    if world != len(per_rank):
        warnings.warn(
            f"checkpoint {str(directory)!r} holds the RNG states of {len(per_rank)} ranks, this run has {world}: "
            "every rank gets rank 0's, so random streams (dropout) do not continue exactly",
            stacklevel=4,
        )
        return state["rng"]
    return per_rank[rank]


def _optimizer_snapshot(optimizer):
    """(the optimizer whose state_dict() snapshots this rank's state, that snapshot) for a
    rollback, or (None, None). A ZeroRedundancyOptimizer's own state_dict() needs a collective
    consolidation first; its local optimizer holds all of this rank's state."""
    if optimizer is None:
        return None, None
    holder = optimizer
    if callable(getattr(optimizer, "consolidate_state_dict", None)) and hasattr(optimizer, "optim"):
        holder = optimizer.optim
    return holder, holder.state_dict()


def _missing_from(optimizer, extras) -> str:
    """A hint for a parameter-count mismatch: the checkpoint's trained non-adapter parameters
    (:func:`_check_trainables`) that the optimizer given does not hold (the saving run's
    optimizer did, most likely)."""
    held = {id(p) for g in getattr(optimizer, "param_groups", ()) for p in g["params"]}
    names = [n for n, p, _ in extras if id(p) not in held]
    if not names:
        return ""
    return f"; the checkpoint holds trained values of {_names(names)}, which the optimizer given does not hold"


def _check_optimizer_state(optimizer, saved, directory: Path, hint: str = "") -> None:
    """The checks torch's Optimizer.load_state_dict makes (group count, parameters per group),
    made before anything is loaded; ``hint`` is added to a count mismatch's message."""
    groups = getattr(optimizer, "param_groups", None)
    saved_groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if groups is None or not isinstance(saved_groups, list):
        return  # not a torch optimizer state: its own load_state_dict decides
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"checkpoint {str(directory)!r}: the optimizer state has {len(saved_groups)} parameter groups, "
            f"the optimizer given has {len(groups)} (build it over the same parameters, in the same order{hint})"
        )
    for i, (g, sg) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(sg.get("params", ())):
            raise ValueError(
                f"checkpoint {str(directory)!r}: optimizer parameter group {i} holds {len(sg.get('params', ()))} "
                f"parameters in the checkpoint, {len(g['params'])} in the optimizer given "
                f"(build it over the same parameters, in the same order{hint})"
            )
    # The same counts in another order load, then fail at optimizer.step() (or, where shapes
    # coincide, swap moments silently): a state tensor must fit its parameter's shape.
    # (Factored state broadcasts to the parameter: torch's Adafactor row_var [m, 1] and col_var
    # [1, n], transformers' fewer-dim vectors; LBFGS keeps flat vectors under its first parameter.)
    if isinstance(optimizer, torch.optim.LBFGS):
        return
    states = saved.get("state") if isinstance(saved.get("state"), dict) else {}
    for g, sg in zip(groups, saved_groups):
        for p, idx in zip(g["params"], sg.get("params", ())):
            for key, t in (states.get(idx) or {}).items():
                if (torch.is_tensor(t) and 0 < t.dim() == p.dim()
                        and not all(a == b or a == 1 for a, b in zip(t.shape, p.shape))):
                    raise ValueError(
                        f"checkpoint {str(directory)!r}: the optimizer's {key!r} of parameter {idx} has shape "
                        f"{tuple(t.shape)}, the optimizer given holds a parameter of shape {tuple(p.shape)} there "
                        "(build it over the same parameters, in the same order)"
                    )
