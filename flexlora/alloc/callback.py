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

import io
import os
import sys
import warnings
from pathlib import Path
from typing import List

import torch
from transformers import Trainer, TrainerCallback

from .._atomic import replace_file
from .allocator import RankAllocator

ALLOCATOR_STATE_FILE = "flexlora_allocator_state.pt"


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
        if self.orthogonal:
            self.allocator.add_orthogonal_grad_()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.allocator.update_importance()

    def on_step_end(self, args, state, control, **kwargs):
        self.allocator.step(state.global_step, kwargs.get("optimizer"))

    def on_save(self, args, state, control, **kwargs):
        # the Trainer has just written checkpoint-<global_step>/ (on the main process)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            buf = io.BytesIO()
            torch.save(self.allocator.state_dict(), buf)
            replace_file(folder / ALLOCATOR_STATE_FILE, buf.getvalue())

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
        self.allocator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def _resume_candidates(args, step: int) -> List[Path]:
    """Where the allocator state of a run resumed at ``step`` may be, most specific first: the
    folder given to ``trainer.train(resume_from_checkpoint=...)`` (the Trainer passes it to no
    callback, so it is read from that call's frame), ``args.resume_from_checkpoint``, then
    ``<output_dir>/checkpoint-<step>`` (``resume_from_checkpoint=True``, or a run that resumes
    in the folder it writes)."""
    found: List[Path] = []
    frame = sys._getframe(1)
    for _ in range(64):  # the Trainer's train() is a few frames up; bounded, in case it is not
        if frame is None:
            break
        folder = frame.f_locals.get("resume_from_checkpoint") if frame.f_code.co_name in _TRAIN_FRAMES else None
        if isinstance(folder, (str, os.PathLike)) and isinstance(frame.f_locals.get("self"), Trainer):
            found.append(Path(folder) / ALLOCATOR_STATE_FILE)
            break
        frame = frame.f_back
    if isinstance(getattr(args, "resume_from_checkpoint", None), (str, os.PathLike)):
        found.append(Path(args.resume_from_checkpoint) / ALLOCATOR_STATE_FILE)
    found.append(Path(args.output_dir) / f"checkpoint-{step}" / ALLOCATOR_STATE_FILE)
    return list(dict.fromkeys(found))


# Trainer methods whose local resume_from_checkpoint names the folder being resumed from
_TRAIN_FRAMES = ("train", "_inner_training_loop")
