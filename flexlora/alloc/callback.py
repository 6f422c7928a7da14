"""`FlexLoRACallback`: runs a :class:`~flexlora.RankAllocator` inside the HF ``Trainer``.

Where each piece runs in the Trainer's optimizer step (transformers 5.x order: clip grads →
``on_pre_optimizer_step`` → ``optimizer.step()`` → ``on_optimizer_step`` → LR scheduler →
``model.zero_grad()`` → ``global_step += 1`` → ``on_step_end``):

- ``on_pre_optimizer_step``: ``allocator.add_orthogonal_grad_()`` — the orthogonality gradient
  goes straight into P.grad / Q.grad (after clipping, so the task gradient's clipping does not
  shrink the regulariser);
- ``on_optimizer_step``: ``allocator.update_importance()`` — gradients still exist here, and are
  gone by ``on_step_end``;
- ``on_step_end``: ``allocator.step(state.global_step, optimizer)`` — the allocation event, with
  the optimizer whose moments of touched slots are reset;
- ``on_save``: ``allocator.state_dict()`` into the new ``checkpoint-<step>/`` folder
  (:data:`ALLOCATOR_STATE_FILE`), and ``on_train_begin`` of a resumed run loads it back from the
  folder given to ``trainer.train(resume_from_checkpoint=...)`` (wherever it is), so the run
  continues the allocation history, event count and importance statistics (the masks come back
  with the model's weights).
"""

from __future__ import annotations

import copy
import io
import os
import sys
import warnings
from pathlib import Path
from typing import List

import torch
from transformers import Trainer, TrainerCallback

from .._atomic import replace_file
from ..checkpoint import _adapter_snapshot, _other_trainables, _restore_snapshot, _saved_modules
from ..layers.wrap import flex_modules, unwrap_model
from .allocator import RankAllocator, _state_holder

ALLOCATOR_STATE_FILE = "flexlora_allocator_state.pt"
# where the callback keeps, on the Trainer, the copy an auto_find_batch_size retry restores
_ATTEMPT_KEY = "_flexlora_retry_snapshot"


