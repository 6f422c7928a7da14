"""`export_peft`: write a FlexLoRA adapter as a standard PEFT LoRA adapter folder.

PEFT computes ΔW = (alpha/r)·B·A with A = lora_A [r, in], B = lora_B [out, r]. For each module with
r active slots J (in slot order):

    A = Q[J, :]                  [r, in]
    B = P[:, J] · diag(s·λ[J])    [out, r]     (s = the module's fixed scaling)
    alpha = r                     so PEFT's scaling alpha/r is exactly 1.0

so B·A = s·P·diag(λ⊙mask)·Q = ΔW. Per-module r and alpha go to ``rank_pattern`` and
``alpha_pattern``. PEFT (0.21) looks a module up in those dicts with
``re.match(rf"(.*\\.)?({key})$", module_name)``, first matching key wins: a key is a regex matched
against a dotted suffix. We write one key per rank value, ``(?<!.)(?:name|name|...)`` over the
``re.escape``-d full names of the modules at that rank: ``(?<!.)`` holds only at the start of the
name, so a key matches whole names only (``layers.1.q_proj`` never matches ``layers.11.q_proj``
nor a deeper module whose name ends with it), and there are at most r_max distinct patterns (one
per module thrashed Python's 512-entry regex cache past 512 modules: PEFT took 111 s to load
1 120 modules, 2 s now). ``target_modules`` is one regex string, the alternation of the escaped
full names of the exported modules: PEFT full-matches a string against each module's name (a list
entry would also match every module whose name ends with ``.<entry>``, e.g. a skipped ``1.0``
beside an exported ``0``).

A module at rank 0 has no LoRA equivalent (PEFT needs r >= 1; its ΔW is 0 anyway): it is left out
of target_modules, so PEFT keeps it as the plain base layer, and ``export_peft`` warns naming it.
``modules_to_save`` modules are exported as PEFT ``modules_to_save`` (keys
``base_model.model.<name>.<key>``, as PEFT writes them); for sequence and token classifiers and
question answering the heads PEFT adds by itself ("classifier", "score"; "qa_outputs") are
exported too. PEFT loads such a module's full state into
a plain copy of the base module, so a FlexLinear inside one (or one that is such a head) is written
there as a plain linear's ``weight`` = cast(W₃₂ + ΔW₃₂) and ``bias``, and is not a LoRA target.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ._atomic import atomic_directory
from .checkpoint import CONFIG_NAME, _SLOT_TENSORS, _base_name, _model_config, _own_storage, _saved_modules, _warn_left_out
from .layers.flex_linear import FlexLinear
from .layers.wrap import check_unsharded, flex_modules, named_modules_all, unwrap_model
from .merging import delta_weight_fp32

# peft.TaskType's values (peft 0.21), for when peft is not installed (it is not a dependency)
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _task_type(model: nn.Module) -> Optional[str]:
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if name.endswith(suffix):
            return task
    return None


def _inside(name: str, prefixes) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or sits inside one of them."""
    return any(name == s or name.startswith(s + ".") for s in prefixes)


# The heads PEFT's task models add to modules_to_save by themselves (peft_model.py, 0.21)
_PEFT_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                    "QUESTION_ANS": ("qa_outputs",)}


def _peft_auto_heads(model: nn.Module, task: Optional[str], saved: List[str]) -> List[Tuple[str, nn.Module]]:
    """PEFT's SEQ_CLS and TOKEN_CLS models add "classifier" and "score" to modules_to_save
    themselves, QUESTION_ANS "qa_outputs", and then expect their weights in the adapter (matching
    names by plain ``endswith``): export those heads too, so the folder loads without missing keys
    (they hold the base model's head if untrained)."""
    heads = _PEFT_TASK_HEADS.get(task)
    if not heads:
        return []
    out = []
    for name, module in model.named_modules():
        if not name or not name.endswith(heads):
            continue
        if _inside(name, saved + [n for n, _ in out]):
            continue
        out.append((name, module))
    return out


def _task_types() -> Tuple[str, ...]:
    try:
        from peft import TaskType
    except ImportError:
        return _TASK_TYPES
    return tuple(t.value for t in TaskType)


def _check_export_args(task_type, dtype) -> Optional[str]:
    """Validate export_peft's arguments before anything is computed or written; returns the task
    type as a plain str (or "auto" / None)."""
    task = getattr(task_type, "value", task_type)  # a peft.TaskType member is written as its value
    if task is not None and task != "auto" and task not in _task_types():
        hint = f" (did you mean {task.upper()!r}?)" if isinstance(task, str) and task.upper() in _task_types() else ""
        raise ValueError(
            f"export_peft: task_type must be \"auto\", None or one of peft's TaskType values "
            f"{list(_task_types())}, got {task_type!r}{hint}"
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"export_peft: dtype must be None or a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}"
        )
    return task


def _merged_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """State of a modules_to_save module as PEFT's plain copy of it holds it: each FlexLinear inside
    becomes a plain linear's ``weight`` = cast(W₃₂ + ΔW₃₂) (its ΔW folded in) and ``bias``."""
    state = module.state_dict()
    for sub_name, sub in named_modules_all(module):
        if not isinstance(sub, FlexLinear):
            continue
        pre = f"{sub_name}." if sub_name else ""
        for key in _SLOT_TENSORS:
            state.pop(pre + key, None)
        state[pre + "weight"] = (sub.weight.detach().float() + delta_weight_fp32(sub)).to(sub.weight.dtype)
    return state


