"""Masked FlexLoRA linear: y = x Wᵀ + b + s·((x_lora Qᵀ) ⊙ (λ⊙mask)) Pᵀ, one op, two backends.

Shapes (after flattening leading dims): x, x_lora: [M, K]; W: [N, K]; b: [N]; P: [N, R];
λ, mask: [R]; Q: [R, K]; R = r_max. g = s·λ⊙mask: [R] is the only place λ, the mask and the
scale enter, so inactive slots get exactly zero gradient in P[:, j], λ[j] and Q[j, :] (every
gradient of slot j is a product with g[j] = 0 or with mask[j] = 0), and none of them is ever
a compile-time constant: a rank change (mask flip) never recompiles anything.

Layout of this file: the Triton kernels (defined only when triton imports), their launchers
(check → allocate → launch), the plain-torch path (`_torch_fwd` / `_torch_bwd`, used on CPU),
the `torch.library` custom ops that dispatch to one or the other (so `torch.compile` treats
the op as one opaque node with a fake implementation), and the public :func:`flex_linear`.

Math of both backends, u = x_lora·Qᵀ [M, R] and dv = dy·P [M, R]:
    forward   y   = x·Wᵀ + (u⊙g)·Pᵀ + b
    backward  dx  = dy·W + (dv⊙g)·Q          (x_lora None; else dx = dy·W, dx_lora = (dv⊙g)·Q)
              dP  = dyᵀ·(u⊙g)                 [N, R]
              dλ  = s·mask⊙Σ_m (u⊙dv)         [R]
              dQ  = (dv⊙g)ᵀ·x_lora            [R, K]
Saved for backward: x, x_lora, u (M×R, or M×r over the active slots on the CPU path; small);
nothing M×N.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ._backend import choose_backend, mend_old_interpreter, triton_interpret, triton_runnable

try:  # triton is optional: without it (or on a CPU without the interpreter) the torch path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

Scaling = Union[float, torch.Tensor]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Default on CUDA tensors: the torch path, i.e. cuBLAS for every product (base GEMM accumulating
# onto the rank-R product with beta = 1). Measured on an H100 (bf16, 8192 tokens, LLaMA-3-8B
# projections, r_max 64 with 32 active; docs/benchmarks.md): fwd+bwd 1.08-1.25x the frozen layer
# at 4096→14336 / 14336→4096 (do_bench, two runs), against 1.57-1.67x for the fused Triton
# kernels, whose base GEMM reaches ~0.45 of the roofline where cuBLAS reaches ~0.75. backend="triton" (or
# FLEXLORA_BACKEND=triton) still runs the fused kernels.
CUDA_DEFAULT_BACKEND = "torch"

# Triton decides between compiled kernels and its CPU interpreter when a kernel is defined (at
# import of this module), so that is the moment that counts for the dot-dtype quirk below.
_INTERPRETED = triton is not None and triton_interpret()
if _INTERPRETED:
    mend_old_interpreter()


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit(do_not_specialize=["L", "T"])
    def _skinny_kernel(
        a_ptr, b_ptr, sc_ptr, out_ptr, c_ptr, part_ptr,
        L, T, R,
        stride_al, stride_at, stride_bt, stride_br, stride_ol, stride_or, stride_cl, stride_cr,
        HAS_ROWDOT: tl.constexpr,
        DOT: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """out[L, R] = (A[L, T]·B[T, R]) ⊙ sc[R], a long-by-skinny product with R = r_max small.

        Every adapter-side product of the op is one of these, told apart by strides only:
            u   = (x_lora·Qᵀ) ⊙ mask      L = M, T = K   (+ nothing)
            dv  = (dy·P) ⊙ mask           L = M, T = N   (+ row-dot with u: partial sums of dλ)
            dP  = (dyᵀ·u) ⊙ g             L = N, T = M
            dQᵀ = (x_loraᵀ·dv) ⊙ g        L = K, T = M   (written through dQ's transposed strides)
        The accumulator is fp32 [BLOCK_L, BLOCK_R]; A and B tiles are cast to DOT (the input
        dtype, or fp32 for bf16 under the interpreter, whose bf16 dot is wrong) just before the
        dot. A program whose R-block is all inactive (sc == 0) skips the reduction loop and
        writes exact zeros: inactive slots cost no FLOPs. With HAS_ROWDOT it also writes
        part[pid_l, r] = Σ_{rows of its block} out[l, r]·C[l, r] (fp32), summed on the host into
        dλ: deterministic, unlike atomics.
        Per-row rank cap (later issue): for the L = M products, multiply `acc` by
        (offs_r < cap[offs_l]) right where `sc` is applied.
        """
        pid_l = tl.program_id(0)
        pid_r = tl.program_id(1)
        offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_t = tl.arange(0, BLOCK_T)
        l_ok = offs_l < L
        r_ok = offs_r < R
        offs_l64 = offs_l.to(tl.int64)

        sc = tl.load(sc_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        n_steps = tl.where(tl.max(tl.abs(sc), axis=0) > 0, tl.cdiv(T, BLOCK_T), 0)

        a_ptrs = a_ptr + offs_l64[:, None] * stride_al + offs_t[None, :] * stride_at
        b_ptrs = b_ptr + offs_t[:, None] * stride_bt + offs_r[None, :] * stride_br
        acc = tl.zeros((BLOCK_L, BLOCK_R), dtype=tl.float32)
        for i in range(0, n_steps):
            t_left = T - i * BLOCK_T
            a = tl.load(a_ptrs, mask=l_ok[:, None] & (offs_t[None, :] < t_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_t[:, None] < t_left) & r_ok[None, :], other=0.0)
            acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PRECISION)
            a_ptrs += BLOCK_T * stride_at
            b_ptrs += BLOCK_T * stride_bt
        # a slot scaled by 0 (inactive, or λ = 0) gives exactly 0, also where its column of A·B
        # is not finite (inf in x, a NaN written into an inactive P column / Q row)
        acc = tl.where(sc[None, :] != 0.0, acc * sc[None, :], 0.0)

        out_ptrs = out_ptr + offs_l64[:, None] * stride_ol + offs_r[None, :] * stride_or
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=l_ok[:, None] & r_ok[None, :])
        if HAS_ROWDOT:
            c_ptrs = c_ptr + offs_l64[:, None] * stride_cl + offs_r[None, :] * stride_cr
            c = tl.load(c_ptrs, mask=l_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            tl.store(part_ptr + pid_l * R + offs_r, tl.sum(acc * c, axis=0), mask=r_ok)

    @triton.jit(do_not_specialize=["M"])
    def _fused_kernel(
        a_ptr, b_ptr, u_ptr, g_ptr, v_ptr, bias_ptr, out_ptr,
        M, L, T, R,
        stride_am, stride_at, stride_bt, stride_bl, stride_um, stride_ur, stride_vr, stride_vl,
        stride_om, stride_ol,
        HAS_BASE: tl.constexpr,
        HAS_LORA: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """out[M, L] = A[M, T]·B[T, L] + (U[M, R] ⊙ g[R])·V[R, L] + bias[L], one write of out.

            forward  y       : A = x,  B = Wᵀ, U = u,  V = Pᵀ, bias       (L = N, T = K)
            backward dx      : A = dy, B = W,  U = dv, V = Q              (L = K, T = N)
            backward dx_lora : HAS_BASE off,   U = dv, V = Q
        The fp32 accumulator starts from the rank-R product (R-blocks whose g is all zero are
        skipped), then the base GEMM streams T through it, then the bias is added in the
        epilogue: no M×L temporary, no second pass. Programs are ordered in groups of GROUP_M
        row-blocks so that neighbouring programs share B tiles in L2 (Triton matmul tutorial).
        Per-row rank cap (later issue): multiply `ug` by (offs_r < cap[offs_m]) where g is applied.
        """
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_l = tl.cdiv(L, BLOCK_L)
        num_pid_in_group = GROUP_M * num_pid_l
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_l = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        m_ok = offs_m < M
        l_ok = offs_l < L
        offs_m64 = offs_m.to(tl.int64)
        offs_l64 = offs_l.to(tl.int64)

        acc = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
        if HAS_LORA:
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_ok = offs_r < R
                g = tl.load(g_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)
                if tl.max(tl.abs(g), axis=0) > 0:
                    u = tl.load(
                        u_ptr + offs_m64[:, None] * stride_um + offs_r[None, :] * stride_ur,
                        mask=m_ok[:, None] & r_ok[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    # slots with g = 0 add exactly nothing: their u and V rows are not read into
                    # the product (0·inf would be NaN)
                    g_on = g != 0.0
                    ug = tl.where(g_on[None, :], u * g[None, :], 0.0)
                    v = tl.load(
                        v_ptr + offs_r[:, None] * stride_vr + offs_l64[None, :] * stride_vl,
                        mask=(r_ok & g_on)[:, None] & l_ok[None, :],
                        other=0.0,
                    )
                    acc = tl.dot(ug.to(DOT), v.to(DOT), acc, input_precision=PRECISION)
        if HAS_BASE:
            offs_t = tl.arange(0, BLOCK_T)
            a_ptrs = a_ptr + offs_m64[:, None] * stride_am + offs_t[None, :] * stride_at
            b_ptrs = b_ptr + offs_t[:, None] * stride_bt + offs_l64[None, :] * stride_bl
            for t0 in range(0, T, BLOCK_T):
                t_left = T - t0
                a = tl.load(a_ptrs, mask=m_ok[:, None] & (offs_t[None, :] < t_left), other=0.0)
                b = tl.load(b_ptrs, mask=(offs_t[:, None] < t_left) & l_ok[None, :], other=0.0)
                acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PRECISION)
                a_ptrs += BLOCK_T * stride_at
                b_ptrs += BLOCK_T * stride_bt
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_l, mask=l_ok, other=0.0).to(tl.float32)[None, :]

        out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_l64[None, :] * stride_ol
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & l_ok[None, :])

    def _fused_configs():
        """Autotune table for the fused GEMM on Hopper/Ampere (bf16/fp16 tensor cores)."""
        shapes = [  # BLOCK_M, BLOCK_L, BLOCK_T, num_stages, num_warps
            (128, 256, 64, 3, 8),
            (256, 128, 64, 3, 8),
            (128, 128, 64, 4, 8),
            (128, 128, 32, 4, 4),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 3, 4),
            (32, 64, 64, 3, 4),
        ]
        return [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_L": bl, "BLOCK_T": bt, "GROUP_M": 8}, num_stages=ns, num_warps=nw
            )
            for bm, bl, bt, ns, nw in shapes
        ]

    # Keyed on the layer's shape and rank buffer (L, T, R) and the code path, never on M (the
    # token count changes every batch; tuning per M would re-run the autotuner all the time).
    _fused_kernel_tuned = triton.autotune(
        configs=_fused_configs(), key=["L", "T", "R", "HAS_BASE", "HAS_LORA", "HAS_BIAS"]
    )(_fused_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers: check → allocate → launch
# ---------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _block_r(R: int) -> int:
    """R-block of every kernel: a power of two ≥ 16 (tl.dot's minimum), ≤ 64. Smaller blocks
    let mask-off slots skip more work; larger ones re-read A fewer times."""
    return min(max(16, _next_pow2(R)), 32 if R <= 64 else 64)


def _skinny_blocks(R: int) -> dict:
    """Block sizes of the skinny products, from (r_max) only (they are memory-bound)."""
    if _INTERPRETED:  # few, small programs: the interpreter runs each as numpy, one by one
        return dict(BLOCK_L=16, BLOCK_T=32, BLOCK_R=_block_r(R))
    return dict(BLOCK_L=64, BLOCK_T=64, BLOCK_R=_block_r(R), num_warps=4, num_stages=3)


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        # Triton's interpreter computes bf16 tl.dot wrongly (verified with triton 3.9); fp32
        # operands hold bf16 values exactly, so the result is the bf16 product with fp32 sums.
        return tl.float32 if _INTERPRETED else tl.bfloat16
    return tl.float16 if dtype == torch.float16 else tl.float32


def _torch_matmul_tf32() -> bool:
    """Whether PyTorch runs fp32 CUDA matmuls in TF32.

    Recent torch has ``fp32_precision`` ("tf32", "ieee" or "none"; it reflects the legacy
    switches too), and reading the legacy ``allow_tf32`` after the new API set TF32 raises a
    RuntimeError (mixing the two APIs), so the new attribute is read where it exists."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:  # older torch: only the legacy switch
        return bool(matmul.allow_tf32)


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow PyTorch's own TF32 switch, so both backends round alike."""
    if dtype == torch.float32 and not _INTERPRETED and _torch_matmul_tf32():
        return "tf32"
    return "ieee" if dtype == torch.float32 or _INTERPRETED else "tf32"


def _skinny(a, a_strides, b, b_strides, sc, out, out_strides, L, T, R, rowdot=None):
    """Launch `_skinny_kernel`; returns the partial row-dots [cdiv(L, BLOCK_L), R] when asked."""
    meta = _skinny_blocks(R)
    n_l = triton.cdiv(L, meta["BLOCK_L"])
    part = c = None
    if rowdot is not None:
        c = rowdot
        part = torch.empty(n_l, R, device=out.device, dtype=torch.float32)
    grid = (n_l, triton.cdiv(R, meta["BLOCK_R"]))
    _skinny_kernel[grid](
        a, b, sc, out,
        out if c is None else c, out if part is None else part,
        L, T, R,
        a_strides[0], a_strides[1], b_strides[0], b_strides[1], out_strides[0], out_strides[1],
        0 if c is None else c.stride(0), 0 if c is None else c.stride(1),
        HAS_ROWDOT=rowdot is not None,
        DOT=_dot_dtype(a.dtype),
        PRECISION=_precision(a.dtype),
        **meta,
    )
    return part


# Fixed configs of the fused GEMM: under the interpreter (few, small programs), and on a GPU when
# autotuning is switched off (a middle entry of the autotune table; good at every LLaMA shape).
_FIXED_INTERPRETED = dict(BLOCK_M=16, BLOCK_L=32, BLOCK_T=32, GROUP_M=4)
_FIXED_GPU = dict(BLOCK_M=128, BLOCK_L=128, BLOCK_T=64, GROUP_M=8, num_stages=4, num_warps=8)
# fp32 operands on tensor cores (TF32) stage twice the bytes: four 128x64 + 64x128 fp32 stages are
# 256 KiB, over the 227 KiB an H100 block can have ("out of resource: shared memory" at launch,
# seen on an H100), so fp32 takes 32-deep K steps (128 KiB)
_FIXED_GPU_FP32 = dict(_FIXED_GPU, BLOCK_T=32)


def _fixed_meta(dtype: torch.dtype) -> dict:
    """The fused GEMM's block config where it does not autotune (see above)."""
    if _INTERPRETED:
        return _FIXED_INTERPRETED
    return _FIXED_GPU_FP32 if dtype == torch.float32 else _FIXED_GPU


def _autotune() -> bool:
    """Whether the fused GEMM autotunes on GPU (env ``FLEXLORA_TRITON_AUTOTUNE``, default on).

    Autotuning costs a few seconds per new layer shape (every table entry is compiled and
    timed once, keyed on (L, T, R) and the code path, never on M). Set the variable to 0 where
    many shapes each run once, e.g. the CUDA test-suite: the fixed config computes the same
    function."""
    return os.environ.get("FLEXLORA_TRITON_AUTOTUNE", "1") not in ("0", "")


def _fused(out, M, L, T, R, a=None, a_strides=(0, 0), b=None, b_strides=(0, 0),
           u=None, g=None, v=None, v_strides=(0, 0), bias=None):
    """Launch `_fused_kernel` (autotuned on GPU unless `_autotune()` is off; a fixed config then,
    and one small fixed config under the interpreter)."""
    has_base, has_lora = a is not None, u is not None
    dummy = out
    args = (
        dummy if a is None else a, dummy if b is None else b, dummy if u is None else u,
        dummy if g is None else g, dummy if v is None else v, dummy if bias is None else bias, out,
        M, L, T, R,
        a_strides[0], a_strides[1], b_strides[0], b_strides[1],
        0 if u is None else u.stride(0), 0 if u is None else u.stride(1),
        v_strides[0], v_strides[1], out.stride(0), out.stride(1),
    )
    flags = dict(
        HAS_BASE=has_base, HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        DOT=_dot_dtype(out.dtype), PRECISION=_precision(out.dtype), BLOCK_R=_block_r(R),
    )
    if _INTERPRETED or not _autotune():
        meta = _fixed_meta(out.dtype)
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(L, meta["BLOCK_L"]),)
        _fused_kernel[grid](*args, **flags, **meta)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(L, meta["BLOCK_L"]),)  # noqa: E731
        _fused_kernel_tuned[grid](*args, **flags)


