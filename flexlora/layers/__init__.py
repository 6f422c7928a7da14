from .flex_linear import FlexLinear
from .wrap import ParameterCount, count_parameters, flex_modules, name_matches, wrap

__all__ = ["FlexLinear", "ParameterCount", "count_parameters", "flex_modules", "name_matches", "wrap"]
