"""flexlora: dynamic-rank LoRA (FlexLoRA) over preallocated max-rank buffers."""

from .config import FlexLoRAConfig
from .layers import FlexLinear, ParameterCount, count_parameters, flex_modules, wrap
from .version import __version__

__all__ = [
    "FlexLoRAConfig",
    "FlexLinear",
    "ParameterCount",
    "count_parameters",
    "flex_modules",
    "wrap",
    "__version__",
]