def _gates(lam, mask, scaling):
    """(g = s·λ⊙mask, mask) as fp32 [R] vectors: the kernels read them as data, never constants.
    g is 0 where the mask is off, whatever λ holds there (λ·0 would keep a NaN)."""
    return _gate(lam.to(torch.float32), mask, scaling), mask.to(torch.float32)


def _triton_fwd(x2, xl2, weight, bias, P, lam, Q, mask, scaling):
    """Triton forward on 2-D inputs; same contract as `_torch_fwd` except u is fp32 [M, R]."""
    M, K = x2.shape
    N, R = P.shape
    xl = x2 if xl2 is None else xl2
    g, maskf = _gates(lam, mask, scaling)
    u = torch.empty(M, R, device=x2.device, dtype=torch.float32)
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    if M == 0:
        return y, u
    # u = (x_lora·Qᵀ) ⊙ mask: B[k, r] = Q[r, k]
    _skinny(xl, xl.stride(), Q, (Q.stride(1), Q.stride(0)), maskf, u, u.stride(), M, K, R)
    # y = x·Wᵀ + (u⊙g)·Pᵀ + b: B[k, n] = W[n, k], V[r, n] = P[n, r]
    _fused(
        y, M, N, K, R,
        a=x2, a_strides=x2.stride(), b=weight, b_strides=(weight.stride(1), weight.stride(0)),
        u=u, g=g, v=P, v_strides=(P.stride(1), P.stride(0)), bias=None if bias is None else bias.contiguous(),
    )
    return y, u


