"""Rank allocation: schedules, the allocator, its history, and (lazily) the HF Trainer callback.

``FlexLoRACallback`` (transformers) loads on first use; ``plot_rank_heatmap`` imports matplotlib
only when called.
"""

import importlib

from .allocator import AllocationEvent, RankAllocator, plan_event
from .history import plot_rank_heatmap, read_history_csv, write_history_csv
from .importance import make_importance
from .orthogonal import add_orthogonal_grad_, orthogonal_loss
from .schedule import budget_at, is_event_step

_LAZY = {"FlexLoRACallback": "flexlora.alloc.callback"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexlora.alloc' has no attribute {name!r}")


__all__ = [
    "AllocationEvent",
    "RankAllocator",
    "plan_event",
    "budget_at",
    "is_event_step",
    "make_importance",
    "orthogonal_loss",
    "add_orthogonal_grad_",
    "plot_rank_heatmap",
    "read_history_csv",
    "write_history_csv",
    *_LAZY,
]
