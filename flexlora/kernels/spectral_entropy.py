"""Batched normalized spectral entropy of every module's λ, with the allocator's slot queries.

Shapes: lam, mask: [n, R] (one row per module, R = r_max, rows padded with mask = False when
modules have different r_max). For row i with active set A = {j : mask[i, j]}, r = |A|:

    sⱼ = λⱼ² / Σ_{k∈A} λₖ²                                  (j ∈ A)
    I  = −Σ_{j∈A} sⱼ·log(sⱼ + ε) / log(r)                   ∈ [0, 1]
    I  = 0 exactly when r < 2 or Σ_{k∈A} λₖ² = 0            (finite λ: never NaN / inf)

In the same pass: min_slot = argmin_{j∈A} |λⱼ| (ties → lowest index; −1 when A is empty),
free_slot = min{j ∉ A} (−1 when every slot is active) and rank = r.

Numerics: everything is computed in fp32 whatever λ's dtype. λ is divided by max_{j∈A} |λⱼ|
before squaring, so λ as large as fp32's max or as small as its smallest normal never overflows
or underflows to a 0/0: sⱼ is scale-invariant, the division changes nothing but the range.

A NaN or ±inf among a row's active λ gives a NaN entropy whatever r, rank 1 included (so that
callers can report a diverged module rather than score it 0 and prune it); min_slot of such a
row is unspecified.

The op is not differentiable (its outputs drive discrete decisions); it reads λ detached.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ._backend import choose_backend, mend_old_interpreter, triton_interpret, triton_runnable

try:  # triton is optional: the torch path below serves when it is missing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

# Triton makes the kernel below interpreted or compiled when it is defined (at import of this
# module). A compiled kernel cannot take CPU tensors ("0 active drivers"), so TRITON_INTERPRET=1
# set after import must not send CPU tensors to it.
_INTERPRETED = triton is not None and triton_interpret()
if _INTERPRETED:
    mend_old_interpreter()


if triton is not None:

    # One program handles BLOCK_ROWS module rows × R_PAD slots (R padded to a power of 2; padded
    # and out-of-range entries load as inactive). All reductions are along the slot axis, in fp32.
    @triton.jit
    def _spectral_entropy_kernel(
        lam_ptr, mask_ptr,                      # [n, R] λ (any float dtype), [n, R] uint8 mask
        ent_ptr, min_ptr, free_ptr, rank_ptr,   # [n] fp32, [n] int64 ×3
        n_rows, R,
        stride_ln, stride_lr, stride_mn, stride_mr,
        eps,
        BLOCK_ROWS: tl.constexpr,
        R_PAD: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, R_PAD)
        row_ok = rows < n_rows
        col_ok = cols < R
        inb = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        lam = tl.load(
            lam_ptr + rows64[:, None] * stride_ln + cols[None, :] * stride_lr, mask=inb, other=0.0
        ).to(tl.float32)
        act = tl.load(
            mask_ptr + rows64[:, None] * stride_mn + cols[None, :] * stride_mr, mask=inb, other=0
        ) != 0

        a = tl.where(act, tl.abs(lam), 0.0)
        amax = tl.max(a, axis=1)
        # divide by the row max before squaring: same sⱼ, no overflow/underflow of λ²
        x = a / tl.where(amax > 0.0, amax, 1.0)[:, None]
        e = x * x
        total = tl.sum(e, axis=1)
        s = e / tl.where(total > 0.0, total, 1.0)[:, None]
        # s = 0 terms are 0 (their limit), also where eps is below fp32's range and s + eps = 0
        h = tl.where(act & (s > 0.0), -s * tl.log(s + eps), 0.0)
        H = tl.sum(h, axis=1)
        r = tl.sum(act.to(tl.int32), axis=1)
        denom = tl.log(tl.maximum(r.to(tl.float32), 2.0))
        # [0, 1] exactly: rounding puts a uniform spectrum one ulp above 1
        ent = tl.minimum(tl.maximum(H / denom, 0.0), 1.0)
        ent = tl.where((r < 2) | (amax == 0.0), 0.0, ent)
        # a NaN / inf active λ makes the row NaN also at r < 2, where the line above gives 0
        # (tl.max need not propagate NaN, so test the slots themselves)
        bad = tl.sum((act & ((a != a) | (a == float("inf")))).to(tl.int32), axis=1) > 0
        ent = tl.where(bad, float("nan"), ent)

        # smallest |λ| among active slots; ties → lowest index (min over candidate indices)
        key = tl.where(act, a, float("inf"))
        kmin = tl.min(key, axis=1)
        cand = tl.where(act & (key == kmin[:, None]), cols[None, :], R_PAD)
        min_slot = tl.min(cand, axis=1)
        min_slot = tl.where(r > 0, min_slot, -1)
        # first inactive real slot
        fcand = tl.where((act == 0) & col_ok[None, :], cols[None, :], R_PAD)
        free_slot = tl.min(fcand, axis=1)
        free_slot = tl.where(free_slot < R, free_slot, -1)

        tl.store(ent_ptr + rows, ent, mask=row_ok)
        tl.store(min_ptr + rows, min_slot.to(tl.int64), mask=row_ok)
        tl.store(free_ptr + rows, free_slot.to(tl.int64), mask=row_ok)
        tl.store(rank_ptr + rows, r.to(tl.int64), mask=row_ok)


def _block_rows(r_pad: int) -> int:
    """Rows per program, keyed on the padded rank only: ~2K slots per program."""
    return max(1, min(64, 2048 // r_pad))


def _spectral_entropy_triton(lam, mask, eps):
    n, R = lam.shape
    dev = lam.device
    ent = torch.empty(n, dtype=torch.float32, device=dev)
    min_slot = torch.empty(n, dtype=torch.int64, device=dev)
    free_slot = torch.empty(n, dtype=torch.int64, device=dev)
    rank = torch.empty(n, dtype=torch.int64, device=dev)
    if n == 0:
        return ent, min_slot, free_slot, rank
    r_pad = triton.next_power_of_2(R)
    block_rows = _block_rows(r_pad)
    m8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.uint8)
    grid = (triton.cdiv(n, block_rows),)
    with torch.cuda.device(dev) if lam.is_cuda else _nullcontext():
        _spectral_entropy_kernel[grid](
            lam, m8, ent, min_slot, free_slot, rank,
            n, R,
            lam.stride(0), lam.stride(1), m8.stride(0), m8.stride(1),
            float(eps),
            BLOCK_ROWS=block_rows,
            R_PAD=r_pad,
        )
    return ent, min_slot, free_slot, rank


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def spectral_entropy_and_slots_torch(
    lam: torch.Tensor, mask: torch.Tensor, eps: float = 1e-12
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch path of :func:`spectral_entropy_and_slots` (same math, no checks)."""
    n, R = lam.shape
    dev = lam.device
    if R == 0:
        z = torch.zeros(n, dtype=torch.int64, device=dev)
        return torch.zeros(n, dtype=torch.float32, device=dev), z - 1, z - 1, z
    lam = _fp32_range(lam.detach(), mask)
    a = torch.where(mask, lam.float().abs(), 0.0)
    amax = a.amax(dim=1, keepdim=True)
    x = a / torch.where(amax > 0, amax, 1.0)
    e = x * x
    total = e.sum(dim=1, keepdim=True)
    s = e / torch.where(total > 0, total, 1.0)
    H = torch.where(mask & (s > 0), -s * torch.log(s + eps), 0.0).sum(dim=1)
    r = mask.sum(dim=1)
    ent = (H / torch.log(r.clamp_min(2).float())).clamp(0.0, 1.0)
    ent = torch.where((r < 2) | (amax[:, 0] == 0), 0.0, ent)
    bad = (mask & ~a.isfinite()).any(dim=1)  # NaN / inf active λ: NaN at every rank, rank 1 too
    ent = torch.where(bad, float("nan"), ent)
    # argmin/argmax return the first extremum on ties (documented), hence "lowest index"
    key = torch.where(mask, a, float("inf"))
    min_slot = torch.where(r > 0, key.argmin(dim=1), -1)
    free_slot = torch.where(mask.all(dim=1), -1, (~mask).to(torch.uint8).argmax(dim=1))
    return ent, min_slot, free_slot, r.to(torch.int64)