def _triton_bwd(dy, x2, xl2, weight, P, lam, Q, mask, u, scaling, needs):
    """Triton backward on 2-D inputs; same contract as `_torch_bwd`."""
    M, K = x2.shape
    N, R = P.shape
    xl = x2 if xl2 is None else xl2
    g, maskf = _gates(lam, mask, scaling)
    dx = dxl = dW = db = dP = dlam = dQ = None
    dev = dy.device
    # dv = (dy·P) ⊙ mask [M, R] in fp32, and in the same pass the partial sums of Σ_m u⊙dv
    dv = torch.empty(M, R, device=dev, dtype=torch.float32)
    part = None
    if M > 0:
        part = _skinny(dy, dy.stride(), P, P.stride(), maskf, dv, dv.stride(), M, N, R, rowdot=u)
    if needs[0]:
        dx = torch.empty(M, K, device=dev, dtype=dy.dtype)
        if M > 0:
            lora = dict(u=dv, g=g, v=Q, v_strides=Q.stride()) if xl2 is None else {}
            _fused(dx, M, K, N, R, a=dy, a_strides=dy.stride(), b=weight, b_strides=weight.stride(), **lora)
    if needs[1] and xl2 is not None:
        dxl = torch.empty(M, K, device=dev, dtype=dy.dtype)
        if M > 0:
            _fused(dxl, M, K, 0, R, u=dv, g=g, v=Q, v_strides=Q.stride())
    if needs[2]:  # frozen in FlexLinear; kept for completeness of the op
        dW = (dy.t() @ x2.to(dy.dtype)).to(weight.dtype)
    if needs[3]:
        db = dy.sum(0).to(weight.dtype)
    if needs[4]:
        dP = torch.zeros(N, R, device=dev, dtype=P.dtype)
        if M > 0:  # dP[n, r] = Σ_m dy[m, n]·u[m, r]·g[r]: A = dyᵀ
            _skinny(dy, (dy.stride(1), dy.stride(0)), u, u.stride(), g, dP, dP.stride(), N, M, R)
    if needs[5]:
        total = part.sum(0) if part is not None else torch.zeros(R, device=dev)
        dlam = (total * scaling).to(lam.dtype)  # dv already carries the mask
    if needs[6]:
        dQ = torch.zeros(R, K, device=dev, dtype=Q.dtype)
        if M > 0:  # dQᵀ[k, r] = Σ_m x_lora[m, k]·dv[m, r]·g[r]: A = x_loraᵀ, out through dQᵀ strides
            _skinny(xl, (xl.stride(1), xl.stride(0)), dv, dv.stride(), g, dQ, (dQ.stride(1), dQ.stride(0)), K, M, R)
    return dx, dxl, dW, db, dP, dlam, dQ