def export_peft(
    model: nn.Module,
    directory,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = "auto",
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, Any]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable with
    ``peft.PeftModel.from_pretrained(base_model, directory)``; atomic like :func:`save_adapter`.

    Args:
        model: a wrapped, unmerged model.
        directory: target folder (created or replaced).
        base_model_name_or_path: recorded in the config; default: the model's ``name_or_path``.
        task_type: PEFT task type; "auto" infers it from the model class name
            (``...ForCausalLM`` -> CAUSAL_LM, ``...ForSequenceClassification`` -> SEQ_CLS, ...), None
            writes none (a plain ``PeftModel``).
        dtype: dtype of the written lora_A/lora_B (default: the adapter's dtype). The folding of
            s·λ into B is done in float32 first.

    Returns:
        ``{"directory", "modules" (names exported as LoRA), "skipped_rank0" (names),
        "rank_pattern", "merged_into_modules_to_save" (FlexLinear names written merged inside an
        exported modules_to_save module)}``.

    Raises ``ValueError`` before writing anything for a bad ``task_type`` / ``dtype``, a merged
    model, or a model with no module left to export as LoRA.
    """
    import safetensors.torch

    task_type = _check_export_args(task_type, dtype)
    model = unwrap_model(model)
    cfg = _model_config(model)
    mods = flex_modules(model)
    check_unsharded(mods, "export_peft", model)
    merged = [n for n, m in mods if m.merged]
    if merged:
        raise ValueError(
            f"export_peft: module {merged[0]!r} is merged (ΔW is inside W); call flexlora.unmerge(model) first"
        )
    saved = _saved_modules(model, cfg)
    task = _task_type(model) if task_type == "auto" else task_type
    saved += _peft_auto_heads(model, task, [n for n, _ in saved])
    folded = [n for n, _ in mods if _inside(n, [s for s, _ in saved])]
    tensors: Dict[str, torch.Tensor] = {}
    rank_pattern: Dict[str, int] = {}
    skipped = []
    with torch.no_grad():
        for name, m in mods:
            if name in folded:
                continue  # written merged, as part of its modules_to_save module's state below
            active = torch.nonzero(m.mask, as_tuple=False).flatten()
            r = int(active.numel())
            if r == 0:
                skipped.append(name)
                continue
            out_dtype = dtype or m.P.dtype
            g = m.lam.detach().float()[active] * m.scaling  # [r]
            A = m.Q.detach().float()[active]  # [r, in]
            B = m.P.detach().float()[:, active] * g  # [out, r]
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = A.to(out_dtype).cpu().contiguous()
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = B.to(out_dtype).cpu().contiguous()
            rank_pattern[name] = r
        for name, module in saved:
            for key, t in _merged_state(module).items():
                tensors[f"{_PREFIX}{name}.{key}"] = t.detach().cpu().contiguous()
    if not rank_pattern:
        # PEFT refuses a LoRA config whose target_modules match nothing
        raise ValueError(
            "export_peft: no module left to export as PEFT LoRA: every adapted module has rank 0"
            + (f" or sits inside an exported modules_to_save module ({folded})" if folded else "")
        )
    first = {id(m): n for n, m in mods if n in rank_pattern}
    aliases = [(first[id(m)], n) for n, m in named_modules_all(model) if id(m) in first and n != first[id(m)]]
    if aliases:
        warnings.warn(
            f"export_peft: {len(aliases)} adapted module(s) are also registered under another name (first: "
            f"{aliases[0][0]!r} as {aliases[0][1]!r}); PEFT adapts a module once, under its first name, so its "
            "calls through the other names run without the adapter in PEFT and outputs differ from FlexLoRA's",
            stacklevel=2,
        )
    _warn_left_out("export_peft", model, saved, whole_saved=True)
    if skipped:
        warnings.warn(
            f"export_peft: {len(skipped)} module(s) at rank 0 have no PEFT LoRA equivalent and are left "
            f"out (their ΔW is zero, PEFT keeps the base layer): {skipped}",
            stacklevel=2,
        )

    names = sorted(rank_pattern, key=lambda n: (-len(n), n))
    default_r = Counter(rank_pattern.values()).most_common(1)[0][0]
    by_rank: Dict[int, List[str]] = {}
    for n in names:
        by_rank.setdefault(rank_pattern[n], []).append(n)
    # one whole-name key per rank (see the module docstring)
    patterns = {"(?<!.)(?:" + "|".join(re.escape(n) for n in ns) + ")": r for r, ns in sorted(by_rank.items())}
    config = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_model_name_or_path or _base_name(model),
        "revision": None,
        "inference_mode": True,
        "r": default_r,
        "lora_alpha": default_r,
        "target_modules": "(?:" + "|".join(re.escape(n) for n in names) + ")",  # full names only
        "rank_pattern": dict(patterns),
        "alpha_pattern": dict(patterns),
        "lora_dropout": float(cfg.dropout),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": [n for n, _ in saved] or None,
    }
    conflicts = ((CONFIG_NAME, "a FlexLoRA adapter: save_adapter or save_checkpoint"),)
    with atomic_directory(directory, (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME), conflicts) as tmp:
        safetensors.torch.save_file(_own_storage(tensors), str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / PEFT_CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    return {
        "directory": Path(directory),
        "modules": [n for n, _ in mods if n in rank_pattern],
        "skipped_rank0": skipped,
        "rank_pattern": dict(rank_pattern),
        "merged_into_modules_to_save": folded,
    }
