"""Compile the flex_linear Triton kernels for an H100 (sm_90) without a GPU; print one JSON per kernel.

Run by tests/kernels/test_flex_linear_sm90.py in a fresh process without TRITON_INTERPRET (the
kernels must be real JIT functions, not interpreted ones). The launchers run on CPU stand-in
tensors with their kernels replaced by recorders, so every captured launch carries exactly the
arguments the launcher passes on a GPU; each launch is specialised with Triton's own rules
(16-divisible ints and pointers, ints equal to 1 become constants) and compiled by Triton's
compiler and ptxas (shipped with the triton wheel) for sm_90. This checks what the interpreter
cannot: the kernels type-check and lower for Hopper, launchers and kernel signatures agree,
shared memory fits, and the dots map to Hopper tensor cores (wgmma) with pipelined loads.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

fl = importlib.import_module("flexlora.kernels.flex_linear")
assert not fl._INTERPRETED, "run without TRITON_INTERPRET"

TARGET = GPUTarget("cuda", 90, 32)


class _Recorder:
    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def capture(M, K, N, R, dtype, x_lora):
    """Launches made by one forward + backward (grads for x, x_lora, P, lam, Q)."""
    calls = []
    fl._skinny_kernel, skinny = _Recorder(fl._skinny_kernel, calls), fl._skinny_kernel
    fl._fused_kernel_tuned, tuned = _Recorder(fl._fused_kernel, calls), fl._fused_kernel_tuned
    try:
        x = torch.randn(M, K, dtype=dtype)
        xl = torch.randn(M, K, dtype=dtype) if x_lora else None
        w, b = torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
        P, lam, Q = torch.randn(N, R), torch.randn(R), torch.randn(R, K)
        mask = torch.ones(R, dtype=torch.bool)
        _, u = fl._triton_fwd(x, xl, w, b, P, lam, Q, mask, 0.5)
        dy = torch.randn(M, N, dtype=dtype)
        fl._triton_bwd(dy, x, xl, w, P, lam, Q, mask, u, 0.5, (True, x_lora, False, False, True, True, True))
    finally:
        fl._skinny_kernel, fl._fused_kernel_tuned = skinny, tuned
    return calls


def compile_launch(fn, args, kwargs, config=None):
    bound = dict(zip(fn.arg_names, args))
    options = {}
    for k, v in kwargs.items():
        (bound if k in fn.arg_names else options)[k] = v
    if config is not None:
        bound.update(config.kwargs)
        options.update(num_warps=config.num_warps, num_stages=config.num_stages)
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound[p.name]
        if p.is_constexpr:
            sig[p.name], consts[(i,)] = "constexpr", v
            continue
        ty, key = native_specialize_impl(
            BaseBackend, v, False, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        sig[p.name] = ty
        if ty == "constexpr":
            consts[(i,)] = key
        elif key:
            attrs[(i,)] = BaseBackend.parse_attr(key)
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET, options=options)
    ptx = kernel.asm["ptx"]
    return {
        "shared": kernel.metadata.shared,
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
        "cp_async": ptx.count("cp.async"),
        "block_m": bound.get("BLOCK_M"),
    }


def main(which: str) -> None:
    # (name of each launch in call order) for x_lora=False / True
    names = {False: ["u", "y", "dv", "dx", "dP", "dQ"], True: ["u", "y", "dv", "dx", "dx_lora", "dP", "dQ"]}
    cfgs = fl._fused_configs()
    jobs = []
    if which == "bf16":
        for name, call in zip(names[False], capture(64, 256, 512, 64, torch.bfloat16, False)):
            fused = call[0] is fl._fused_kernel
            for cfg in (cfgs[:2] if name == "y" else cfgs[:1]) if fused else [None]:
                jobs.append((f"bf16 {name}" + (f" {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_L']}" if cfg else ""), call, cfg))
        call = dict(zip(names[True], capture(64, 256, 512, 64, torch.bfloat16, True)))["dx_lora"]
        jobs.append(("bf16 dx_lora", call, cfgs[0]))
    elif which == "fp32-tf32":
        # fp32 with torch's TF32 switch on: tf32 tensor-core dots, 4-byte tiles in every stage.
        # The fused GEMM as it runs with autotuning off (its fixed config) must fit.
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        fixed = dict(fl._fixed_meta(torch.float32))
        cfg = triton.Config(fixed, num_stages=fixed.pop("num_stages"), num_warps=fixed.pop("num_warps"))
        for name, call in zip(names[False], capture(64, 256, 512, 64, torch.float32, False)):
            jobs.append((f"fp32-tf32 {name}", call, cfg if call[0] is fl._fused_kernel else None))
    elif which == "fp16-r256":
        calls = dict(zip(names[False], capture(32, 128, 256, 256, torch.float16, False)))
        jobs += [("fp16-r256 y", calls["y"], cfgs[2]), ("fp16-r256 dv", calls["dv"], None)]
    for tag, (fn, args, kwargs), cfg in jobs:
        print(json.dumps({"kernel": tag, **compile_launch(fn, args, kwargs, cfg)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