# ---------------------------------------------------------------------------------------------
# Plain-torch path (CPU). H2 tunes the bodies of these two for CPU speed: keep the signatures.
# ---------------------------------------------------------------------------------------------
def _check_inputs(x, weight, bias, P, lam, Q, mask, x_lora, scaling=1.0) -> None:
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"flex_linear: x must be a floating-point tensor, got {got}")
    if x.dim() < 1:
        raise ValueError("flex_linear: x must have at least 1 dimension [..., in_features], got a 0-d tensor")
    for name, t, optional in (("weight", weight, False), ("bias", bias, True), ("P", P, False), ("lam", lam, False),
                              ("Q", Q, False), ("mask", mask, False), ("x_lora", x_lora, True)):
        if not isinstance(t, torch.Tensor) and not (optional and t is None):
            raise TypeError(
                f"flex_linear: {name} must be a tensor{' or None' if optional else ''}, got {type(t).__name__}"
            )
    if weight.dim() != 2:
        raise ValueError(f"flex_linear: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(
            f"flex_linear: x has last dimension {x.shape[-1]}, expected in_features={K} "
            f"(x.shape={tuple(x.shape)})"
        )
    if lam.dim() != 1:
        raise ValueError(f"flex_linear: lam must be 1-D [r_max], got shape {tuple(lam.shape)}")
    R = lam.shape[0]
    for name, t, want, dims in (("P", P, (N, R), "[N, R]"), ("Q", Q, (R, K), "[R, K]"), ("mask", mask, (R,), "[R]")):
        if t.shape != want:  # N, K from weight, R from lam
            raise ValueError(
                f"flex_linear: {name} must have shape {dims} = {want} (N={N}, K={K} from weight, R={R} from lam), "
                f"got {tuple(t.shape)}"
            )
    if mask.dtype != torch.bool:
        raise TypeError(f"flex_linear: mask must be a bool tensor, got dtype {mask.dtype}")
    for name, t in (("P", P), ("lam", lam), ("Q", Q)):
        if not torch.is_floating_point(t):
            raise TypeError(f"flex_linear: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"flex_linear: bias must have shape ({N},), got {tuple(bias.shape)}")
    if x_lora is not None:
        if x_lora.shape != x.shape:
            raise ValueError(
                f"flex_linear: x_lora must have x's shape {tuple(x.shape)}, got {tuple(x_lora.shape)}"
            )
        if x_lora.dtype != x.dtype:
            raise TypeError(f"flex_linear: x_lora must have x's dtype {x.dtype}, got {x_lora.dtype}")
    named = [("weight", weight), ("bias", bias), ("P", P), ("lam", lam), ("Q", Q), ("mask", mask), ("x_lora", x_lora)]
    for name, t in named:
        if t is not None and t.device != x.device:
            raise ValueError(f"flex_linear: {name} is on {t.device}, expected x's device {x.device}")
    if isinstance(scaling, torch.Tensor):
        if scaling.dim() != 0:
            raise ValueError(f"flex_linear: scaling must be a float or a 0-d tensor, got shape {tuple(scaling.shape)}")
    elif not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"flex_linear: scaling must be a float or a 0-d tensor, got {type(scaling).__name__}")


