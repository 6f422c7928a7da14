"""Backend choice shared by every op: Triton where it can run, the torch path elsewhere."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("triton", "torch")


def triton_interpret() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, read at import of triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def mend_old_interpreter(interpreter_module=None) -> bool:
    """Let Triton 3.6's (and older) CPU interpreter run loops with a runtime bound under NumPy >= 2.4.

    Those interpreters turn every int argument into a 1-element array and take a loop bound
    (``range(0, n)``) with ``int(array)``, which NumPy 2.4 refuses for arrays that are not 0-d
    ("only 0-dimensional arrays can be converted to Python scalars"): every kernel with a loop
    over K failed there (torch 2.11 pins triton 3.6). Triton 3.7 converts ``int(array.squeeze())``;
    this wraps the interpreter's tensor patching to do the same (on 3.7+ it sets what is already
    there). A no-op where NumPy still converts, or the interpreter has no such hook. Returns
    whether it wrapped the hook.
    """
    import numpy as np

    if interpreter_module is None:
        try:
            from triton.runtime import interpreter as interpreter_module
        except ImportError:  # pragma: no cover - triton without an interpreter
            return False
    patch = getattr(interpreter_module, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_flexlora_mended", False):
        return False
    try:
        int(np.ones(1, dtype=np.int32))
        return False  # this NumPy still converts 1-element arrays
    except TypeError:
        pass

    def index(self):
        return int(np.asarray(self.handle.data).squeeze())

    def patch_lang_tensor(tensor, *args, **kwargs):
        patch(tensor, *args, **kwargs)
        # Triton 3.6 patches through a scope that undoes it after the launch; 3.5 and older take
        # (tensor) or (tensor, builder) and set the class attributes for good
        scope = kwargs.get("scope", args[0] if args else None)
        if hasattr(scope, "set_attr"):
            scope.set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patch_lang_tensor._flexlora_mended = True
    interpreter_module._patch_lang_tensor = patch_lang_tensor
    return True


def choose_backend(x: torch.Tensor, backend: Optional[str], cuda_default: str = "triton") -> str:
    """Pick the backend for an op whose main input is ``x``.

    ``backend=None`` means: ``cuda_default`` for CUDA tensors (Triton, unless an op measures its
    torch path faster there), Triton for CPU tensors when the Triton interpreter is on (that is
    how CI exercises the kernels); the torch path otherwise.
    ``"triton"`` / ``"torch"`` force one; forcing Triton where it cannot run is an error.
    The environment variable ``FLEXLORA_BACKEND`` ("triton" / "torch") sets the default that
    ``None`` resolves to (the test-suite uses it to keep model-level tests off the slow
    interpreter while kernel tests force ``backend="triton"``).
    """
    if backend is None:
        backend = os.environ.get("FLEXLORA_BACKEND") or None
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"the environment variable FLEXLORA_BACKEND must be one of {BACKENDS} or unset, got {backend!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    can_triton = triton_available() and (x.is_cuda or (x.device.type == "cpu" and triton_interpret()))
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not can_triton:
            raise RuntimeError(
                "backend='triton' needs triton installed and a CUDA tensor, or TRITON_INTERPRET=1 "
                f"for CPU tensors (got a {x.device.type} tensor, triton installed: {triton_available()}, "
                f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})"
            )
        return "triton"
    if x.is_cuda and cuda_default == "torch":
        return "torch"
    return "triton" if can_triton else "torch"


def triton_runnable(op: str, x: torch.Tensor, backend: Optional[str], interpreted: bool,
                    problem: Optional[str] = None) -> bool:
    """For an op that :func:`choose_backend` sent to Triton: whether its kernels can run on ``x``.

    ``problem`` is an op-specific reason they cannot (a dtype), checked first; CPU tensors also
    need the interpreter to have been on when the op's kernels were defined (``interpreted``): a
    TRITON_INTERPRET set later would launch compiled kernels on CPU tensors. If they cannot run,
    the torch path does (False), unless Triton was asked for by name (argument or
    FLEXLORA_BACKEND): then a RuntimeError naming ``op`` says why.
    """
    if problem is None and x.device.type == "cpu" and not interpreted:
        problem = (
            "TRITON_INTERPRET=1 must be set before flexlora is imported to run the Triton kernels on "
            "CPU tensors (triton picks compiled vs interpreted kernels when they are defined)"
        )
    if problem is None:
        return True
    if backend == "triton" or (backend is None and os.environ.get("FLEXLORA_BACKEND") == "triton"):
        raise RuntimeError(f"{op}: backend='triton' cannot run here: {problem}")
    return False