class FlexLoRACallback(TrainerCallback):
    """HF ``TrainerCallback`` that applies FlexLoRA's orthogonality penalty and rank allocation.

    Args:
        allocator: the :class:`~flexlora.RankAllocator` of the model given to the Trainer.
        orthogonal: add the orthogonality gradient (config.orth_reg) before each optimizer step;
            set False when the training loss already includes ``allocator.orthogonal_loss()``.

    Example::

        allocator = flexlora.RankAllocator(model)
        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          callbacks=[flexlora.FlexLoRACallback(allocator)])
    """

    def __init__(self, allocator: RankAllocator, orthogonal: bool = True) -> None:
        if not isinstance(allocator, RankAllocator):
            raise TypeError(f"FlexLoRACallback: allocator must be a flexlora.RankAllocator, got {type(allocator).__name__}")
        self.allocator = allocator
        self.orthogonal = bool(orthogonal)

    def on_train_begin(self, args, state, control, **kwargs):
        # a new run (a resume in the same process, a second train()) starts with no hook done yet
        self.allocator.__dict__["_callback_marks"] = {}
        model = kwargs.get("model")
        self._check_model(model)
        if getattr(args, "auto_find_batch_size", False) and model is not None:
            self._restart_or_snapshot(unwrap_model(model), state, kwargs.get("optimizer"))
        if state.global_step > 0:  # resumed from a checkpoint written at global_step
            self._load_state(_resume_candidates(args, state.global_step), state.global_step)
        cfg = self.allocator.config
        if state.max_steps and state.max_steps > 0 and state.max_steps != cfg.total_steps:
            warnings.warn(
                f"FlexLoRACallback: the Trainer runs max_steps={state.max_steps} optimizer steps but "
                f"FlexLoRAConfig.total_steps={cfg.total_steps}; the allocation schedule (t_warmup, "
                "t_final, b(t)) is laid out over total_steps — set total_steps to the Trainer's step count",
                stacklevel=2,
            )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.orthogonal and self._first_call("pre_optimizer_step", state.global_step):
            self.allocator.add_orthogonal_grad_()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # global_step counts this step only after this hook; a step the allocator will ignore
        # (not past its last one: a second train() on the same allocator) must not feed the
        # importance either, as a plain loop's step() does not
        if self._first_call("optimizer_step", state.global_step) and state.global_step + 1 > self.allocator._last_step:
            self.allocator.update_importance()

    def on_step_end(self, args, state, control, **kwargs):
        if self._first_call("step_end", state.global_step):
            self.allocator.step(state.global_step, kwargs.get("optimizer"))

    def on_save(self, args, state, control, **kwargs):
        # the Trainer has just written checkpoint-<global_step>/ into its run folder: output_dir,
        # or output_dir/run-<trial> in a hyperparameter search
        if not _should_save(args, state) or not self._first_call("save", state.global_step):
            return
        folder = _run_dir(args) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            warnings.warn(
                f"FlexLoRACallback: the Trainer saved at step {state.global_step} but {str(folder)!r} is not a "
                f"folder, so {ALLOCATOR_STATE_FILE} was not written and a resume from that checkpoint will "
                "start the allocator afresh",
                stacklevel=2,
            )
            return
        buf = io.BytesIO()
        torch.save(self.allocator.state_dict(), buf)
        replace_file(folder / ALLOCATOR_STATE_FILE, buf.getvalue())

    def on_train_end(self, args, state, control, **kwargs):
        trainer, _ = _trainer_frame(_TRAIN_FRAMES)
        if trainer is not None:  # the run ended: a later train begin is a new run, not a retry
            trainer.__dict__.pop(_ATTEMPT_KEY, None)
        # load_best_model_at_end has just put the best checkpoint's weights (masks, λ) back: the
        # allocator goes back with them, or it would describe the last step's ranks and a
        # save_adapter(..., allocator=) would pair that history with the best model's masks
        best = getattr(state, "best_model_checkpoint", None)
        if getattr(args, "load_best_model_at_end", False) and best and state.global_step > 0:
            path = Path(best) / ALLOCATOR_STATE_FILE
            if path.is_file():
                saved = _read_state(path)
                # only when the model does hold that checkpoint's ranks: on_train_end also ends a
                # trial a hyperparameter search pruned, where no best model was loaded
                if _last_ranks(saved) == self.allocator.ranks():
                    self.allocator.load_state_dict(saved)
            else:
                warnings.warn(
                    f"FlexLoRACallback: the Trainer loaded the best model from {best!r}, which holds no "
                    f"{ALLOCATOR_STATE_FILE}: the allocator still describes the last step, not the model's ranks",
                    stacklevel=2,
                )

    def _restart_or_snapshot(self, model, state, optimizer) -> None:
        """auto_find_batch_size: keep a CPU copy of everything that trains and of the allocator at
        the start of a run; when the same Trainer begins again at a smaller batch without having
        ended (its retry after running out of memory), put them back and warn.

        The Trainer retries from step 0 (or the checkpoint's step) keeping the failed attempt's
        weights, so the allocator would ignore every step up to where the attempt stopped and mix
        both attempts' events. The copy lives on the Trainer (gone with it; an interrupted run's
        copy is never taken for another Trainer's). What is copied: the adapters, modules_to_save
        and any other parameter that trains (a norm unfrozen by hand)."""
        trainer, _ = _trainer_frame(_TRAIN_FRAMES)
        batch = getattr(trainer, "_train_batch_size", None)
        if trainer is None or not isinstance(batch, int):
            return
        attempt = trainer.__dict__.get(_ATTEMPT_KEY)
        if attempt is not None and attempt["allocator"] is self.allocator and batch < attempt["batch"]:
            _restore_snapshot(attempt["tensors"])
            self.allocator.load_state_dict(attempt["allocator_state"])
            attempt["batch"] = batch
            holder = _state_holder(optimizer) if optimizer is not None else None
            if holder is not None and state.global_step == 0:
                # the Trainer keeps its optimizer: the restored tensors start with a fresh
                # optimizer's state (a resumed retry has just reloaded the checkpoint's instead)
                for p in attempt["params"]:
                    holder.state.pop(p, None)
            warnings.warn(
                f"FlexLoRACallback: auto_find_batch_size restarted training at batch size {batch}; the adapters, "
                "modules_to_save, other trained parameters, their optimizer state and the allocator were put back "
                "to their state at the start of the failed attempt, so the retry starts over",
                UserWarning,
                stacklevel=3,
            )
            return
        saved = _saved_modules(model, self.allocator.config)
        tensors = _adapter_snapshot(model, device="cpu")
        others = list(_other_trainables(model, saved).values())
        tensors += [(p, p.detach().to("cpu", copy=True)) for p in others]
        params = [p for _, m in flex_modules(model) for p in (m.P, m.lam, m.Q)] + others
        params += [p for _, m in saved for p in m.parameters() if p.requires_grad]
        trainer.__dict__[_ATTEMPT_KEY] = {
            "allocator": self.allocator,
            "batch": batch,
            "tensors": tensors,
            "params": params,
            "allocator_state": _on_cpu(self.allocator.state_dict()),
        }

    def _first_call(self, hook: str, step: int) -> bool:
        """False when this hook already ran for this step on the same allocator: one allocator in
        two callbacks (or one callback added twice) would add the orthogonality gradient twice
        and advance the sensitivity averages twice per step. Warns once."""
        marks = self.allocator.__dict__.setdefault("_callback_marks", {})
        if marks.get(hook) == step:
            if not self.allocator.__dict__.get("_callback_dup_warned"):
                self.allocator.__dict__["_callback_dup_warned"] = True
                warnings.warn(
                    "FlexLoRACallback: two callbacks drive the same RankAllocator (or one was added twice); "
                    "the second one's calls are skipped, so each step adds the orthogonality gradient and "
                    "updates the importance once",
                    stacklevel=3,
                )
            return False
        marks[hook] = step
        return True

    def _check_model(self, model) -> None:
        """The allocator must drive the model the Trainer trains: one built for another model (or
        for a model_init's earlier model) would move the ranks of a model nobody trains."""
        if model is None:
            return
        inner = unwrap_model(model)
        ids = {id(m) for m in inner.modules()}
        if not all(id(m) in ids for m in self.allocator.modules):
            raise ValueError(
                "FlexLoRACallback: the allocator's FlexLinear modules are not in the model the Trainer "
                "trains; build the RankAllocator from that model (with Trainer(model_init=...), every "
                "call makes a new model: wrap it and build its allocator and callback inside, or pass "
                "the model itself)"
            )

    def _load_state(self, candidates: List[Path], step: int) -> None:
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            looked = " or ".join(repr(str(p)) for p in candidates)
            warnings.warn(
                f"FlexLoRACallback: the Trainer resumes at step {step} but {looked} does not exist, so "
                "the allocator starts afresh: its history and event count restart and its importance "
                "statistics are lost (the masks come back with the model's weights). Checkpoints written "
                f"with FlexLoRACallback hold {ALLOCATOR_STATE_FILE}; for others call allocator.load_state_dict "
                "yourself",
                stacklevel=2,
            )
            return
        self.allocator.load_state_dict(_read_state(path))