def _wide(lam: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """λ in the wider of its dtype and the compute dtype dt, so that s·λ is formed without an
    extra rounding (λ stored in bf16, computing in fp32: the product must not round to bf16)."""
    return _cast(lam, torch.promote_types(lam.dtype, dt))


def _gate(lam: torch.Tensor, mask: torch.Tensor, scaling: Scaling) -> torch.Tensor:
    """g = s·λ⊙mask, [R], in λ's dtype: exactly 0 where the mask is off, whatever λ holds there."""
    return torch.where(mask, lam * scaling, 0.0)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; t itself when it already is (``.to`` costs a dispatch even then)."""
    return t if t.dtype == dtype else t.to(dtype)


def _active_slots(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Indices of the active slots on CPU when some are inactive; None when every slot is active
    or on other devices (then all R slots are computed, with no gather).

    On CPU the adapter GEMMs cost time in proportion to their width, so the torch path works on
    the r active slots only (index_select of P columns / Q rows: [N, r] and [r, K], small copies).
    ``nonzero`` reads the mask on the host: free on CPU, a sync on CUDA, so CUDA (where this path
    runs only when forced) keeps all R slots. The data-dependent r is invisible to torch.compile:
    under compile this runs inside the flexlora::flex_linear custom op, whose outputs keep their
    full shapes (only the eager autograd.Function keeps u at width r between the passes).
    """
    if mask.device.type != "cpu":
        return None
    idx = mask.nonzero().squeeze(1)
    return None if idx.numel() == mask.numel() else idx


def _thin_transposed(width: int) -> bool:
    """Whether the CPU path computes a thin product of the given width transposed.

    MKL's fp32 GEMM is several times slower when the thin side of the output is a width not a
    multiple of 16 (one AVX-512 register) than when that width is the output's row count: at
    M = 1024, N = 512, width 8, dy·P takes 0.43 ms and (Pᵀ·dyᵀ)ᵀ 0.17 ms, dyᵀ·u 0.73 ms and
    (uᵀ·dy)ᵀ 0.16 ms; at width 16 or 32 the plain order is as fast or faster (measured on the
    project's AVX-512 EPYC machine, see docs/kernels.md). The choice depends on the width only,
    so it is fixed for a given rank: results are deterministic.
    """
    return width % 16 != 0


def _thin(a: torch.Tensor, b: torch.Tensor, transposed: bool) -> torch.Tensor:
    """a·b for a: [L, T], b: [T, w] with w small; computed as (bᵀ·aᵀ)ᵀ when `transposed`
    (the result is then a [L, w] view of a [w, L] tensor: columns are contiguous)."""
    return torch.mm(b.t(), a.t()).t() if transposed else torch.mm(a, b)


def _torch_fwd(x2, xl2, weight, bias, P, lam, Q, mask, scaling):
    """Torch-path forward on 2-D inputs.

    x2: [M, K]; xl2: [M, K] or None (then x2 feeds the adapter); weight: [N, K]; bias: [N] or
    None; P: [N, R]; lam, mask: [R]; Q: [R, K]; scaling: float or 0-d tensor.
    Returns (y [M, N] in x2's dtype, u, slots, gathered): u = xl2·Qᵀ, saved for backward. slots
    None: u is [M, R] (every slot; off CPU, or every slot active). Otherwise slots is the [r]
    index of the active slots and u is [M, r], their columns only (:func:`_full_u` widens it).
    gathered: (P [N, r], Q [r, K], s·λ [r]) of those slots in x2's dtype, which backward may
    reuse instead of gathering again; off CPU (P, Q, g = s·λ⊙mask) over all R slots, cast once.
    """
    dt = x2.dtype
    xl = x2 if xl2 is None else xl2
    if x2.device.type != "cpu":  # CUDA (cuBLAS): all R slots, no host sync
        Qc, Pc, g = _cast(Q, dt), _cast(P, dt), _cast(_gate(_wide(lam, dt), mask, scaling), dt)
        u = torch.mm(xl, Qc.t())
        # the base GEMM accumulates onto the rank-R product in its epilogue: on an H100 at
        # 4096→14336 this saves 0.15 ms against a read-modify-write pass of y afterwards
        y = _base_onto(x2, weight, bias, u * g, Pc, dt)
        return y, u, None, (Pc, Qc, g)
    # CPU: the r active slots only (index_select of P columns / Q rows: small copies)
    slots = _active_slots(mask)
    Pa, Qa, ga = _gather_slots(P, lam, Q, slots, scaling, dt)
    if ga.numel() and not bool(ga.all()):
        # An active slot with λ = 0 (just expanded): the output product runs over the live slots
        # (λ != 0) only, so the new slot leaves its width, hence BLAS's blocking and every bit
        # of y, unchanged (zero-impact expansion is bit-identical); its u still feeds dλ.
        u, ug_live, P_live = _u_split_live(xl, Qa, Pa, ga)
    else:
        u = _thin(xl, Qa.t(), _thin_transposed(ga.numel()))  # [M, r]
        ug_live, P_live = u * ga, Pa  # s·λ folded into the [M, r] factor
    y = _base_onto(x2, weight, bias, ug_live, P_live, dt)
    return y, u, slots, (Pa, Qa, ga)


def _gather_slots(P, lam, Q, slots, scaling, dt):
    """(P [N, r], Q [r, K], s·λ [r]) of the given [r] slots (all R when slots is None), in dt.
    No mask factor: the caller passes active slots only, or every slot is active."""
    if slots is not None:
        P, lam, Q = P.index_select(1, slots), lam.index_select(0, slots), Q.index_select(0, slots)
    return _cast(P, dt), _cast(Q, dt), _cast(_wide(lam, dt) * scaling, dt)


def _base_onto(x2, weight, bias, ug, Pl, dt):
    """y = x2·Wᵀ + ug·Plᵀ (+ b), [M, N]: the rank-r product (+ b) is written first and the base
    GEMM accumulates onto it (beta = 1), reading y inside its compute-bound blocks. Adding the
    product to y afterwards costs a separate read-modify-write pass over y [M, N], by then out of
    cache: 0.25-0.6 ms a module at the CPU LLaMA benchmark's shapes (M 1024, r 8), ~2 % of its
    step (docs/kernels.md)."""
    w, b = _cast(weight, dt), None if bias is None else _cast(bias, dt)
    if ug.shape[1] == 0:
        return F.linear(x2, w, b)
    y = torch.mm(ug, Pl.t()) if b is None else torch.addmm(b, ug, Pl.t())
    return y.addmm_(x2, w.t())


def _u_split_live(xl, Qa, Pa, ga):
    """When some active slots have λ = 0: u over the active slots [M, r] (slot-major), and the
    live slots' (u⊙g [M, l], P [N, l]) for the output product."""
    live, idle = ga.ne(0).nonzero().squeeze(1), ga.eq(0).nonzero().squeeze(1)
    u = xl.new_empty(Qa.shape[0], xl.shape[0]).t()  # slot-major, as backward reads it
    ul = _thin(xl, Qa.index_select(0, live).t(), _thin_transposed(live.numel()))
    u.index_copy_(1, live, ul)
    u.index_copy_(1, idle, _thin(xl, Qa.index_select(0, idle).t(), _thin_transposed(idle.numel())))
    return u, ul * ga.index_select(0, live), Pa.index_select(1, live)


def _full_u(u: torch.Tensor, slots: Optional[torch.Tensor], R: int) -> torch.Tensor:
    """u [M, R] from the forward's (u, slots): inactive columns 0."""
    if slots is None:
        return u
    return u.new_zeros(R, u.shape[0]).index_copy_(0, slots, u.t()).t()


def _torch_bwd(dy, x2, xl2, weight, P, lam, Q, mask, u, scaling, needs, slots=None, gathered=None):
    """Torch-path backward on 2-D inputs.

    dy: [M, N]; the other tensors as in :func:`_torch_fwd`; u [M, R] (every slot), or [M, r]
    when `slots` (the [r] active indices, from the forward) is given; gathered: the forward's
    (P, Q, s·λ) of its slots, or None (then gathered here). needs: 7 bools, whether a
    gradient is wanted for (x, x_lora, weight, bias, P, lam, Q).
    Returns (dx, dx_lora, dweight, dbias, dP, dlam, dQ), None where not needed. Gradients of
    inactive slots are exactly 0.0 (products with g = 0 or mask = 0, or never computed).
    """
    s = scaling
    dt = dy.dtype
    acc = torch.promote_types(dt, torch.float32)  # dλ's sums: fp32 for low precision, else dt
    xl = x2 if xl2 is None else xl2
    if slots is None and u.shape[1] == mask.numel():
        slots = _active_slots(mask)
        if slots is not None:
            u = u.t().index_select(0, slots).t()  # [M, r], slot-major
    idx, ua = slots, u
    if gathered is not None and gathered[2].dtype == dt:  # the forward's slots (all or some)
        (Pa, Qa, ga), dlam_scale = gathered, s
        if x2.device.type != "cpu":  # all R slots, some may be inactive: dλ needs the mask
            dlam_scale = mask.to(acc) * s
    elif idx is None:  # all R slots: the mask enters through g and the dλ factor
        Pa, Qa, ga = _cast(P, dt), _cast(Q, dt), _cast(_gate(_wide(lam, dt), mask, s), dt)
        dlam_scale = mask.to(acc) * s
    else:  # the r active slots only; the gradients of the others are filled with 0.0
        (Pa, Qa, ga), dlam_scale = _gather_slots(P, lam, Q, idx, s, dt), s
    tr = _thin_transposed(Pa.shape[1])
    dx = dxl = dW = db = dP = dlam = dQ = None
    # the two thin products that read dy [M, N] first, back to back while it is in cache (the
    # base GEMM dy·W evicts it): 0.15-0.4 ms a module at the CPU LLaMA benchmark's shapes
    dv = _thin(dy, Pa, tr)  # [M, r]
    if needs[4]:
        dP = _cast(_thin(dy.t(), ua * ga, tr), P.dtype)  # [N, r]
        if idx is not None:
            dP = P.new_zeros(P.shape).index_copy_(1, idx, dP)
    dvg = dv * ga
    if needs[0]:
        if xl2 is None:  # dy·W accumulates onto (dv⊙g)·Q, as the forward's y (beta = 1)
            dx = _base_onto(dy, weight.t(), None, dvg, Qa.t(), dt)
        else:
            dx = torch.mm(dy, _cast(weight, dt))
    if needs[1] and xl2 is not None:
        dxl = torch.mm(dvg, Qa)
    if needs[2]:
        dW = torch.mm(dy.t(), x2).to(weight.dtype)
    if needs[3]:
        db = dy.sum(0).to(weight.dtype)
    if needs[5]:
        # dλ_j = s·mask_j·Σ_m u[m, j]·dv[m, j]: one fused dot per column, summed in `acc` (fp32
        # sums would cost float64 inputs 8 of their 16 digits)
        dlam = _cast(torch.linalg.vecdot(_cast(ua, acc), _cast(dv, acc), dim=0) * dlam_scale, lam.dtype)
        if idx is not None:
            dlam = lam.new_zeros(lam.shape).index_copy_(0, idx, dlam)
    if needs[6]:
        dQ = _cast(torch.mm(dvg.t(), xl), Q.dtype)
        if idx is not None:
            dQ = Q.new_zeros(Q.shape).index_copy_(0, idx, dQ)
    return dx, dxl, dW, db, dP, dlam, dQ


# ---------------------------------------------------------------------------------------------
# torch.library ops: one opaque node for torch.compile, with fake shapes and an autograd formula
# ---------------------------------------------------------------------------------------------
def _scale(scaling: float, scaling_t: Optional[torch.Tensor]) -> Scaling:
    return scaling if scaling_t is None else scaling_t


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make that x's device (multi-GPU, DDP)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(x, x_lora, weight, bias, P, lam, Q, mask, s, backend):
    """One forward on 2-D inputs through the chosen backend: (y [M, N], u, slots, gathered), u
    [M, R] when slots is None, else [M, r] over the slots (torch path on CPU); gathered: see
    :func:`_torch_fwd` (None on Triton)."""
    if backend == "triton":
        with _on_device(x):
            return (*_triton_fwd(x, x_lora, weight, bias, P, lam, Q, mask, s), None, None)
    return _torch_fwd(x, x_lora, weight, bias, P, lam, Q, mask, s)


def _backward(dy, x, x_lora, weight, P, lam, Q, mask, u, s, backend, needs, slots=None, gathered=None):
    """One backward on 2-D inputs through the chosen backend: the 7 gradients, None where not needed."""
    if backend == "triton":
        with _on_device(dy):
            return _triton_bwd(dy, x, x_lora, weight, P, lam, Q, mask, u, s, needs)
    return _torch_bwd(dy.contiguous(), x, x_lora, weight, P, lam, Q, mask, u, s, needs, slots, gathered)


@torch.library.custom_op("flexlora::flex_linear", mutates_args=())
def _op_fwd(
    x: torch.Tensor,
    x_lora: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    P: torch.Tensor,
    lam: torch.Tensor,
    Q: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    scaling_t: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D forward: returns (y [M, N], u [M, R]); u is returned only to be saved for backward."""
    y, u, slots, _ = _forward(x, x_lora, weight, bias, P, lam, Q, mask, _scale(scaling, scaling_t), backend)
    return y, _full_u(u, slots, mask.numel()).contiguous()  # the fake's shape and layout


@_op_fwd.register_fake
def _op_fwd_fake(x, x_lora, weight, bias, P, lam, Q, mask, scaling, scaling_t, backend):
    M, N, R = x.shape[0], weight.shape[0], P.shape[1]
    u_dtype = torch.float32 if backend == "triton" else x.dtype
    return x.new_empty(M, N), x.new_empty(M, R, dtype=u_dtype)


@torch.library.custom_op("flexlora::flex_linear_backward", mutates_args=())
def _op_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    x_lora: Optional[torch.Tensor],
    weight: torch.Tensor,
    P: torch.Tensor,
    lam: torch.Tensor,
    Q: torch.Tensor,
    mask: torch.Tensor,
    u: torch.Tensor,
    scaling: float,
    scaling_t: Optional[torch.Tensor],
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-D backward: (dx, dx_lora, dweight, dbias, dP, dlam, dQ); an empty tensor where not needed."""
    grads = _backward(dy, x, x_lora, weight, P, lam, Q, mask, u, _scale(scaling, scaling_t), backend, tuple(needs))
    # contiguous, as the fake promises: a thin product computed transposed (a width not a
    # multiple of 16) is a transposed view, and inductor checks the strides at run time
    return tuple(dy.new_empty(0) if gr is None else gr.contiguous() for gr in grads)


@_op_bwd.register_fake
def _op_bwd_fake(dy, x, x_lora, weight, P, lam, Q, mask, u, scaling, scaling_t, backend, needs):
    shapes = [
        (needs[0], x.shape, dy.dtype),
        (needs[1] and x_lora is not None, x.shape, dy.dtype),
        (needs[2], weight.shape, weight.dtype),
        (needs[3], weight.shape[:1], weight.dtype),
        (needs[4], P.shape, P.dtype),
        (needs[5], lam.shape, lam.dtype),
        (needs[6], Q.shape, Q.dtype),
    ]
    return tuple(dy.new_empty(shape if need else (0,), dtype=dt if need else dy.dtype) for need, shape, dt in shapes)


def _op_setup_context(ctx, inputs, output):
    x, x_lora, weight, bias, P, lam, Q, mask, scaling, scaling_t, backend = inputs
    ctx.save_for_backward(x, x_lora, weight, P, lam, Q, mask, output[1], scaling_t)
    ctx.scaling = scaling
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _op_backward(ctx, dy, du):
    x, x_lora, weight, P, lam, Q, mask, u, scaling_t = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:7]]
    needs[1] = needs[1] and x_lora is not None
    grads = _op_bwd(dy, x, x_lora, weight, P, lam, Q, mask, u, ctx.scaling, scaling_t, ctx.backend, needs)
    # scaling is a constant of the layer (alpha / r_init): no gradient, also when given as a tensor
    return (*[gr if need else None for gr, need in zip(grads, needs)], None, None, None, None)


