"""Where the adapter op's time goes on a GPU: each product of the op timed alone, both ways.

For LLaMA-3-8B projection shapes (bf16, 8192 tokens, r_max 64 with 32 active) this times every
adapter-side product of forward and backward as a cuBLAS call and as the Triton skinny kernel,
the base GEMM plain and with a beta = 1 accumulation, and then the whole op (both backends) under
``torch.profiler`` with its kernels listed. It prints the times in µs; run it alone:

    python benchmarks/profile_flex_linear_cuda.py
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

fl = importlib.import_module("flexlora.kernels.flex_linear")


def us(fn) -> float:
    return 1e3 * float(do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0])


def products(M: int, K: int, N: int, R: int, dt=torch.bfloat16) -> None:
    dev = "cuda"
    x = torch.randn(M, K, device=dev, dtype=dt)
    dy = torch.randn(M, N, device=dev, dtype=dt)
    W = torch.randn(N, K, device=dev, dtype=dt) * K**-0.5
    P = torch.randn(N, R, device=dev, dtype=dt)
    Q = torch.randn(R, K, device=dev, dtype=dt)
    Pf, Qf = P.float(), Q.float()
    mask = torch.zeros(R, dtype=torch.bool, device=dev)
    mask[torch.randperm(R)[: R // 2]] = True
    g, maskf = fl._gates(torch.randn(R, device=dev), mask, 0.5)
    u32 = torch.randn(M, R, device=dev)
    u = u32.to(dt)
    y = torch.empty(M, N, device=dev, dtype=dt)
    dx = torch.empty(M, K, device=dev, dtype=dt)
    rows = []

    def row(name, fn):
        rows.append((name, us(fn)))

    row("base  y = x·Wᵀ", lambda: torch.mm(x, W.t()))
    row("base  y = x·Wᵀ (out=)", lambda: torch.mm(x, W.t(), out=y))
    row("base  y += x·Wᵀ (addmm_ beta=1)", lambda: y.addmm_(x, W.t()))
    row("base  dx = dy·W", lambda: torch.mm(dy, W))
    row("base  dx += dy·W (addmm_ beta=1)", lambda: dx.addmm_(dy, W))
    row("thin  u = x·Qᵀ cuBLAS", lambda: torch.mm(x, Q.t()))
    row("thin  u = x·Qᵀ triton", lambda: fl._skinny(x, x.stride(), Qf, (Qf.stride(1), Qf.stride(0)), maskf, u32,
                                                     u32.stride(), M, K, R))
    row("thin  y += (u⊙g)·Pᵀ cuBLAS addmm_", lambda: y.addmm_(u * g.to(dt), P.t()))
    row("thin  t = (u⊙g)·Pᵀ cuBLAS", lambda: torch.mm(u * g.to(dt), P.t()))
    row("thin  dv = dy·P cuBLAS", lambda: torch.mm(dy, P))
    row("thin  dv = dy·P triton (+dλ parts)", lambda: fl._skinny(dy, dy.stride(), Pf, Pf.stride(), maskf, u32, u32.stride(),
                                                                 M, N, R, rowdot=u32))
    row("thin  dP = dyᵀ·(u⊙g) cuBLAS", lambda: torch.mm(dy.t(), u * g.to(dt)))
    dP = torch.empty(N, R, device=dev)
    row("thin  dP = dyᵀ·(u⊙g) triton", lambda: fl._skinny(dy, (dy.stride(1), dy.stride(0)), u32, u32.stride(), g, dP,
                                                           dP.stride(), N, M, R))
    row("thin  dQ = (dv⊙g)ᵀ·x cuBLAS", lambda: torch.mm((u * g.to(dt)).t(), x))
    dQ = torch.empty(R, K, device=dev)
    row("thin  dQ = (dv⊙g)ᵀ·x triton", lambda: fl._skinny(x, (x.stride(1), x.stride(0)), u32, u32.stride(), g, dQ,
                                                           (dQ.stride(1), dQ.stride(0)), K, M, R))
    row("thin  dx = (dv⊙g)·Q cuBLAS", lambda: torch.mm(u * g.to(dt), Q))
    print(f"\n## {K}->{N}, M={M}, R={R}, {dt}: products alone (µs, do_bench median)")
    for name, t in rows:
        print(f"{name:42s} {t:9.1f}")


def whole_op(M: int, K: int, N: int, R: int, dt=torch.bfloat16) -> None:
    from torch.profiler import ProfilerActivity, profile

    from flexlora.layers.flex_linear import FlexLinear

    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=dt).requires_grad_(False)
    layer = FlexLinear.from_linear(lin, r_max=R, r_init=R // 2, alpha=float(R))
    with torch.no_grad():
        layer.lam.normal_()
    x = torch.randn(M, K, device="cuda", dtype=dt, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=dt)
    for backend in ("frozen", "triton", "torch"):
        mod = lin if backend == "frozen" else layer
        layer.backend = None if backend == "frozen" else backend

        def step():
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            mod(x).backward(dy)

        t = us(step)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"\n## {K}->{N} fwd+bwd [{backend}]: {t:.1f} µs (do_bench); kernels over 5 steps:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help; no options
    if not torch.cuda.is_available():
        raise SystemExit("profile_flex_linear_cuda.py: needs a CUDA device (none is visible)")
    print(torch.cuda.get_device_name(), torch.__version__)
    for K, N in ((4096, 4096), (4096, 14336)):
        products(8192, K, N, 64)
    for K, N in ((4096, 4096), (4096, 14336)):
        whole_op(8192, K, N, 64)