def _fp32_range(lam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """λ wider than fp32 (float64) divided by its row's largest active |λ| in its own dtype: the
    entropy does not change, and the fp32 math after it sees neither inf (λ = 1e300) nor 0
    (λ = 1e-300). Narrower λ is returned as it is."""
    if lam.dtype.itemsize <= 4:
        return lam
    amax = torch.where(mask, lam.abs(), 0.0).amax(dim=1, keepdim=True)
    return lam / torch.where(amax > 0, amax, 1.0)


def _check(lam: torch.Tensor, mask: torch.Tensor, eps: float) -> None:
    if not isinstance(lam, torch.Tensor) or lam.dim() != 2 or not torch.is_floating_point(lam):
        got = f"{lam.dtype} tensor of shape {tuple(lam.shape)}" if isinstance(lam, torch.Tensor) else type(lam).__name__
        raise ValueError(f"spectral_entropy: lam must be a 2-D floating tensor [n, r_max], got {got}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != lam.shape:
        got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"spectral_entropy: mask must be a bool tensor of lam's shape {tuple(lam.shape)}, got {got}")
    if mask.device != lam.device:
        raise ValueError(f"spectral_entropy: mask is on {mask.device}, lam on {lam.device}; expected the same device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"spectral_entropy: eps must be a finite number > 0, got {eps!r}")


@torch.no_grad()
def spectral_entropy_and_slots(
    lam: torch.Tensor, mask: torch.Tensor, eps: float = 1e-12, *, backend=None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized spectral entropy of every row, plus the slots the allocator needs, in one pass.

    Args:
        lam: [n, R] λ of n modules (fp32, fp16, bf16, or float64: scaled per row into fp32's
            range first; read detached).
        mask: [n, R] bool, active slots.
        eps: the ε in −Σ s log(s + ε) (> 0).
        backend: "triton", "torch" or None (Triton on CUDA, or on CPU under TRITON_INTERPRET=1
            set before flexlora was imported; the torch path otherwise).

    Returns:
        entropy [n] float32 in [0, 1] (0 when rank < 2 or all active λ are 0);
        min_slot [n] int64: active slot of smallest |λ| (ties → lowest index), −1 if none active;
        free_slot [n] int64: first inactive slot, −1 if all active;
        rank [n] int64: number of active slots.
    """
    _check(lam, mask, eps)
    if _use_triton(lam, backend) and lam.shape[1] > 0:
        return _spectral_entropy_triton(_fp32_range(lam.detach(), mask), mask, eps)
    return spectral_entropy_and_slots_torch(lam, mask, eps)


def _use_triton(lam: torch.Tensor, backend) -> bool:
    return choose_backend(lam, backend) == "triton" and triton_runnable("spectral_entropy", lam, backend, _INTERPRETED)


def spectral_entropy(lam: torch.Tensor, mask: torch.Tensor, eps: float = 1e-12, *, backend=None) -> torch.Tensor:
    """Normalized spectral entropy [n] float32 of lam [n, R] over mask [n, R]; see
    :func:`spectral_entropy_and_slots` for the arguments."""
    return spectral_entropy_and_slots(lam, mask, eps, backend=backend)[0]