_op_fwd.register_autograd(_op_backward, setup_context=_op_setup_context)


def _eager_forward(x, x_lora, weight, bias, P, lam, Q, mask, scaling, scaling_t, backend):
    """Forward of the eager Functions: (y, u, slots, P_a, Q_a, g_a). u stays compact ([M, r] over
    the active slots) between the two passes, and backward reuses the forward's gathered factors
    of those slots; P_a / Q_a are None where they are P / Q themselves (every slot active)."""
    y, u, slots, gathered = _forward(x, x_lora, weight, bias, P, lam, Q, mask, _scale(scaling, scaling_t), backend)
    Pa, Qa, ga = gathered or (None, None, None)
    return y, u, slots, None if Pa is P else Pa, None if Qa is Q else Qa, ga


@torch.autograd.function.once_differentiable
def _eager_backward(ctx, dy, *_):
    """Backward of the eager Functions, from ctx.saved_tensors = (x, x_lora, weight, P, lam, Q,
    mask, u, slots, P_a, Q_a, g_a, scaling_t)."""
    if dy is None:  # no gradient reached y (grads are not materialized)
        return (None,) * 11
    x, x_lora, weight, P, lam, Q, mask, u, slots, Pa, Qa, ga, scaling_t = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:7])
    needs = needs[:1] + (needs[1] and x_lora is not None,) + needs[2:]
    gathered = None if ga is None else (P if Pa is None else Pa, Q if Qa is None else Qa, ga)
    grads = _backward(dy, x, x_lora, weight, P, lam, Q, mask, u, _scale(ctx.scaling, scaling_t), ctx.backend, needs,
                      slots, gathered)
    return (*[gr if need else None for gr, need in zip(grads, needs)], None, None, None, None)


