"""Backend helpers shared by the ops (flexlora/kernels/_backend.py)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from flexlora.kernels._backend import mend_old_interpreter


class _Scope:
    """Stands in for the interpreter's patch scope: sets attributes for the kernel call."""

    def set_attr(self, obj, name, value):
        setattr(obj, name, value)


def _old_patch_lang_tensor(tensor, scope):
    """Triton 3.6's rule: a loop bound is int() of a 1-element array."""
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def _numpy_refuses_size1():
    try:
        int(np.ones(1, dtype=np.int32))
        return False
    except TypeError:
        return True


def test_mend_old_interpreter_lets_runtime_loop_bounds_through():
    class Tensor:  # the interpreter's tl.tensor: a handle holding a numpy array
        pass

    fake = types.SimpleNamespace(_patch_lang_tensor=_old_patch_lang_tensor)
    assert mend_old_interpreter(fake) is _numpy_refuses_size1()
    fake._patch_lang_tensor(Tensor, _Scope())
    bound = Tensor()
    bound.handle = types.SimpleNamespace(data=np.array([3], dtype=np.int32))  # an int kernel argument
    assert list(range(0, bound)) == [0, 1, 2]
    scalar = Tensor()
    scalar.handle = types.SimpleNamespace(data=np.array(5, dtype=np.int64))  # a 0-d result
    assert list(range(scalar)) == [0, 1, 2, 3, 4]
    assert mend_old_interpreter(fake) is False  # wrapped once only


def _oldest_patch_lang_tensor(tensor):
    """Triton 3.5's form: no scope, the class attribute is set for good."""
    tensor.__index__ = lambda self: int(self.handle.data)


def _builder_patch_lang_tensor(tensor, builder):
    """An older form that takes the interpreter's builder (no set_attr) as its second argument."""
    tensor.__index__ = lambda self: int(self.handle.data)


@pytest.mark.parametrize("hook", [_oldest_patch_lang_tensor, _builder_patch_lang_tensor], ids=["tensor", "tensor-builder"])
def test_mend_old_interpreter_handles_hooks_without_a_scope(hook):
    class Tensor:
        pass

    fake = types.SimpleNamespace(_patch_lang_tensor=hook)
    assert mend_old_interpreter(fake) is _numpy_refuses_size1()
    args = (Tensor,) if hook is _oldest_patch_lang_tensor else (Tensor, types.SimpleNamespace())
    fake._patch_lang_tensor(*args)
    bound = Tensor()
    bound.handle = types.SimpleNamespace(data=np.array([4], dtype=np.int32))
    assert list(range(bound)) == [0, 1, 2, 3]


def test_mend_old_interpreter_leaves_other_interpreters_alone():
    assert mend_old_interpreter(types.SimpleNamespace()) is False  # no such hook: nothing to mend
