"""The training loop behind ``flexlora train``: FlexLoRA, PEFT LoRA or PEFT AdaLoRA on a
sequence classifier (texts with labels) or a causal LM (texts only).

Sequence classification = the model's last hidden states, mean-pooled over real tokens (as
sentence-transformers pools), into a linear head. Before the adapters train, the head alone is
fitted on the frozen model's pooled features (a linear probe, L-BFGS on the training split): its
test accuracy is the "head only" number, and the adapter run starts from that head (so the
adapters get a useful gradient from step 0).

Per optimizer step: ``loss = task loss + allocator.orthogonal_loss()`` (FlexLoRA), backward,
gradient clipping, ``optimizer.step()``, LR schedule, then ``allocator.step(step, optimizer)``
(FlexLoRA) or ``update_and_allocate(step)`` (AdaLoRA — without it AdaLoRA trains as plain LoRA).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError

from ._atomic import move_into, replace_directory
from .checkpoint import _OWNED, TRAINING_STATE_NAME
from .cli import config_flag
from .layers.wrap import name_matches
from .data import InputError, TextDataset, load_dataset, split
from .models import BUILTIN_MODELS, resolve_model

METHODS = ("flexlora", "lora", "adalora")
# What a run writes into --output-dir; each run replaces all of them (ADAPTER_DIR is a folder).
ADAPTER_DIR = "adapter"
# The hidden folder inside --output-dir that a save fills before renaming the outputs in.
STAGE_PREFIX = ".flexlora-save-"
OUTPUT_FILES = ("rank_history.csv", "rank_heatmap.png", "train_log.csv", "classifier_head.safetensors", "metrics.json")
# --save-every writes flexlora.save_checkpoint here; --resume continues from it; a finished run removes it
CHECKPOINT_DIR = "checkpoint"
# held (flock) by the run writing into --output-dir: a second run there at the same time is refused
LOCK_NAME = ".flexlora-run.lock"
# options a --resume may change: where and how the run reports, not what it computes (--data's
# path may change too: the training split's digest is compared instead)
_RESUME_FREE = ("output_dir", "progress", "log_every", "threads", "cache_dir", "device", "save_every", "resume",
                "data")
TASKS = ("auto", "classify", "causal-lm")

# --target-modules defaults by model_type (the paper adapts q, k, v, up, down on LLaMA).
_DEFAULT_TARGETS = {
    "bert": BUILTIN_MODELS["minilm"].default_targets,
    "roberta": BUILTIN_MODELS["minilm"].default_targets,
    "llama": BUILTIN_MODELS["smollm2"].default_targets,
    "mistral": BUILTIN_MODELS["smollm2"].default_targets,
    "qwen2": BUILTIN_MODELS["smollm2"].default_targets,
}


@dataclass
class TrainOptions:
    """Everything ``flexlora train`` takes; ``None`` means "derived" (see :func:`resolve`)."""

    model: str = "minilm"
    data: str = "movie-sentences"
    task: str = "auto"
    method: str = "flexlora"
    target_modules: Optional[List[str]] = None
    r: int = 8
    r_max: Optional[int] = None
    alpha: Optional[float] = None
    dropout: float = 0.0
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 32
    lr: float = 5e-3
    head_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 64
    train_size: Optional[int] = None
    test_size: Optional[int] = None
    seed: int = 0
    output_dir: str = "flexlora-output"
    # allocation (FlexLoRA; delta_t / t_warmup / t_final / b0 also drive AdaLoRA)
    b0: Optional[int] = None
    delta_t: Optional[int] = None
    t_warmup: Optional[int] = None
    t_final: Optional[int] = None
    schedule: str = "cubic"
    importance: str = "entropy"
    allocation_mode: str = "prune_expand"
    expand_init: str = "zero_impact"
    orth_reg: float = 0.1
    r_min: int = 1
    log_every: Optional[int] = None
    progress: bool = True
    cache_dir: Optional[str] = None
    threads: Optional[int] = None
    device: str = "auto"
    precision: str = "fp32"
    save_every: Optional[int] = None  # None: 0 (never), or on --resume the saved run's
    resume: bool = False


# ------------------------------------------------------------------------------------------------
# models


class MeanPoolClassifier(nn.Module):
    """``logits = head(mean of encoder(x).last_hidden_state over real tokens)``.

    input_ids, attention_mask: [B, T]; labels: [B] (optional). Returns a
    ``SequenceClassifierOutput`` with ``loss`` (when labels are given) and ``logits`` [B, C]
    (PEFT's AdaLoRA adds its orthogonality term to ``.loss``).
    """

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # PEFT reads model.config
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def pooled(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids, attention_mask, labels=None, **_):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.head(self.pooled(input_ids, attention_mask))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


PRECISIONS = ("fp32", "bf16")


def resolve_device(name: str) -> torch.device:
    """``--device``: "auto" (the current CUDA device where one is visible, else the CPU),
    "cpu", "cuda" or "cuda:N"; InputError for anything else or a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is visible here (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def autocast(device: torch.device, precision: str):
    """The forward passes' context: bf16 autocast for ``--precision bf16`` (matmuls in bfloat16,
    losses and the adapters' parameters, gradients and AdamW state in fp32), else none."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def load_model(path: Path, task: str, num_labels: int):
    """(model, tokenizer) in float32 for ``task`` in {classify, causal-lm}."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many kinds; all mean "not a usable model dir"
        raise InputError(f"--model: cannot load a tokenizer from {path} ({_first_line(e)})") from None
    if len(tok) <= len(set(tok.all_special_ids)):  # transformers builds one from config.json alone
        raise InputError(
            f"--model: {path} has no tokenizer vocabulary, only {len(tok)} special tokens (the folder needs the "
            "tokenizer files saved with the model: tokenizer.json, or vocab.txt / vocab.json / tokenizer.model)"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    try:
        if task == "classify":
            model = MeanPoolClassifier(AutoModel.from_pretrained(str(path), dtype=torch.float32), num_labels)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except Exception as e:
        kind = "an encoder" if task == "classify" else "a causal LM"
        raise InputError(f"--model: cannot load {path} as {kind} ({_first_line(e)})") from None
    return model, tok


def _config_json(path: Path) -> dict:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


def model_type_of(path: Path) -> str:
    return _config_json(path).get("model_type", "")


def is_causal_lm(architectures: Sequence[str]) -> bool:
    """Saved from a causal LM class: ...ForCausalLM, or ...LMHeadModel (GPT-2's naming)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def check_model_dir(path: Path, max_length: int) -> List[str]:
    """Refuse, before loading anything, what the loop cannot train: a malformed
    ``architectures``, an encoder-decoder model (it needs decoder inputs), or --max-length beyond
    the model's position table. Returns config.json's ``architectures`` ([] when absent)."""
    cfg = _config_json(path)
    arch = [] if cfg.get("architectures") is None else cfg["architectures"]
    if not isinstance(arch, list) or not all(isinstance(a, str) for a in arch):
        raise InputError(f"--model: {path / 'config.json'}: \"architectures\" must be a list of class names, got {arch!r}")
    if cfg.get("is_encoder_decoder"):
        raise InputError(
            f"--model: {path} is an encoder-decoder model ({cfg.get('model_type')!r}); flexlora train fine-tunes "
            "an encoder (classification) or a causal LM"
        )
    limit = next((cfg[k] for k in ("max_position_embeddings", "n_positions") if isinstance(cfg.get(k), int)), None)
    if limit is not None and max_length > limit:
        raise InputError(f"--max-length must be <= {limit} (the model's max_position_embeddings), got {max_length}")
    return arch


# ------------------------------------------------------------------------------------------------
# adapters


def _check_rank_fits(model, opts: TrainOptions, targets: Sequence[str]) -> None:
    """The largest rank asked for (--r, and --r-max but for LoRA) must not exceed min(in, out) of
    every target Linear: such a rank adds nothing a smaller one could not, and a huge one only
    ran out of memory with a traceback."""
    limits = [min(m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n and name_matches(n, list(targets))]
    rank, flag = (opts.r, "--r") if opts.method == "lora" or opts.r_max is None else (max(opts.r, opts.r_max), "--r-max")
    if limits and rank > max(limits):
        default = " (it defaults to 2 x --r)" if flag == "--r-max" and opts.r_max == 2 * opts.r else ""
        raise InputError(
            f"{flag} {rank}{default} exceeds min(in, out) = {max(limits)} of every adapted layer: a rank above "
            "a layer's smaller side adds nothing; give a smaller --r / --r-max"
        )


def add_adapters(model, opts: TrainOptions, targets: Sequence[str], steps: int, task: str):
    """Wrap ``model`` with ``opts.method``; returns (model, allocator or None, peft AdaLoRA
    model or None)."""
    save = ["head"] if task == "classify" else []
    _check_rank_fits(model, opts, targets)
    if opts.method == "flexlora":
        import flexlora

        try:
            cfg = flexlora.FlexLoRAConfig(
                r_init=opts.r, r_max=opts.r_max, alpha=opts.alpha, dropout=opts.dropout,
                target_modules=list(targets), modules_to_save=save, total_steps=steps,
                t_warmup=opts.t_warmup, t_final=opts.t_final, delta_t=opts.delta_t, b0=opts.b0,
                schedule=opts.schedule, r_min=opts.r_min, importance=opts.importance,
                allocation_mode=opts.allocation_mode, expand_init=opts.expand_init,
                orth_reg=opts.orth_reg, seed=opts.seed,
            )
        except ValueError as e:
            raise InputError(_flag_message(str(e))) from None
        try:
            flexlora.wrap(model, cfg)
        except ValueError as e:
            raise InputError(f"--target-modules: {e}") from None
        return model, flexlora.RankAllocator(model, cfg), None

    try:
        import peft
    except ImportError:
        raise InputError(f"--method {opts.method} needs the peft package (pip install peft)") from None
    common = dict(target_modules=list(targets), lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                  modules_to_save=save or None)
    try:  # check_flags has checked what PEFT checks; this turns anything it adds into one line
        if opts.method == "lora":
            pcfg = peft.LoraConfig(r=opts.r, **common)
        else:
            pcfg = peft.AdaLoraConfig(
                init_r=opts.r_max, target_r=opts.r, tinit=opts.t_warmup, tfinal=opts.t_final,
                deltaT=opts.delta_t, total_step=steps, orth_reg_weight=opts.orth_reg, **common,
            )
    except ValueError as e:
        raise InputError(f"--method {opts.method}: {_first_line(e)}") from None
    try:
        pm = peft.get_peft_model(model, pcfg)
    except ValueError as e:
        raise InputError(f"--target-modules: {_first_line(e)}") from None
    return pm, None, (pm if opts.method == "adalora" else None)


def _flag_message(msg: str) -> str:
    """'FlexLoRAConfig.t_warmup must be ...' -> '--t-warmup must be ...'."""
    if msg.startswith("FlexLoRAConfig."):
        field_name = msg[len("FlexLoRAConfig."):].split(" ", 1)[0]
        return config_flag(field_name) + msg[len("FlexLoRAConfig.") + len(field_name):]
    return msg


def current_rank(model, method: str, opts: TrainOptions, n_modules: int, step: int) -> int:
    """Total active rank over adapted modules (FlexLoRA: mask counts; AdaLoRA: non-zero λ after
    its warm-up; LoRA: r per module)."""
    if method == "flexlora":
        import flexlora

        return flexlora.count_parameters(model).total_rank
    if method == "lora":
        return opts.r * n_modules
    if step <= opts.t_warmup:
        return opts.r_max * n_modules
    total = 0
    for m in model.modules():
        e = getattr(m, "lora_E", None)
        if isinstance(e, nn.ParameterDict):
            total += sum(int((p != 0).sum()) for p in e.values())
    return total


def adapted_module_count(model, method: str) -> int:
    if method == "flexlora":
        import flexlora

        return len(flexlora.flex_modules(model))
    return sum(1 for m in model.modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) or
               isinstance(getattr(m, "lora_A", None), nn.ParameterDict))


# ------------------------------------------------------------------------------------------------
# batches


def tokenize(tok, texts: Sequence[str], max_length: int) -> List[List[int]]:
    if not texts:  # an empty test split (--test-size 0): tokenizers reject an empty batch
        return []
    return tok(list(texts), truncation=True, max_length=max_length)["input_ids"]


def collate(ids: Sequence[List[int]], pad_id: int, labels=None, causal=False) -> Dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask [B, T]; labels [B] (classify) or [B, T] with -100
    on padding (causal LM)."""
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        attn[i, : len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attn}
    if causal:
        batch["labels"] = input_ids.masked_fill(attn == 0, -100)
    elif labels is not None:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


def batch_stream(ids, labels, batch_size: int, pad_id: int, causal: bool, seed: int, skip: int = 0) -> Iterator[dict]:
    """Endless seeded epochs of shuffled batches (the last, smaller batch of an epoch is kept);
    the first ``skip`` batches are passed over without being built (a resumed run)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(ids), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            if skip:
                skip -= 1
                continue
            idx = order[i: i + batch_size]
            yield collate([ids[j] for j in idx], pad_id, None if labels is None else [labels[j] for j in idx], causal)


def _by_length(ids) -> List[int]:
    """Indices sorted by length: evaluation batches of similar lengths waste little padding."""
    return sorted(range(len(ids)), key=lambda i: len(ids[i]))


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def pooled_features(model: MeanPoolClassifier, ids, pad_id: int, batch_size: int = 128,
                    precision: str = "fp32") -> torch.Tensor:
    """[len(ids), hidden] fp32 mean-pooled features on the model's device, in the order of ``ids``."""
    model.eval()
    dev = _device_of(model)
    order = _by_length(ids)
    out = torch.empty(len(ids), model.config.hidden_size, device=dev)
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        b = to_device(collate([ids[j] for j in idx], pad_id), dev)
        with autocast(dev, precision):
            out[torch.tensor(idx, device=dev)] = model.pooled(b["input_ids"], b["attention_mask"]).float()
    return out


def fit_linear_probe(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, l2: float = 1e-3) -> None:
    """Logistic regression of ``head`` on fixed features [n, d] (full-batch L-BFGS), in place."""
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)


@torch.no_grad()
def accuracy(model, ids, labels, pad_id: int, batch_size: int = 128, precision: str = "fp32") -> float:
    model.eval()
    dev = _device_of(model)
    order = _by_length(ids)
    correct = 0
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        b = to_device(collate([ids[j] for j in idx], pad_id), dev)
        with autocast(dev, precision):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        correct += int((logits.argmax(-1).cpu() == torch.tensor([labels[j] for j in idx])).sum())
    return correct / max(1, len(ids))


@torch.no_grad()
def lm_loss(model, ids, pad_id: int, batch_size: int = 32, precision: str = "fp32") -> float:
    """Mean next-token cross-entropy over the real tokens of ``ids``."""
    model.eval()
    dev = _device_of(model)
    order = _by_length(ids)
    total, count = 0.0, 0
    for i in range(0, len(order), batch_size):
        b = collate([ids[j] for j in order[i: i + batch_size]], pad_id, causal=True)
        n = int((b["labels"][:, 1:] != -100).sum())
        if n == 0:
            continue
        with autocast(dev, precision):
            total += float(model(**to_device(b, dev)).loss) * n
        count += n
    return total / max(1, count)


# ------------------------------------------------------------------------------------------------
# the run


def check_flags(o: TrainOptions) -> torch.device:
    """Every flag on its own (before anything loads): InputError naming the first bad one.
    Returns the device ``--device`` resolves to."""
    if o.method not in METHODS:
        raise InputError(f"--method must be one of {METHODS}, got {o.method!r}")
    if o.task not in TASKS:
        raise InputError(f"--task must be one of {TASKS}, got {o.task!r}")
    if o.precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {PRECISIONS}, got {o.precision!r}")
    device = resolve_device(o.device)
    # bf16 tensor cores from Ampere (sm_80) on; torch.cuda.is_bf16_supported() also says yes for
    # older GPUs that only emulate it (slowly), and asks about the current device, not this one
    if o.precision == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        raise InputError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 tensor cores "
                         "(compute capability 8.0 or newer needed); use --precision fp32")
    # at least 1; None = derived (only r, batch_size and max_length are always given)
    for name in ("r", "batch_size", "max_length", "threads", "log_every", "steps", "train_size", "delta_t"):
        if getattr(o, name) is not None and getattr(o, name) < 1:
            raise InputError(f"{config_flag(name)} must be >= 1, got {getattr(o, name)}")
    for name in ("test_size", "b0", "t_warmup", "t_final", "r_min", "save_every"):  # at least 0
        if getattr(o, name) is not None and getattr(o, name) < 0:
            raise InputError(f"{config_flag(name)} must be >= 0, got {getattr(o, name)}")
    for name in ("lr", "head_lr", "epochs", "alpha"):  # head_lr, epochs, alpha may be None
        v = getattr(o, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise InputError(f"{config_flag(name)} must be a finite number > 0, got {v}")
    for name in ("weight_decay", "orth_reg"):
        if not (math.isfinite(getattr(o, name)) and getattr(o, name) >= 0):
            raise InputError(f"{config_flag(name)} must be a finite number >= 0, got {getattr(o, name)}")
    if not 0.0 <= o.warmup_ratio <= 1.0:
        raise InputError(f"--warmup-ratio must be in [0, 1], got {o.warmup_ratio}")
    if not 0.0 <= o.dropout < 1.0:
        raise InputError(f"--dropout must be in [0, 1), got {o.dropout}")
    if o.steps is not None and o.epochs is not None:
        raise InputError("give --steps or --epochs, not both")
    if o.method != "flexlora":
        for flag, given in (("--save-every", bool(o.save_every)), ("--resume", o.resume)):
            if given:  # PEFT's models would need their own state (AdaLoRA's sensitivity EMAs)
                raise InputError(f"{flag} is for --method flexlora (checkpoints are flexlora.save_checkpoint)")
    if o.steps is not None and o.method != "lora":  # with --epochs: once the data is read
        _check_window(o.steps, o)
    if o.steps is not None and o.steps > _MAX_STEPS:
        raise InputError(f"--steps must be <= {_MAX_STEPS}, got {o.steps}")
    if not -(2**63) <= o.seed < 2**64:  # what torch.manual_seed takes
        raise InputError(f"--seed must be an int in [-2**63, 2**64), got {o.seed}")
    if o.method != "lora":  # LoRA has one rank: --r-max and --r-min do not apply
        if o.r_max is not None and o.r_max < o.r:
            raise InputError(f"--r-max must be >= --r ({o.r}), got {o.r_max}")
        if o.method == "adalora" and o.r_max is not None and o.r_max == o.r:
            # AdaLoRA prunes from init_r = --r-max down to target_r = --r: with nothing to prune
            # PEFT's budget masking failed with a traceback at its first allocation
            raise InputError(f"--method adalora needs --r-max > --r ({o.r}): it prunes from --r-max down to --r")
        if o.method == "flexlora" and o.r_min > o.r:
            raise InputError(f"--r-min must be <= --r ({o.r}), got {o.r_min}")
    return device


def _window_defaults(steps: int):
    """Default (t_warmup, t_final): 20 % of the steps each, the warm-up at least 1 step where the
    run allows it (the first event then sits at the window's start, where b(t) = b0; with
    t_warmup = 0 a short run's b(t) can round to 0 at every event)."""
    return (max(1, steps // 5) if steps > 1 else 0), steps // 5


def _check_window(steps: int, o: TrainOptions) -> None:
    """--t-warmup + --t-final < steps (a None takes its default), and for AdaLoRA steps - t_final
    >= 2; names the flags given."""
    default_w, default_f = _window_defaults(steps)
    w = default_w if o.t_warmup is None else o.t_warmup
    f = default_f if o.t_final is None else o.t_final
    if w + f < steps:
        if o.method == "adalora" and steps - f < 2:
            # PEFT's AdaLoRA fixes its final ranks at step steps - t_final from the importance scores
            # gathered before it: at step 1 there are none (a KeyError deep inside PEFT)
            raise InputError(
                f"--method adalora needs at least 2 steps before its final phase: steps ({steps}) - --t-final ({f}) "
                "must be >= 2 (give more --steps or --epochs, or a smaller --t-final)"
            )
        return
    named = " + ".join(f"{config_flag(n)} ({getattr(o, n)})" for n in ("t_warmup", "t_final") if getattr(o, n) is not None)
    raise InputError(
        f"{named or '--t-warmup + --t-final'}: no steps left for rank allocation (--t-warmup + --t-final "
        f"= {w} + {f} must be < the {steps} training steps)"
    )


def resolve(opts: TrainOptions, n_examples: int, builtin_data: bool) -> TrainOptions:
    """Fill the derived defaults (returns a copy)."""
    o = TrainOptions(**asdict(opts))
    if o.r_max is None:
        o.r_max = 2 * o.r
    if o.alpha is None:
        o.alpha = float(2 * o.r)
    if o.test_size is None:
        o.test_size = 2000 if builtin_data else (n_examples // 10 if n_examples >= 10 else 0)
    if o.train_size is None and builtin_data and o.data == "movie-sentences":
        o.train_size = 4000
    return o


_MAX_STEPS = 2**31 - 1


def resolve_schedule(o: TrainOptions, n_train: int) -> int:
    """Total optimizer steps from --steps or --epochs (1 epoch by default); allocation defaults
    scaled to it: warm-up 20 % (at least 1 step), final freeze 20 %, about 20 events, b0 = 10 % of
    the modules."""
    if o.steps is not None:
        steps = o.steps
    else:
        epochs = 1.0 if o.epochs is None else o.epochs
        total = math.ceil(n_train / o.batch_size) * epochs
        if total > _MAX_STEPS:  # ceil(inf) raised OverflowError with a traceback
            raise InputError(f"--epochs {epochs:g} gives {total:.3g} steps, more than {_MAX_STEPS}")
        steps = math.ceil(total)
    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    if o.method != "lora":
        _check_window(steps, o)
    default_w, default_f = _window_defaults(steps)
    o.t_warmup = default_w if o.t_warmup is None else o.t_warmup
    o.t_final = default_f if o.t_final is None else o.t_final
    if o.delta_t is None:
        o.delta_t = max(1, (steps - o.t_warmup - o.t_final) // 20)
    return steps


@contextlib.contextmanager
def _folder_for_now(out: Path):
    """``out`` made for the block, with any missing parents; the folders this made are removed
    again afterwards where they are left empty (deepest first), so a run that fails before it
    saves anything leaves none behind."""
    made = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        yield
    finally:
        for folder in made:  # rmdir removes only empty folders
            try:
                os.rmdir(folder)
            except OSError:
                break


def prepare_output_dir(path: str) -> Path:
    """Prove before any training that the outputs can be written into ``path``: the folder (or
    the nearest folder above it that exists) takes a file, and no existing entry has a name of
    ours with the wrong kind (a file named ``adapter``, a folder named ``metrics.json``). Folders
    created for the probe are removed again, so a run that fails before saving leaves none behind."""
    if not str(path).strip():
        # "" is Path("."): an unset shell variable would scatter the outputs into the working folder
        raise InputError("--output-dir: empty; give a folder (. for the current one)")
    out = Path(path).expanduser()
    try:
        with _folder_for_now(out):
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise InputError(f"--output-dir: cannot write to {out} ({e.strerror or e})") from None
    for name, what in ((ADAPTER_DIR, "the adapter is saved there"), (CHECKPOINT_DIR, "--save-every saves there")):
        if (out / name).exists() and not (out / name).is_dir():
            raise InputError(f"--output-dir: {out / name} exists and is not a folder ({what})")
    for name in OUTPUT_FILES:
        if (out / name).is_dir():
            raise InputError(f"--output-dir: {out / name} is a folder (the run writes a file of that name)")
    for left in sorted(out.glob(STAGE_PREFIX + "*")) if out.is_dir() else []:
        # a run killed while saving: its stage may hold the only copy of the outputs before it
        held = " (the outputs it was replacing are in its .previous/)" if (left / ".previous").is_dir() else ""
        print(f"flexlora: note: {left} is left from an interrupted save{held}; this run does not touch it, "
              "delete it once you have what you need", file=sys.stderr)
    return out


def run(opts: TrainOptions) -> dict:
    """Train as ``opts`` says, write the outputs into ``opts.output_dir`` and return the metrics."""
    device = check_flags(opts)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    t_start = time.perf_counter()
    out = prepare_output_dir(opts.output_dir)
    ckpt = out / CHECKPOINT_DIR
    with _output_lock(out):
        try:
            return _train(opts, device, out, ckpt, t_start)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into one), in any phase
            _point_to_checkpoint(ckpt)
            raise


def _train(opts: TrainOptions, device: torch.device, out: Path, ckpt: Path, t_start: float) -> dict:
    from tqdm.auto import tqdm

    saved = _unfinished_run(ckpt, opts.resume, opts.method)
    if saved is not None:  # the flags given on both command lines, before anything loads
        _check_same("", saved.get("flags", {}), _resume_key(opts), ckpt, given_only=True)
    cache = Path(opts.cache_dir).expanduser() if opts.cache_dir else None

    model_dir = resolve_model(opts.model, cache)
    arch = check_model_dir(model_dir, opts.max_length)
    ds = load_dataset(opts.data, cache)
    o = resolve(opts, len(ds), builtin_data=opts.data == "movie-sentences")
    task = o.task
    causal_dir = is_causal_lm(arch)
    auto_task = "classify" if ds.labels is not None and not causal_dir else "causal-lm"  # what auto comes to
    if task == "auto":
        task = auto_task
        if task == "causal-lm" and arch and not causal_dir:
            # e.g. a BERT on texts: its LM head would be new and frozen, its attention bidirectional
            raise InputError(
                f"--data {ds.source} has no labels, so --task auto would fine-tune a causal LM, but --model "
                f"{opts.model} is a {arch[0]}, not a causal LM; give labelled data or a causal LM (or --task "
                "causal-lm to train it as one anyway)"
            )
    if task == "classify" and ds.labels is None:
        raise InputError(f"--task classify needs labels, but {ds.source} has only texts")
    o.task = task  # resolved: a resume compares what --task auto came to
    if task == "causal-lm" and o.head_lr is not None:
        warnings.warn("--head-lr has no effect on a causal LM (there is no classifier head)", stacklevel=2)

    if o.test_size:
        train_ds, test_ds = split(ds, o.test_size, o.seed)
    else:
        train_ds, test_ds = ds, TextDataset([], None, ds.label_names, ds.source)
    if o.train_size is not None:
        train_ds = train_ds.subset(range(min(o.train_size, len(train_ds))))
    steps = resolve_schedule(o, len(train_ds))
    targets = o.target_modules or list(_DEFAULT_TARGETS.get(model_type_of(model_dir), ("q_proj", "v_proj")))
    # what a --resume must share with the run that saved the checkpoint (b0 is filled in below
    # from the model's modules: the same model and flags give the same b0)
    record = {"flags": _resume_key(opts), "options": _resume_key(o), "steps": steps,
              "data": _data_digest(train_ds.texts, train_ds.labels)}
    if saved is not None:
        _check_resume(saved, record, ckpt, auto_task)

    torch.manual_seed(o.seed)
    model, tok = load_model(model_dir, task, ds.num_labels)
    pad_id = tok.pad_token_id
    causal = task == "causal-lm"
    train_ids = tokenize(tok, train_ds.texts, o.max_length)
    test_ids = tokenize(tok, test_ds.texts, o.max_length)
    if causal:  # a one-token text has nothing to predict
        train_ids = [x for x in train_ids if len(x) >= 2]
        test_ids = [x for x in test_ids if len(x) >= 2]
        if not train_ids:
            raise InputError(f"--data: every training text of {ds.source} is shorter than 2 tokens")

    metrics: dict = {
        "method": o.method, "model": o.model, "data": o.data, "task": task,
        "train_examples": len(train_ids), "test_examples": len(test_ids), "steps": steps,
        "batch_size": o.batch_size, "lr": o.lr, "max_length": o.max_length, "seed": o.seed,
        "target_modules": list(targets), "r": o.r, "r_max": None if o.method == "lora" else o.r_max,
        "device": str(device), "precision": o.precision,
    }
    if device.type == "cuda":
        metrics["device_name"] = torch.cuda.get_device_name(device)
    model.to(device)

    # --- before the adapters train -------------------------------------------------------------
    t0 = time.perf_counter()
    if task == "classify":
        y_train = torch.tensor(train_ds.labels, device=device)
        fit_linear_probe(model.head, pooled_features(model, train_ids, pad_id, precision=o.precision), y_train)
        if test_ids:
            metrics["test_accuracy_head_only"] = accuracy(model, test_ids, test_ds.labels, pad_id, precision=o.precision)
    elif test_ids:
        metrics["test_loss_before"] = lm_loss(model, test_ids, pad_id, precision=o.precision)
    metrics["seconds_before"] = round(time.perf_counter() - t0, 2)

    # --- adapters ------------------------------------------------------------------------------
    if o.b0 is None:  # FlexLoRA: 10 % of the adapted modules per event; AdaLoRA ignores it
        n_targets = sum(1 for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and name_matches(n, list(targets)))
        o.b0 = max(1, n_targets // 10)
    model, allocator, adalora = add_adapters(model, o, targets, steps, task)
    n_mod = adapted_module_count(model, o.method)
    trainable = [p for p in model.parameters() if p.requires_grad]
    head_ids = {id(p) for n, p in model.named_parameters() if p.requires_grad and ".head." in "." + n + "."}
    groups = [{"params": [p for p in trainable if id(p) not in head_ids], "lr": o.lr}]
    if head_ids:
        groups.append({"params": [p for p in trainable if id(p) in head_ids], "lr": o.head_lr or o.lr})
    optimizer = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    warm = max(1, int(o.warmup_ratio * steps))

    def lr_factor(s: int) -> float:  # linear warm-up, then linear decay to 0
        return (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    metrics["adapted_modules"] = n_mod
    metrics["rank_budget"] = o.r * n_mod
    metrics["trainable_params"] = sum(p.numel() for p in trainable)

    # --- checkpoints: the loop's record travels with the LR scheduler's state ------------------
    train_labels = None if causal else list(train_ds.labels)
    save_every = o.save_every if o.save_every is not None else (saved["save_every"] if saved else 0)
    record.update(save_every=save_every, log_rows=[], losses=[], tokens_total=0, train_time=0.0, ema=None,
                  elapsed=0.0)
    loop_state = _LoopState(scheduler, record)
    start = 0
    if saved is not None:
        import flexlora

        try:
            start = flexlora.load_checkpoint(ckpt, model, allocator, optimizer, loop_state)
        except (ValueError, FileNotFoundError) as e:
            raise InputError(f"--resume: {_first_line(e)}") from None
        record["save_every"] = save_every  # this run's, for the checkpoints it writes
        metrics["resumed_from_step"] = start
    earlier = record["elapsed"]  # wall seconds of the runs before this one, up to the checkpoint

    # --- training ------------------------------------------------------------------------------
    log_every = o.log_every or max(1, steps // 10)
    stream = batch_stream(train_ids, train_labels, o.batch_size, pad_id, causal, o.seed, skip=start)
    log_rows, losses = record["log_rows"], record["losses"]
    tokens_total, train_time, ema = record["tokens_total"], record["train_time"], record["ema"]
    model.train()
    bar = tqdm(total=steps, initial=start, desc=f"{o.method} {o.model}", disable=not o.progress, dynamic_ncols=True,
               file=sys.stderr)
    for step in range(start + 1, steps + 1):
        batch = to_device(next(stream), device)
        t_step = time.perf_counter()
        with autocast(device, o.precision):
            loss = model(**batch).loss
        # the orthogonality penalty in fp32, outside autocast: PᵀP and QQᵀ are what it measures
        total = loss + allocator.orthogonal_loss() if allocator is not None else loss
        total.backward()
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, o.max_grad_norm)
        optimizer.step()
        lr_used = optimizer.param_groups[0]["lr"]  # the log shows the lr of this step, not the next
        scheduler.step()
        if allocator is not None:
            try:
                allocator.step(step, optimizer)
            except FloatingPointError as e:  # NaN scores: the run diverged
                bar.close()
                raise InputError(f"training diverged at step {step} ({_first_line(e)}); try a smaller --lr"
                                 f"{_restart_hint(ckpt)}") from None
        elif adalora is not None:
            adalora.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        lv = loss.item()  # waits for the GPU's step to end, so dt below is its real duration
        dt = time.perf_counter() - t_step
        ntok = int(batch["attention_mask"].sum())
        tokens_total += ntok
        train_time += dt
        if not math.isfinite(lv):
            bar.close()
            raise InputError(f"the loss became {lv} at step {step}; try a smaller --lr{_restart_hint(ckpt)}")
        losses.append(lv)
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        rank = current_rank(model, o.method, o, n_mod, step)
        log_rows.append({"step": step, "loss": round(lv, 6), "lr": lr_used,
                         "total_rank": rank, "tokens_per_s": round(ntok / dt, 1)})
        bar.set_postfix(loss=f"{ema:.4f}", tok_s=f"{tokens_total / train_time:.0f}", rank=rank, refresh=False)
        bar.update(1)
        if step % log_every == 0 or step == steps:
            window = losses[-log_every:]
            bar.write(f"step {step:>5}/{steps}  loss {sum(window) / len(window):.4f}  total rank {rank}  "
                      f"{tokens_total / train_time:.0f} tok/s")
        if save_every and step % save_every == 0 and step < steps:
            record.update(tokens_total=tokens_total, train_time=train_time, ema=ema,
                          elapsed=earlier + time.perf_counter() - t_start)
            _save_checkpoint(ckpt, model, allocator, optimizer, loop_state, step)
    bar.close()
    metrics["train_seconds"] = round(train_time, 2)
    metrics["tokens_per_s"] = round(tokens_total / max(train_time, 1e-9), 1)
    # the steady rate: the average above includes the first steps' one-off costs (on a GPU, new
    # sequence lengths and kernel compiles made a 100-step run's average 0.4x its median step)
    metrics["tokens_per_s_median_step"] = round(statistics.median(r["tokens_per_s"] for r in log_rows), 1)
    k = max(1, min(len(losses) // 10, 20))
    metrics["loss_first"] = round(sum(losses[:k]) / k, 4)
    metrics["loss_last"] = round(sum(losses[-k:]) / k, 4)
    metrics["total_rank_final"] = current_rank(model, o.method, o, n_mod, steps + 1)

    # --- after --------------------------------------------------------------------------------
    if test_ids:
        if task == "classify":
            metrics["test_accuracy_after"] = accuracy(model, test_ids, test_ds.labels, pad_id, precision=o.precision)
        else:
            metrics["test_loss_after"] = lm_loss(model, test_ids, pad_id, precision=o.precision)
    metrics["total_seconds"] = round(earlier + time.perf_counter() - t_start, 2)
    save_outputs(out, model, allocator, o, task, log_rows, metrics, ds)
    if ckpt.is_dir():  # the run is finished: its outputs hold everything the checkpoint did
        _remove_checkpoint(ckpt)
    print_summary(metrics, out)
    return metrics


# ------------------------------------------------------------------------------------------------
# --save-every / --resume


def _remove_checkpoint(ckpt: Path) -> None:
    """Remove a finished run's checkpoint folder. Where checkpoint/ is a symlink (the folder moved
    to another disk), rmtree refused it silently and the next run took the finished run for an
    unfinished one: the files save_checkpoint writes are deleted in the folder it points to, then
    that folder and the link where nothing else is left there."""
    if not ckpt.is_symlink():
        shutil.rmtree(ckpt, ignore_errors=True)
        return
    real = ckpt.resolve()
    for name in _OWNED:  # what save_checkpoint writes
        with contextlib.suppress(OSError):
            (real / name).unlink()
    with contextlib.suppress(OSError):
        real.rmdir()  # only when empty: the user's own files there are kept, and the link with them
        ckpt.unlink()


class _LoopState:
    """The LR scheduler and the loop's record (log rows, losses, token and time counts, the
    options and a digest of the data), given to save_checkpoint / load_checkpoint as their
    scheduler: the record is then written in the same atomic save as the adapter, allocator,
    optimizer and RNG states, and restored only once their checks have passed."""

    def __init__(self, scheduler, record: dict):
        self.scheduler, self.record = scheduler, record

    def state_dict(self) -> dict:
        return {"lr_scheduler": self.scheduler.state_dict(), "run": dict(self.record)}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.record.clear()
        self.record.update(state["run"])


def _resume_key(o: TrainOptions) -> dict:
    """The resolved options a resumed run must share with the run that saved the checkpoint."""
    return {k: v for k, v in asdict(o).items() if k not in _RESUME_FREE}


def _data_digest(texts, labels) -> str:
    """SHA-256 of the training split's texts and labels: other data or another split give another
    digest."""
    return hashlib.sha256(json.dumps([list(texts), None if labels is None else list(labels)]).encode()).hexdigest()


def _read_saved_run(ckpt: Path) -> Optional[dict]:
    """{step, options, save_every, ...} of the `flexlora train` checkpoint in ckpt, or None when
    it is not one (read without restoring anything; memory-mapped, so the optimizer state and
    trained values it also holds are not read for this)."""
    try:
        state = torch.load(ckpt / TRAINING_STATE_NAME, map_location="cpu", weights_only=True, mmap=True)
        return {"step": int(state["step"]), **state["scheduler"]["run"]}
    except Exception:
        return None


@contextlib.contextmanager
def _output_lock(out: Path):
    """Hold an exclusive lock on ``out`` while a run writes into it: two runs into one folder at
    once would replace each other's checkpoints (and one's finish would delete the other's). The
    lock is an flock on a hidden file, released by the OS however the process ends; the file,
    and any folders made for it, are removed at the end (a run that fails early leaves no folder
    behind). Without fcntl (Windows) there is no lock."""
    try:
        import fcntl  # noqa: F401  (Windows has none: no lock there)
    except ImportError:
        yield
        return
    path = out / LOCK_NAME
    with _folder_for_now(out):  # prepare_output_dir proved it can be made
        fd = _locked(path, out)
        try:
            with contextlib.suppress(OSError):  # read-only: another user's file, the pid stays unsaid
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            with contextlib.suppress(OSError):  # unlinked while held: see _locked
                os.unlink(path)
            os.close(fd)


def _locked(path: Path, out: Path) -> int:
    """An fd of ``path`` holding its flock: InputError if another run holds it. A run that ends
    unlinks the file while holding it, so an flock won on a file that is no longer at ``path``
    (opened just before that unlink) does not count: open again."""
    import errno
    import fcntl

    for _ in range(8):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as denied:
            try:  # another user's file (a killed run's): flock works on a read-only descriptor too
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                raise InputError(
                    f"--output-dir: cannot open the lock file {path} ({denied.strerror or denied})"
                ) from None
        except OSError as e:
            raise InputError(f"--output-dir: cannot open the lock file {path} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # no locks on this filesystem (NFS, Lustre)
                try:
                    warnings.warn(f"--output-dir: {out} cannot be locked ({e.strerror or e}); a second run into it "
                                  "at the same time would not be noticed", stacklevel=2)
                except BaseException:  # warnings turned into errors: the run ends here, its lock file too
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    raise
                return fd
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise InputError(
                f"--output-dir: another flexlora train{f' (pid {holder})' if holder.isdigit() else ''} is "
                f"writing into {out}; wait for it to end, or choose another --output-dir"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise InputError(f"--output-dir: cannot lock {path}: it keeps being replaced (another run starting and ending?)")


def _point_to_checkpoint(ckpt: Path) -> None:
    """After an interrupt: say which step the checkpoint on disk holds (if there is one)."""
    saved = _read_saved_run(ckpt)
    if saved is not None:
        print(f"flexlora: the checkpoint of step {saved['step']} is in {ckpt}: run the same command with "
              "--resume to continue from it", file=sys.stderr)


def _unfinished_run(ckpt: Path, resume: bool, method: str = "flexlora") -> Optional[dict]:
    """With --resume, the saved run in ckpt (an InputError if there is none); without, an
    InputError if ckpt holds one: a fresh run would overwrite it at its first save, and a later
    --resume would continue the old run over the new run's outputs."""
    if resume:
        if not (ckpt / TRAINING_STATE_NAME).is_file():
            if (ckpt.parent / "metrics.json").is_file():
                raise InputError(
                    f"--resume: no checkpoint in {ckpt}: the run in {ckpt.parent} has finished (its metrics.json "
                    "is there; a finished run removes its checkpoint)"
                )
            raise InputError(f"--resume: no checkpoint in {ckpt} (a run writes one with --save-every N)")
        saved = _read_saved_run(ckpt)
        if saved is None:
            raise InputError(f"--resume: {ckpt / TRAINING_STATE_NAME} is not a readable checkpoint of flexlora train")
        return saved
    if ckpt.exists():
        saved = _read_saved_run(ckpt)
        if saved is None:  # empty, or written by a script of the user's
            raise InputError(
                f"--output-dir: {ckpt} exists but holds no checkpoint of flexlora train (--save-every writes "
                "there): move or delete it, or choose another --output-dir"
            )
        where = f"(step {saved['step']} of {saved.get('steps')})"
        if method != "flexlora":  # --resume is for FlexLoRA runs
            raise InputError(
                f"--output-dir: {ckpt} holds the checkpoint of an unfinished FlexLoRA run {where}: delete that "
                "folder or choose another --output-dir"
            )
        raise InputError(
            f"--output-dir: {ckpt} holds the checkpoint of an unfinished run {where}: add --resume to continue "
            "it, or delete that folder (or choose another --output-dir) to start over"
        )
    return None


def _restart_hint(ckpt: Path) -> str:
    """For a run that failed for good (it diverged): its checkpoint would only fail again."""
    if not ckpt.is_dir():
        return ""
    return f" (delete {ckpt} first, or choose another --output-dir: resuming it would diverge again)"


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "(default)" if value is None else str(value)


def _check_same(what: str, saved: dict, now: dict, ckpt: Path, given_only: bool = False) -> None:
    """InputError naming the first option whose value differs from the saved run's; given_only:
    only options set on both command lines (one left to its default is compared once derived:
    --r-max 16 given against a saved default that came out as 16 is the same run)."""
    for name, was in saved.items():
        if given_only and (was is None or now.get(name) is None):
            continue
        if given_only and name == "task":
            continue  # compared once resolved: --task classify is what --task auto came to
        if now.get(name) != was and not (name == "model" and _same_folder(was, now.get(name))):
            flag = config_flag(name)
            raise InputError(
                f"--resume: the checkpoint in {ckpt} was saved by a run with {what}{flag} {_shown(was)}, this run "
                f"has {flag} {_shown(now.get(name))}; give the flags of the run that saved it"
            )


def _same_folder(a, b) -> bool:
    """Whether two --model values name one existing folder (./m/ and m, or through a link); a
    built-in name is never a folder (resolve_model takes the built-in first)."""
    if not (isinstance(a, str) and isinstance(b, str)) or a in BUILTIN_MODELS or b in BUILTIN_MODELS:
        return False
    try:
        return Path(a).is_dir() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _check_resume(saved: dict, record: dict, ckpt: Path, auto_task: str) -> None:
    """The resumed run must compute what the saved one did: the same flags (checked first, on
    their own), the same training data, the same derived settings (a default derived from the
    data, such as --test-size, differs only when the data do, so the data are compared first)."""
    if saved.get("data") != record["data"]:
        raise InputError(
            f"--resume: the training data differ from those of the run that saved the checkpoint in {ckpt} "
            "(other --data contents or another split)"
        )
    # --steps or --epochs: what counts is the number of steps they come to
    options = {k: v for k, v in saved.get("options", {}).items() if k not in ("steps", "epochs")}
    if options.get("task") == "auto":  # a checkpoint from before --task was recorded resolved
        options["task"] = auto_task  # what it came to: the model and data are the same
    _check_same("(derived) ", options, record["options"], ckpt)
    if saved.get("steps") != record["steps"]:
        raise InputError(
            f"--resume: the checkpoint in {ckpt} was saved by a run of {saved.get('steps')} steps, this run has "
            f"{record['steps']} (--steps / --epochs); give the flags of the run that saved it"
        )


def _save_checkpoint(ckpt: Path, model, allocator, optimizer, loop_state: _LoopState, step: int) -> None:
    """flexlora.save_checkpoint; a failed write warns and the run goes on (the last checkpoint
    written stays whole: saves are atomic)."""
    import flexlora

    try:
        flexlora.save_checkpoint(ckpt, model, allocator, optimizer, loop_state, step=step)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: torch.save says RuntimeError
        warnings.warn(f"--save-every: the checkpoint of step {step} could not be written to {ckpt} ({e}); training "
                      "goes on, the last checkpoint written (if any) is kept", stacklevel=2)


def save_outputs(out: Path, model, allocator, o: TrainOptions, task, log_rows, metrics, ds) -> None:
    """Write the run's outputs into ``out``: adapter/ (FlexLoRA: flexlora.save_adapter; PEFT:
    save_pretrained), rank_history.csv + rank_heatmap.png (FlexLoRA), train_log.csv,
    classifier_head.safetensors (classify), metrics.json.

    All of them are written into a hidden folder inside ``out`` first and then renamed into place
    together (:func:`flexlora._atomic.move_into`): a save that fails (disk full, a permission)
    leaves the previous run's outputs as they were, never a mix of two runs; outputs of ours that
    this run does not write (a heatmap after a PEFT run) are removed, and adapter/ is replaced
    whole. An adapter/ that is a symlink to a folder keeps the link: the folder it points to is
    replaced (atomically on its own, just before the other outputs are renamed in). An OSError
    becomes an InputError naming the folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out))
    except OSError as e:
        raise InputError(f"--output-dir: cannot write to {out} ({e.strerror or e})") from None
    try:
        _write_outputs(stage, model, allocator, o, task, log_rows, metrics, ds)
        link = out / ADAPTER_DIR
        if link.is_symlink() and link.is_dir():
            # adapter/ links elsewhere (another disk): replace the folder it points to, keep the
            # link; put back should the other outputs then fail to go in (no mix of two runs)
            undo_adapter = replace_directory(link, stage / ADAPTER_DIR)
            try:
                move_into(stage, out, OUTPUT_FILES)
            except BaseException:
                undo_adapter(True)
                raise
            undo_adapter(False)
        else:
            move_into(stage, out, (ADAPTER_DIR, *OUTPUT_FILES))
    except OSError as e:
        raise InputError(
            f"--output-dir: saving the outputs into {out} failed ({e.strerror or e}); what was there before is unchanged"
        ) from None
    except (RuntimeError, SafetensorError) as e:  # how torch.save and safetensors report a full disk
        free = shutil.disk_usage(out).free
        raise InputError(
            f"--output-dir: saving the outputs into {out} failed ({type(e).__name__}: {_first_line(e)}; "
            f"{free / 2**20:.1f} MiB free there); what was there before is unchanged"
        ) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_outputs(stage: Path, model, allocator, o: TrainOptions, task, log_rows, metrics, ds) -> None:
    from safetensors.torch import save as st_save

    files = {}
    if o.method == "flexlora":
        import flexlora

        flexlora.save_adapter(model, stage / ADAPTER_DIR, allocator=allocator)
        allocator.history_csv(stage / "rank_history.csv")
        flexlora.plot_rank_heatmap(allocator.history, stage / "rank_heatmap.png")
        files.update(rank_history="rank_history.csv", rank_heatmap="rank_heatmap.png")
    else:
        with warnings.catch_warnings():
            # AdaLoRA writes a module it pruned to rank 0 as zero-sized lora_A / lora_B tensors,
            # which PEFT's save takes for ungathered DeepSpeed ZeRO-3 / FSDP shards and warns so;
            # nothing is sharded here and the folder reloads as it is
            warnings.filterwarnings("ignore", message=r"Adapter '.*': \d+ LoRA tensor\(s\) have invalid shape")
            model.save_pretrained(str(stage / ADAPTER_DIR))
    files["adapter"] = ADAPTER_DIR
    if task == "classify":
        head = model.head if hasattr(model, "head") else model.base_model.model.head
        tensors = {k: v.detach().contiguous().clone() for k, v in _head_state(head).items()}
        (stage / "classifier_head.safetensors").write_bytes(
            st_save(tensors, metadata={"label_names": json.dumps(ds.label_names)}))
        files["classifier_head"] = "classifier_head.safetensors"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(log_rows[0]))
    w.writeheader()
    w.writerows(log_rows)
    (stage / "train_log.csv").write_text(buf.getvalue(), encoding="utf-8", newline="")
    files["train_log"] = "train_log.csv"
    metrics["files"] = files
    (stage / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def _head_state(head) -> dict:
    # PEFT wraps modules_to_save in a ModulesToSaveWrapper; the trained copy is the active one.
    inner = getattr(head, "modules_to_save", None)
    if inner is not None:
        head = next(iter(inner.values()))
    return {"weight": head.weight, "bias": head.bias}


def print_summary(m: dict, out: Path) -> None:
    """The final table on stdout."""
    name = {"flexlora": "FlexLoRA", "lora": "PEFT LoRA", "adalora": "PEFT AdaLoRA"}[m["method"]]
    rows = [
        ("model", m["model"]),
        ("data", f"{m['data']} ({m['train_examples']} train / {m['test_examples']} test)"),
        ("task", m["task"]),
        ("method", f"{name} on {m['adapted_modules']} modules, rank budget {m['rank_budget']} "
                   f"(final total rank {m['total_rank_final']})"),
        ("trainable params", f"{m['trainable_params']:,}"),
        ("steps", f"{m['steps']} x batch {m['batch_size']}, lr {m['lr']}"),
        ("train loss", f"{m['loss_first']:.4f} (first steps) -> {m['loss_last']:.4f} (last steps)"),
        ("speed", f"{m['tokens_per_s']:.0f} tokens/s (median step {m['tokens_per_s_median_step']:.0f}), "
                  f"{m['train_seconds']:.1f} s training"),
        ("device", f"{m.get('device_name') or m['device']}, {m['precision']}"),
    ]
    if "test_accuracy_head_only" in m:
        rows.append(("test accuracy", f"{m['test_accuracy_head_only']:.4f} head only (frozen model + linear probe)"))
        rows.append(("", f"{m['test_accuracy_after']:.4f} after {name} (adapters + head)"))
    if "test_loss_before" in m:
        rows.append(("test loss", f"{m['test_loss_before']:.4f} base model (perplexity {math.exp(m['test_loss_before']):.2f})"))
        rows.append(("", f"{m['test_loss_after']:.4f} after {name} (perplexity {math.exp(m['test_loss_after']):.2f})"))
    rows.append(("total time", f"{m['total_seconds']:.1f} s"))
    rows.append(("outputs", str(out)))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    print(line)
    for k, v in rows:
        print(f"{k:<{width}} | {v}")
    print(line)