class _EagerFlexLinear(torch.autograd.Function):
    """The same forward and backward as the custom op, for eager mode.

    A ``torch.library`` custom op costs ~0.25 ms more Python per call and backward (schema
    checks, pytree work, a second custom op for the backward): 10 ms a step on the CPU LLaMA
    benchmark (40 adapted modules), and on a GPU it is launch latency the kernels cannot hide.
    Eager calls take a plain ``autograd.Function`` (one Python frame each way); traced calls
    (``torch.compile``) take the custom op, which dynamo keeps as one opaque node.

    This one keeps forward and setup_context apart, as torch.func (grad, vmap, ...) requires; it
    runs when a functorch transform is active. Otherwise :class:`_FastEagerFlexLinear` runs.
    """

    @staticmethod
    def forward(x, x_lora, weight, bias, P, lam, Q, mask, scaling, scaling_t, backend):
        return _eager_forward(x, x_lora, weight, bias, P, lam, Q, mask, scaling, scaling_t, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_lora, weight, bias, P, lam, Q, mask, scaling, scaling_t, backend = inputs
        ctx.save_for_backward(x, x_lora, weight, P, lam, Q, mask, *output[1:], scaling_t)
        ctx.scaling, ctx.backend = scaling, backend
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        # the 5 side outputs never get a gradient: without this, autograd would allocate and
        # zero-fill one per output ([M, r], [N, r], ...) for every backward call
        ctx.set_materialize_grads(False)

    backward = staticmethod(_eager_backward)


# Function.apply binds its arguments to forward's signature on every call (for torch.func); a
# precomputed signature spares inspect rebuilding it each time (~25 µs a call).
_EagerFlexLinear.forward.__signature__ = inspect.signature(_EagerFlexLinear.forward)


class _FastEagerFlexLinear(torch.autograd.Function):
    """:class:`_EagerFlexLinear` with forward and context in one method, and y its only output.

    Function.apply of the split form binds every call's arguments to forward's signature, and
    turns the five side outputs into graph outputs (wrapped, marked non-differentiable): ~60 µs
    of Python per forward + backward that this form skips (fwd+bwd of a layer at M = 1: 0.46 ->
    0.40 ms; the 150 adapted modules of SmolLM2-135M pay that fixed cost every step). torch.func cannot run this form, so
    :func:`_eager_apply` picks the split one while a functorch transform is active.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, P, lam, Q, mask, scaling, scaling_t, backend):
        y, *side = _eager_forward(x, x_lora, weight, bias, P, lam, Q, mask, scaling, scaling_t, backend)
        ctx.save_for_backward(x, x_lora, weight, P, lam, Q, mask, *side, scaling_t)
        ctx.scaling, ctx.backend = scaling, backend
        return y

    backward = staticmethod(_eager_backward)


# A private torch function (stable since torch 2.0); where a build lacks it, every eager call
# takes the torch.func-safe Function.
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _eager_apply(*args) -> torch.Tensor:
    """y of the eager Function for (x, x_lora, weight, bias, P, lam, Q, mask, scaling,
    scaling_t, backend)."""
    if _functorch_active():
        # torch.func hands backward functorch-wrapped tensors, which a Triton launch cannot read
        # ("Cannot access storage of TensorWrapper"): both passes take the torch path there
        return _EagerFlexLinear.apply(*args[:-1], "torch")[0]
    return _FastEagerFlexLinear.apply(*args)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def _resolve_backend(x: torch.Tensor, backend: Optional[str]) -> str:
    """The backend that runs (x's device and dtype, `backend`, env), with errors for impossible asks."""
    chosen = choose_backend(x, backend, cuda_default=CUDA_DEFAULT_BACKEND)
    if chosen != "triton":
        return chosen
    problem = None
    if x.dtype not in _TRITON_DTYPES:
        problem = f"the Triton kernels support x of dtype float32, float16 or bfloat16, got {x.dtype}"
    return "triton" if triton_runnable("flex_linear", x, backend, _INTERPRETED, problem) else "torch"


@torch.compiler.assume_constant_result
def _resolve_backend_traced(device_type: str, dtype: torch.dtype, backend: Optional[str]) -> str:
    return _resolve_backend(torch.empty(0, device=device_type, dtype=dtype), backend)


def flex_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    P: torch.Tensor,
    lam: torch.Tensor,
    Q: torch.Tensor,
    mask: torch.Tensor,
    scaling: Scaling,
    *,
    x_lora: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Masked FlexLoRA linear: ``y = x Wᵀ + b + s·((x_lora Qᵀ) ⊙ (λ⊙mask)) Pᵀ``.

    Args:
        x: [..., K] input (fp32, fp16 or bf16 on the Triton path, any float on the torch path;
            any leading dims; need not be contiguous).
        weight: [N, K] base weight; bias: [N] or None.
        P: [N, R], lam: [R], Q: [R, K] adapter factors (any float dtype; the products run in
            x's dtype with fp32 accumulation on the Triton path).
        mask: [R] bool, active slots (R = r_max).
        scaling: s, a float or a 0-d tensor (a constant: it gets no gradient).
        x_lora: optional [..., K] input of the adapter branch only (e.g. dropout(x)), same dtype
            as x; x is used when None.
        backend: "triton", "torch" or None: the torch path (cuBLAS) for CUDA tensors, where it
            measures faster than the fused Triton kernels (:data:`CUDA_DEFAULT_BACKEND`); Triton for
            CPU tensors when TRITON_INTERPRET=1; the torch path otherwise. Env FLEXLORA_BACKEND
            sets the default.

    Returns:
        y: [..., N] in x's dtype (in the autocast dtype inside ``torch.autocast``, as
        ``nn.Linear``). Differentiable in x, x_lora, weight, bias, P, lam and Q.
    """
    _check_inputs(x, weight, bias, P, lam, Q, mask, x_lora, scaling)
    x, x_lora = _autocast_inputs(x, x_lora)
    if torch.compiler.is_compiling():
        # Decided once per traced graph from static facts (device, dtype, env); keeps dynamo out
        # of choose_backend's lru_cache / importlib internals.
        chosen = _resolve_backend_traced(x.device.type, x.dtype, backend)
    else:
        chosen = _resolve_backend(x, backend)
    return _call_op(x, weight, bias, P, lam, Q, mask, scaling, x_lora, chosen)


def _autocast_inputs(x, x_lora):
    """Inside ``torch.autocast`` cast the inputs to the autocast dtype, as ``nn.Linear`` does: a
    custom op is opaque to autocast, and without this the base GEMM would silently run in fp32
    (the op computes in x's dtype, casting W, P and Q to it)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev) or x.dtype == torch.float64:
        return x, x_lora  # autocast leaves float64 alone (nn.Linear stays float64 there too)
    dt = torch.get_autocast_dtype(dev)
    return x.to(dt), None if x_lora is None else x_lora.to(dt)


def _call_op(x, weight, bias, P, lam, Q, mask, scaling, x_lora, backend):
    M, K = x.shape[:-1].numel(), x.shape[-1]
    # M spelled out: reshape(-1, 0) is ambiguous (in_features = 0 gives y = b, as F.linear)
    x2 = x.reshape(M, K)
    xl2 = None if x_lora is None else x_lora.reshape(M, K)
    if isinstance(scaling, torch.Tensor):
        # fp32 at least, float64 kept (a float64 s rounded to fp32 cost float64 math 8 digits)
        s, s_t = 1.0, scaling.to(device=x.device, dtype=torch.promote_types(scaling.dtype, torch.float32))
    else:
        s, s_t = float(scaling), None
    if torch.compiler.is_compiling():
        y, _ = torch.ops.flexlora.flex_linear(x2, xl2, weight, bias, P, lam, Q, mask, s, s_t, backend)
    else:
        y = _eager_apply(x2, xl2, weight, bias, P, lam, Q, mask, s, s_t, backend)
        shape = (*x.shape[:-1], weight.shape[0])
        if tuple(y.shape) == shape:
            return y
        if y.is_contiguous():
            # not a view, as F.linear's output is not: FSDP2 warns about a module returning a view
            # (an in-place `out += residual` on it would drop its pre-backward hook)
            return torch.ops.aten._unsafe_view(y, shape)
    return y.reshape(*x.shape[:-1], weight.shape[0])
