"""Benchmark of the FlexLoRA adapter op (``FlexLinear``) against a frozen ``nn.Linear``, PEFT LoRA
and PEFT AdaLoRA at the same rank: forward, backward and forward+backward ("full"), as ratios to
the frozen base measured in the same run.

    python benchmarks/bench_flex_linear.py                 # CUDA if present, else CPU; all modes
    python benchmarks/bench_flex_linear.py --device cpu --mode full --quick

CPU (scaled down, fp32, 2 threads): 2048 tokens, 2048→2048 and 2048→5632, FlexLinear with r_max 64
and 32 active slots and with r_max 32 all active, PEFT at r = 32. Times are wall clock, taken
round-robin over the cases (:func:`_common.interleaved_times_ms`); ``ratio`` is the median over
rounds of (case time / frozen time in the same round), which resists the drift of a shared machine;
``ratio_cpu`` is the same on process CPU time, which stays steady when other jobs share the cores.

CUDA (bf16): LLaMA-3-8B projections 4096→4096, 4096→14336, 14336→4096 at 8192 tokens, r_max 64 with
32 active, timed by ``triton.testing.do_bench``; FlexLinear twice, on the default torch path
(cuBLAS) and on the fused Triton kernels (``--backend`` picks one). Beside each row an analytic cost model: the FLOPs and
bytes the op's math needs at the active rank (every tensor read or written once, in the activation
dtype), the H100 SXM roofline time max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s), and the achieved
fraction roofline / measured.

``--compile MODE`` times every case (the frozen baseline too) through ``torch.compile(module,
mode=MODE)``, e.g. ``reduce-overhead`` (CUDA graphs: the host-side cost of launching the op's
kernels disappears, and mask flips / λ changes replay without re-recording); modes fwd and full.

In every mode x requires grad (so backward computes dx as a training step through a frozen layer
does). "bwd" times ``y.backward(dy, retain_graph=True)`` of a graph built once; "full" times
``module(x).backward(dy)``; gradients are reset to None (untimed) before every call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # run from anywhere, without installing
# Idle OpenMP threads sleep instead of spinning (read once, when torch loads OpenMP). On a machine
# shared with other jobs a spinning thread holds a core its own descheduled sibling needs, and every
# small multi-threaded op then waits a scheduler time slice; on a quiet machine it costs a thread
# wake-up (microseconds) per op. Set OMP_WAIT_POLICY=ACTIVE to time OpenMP's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from _common import (H100_SXM, check_csv_path, cuda_time_ms, format_table, interleaved_times_ms,  # noqa: E402
                     median_ratio, median_ratio_ci, positive_int, write_csv)

MODES = ("fwd", "bwd", "full")
DEFAULT_CASES = "flexlora,peft_lora,peft_adalora"


@dataclass(frozen=True)
class Shape:
    """A projection: M tokens, K → N features."""

    M: int
    K: int
    N: int

    def __str__(self) -> str:
        return f"{self.K}->{self.N}"


@dataclass(frozen=True)
class Case:
    """One benchmarked layer: ``kind`` names the setup factory; r_max = rank for PEFT layers."""

    kind: str
    r_max: int = 0
    rank: int = 0
    backend: Optional[str] = None  # FlexLinear only: "triton" / "torch" forced, None = library's choice

    @property
    def label(self) -> str:
        if self.kind == "frozen":
            return "frozen nn.Linear"
        if self.kind == "flexlora":
            return f"FlexLinear r_max={self.r_max} r={self.rank}" + (f" [{self.backend}]" if self.backend else "")
        return f"{'PEFT LoRA' if self.kind == 'peft_lora' else 'PEFT AdaLoRA'} r={self.rank}"


@dataclass
class Setup:
    """What a factory builds: the layer, its input (requires grad), a gradient for its output,
    and every tensor whose ``.grad`` must be reset between timed calls."""

    module: nn.Module
    x: torch.Tensor
    dy: torch.Tensor
    grads: List[torch.Tensor]


# --------------------------------------------------------------------------------------------
# Setup factories: one per case. All build the same base weights (same seed) on device/dtype.
# --------------------------------------------------------------------------------------------


class _OneLinear(nn.Module):
    """The smallest model PEFT can wrap: one projection named ``proj``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _base(shape: Shape, dtype: torch.dtype, device: str) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(shape.K, shape.N, bias=False, device=device, dtype=dtype)
    lin.weight.requires_grad_(False)
    return lin


