"""One op per file: Triton kernels, launcher, autograd and a plain-torch path side by side."""

from .flex_linear import flex_linear

__all__ = ["flex_linear"]