def _on_cpu(obj):
    """A copy of a state (dicts, lists, tuples, tensors, plain values) with every tensor on the
    CPU: the sensitivity metric's statistics live where the adapters do, on the device that has
    just run out of memory in a retry."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _read_state(path: Path) -> dict:
    """An allocator state file written by :meth:`FlexLoRACallback.on_save`."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _last_ranks(state: dict) -> dict:
    """{module: rank} of the last history step of an allocator state."""
    rows = state.get("history") or []
    last = max((r["step"] for r in rows), default=None)
    return {r["module"]: int(r["rank"]) for r in rows if r["step"] == last}


def _should_save(args, state) -> bool:
    """Whether this process writes checkpoints: the Trainer's own rule (args.should_save: the main
    process, or each node's with save_on_each_node)."""
    should = getattr(args, "should_save", None)
    return bool(should) if should is not None else bool(state.is_world_process_zero)


def _trainer_frame(names):
    """(trainer, locals) of the nearest calling frame of a transformers Trainer method in
    ``names``, or (None, None). The Trainer tells callbacks neither the folder it resumes from
    nor the run folder of a hyperparameter-search trial; its own frames know both."""
    frame = sys._getframe(2)
    for _ in range(64):  # a few frames up; bounded, in case the caller is no Trainer at all
        if frame is None:
            break
        if frame.f_code.co_name in names and isinstance(frame.f_locals.get("self"), Trainer):
            return frame.f_locals["self"], frame.f_locals
        frame = frame.f_back
    return None, None


def _run_dir(args) -> Path:
    """The folder the Trainer writes checkpoint-<step>/ into: output_dir/run-<trial> inside a
    hyperparameter search (Trainer._get_output_dir), else output_dir."""
    trainer, local = _trainer_frame(("_maybe_log_save_evaluate", "_save_checkpoint"))
    if trainer is not None and hasattr(trainer, "_get_output_dir"):
        try:
            return Path(trainer._get_output_dir(trial=local["trial"]))
        except Exception:  # a private helper of the Trainer: fall back to the plain rule
            pass
    return Path(args.output_dir)


def _resume_candidates(args, step: int) -> List[Path]:
    """Where the allocator state of a run resumed at ``step`` is: in the folder given to
    ``trainer.train(resume_from_checkpoint=...)`` (read from that call's frame; the Trainer
    replaces True by the last checkpoint of output_dir there), else in
    ``args.resume_from_checkpoint``; only when neither names a folder, in
    ``<output_dir>/checkpoint-<step>`` (another run's file there must not be picked up when the
    folder resumed from lacks one)."""
    _, local = _trainer_frame(_TRAIN_FRAMES)
    folder = None if local is None else local.get("resume_from_checkpoint")
    if not isinstance(folder, (str, os.PathLike)):
        folder = getattr(args, "resume_from_checkpoint", None)
    if isinstance(folder, (str, os.PathLike)):
        return [Path(folder) / ALLOCATOR_STATE_FILE]
    return [Path(args.output_dir) / f"checkpoint-{step}" / ALLOCATOR_STATE_FILE]


# Trainer methods whose local resume_from_checkpoint names the folder being resumed from
_TRAIN_FRAMES = ("train", "_inner_training_loop")
