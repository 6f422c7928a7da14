"""Whole tensors and slot writes for adapters sharded as DTensors (FSDP2's ``fully_shard``).

Between steps FSDP2 keeps on each rank only its part of every parameter (by default a
``Shard(0)`` slice: some rows of P [out, R], some entries of λ [R], some rows of Q [R, in]), and
so it keeps the optimizer's moments. Rank allocation reads whole tensors (λ for the scores, P and
Q for the orthogonality penalty and the spectral metrics) and writes single slots (a pruned
slot's P column, λ entry, Q row and their moments). These helpers gather the whole tensor where
it is read (a collective: every rank must make the same calls in the same order, as every rank
runs the allocator), and apply a slot write to the part this rank holds. Plain tensors pass
through untouched, so unsharded training pays nothing.

Placements handled: ``Shard(d)`` and ``Replicate`` on a mesh of any dimension (FSDP2, HSDP).
Others (``Partial``, the strided shards of FSDP2 combined with tensor parallelism) are refused
with an error naming the module.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

Value = Union[float, int, bool, torch.Tensor]


def _tensor_api():
    """torch's DTensor package: torch.distributed.tensor (torch 2.5+), torch.distributed._tensor
    before."""
    try:
        import torch.distributed.tensor as api
        api.DTensor  # noqa: B018 - present since 2.5
    except (ImportError, AttributeError):  # pragma: no cover - torch 2.4
        import torch.distributed._tensor as api
    return api


def dtensor_type():
    """torch's DTensor class, or None in a build without torch.distributed or before a process
    group exists (a DTensor needs a device mesh, which needs one: unsharded training skips the
    per-module checks)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return _tensor_api().DTensor


def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor (a parameter or optimizer state of an FSDP2 / DTensor model)."""
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def any_sharded(modules: Sequence) -> bool:
    """Whether any FlexLinear of ``modules`` holds P, λ or Q as a DTensor right now (FSDP2 swaps
    the registered parameters between sharded and whole around each forward and backward)."""
    cls = dtensor_type()
    return cls is not None and any(isinstance(getattr(m, k), cls) for m in modules for k in ("P", "lam", "Q"))


def _fsdp_module_class():
    """FSDP2's FSDPModule class (torch.distributed.fsdp since torch 2.6, its _composable
    package before), or None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def fsdp_units(model) -> list:
    """The modules of ``model`` that ``fully_shard`` was applied to (empty without a process
    group: FSDP2 needs one, so unsharded training pays no module scan)."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return []
    cls = _fsdp_module_class()
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def fsdp_managed(model) -> bool:
    """Whether FSDP2's ``fully_shard`` was applied to ``model`` or a module in it. Its
    parameters are DTensor shards between steps but whole tensors between a root's forward and
    backward, so the type of a parameter alone does not tell."""
    return bool(fsdp_units(model))


def reshard(units: Sequence) -> None:
    """Put every FSDP2 unit back into its sharded state (``FSDPModule.reshard``, public): after
    a forward without backward (an evaluation under no_grad), or with reshard_after_forward=False,
    a unit keeps whole working copies registered on its modules, which it frees at its next
    reshard, so a slot written into them would be lost. Mid-step this is what a unit does after
    its own forward with reshard_after_forward=True: its backward gathers the shards again."""
    for unit in units:
        unit.reshard()


def registered_shards(units: Sequence) -> Optional[dict]:
    """{(id(module), name): FSDP's sharded parameter} of every parameter the units manage, read
    from FSDP2's internals (None where this torch lays them out otherwise). Between steps a
    managed module holds exactly these; other tensors under those names (whole working copies,
    the smaller-mesh copies of reshard_after_forward=<int>) are FSDP's temporaries."""
    out = {}
    try:
        for unit in units:
            state = unit._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)  # several with per-parameter meshes
            if groups is None:
                groups = [] if state._fsdp_param_group is None else [state._fsdp_param_group]
            for group in groups:
                for fsdp_param in group.fsdp_params:
                    info = fsdp_param._module_info
                    out[(id(info.module), info.param_name)] = fsdp_param.sharded_param
                    for module, name in zip(info.shared_modules, info.shared_param_names):
                        out[(id(module), name)] = fsdp_param.sharded_param
    except (AttributeError, AssertionError, TypeError):
        return None
    return out


def unsupported_placement(t) -> Optional[str]:
    """A description of the first placement of DTensor ``t`` these helpers cannot map (None when
    all are ``Shard(d)`` or ``Replicate``, or ``t`` is no DTensor)."""
    if not is_sharded(t):
        return None
    api = _tensor_api()
    Replicate, Shard = api.Replicate, api.Shard
    for p in t.placements:
        if type(p) not in (Shard, Replicate):
            return repr(p)
    return None