def _io(module: nn.Module, shape: Shape, dtype: torch.dtype, device: str) -> Setup:
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(shape.M, shape.K, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(shape.M, shape.N, generator=g).to(device=device, dtype=dtype)
    grads = [x] + [p for p in module.parameters() if p.requires_grad]
    return Setup(module, x, dy, grads)


def make_frozen(shape: Shape, case: Case, dtype: torch.dtype, device: str) -> Setup:
    return _io(_base(shape, dtype, device), shape, dtype, device)


def make_flexlora(shape: Shape, case: Case, dtype: torch.dtype, device: str) -> Setup:
    from flexlora.layers.flex_linear import FlexLinear

    layer = FlexLinear.from_linear(_base(shape, dtype, device), r_max=case.r_max, r_init=case.rank, alpha=2.0 * case.rank)
    with torch.no_grad():  # a mid-training state: λ ≠ 0, active slots scattered over the buffer
        g = torch.Generator(device="cpu").manual_seed(2)
        layer.lam.copy_(torch.randn(case.r_max, generator=g))
        active = torch.randperm(case.r_max, generator=g)[: case.rank]
        layer.mask.zero_()
        layer.mask[active.to(layer.mask.device)] = True
    layer.backend = case.backend
    return _io(layer, shape, dtype, device)


def _peft(shape: Shape, config, dtype: torch.dtype, device: str) -> Setup:
    from peft import get_peft_model

    model = get_peft_model(_OneLinear(_base(shape, dtype, device)), config)
    return _io(model, shape, dtype, device)


def make_peft_lora(shape: Shape, case: Case, dtype: torch.dtype, device: str) -> Setup:
    from peft import LoraConfig

    cfg = LoraConfig(r=case.rank, lora_alpha=2 * case.rank, target_modules=["proj"], lora_dropout=0.0)
    return _peft(shape, cfg, dtype, device)


def make_peft_adalora(shape: Shape, case: Case, dtype: torch.dtype, device: str) -> Setup:
    from peft import AdaLoraConfig

    cfg = AdaLoraConfig(
        init_r=case.rank, target_r=case.rank, total_step=1000, lora_alpha=2 * case.rank,
        target_modules=["proj"], lora_dropout=0.0,
    )
    return _peft(shape, cfg, dtype, device)


FACTORIES: Dict[str, Callable[[Shape, Case, torch.dtype, str], Setup]] = {
    "frozen": make_frozen,
    "flexlora": make_flexlora,
    "peft_lora": make_peft_lora,
    "peft_adalora": make_peft_adalora,
}


def timed_fn(s: Setup, mode: str) -> Callable[[], object]:
    """The zero-argument callable timed for ``mode`` (for "bwd" the graph is built here, once)."""
    if mode == "fwd":
        return lambda: s.module(s.x)
    if mode == "bwd":
        y = s.module(s.x)
        return lambda: y.backward(s.dy, retain_graph=True)
    if mode == "full":
        return lambda: s.module(s.x).backward(s.dy)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _cuda_fn(s: Setup, mode: str, compile_mode: Optional[str]) -> Callable[[], object]:
    """The callable do_bench times for one case on CUDA. Compiled cases are compiled here, one at
    a time after ``torch._dynamo.reset()``: each then has CUDA-graph trees of its own (a case
    recorded into the trees of the cases timed before it had its saved tensors overwritten)."""
    if compile_mode is None:
        return timed_fn(s, mode)
    torch._dynamo.reset()
    s = Setup(torch.compile(s.module, mode=compile_mode), s.x, s.dy, s.grads)
    if compile_mode != "reduce-overhead":
        return timed_fn(s, mode)
    return _new_graph_step(_fresh_leaf_fn(s, mode))


def _fresh_leaf_fn(s: Setup, mode: str) -> Callable[[], object]:
    """As :func:`timed_fn` for CUDA graphs: x is a new leaf (no copy) and every ``.grad`` is reset at
    each call. A first gradient is stored by reference, so a ``.grad`` kept across calls would
    alias a graph's output memory that the next replay overwrites (do_bench resets gradients only
    in its final loop, not while it estimates and warms up)."""

    def call():
        for t in s.grads:
            t.grad = None
        y = s.module(s.x.detach().requires_grad_(True))
        return y if mode == "fwd" else y.backward(s.dy)

    return call


def _new_graph_step(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` preceded by ``torch.compiler.cudagraph_mark_step_begin()``: CUDA-graph trees may then
    reuse the previous call's output memory (do_bench calls ``fn`` back to back, and without the
    mark the next replay refuses to overwrite outputs it thinks are still alive)."""

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        return fn()

    return step


# --------------------------------------------------------------------------------------------
# Analytic cost model (CUDA rows)
# --------------------------------------------------------------------------------------------


def cost(shape: Shape, rank: int, mode: str, elem: int) -> tuple:
    """(FLOPs, bytes) the math of ``mode`` needs at active ``rank`` (0 = frozen base).

    Forward: y = x Wᵀ + ((x Qᵀ)⊙g) Pᵀ, saving u = x Qᵀ. Backward (W frozen): dx = dy W + ((dy P)⊙g) Q,
    dP = dyᵀ (u⊙g), dQ = ((dy P)⊙g)ᵀ x, dλ from u and dy P. Every tensor is read or written once.
    """
    M, K, N, r = shape.M, shape.K, shape.N, rank
    fwd_f = 2 * M * K * N + 2 * M * r * (K + N)
    fwd_b = elem * (M * K + N * K + M * N + r * (K + N) + M * r)
    bwd_f = 2 * M * K * N + 4 * M * r * (K + N)
    bwd_b = elem * (M * N + N * K + M * K + (M * K + M * r + 2 * r * (K + N) if r else 0))
    return {"fwd": (fwd_f, fwd_b), "bwd": (bwd_f, bwd_b), "full": (fwd_f + bwd_f, fwd_b + bwd_b)}[mode]


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def cases_for(rank_configs: Sequence[tuple], kinds: Sequence[str], backends: Sequence[Optional[str]] = (None,)) -> List[Case]:
    """Frozen first (the baseline), then FlexLinear at each (r_max, rank) and backend, then PEFT at each rank."""
    out = [Case("frozen")]
    if "flexlora" in kinds:
        out += [Case("flexlora", r_max, r, b) for b in backends for r_max, r in rank_configs]
    for kind in ("peft_lora", "peft_adalora"):
        if kind in kinds:
            out += [Case(kind, r, r) for r in sorted({r for _, r in rank_configs})]
    return out


def run_shape(shape: Shape, cases: List[Case], modes, dtype, device: str, rounds: int,
              compile_mode: Optional[str] = None) -> List[dict]:
    """Rows of the table for one shape: every mode, every case, ratios to ``cases[0]`` (frozen).

    device "cuda": one ``do_bench`` median per case, plus the cost model; "cpu": ``rounds``
    interleaved rounds, wall and CPU-time medians and per-round ratios. ``compile_mode``: every
    case's module goes through ``torch.compile(mode=compile_mode)`` first.
    """
    setups = {c: FACTORIES[c.kind](shape, c, dtype, device) for c in cases}
    if compile_mode is not None and device == "cpu":  # interleaved rounds: every case compiled up front
        for st in setups.values():
            st.module = torch.compile(st.module, mode=compile_mode)
    all_grads = [t for s in setups.values() for t in s.grads]
    rows = []
    base = cases[0]
    for mode in modes:
        if device == "cuda":
            cuda_ms = {c: cuda_time_ms(_cuda_fn(setups[c], mode, compile_mode), setups[c].grads) for c in cases}
        else:
            fns = {c: timed_fn(setups[c], mode) for c in cases}
            samples = interleaved_times_ms(fns, rounds=rounds, warmup=1, grads_to_none=all_grads)
            del fns  # frees the graphs built for "bwd"
        for c in cases:
            row = {
                "device": device, "dtype": str(dtype).replace("torch.", ""), "M": shape.M, "K": shape.K,
                "N": shape.N, "mode": mode, "case": c.label, "r_max": c.r_max, "rank": c.rank,
                "compile": compile_mode or "eager",
            }
            if device == "cuda":
                flops, nbytes = cost(shape, c.rank, mode, torch.finfo(dtype).bits // 8)
                roof = H100_SXM.time_ms(flops, nbytes)
                row.update(ms=cuda_ms[c], ratio=cuda_ms[c] / cuda_ms[base], GFLOP=flops / 1e9, MB=nbytes / 1e6,
                           roofline_ms=roof, achieved=roof / cuda_ms[c])
            else:
                t, tb = samples[c], samples[base]
                lo, hi = median_ratio_ci(t.wall_ms, tb.wall_ms)
                row.update(ms=statistics.median(t.wall_ms), ratio=median_ratio(t.wall_ms, tb.wall_ms),
                           ratio_ci=f"[{lo:.3f}, {hi:.3f}]", cpu_ms=statistics.median(t.cpu_ms),
                           ratio_cpu=median_ratio(t.cpu_ms, tb.cpu_ms))
            rows.append(row)
    return rows


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", choices=(*MODES, "all"), default="all")
    p.add_argument("--quick", action="store_true", help="one shape, fewer rounds (a smoke run)")
    p.add_argument("--rounds", type=positive_int, default=None, help="CPU rounds per case (default 7, --quick 3)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma list of compared cases")
    p.add_argument("--backend", choices=("triton", "torch"), default=None,
                   help="FlexLinear backend (default: CUDA times both, the Triton kernels and the torch "
                        "path on cuBLAS, as two rows; the CPU run uses the torch path)")
    p.add_argument("--compile", default="none", choices=("none", "default", "reduce-overhead", "max-autotune"),
                   help="time every case through torch.compile(mode=...) (modes fwd and full; default none: eager)")
    p.add_argument("--csv", default=None,
                   help="CSV path (default: benchmarks/results/flex_linear_<device>.csv, the published table, "
                        "written only by a full default run; a run with --quick, --mode, --cases, --rounds, --threads, "
                        "--backend or --compile writes a CSV only where --csv says)")
    args = p.parse_args(argv)
    check_csv_path(p, args.csv)
    kinds = [k.strip() for k in args.cases.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FACTORIES or k == "frozen"]
    if bad:
        p.error(f"--cases: unknown {bad}; choose from flexlora, peft_lora, peft_adalora")
    args.kinds = kinds
    if args.compile != "none" and args.mode == "bwd":
        p.error("--compile: times modes fwd and full (a compiled graph's backward is not re-run alone)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    modes = MODES if args.mode == "all" else (args.mode,)
    compile_mode = None if args.compile == "none" else args.compile
    if compile_mode is not None:
        modes = tuple(m for m in modes if m != "bwd")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        dtype, M = torch.bfloat16, 8192
        dims = [(4096, 4096), (4096, 14336), (14336, 4096)]
        rank_configs = [(64, 32)]
        backends = (args.backend,) if args.backend else ("triton", "torch")
    else:
        torch.set_num_threads(args.threads)
        dtype, M = torch.float32, 2048
        dims = [(2048, 2048), (2048, 5632)]
        rank_configs = [(64, 32), (32, 32)]
        if args.backend == "triton":
            raise SystemExit("--device cpu: the Triton backend runs on CPU only under its interpreter (not a benchmark)")
        os.environ["FLEXLORA_BACKEND"] = "torch"
        backends = (None,)
    if args.quick:
        dims = dims[1:2]
    rounds = args.rounds or (3 if args.quick else 7)
    cases = cases_for(rank_configs, args.kinds, backends)

    where = f"{torch.cuda.get_device_name()}" if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# flex_linear benchmark: {where}, {dtype}, M={M} tokens, torch {torch.__version__}"
          + (f", every case through torch.compile(mode={compile_mode!r})" if compile_mode else ""))
    if args.device == "cpu":
        # other jobs on the same cores inflate small multi-threaded ops most (each one waits for a
        # descheduled thread), so the adapter's ratio is only meaningful on a quiet machine
        print(f"# load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    t_start = time.time()
    rows: List[dict] = []
    for K, N in dims:
        shape = Shape(M, K, N)
        rows += run_shape(shape, cases, modes, dtype, args.device, rounds, compile_mode)
        if args.device == "cuda":
            torch.cuda.empty_cache()

    columns = ["K", "N", "mode", "case", "ms", "ratio"]
    columns += ["ratio_ci", "cpu_ms", "ratio_cpu"] if args.device == "cpu" else ["GFLOP", "MB", "roofline_ms", "achieved"]
    print(format_table(rows, columns))
    if args.device == "cpu":
        print(f"(ms: median wall time; ratio: median over {rounds} interleaved rounds of time / frozen time "
              "in the same round, ratio_ci its 95% bootstrap interval; cpu_ms, ratio_cpu: the same on process CPU "
              "time, steadier on a busy machine)")
    if compile_mode is None:  # the targets are for the eager op
        _print_target(rows)
    print("\nratios to the frozen base (Markdown):\n" + markdown_ratios(rows))
    # only a full default run may replace the published table in benchmarks/results/: a partial
    # one (one mode, fewer cases or rounds, a smoke run) would overwrite it with a subset
    default_run = (not args.quick and compile_mode is None and args.mode == "all" and args.rounds is None
                   and args.backend is None and args.threads == 2 and args.kinds == DEFAULT_CASES.split(","))
    path = args.csv or (os.path.join(_HERE, "results", f"flex_linear_{args.device}.csv") if default_run else None)
    if path:
        write_csv(rows, path)
    if args.device == "cpu":
        print(f"# load average after the run: {os.getloadavg()[0]:.2f}")
    print(f"# {'wrote ' + path if path else 'no CSV written (not a full default run; pass --csv PATH)'} "
          f"({time.time() - t_start:.0f} s)")
    return rows


def markdown_ratios(rows: List[dict], key: str = "ratio") -> str:
    """A Markdown table of ``key`` (e.g. "ratio"): one line per case, one column per (shape, mode)."""
    cols = list(dict.fromkeys((r["K"], r["N"], r["mode"]) for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    val = {(r["case"], r["K"], r["N"], r["mode"]): r[key] for r in rows}
    head = "| case | " + " | ".join(f"{k}→{n} {m}" for k, n, m in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    body = [
        f"| {c} | " + " | ".join(f"{val[(c, k, n, m)]:.2f}×" if (c, k, n, m) in val else "" for k, n, m in cols) + " |"
        for c in cases
    ]
    return "\n".join([head, sep, *body])


def _print_target(rows: List[dict]) -> None:
    """The CPU target of the project: FlexLinear fwd+bwd <= 1.05x the frozen base at 2048->5632, r=32."""
    for r in rows:
        if r["device"] == "cpu" and r["mode"] == "full" and (r["K"], r["N"]) == (2048, 5632) and r["case"].startswith("FlexLinear"):
            verdict = "met" if max(r["ratio"], r["ratio_cpu"]) <= 1.05 else "NOT met"
            print(f"target full <= 1.05x at 2048->5632: {r['case']}: {r['ratio']:.3f}x wall "
                  f"(95% CI {r['ratio_ci']}), {r['ratio_cpu']:.3f}x CPU ({verdict})")


if __name__ == "__main__":
    main()
