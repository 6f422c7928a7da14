"""One op per file: Triton kernels, launcher, autograd and a plain-torch path side by side."""

from .flex_linear import flex_linear
from .spectral_entropy import spectral_entropy, spectral_entropy_and_slots

__all__ = ["flex_linear", "spectral_entropy", "spectral_entropy_and_slots"]
