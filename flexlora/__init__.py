"""flexlora: dynamic-rank LoRA (FlexLoRA) over preallocated max-rank buffers."""

import importlib

from .config import FlexLoRAConfig
from .layers import FlexLinear, ParameterCount, count_parameters, flex_modules, wrap
from .version import __version__

# Public names living in modules that import heavier dependencies (transformers, safetensors,
# matplotlib) load on first use, so `import flexlora` stays fast.
_LAZY = {
    "RankAllocator": "flexlora.alloc.allocator",
    "FlexLoRACallback": "flexlora.alloc.callback",
    "plot_rank_heatmap": "flexlora.alloc.history",
    "save_adapter": "flexlora.checkpoint",
    "load_adapter": "flexlora.checkpoint",
    "save_checkpoint": "flexlora.checkpoint",
    "load_checkpoint": "flexlora.checkpoint",
    "merge": "flexlora.merging",
    "unmerge": "flexlora.merging",
    "merge_and_unload": "flexlora.merging",
    "unload": "flexlora.merging",
    "export_peft": "flexlora.export",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexlora' has no attribute {name!r}")


__all__ = [
    "FlexLoRAConfig",
    "FlexLinear",
    "ParameterCount",
    "count_parameters",
    "flex_modules",
    "wrap",
    "__version__",
    *_LAZY,
]
