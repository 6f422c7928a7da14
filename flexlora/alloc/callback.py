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
  (:data:`ALLOCATOR_STATE_FILE`), and ``on_train_begin`` of a resumed run loads it back, so
  ``trainer.train(resume_from_checkpoint=...)`` continues the allocation history, event count and
  importance statistics (the masks come back with the model's weights).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

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
        if state.global_step > 0:  # resumed from checkpoint-<global_step>
            self._load_state(Path(args.output_dir) / f"checkpoint-{state.global_step}" / ALLOCATOR_STATE_FILE,
                             state.global_step)
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

    def _load_state(self, path: Path, step: int) -> None:
        if not path.is_file():
            warnings.warn(
                f"FlexLoRACallback: the Trainer resumes at step {step} but {str(path)!r} does not exist, so "
                "the allocator starts afresh: its history and event count restart and its importance "
                "statistics are lost (the masks come back with the model's weights). Checkpoints written "
                "with FlexLoRACallback hold that file; for others call allocator.load_state_dict yourself",
                stacklevel=2,
            )
            return
        self.allocator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
