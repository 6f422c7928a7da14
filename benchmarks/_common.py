"""Small helpers shared by the benchmark scripts: timing, an analytic roofline, table and CSV output.

Timing
    * CUDA: :func:`cuda_time_ms` wraps ``triton.testing.do_bench`` (median, L2 flushed, grads reset).
    * CPU: :func:`interleaved_times_ms` runs every case once per round, round-robin, rotating the
      start, so that slow drift and bursts of load on a shared machine hit all cases alike; it
      keeps wall and process-CPU time; report medians (and per-round ratios, :func:`median_ratio`,
      with a bootstrap interval, :func:`median_ratio_ci`), never a single run.

Roofline
    :class:`Roofline` gives the lower bound on time of a kernel that must do ``flops`` and move
    ``bytes`` on a device: ``max(flops / peak_flops, bytes / bandwidth)``. :data:`H100_SXM` holds the
    H100 SXM numbers (3.35 TB/s HBM3, 989 TFLOP/s dense bf16/fp16 tensor core).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def reset_grads(tensors: Iterable[torch.Tensor]) -> None:
    """Drop ``.grad`` so that a timed backward allocates fresh gradients instead of accumulating."""
    for t in tensors:
        t.grad = None


@dataclass
class Samples:
    """Per-round samples of one case: wall-clock ms and process CPU ms (all threads, user+sys)."""

    wall_ms: List[float] = field(default_factory=list)
    cpu_ms: List[float] = field(default_factory=list)


def interleaved_times_ms(
    fns: Dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    grads_to_none: Sequence[torch.Tensor] = (),
) -> Dict[str, Samples]:
    """CPU times of each function, ``rounds`` samples each, taken round-robin.

    fns: name -> zero-argument callable (the timed region).
    grads_to_none: tensors whose ``.grad`` is dropped (untimed) before every call.
    Round ``i`` starts at case ``i mod len(fns)`` so that no case always runs first after a pause.
    Both clocks are kept: wall time is what a user waits for; process CPU time (``time.process_time``)
    is what the op costs, and stays steady when other jobs share the cores (wall time then swings
    by 2x or more, CPU time by ~10%).
    Returns name -> :class:`Samples` of ``rounds`` entries, warm-up rounds excluded.
    """
    names = list(fns)
    out: Dict[str, Samples] = {n: Samples() for n in names}
    for rnd in range(warmup + rounds):
        k = rnd % len(names)
        for name in names[k:] + names[:k]:
            reset_grads(grads_to_none)
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            t1, c1 = time.perf_counter(), time.process_time()
            if rnd >= warmup:
                out[name].wall_ms.append((t1 - t0) * 1e3)
                out[name].cpu_ms.append((c1 - c0) * 1e3)
    return out


def median_ratio(times: Sequence[float], base_times: Sequence[float]) -> float:
    """Median over rounds of ``times[i] / base_times[i]`` (both measured in the same round)."""
    return statistics.median(t / b for t, b in zip(times, base_times))


def median_ratio_ci(times: Sequence[float], base_times: Sequence[float], level: float = 0.95,
                    resamples: int = 2000) -> Tuple[float, float]:
    """Percentile-bootstrap interval of :func:`median_ratio`: the rounds are resampled with
    replacement ``resamples`` times (fixed seed, so a CSV can be reproduced from its samples).
    On a shared machine one run's ratio moves by a few percent; the interval says how far."""
    ratios = [t / b for t, b in zip(times, base_times)]
    if len(ratios) < 2:
        return (float("nan"), float("nan"))
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1.0 - level) / 2
    return meds[int(tail * resamples)], meds[min(resamples - 1, int((1.0 - tail) * resamples))]


def cuda_time_ms(fn: Callable[[], object], grads_to_none: Sequence[torch.Tensor] = ()) -> float:
    """Median CUDA time (ms) of ``fn`` by ``triton.testing.do_bench`` (L2 flushed between calls)."""
    from triton.testing import do_bench

    return float(do_bench(fn, grad_to_none=list(grads_to_none) or None, quantiles=[0.5, 0.2, 0.8])[0])


# --------------------------------------------------------------------------------------------
# Roofline
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Roofline:
    """A device's peak numbers: ``bandwidth`` in bytes/s, ``peak_flops`` in FLOP/s."""

    name: str
    bandwidth: float
    peak_flops: float

    def time_ms(self, flops: float, nbytes: float) -> float:
        """Lower bound (ms) on a kernel doing ``flops`` and moving ``nbytes`` through memory."""
        return max(flops / self.peak_flops, nbytes / self.bandwidth) * 1e3


H100_SXM = Roofline("H100 SXM", bandwidth=3.35e12, peak_flops=989e12)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def format_table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    """Plain-text table of ``rows`` (dicts) over ``columns``; floats with 3 significant decimals."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts that must be >= 1 (rounds, repeats, steps, threads): a
    clear usage error at parse time instead of a traceback after the run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def check_csv_path(parser: argparse.ArgumentParser, path: Optional[str]) -> None:
    """Before the run: the --csv path's folder exists (it is created) and takes a file, so a bad
    path is a usage error now rather than a lost run later."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        parser.error(f"--csv: cannot create {folder} ({e.strerror or e})")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        parser.error(f"--csv: cannot write {path}")


def write_csv(rows: Sequence[Dict[str, object]], path: str) -> None:
    """Write ``rows`` (dicts sharing keys; the first row's key order is used) to ``path``."""
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