def check_placements(named: Sequence[Tuple[str, object]], caller: str) -> None:
    """Raise NotImplementedError naming the module when an adapter tensor is a DTensor with a
    placement other than Shard / Replicate (tensor parallelism's strided or partial layouts)."""
    for name, m in named:
        for key in ("P", "lam", "Q"):
            bad = unsupported_placement(getattr(m, key))
            if bad is not None:
                raise NotImplementedError(
                    f"{caller}: the adapter of {name!r} has {key} placed as {bad}; flexlora handles adapters "
                    "sharded by FSDP2's fully_shard (Shard / Replicate placements), not tensor-parallel layouts"
                )


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t`` itself, or for a DTensor its ``full_tensor()`` (a collective,
    differentiable: the gradient of the whole tensor flows back to this rank's part)."""
    return t.full_tensor() if is_sharded(t) else t


def _local_region(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[slice, ...]]:
    """(the tensor this rank writes, the slices of the whole tensor it holds). For a plain
    tensor: (t, full slices)."""
    if not is_sharded(t):
        return t, tuple(slice(0, n) for n in t.shape)
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - torch 2.4
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


def set_slot_(t: torch.Tensor, dim: int, j: int, value: Value) -> None:
    """``t.select(dim, j)[...] = value`` on the whole tensor, applied to this rank's part.

    t: [R] (dim 0) or 2-D ([out, R] with dim 1, [R, in] with dim 0); value: a number, or a
    whole 1-D tensor over t's other dimension (a P column [out], a Q row [in]).
    """
    local, region = _local_region(t)
    own = region[dim]
    if not own.start <= j < own.stop:
        return  # this rank holds no part of slot j
    target = local.select(dim, j - own.start)
    if torch.is_tensor(value) and value.dim() > 0:
        other = region[1 - dim]
        target.copy_(value[other].to(device=target.device, dtype=target.dtype))
    else:
        target.fill_(value)


def fill_slots_(t: torch.Tensor, dim: int, which: torch.Tensor, value: Value) -> None:
    """Fill the slots where the whole-length bool ``which`` [R] is True along ``dim`` of ``t``
    with ``value``, on this rank's part (t: [R], [out, R] with dim 1, or [R, in] with dim 0)."""
    local, region = _local_region(t)
    mine = which[region[dim]].to(local.device)
    shape = [1] * local.dim()
    shape[dim] = mine.numel()
    local.masked_fill_(mine.view(shape), value)


def copy_whole_(t: torch.Tensor, value: torch.Tensor) -> None:
    """``t.copy_(value)`` for a value shaped like the whole ``t``; for a DTensor only this
    rank's part of it is copied."""
    local, region = _local_region(t)
    local.copy_(value[region].to(device=local.device, dtype=local.dtype))


def local_like(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A new tensor laid out like ``p`` holding the whole-shaped ``value`` in p's dtype (when
    floating) and device: for a DTensor parameter a DTensor of this rank's part (an optimizer
    moment of a sharded parameter), else a plain copy."""
    dtype = p.dtype if value.is_floating_point() else value.dtype
    if not is_sharded(p) or tuple(value.shape) != tuple(p.shape):  # not per-element: kept whole
        return value.to(device=p.device, dtype=dtype, copy=True)
    DTensor = _tensor_api().DTensor
    local, region = _local_region(p)
    part = value[region].to(device=local.device, dtype=dtype).contiguous()
    return DTensor.from_local(part, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def add_to_grad_(p: torch.Tensor, g: torch.Tensor) -> None:
    """``p.grad += g`` for a whole gradient ``g`` (shaped like the whole p), creating the
    gradient where it is None; for a DTensor parameter only this rank's part of g is added."""
    if p.grad is None:
        p.grad = local_like(p, g)
    else:
        grad_local, region = _local_region(p.grad)
        grad_local.add_(g[region].to(device=grad_local.device, dtype=grad_local.dtype))


class WholeView:
    """A read-only stand-in for a FlexLinear whose P, λ, Q are gathered whole on first access
    (one collective each, in the order the caller reads them: every rank reads the same
    attributes in the same order). Other attributes come from the module."""

    __slots__ = ("module", "_cache")

    def __init__(self, module) -> None:
        self.module = module
        self._cache = {}

    def _get(self, key: str) -> torch.Tensor:
        t = self._cache.get(key)
        if t is None:
            with torch.no_grad():
                t = self._cache[key] = whole(getattr(self.module, key)).detach()
        return t

    @property
    def P(self) -> torch.Tensor:
        return self._get("P")

    @property
    def lam(self) -> torch.Tensor:
        return self._get("lam")

    @property
    def Q(self) -> torch.Tensor:
        return self._get("Q")

    def __getattr__(self, name):
        return getattr(self.module, name)


def whole_views(modules: Sequence) -> Sequence:
    """``modules`` itself when nothing is sharded, else a :class:`WholeView` per module."""
    return [WholeView(m) for m in modules] if any_sharded(modules) else modules
