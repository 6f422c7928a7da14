"""Benchmark: batched spectral entropy (one launch for every module) vs a per-module Python loop.

Case: LLaMA-7B adapters, 32 layers × 7 projections = 224 modules, r_max = 64, random masks
(about half the slots active). Rows, all timed in the same run, as ratios to the per-module loop:

  loop          per module: mask its λ, entropy from torch ops, argmin, argmax (what existing
                implementations do), results stacked at the end
  loop+item     the same with one .item() per module (a host sync each)
  stack+op      stack_lam_mask over the modules + spectral_entropy_and_slots (the allocator's path)
  op            spectral_entropy_and_slots on a prestacked [224, 64] λ/mask

A second table times the orthogonality gradient: per-module loop of loss + backward vs
the batched orthogonal_loss + backward vs the batched add_orthogonal_grad_ (CPU: projection sizes divided by --cpu-shrink to keep the shared box usable).

On CUDA: triton.testing.do_bench (Triton backend for the op); on CPU: interleaved repeats,
median (torch backend). Run: python benchmarks/bench_spectral_entropy.py [--csv out.csv]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # run from anywhere, this checkout's flexlora

import torch  # noqa: E402

from _common import check_csv_path, cuda_time_ms, positive_int, write_csv  # noqa: E402
from flexlora.alloc._batch import stack_lam_mask  # noqa: E402
from flexlora.alloc.orthogonal import add_orthogonal_grad_, orthogonal_loss  # noqa: E402
from flexlora.kernels.spectral_entropy import spectral_entropy_and_slots  # noqa: E402

N_LAYERS, R_MAX = 32, 64
# LLaMA-7B projections: (in_features, out_features)
PROJ = {
    "q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
    "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096),
}


class _Mod:
    """Just the attributes the ops read (no base weight: 224 frozen 7B weights would not fit)."""

    def __init__(self, i, o, R, device, gen, with_factors):
        self.lam = torch.randn(R, generator=gen).to(device)
        self.mask = (torch.rand(R, generator=gen) < 0.5).to(device)
        self.scaling = 2.0
        if with_factors:
            self.P = (torch.randn(o, R, generator=gen) * 0.05).to(device).requires_grad_(True)
            self.Q = (torch.randn(R, i, generator=gen) * 0.05).to(device).requires_grad_(True)


def make_modules(device, with_factors=False, shrink=1):
    gen = torch.Generator().manual_seed(0)
    return [
        _Mod(max(1, i // shrink), max(1, o // shrink), R_MAX, device, gen, with_factors)
        for _ in range(N_LAYERS)
        for (i, o) in PROJ.values()
    ]


def entropy_loop(mods, eps=1e-12, item=False):
    ents, mins, frees = [], [], []
    for m in mods:
        lam2 = torch.where(m.mask, m.lam.float() ** 2, 0.0)
        r = m.mask.sum()
        s = lam2 / lam2.sum().clamp_min(1e-30)
        H = -(s * torch.log(s + eps)).sum()
        e = torch.where(r >= 2, H / torch.log(r.clamp_min(2).float()), 0.0)
        mn = torch.where(m.mask, m.lam.abs(), float("inf")).argmin()
        fr = (~m.mask).to(torch.uint8).argmax()
        if item:
            e, mn, fr = e.item(), mn.item(), fr.item()
        ents.append(e), mins.append(mn), frees.append(fr)
    if item:
        return torch.tensor(ents), torch.tensor(mins), torch.tensor(frees)
    return torch.stack(ents), torch.stack(mins), torch.stack(frees)


def orth_loop(mods, gamma=0.1):
    """The penalty module by module: γ times the mean over modules (as orthogonal_loss defines it)."""
    total = 0.0
    for m in mods:
        mf = m.mask.float()
        M = mf[:, None] * mf[None, :]
        eye = torch.eye(m.P.shape[1], device=m.P.device)
        total = total + (((m.P.t() @ m.P - eye) * M) ** 2).sum() + (((m.Q @ m.Q.t() - eye) * M) ** 2).sum()
    return total * (gamma / len(mods))


H100_SXM_BYTES_PER_S = 3.35e12  # HBM3 bandwidth, for the roofline column


def time_cases(cases, device, rounds, grads=(), base="loop"):
    """name -> (median ms, speedup vs the ``base`` case). CUDA: triton.testing.do_bench (median). CPU: every
    case once per round, round-robin with a rotating start (so load bursts on a shared machine
    hit all cases alike); speedup = median over rounds of the per-round ratio loop / case."""
    if device.type == "cuda":
        ms = {name: cuda_time_ms(fn, grads) for name, fn in cases.items()}  # medians
        return {name: (t, ms[base] / t) for name, t in ms.items()}
    names = list(cases)
    times = {n: [] for n in names}
    warmup = 2
    for rnd in range(warmup + rounds):
        k = rnd % len(names)
        for name in names[k:] + names[:k]:
            for g in grads:
                g.grad = None
            t0 = time.perf_counter()
            cases[name]()
            if rnd >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {
        n: (statistics.median(t), statistics.median(a / b for a, b in zip(times[base], t)))
        for n, t in times.items()
    }


def format_table(rows, columns):
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda or cuda:N (default: cuda where one is visible)")
    ap.add_argument("--rounds", type=positive_int, default=40, help="CPU: interleaved rounds (entropy table)")
    ap.add_argument("--orth-rounds", type=positive_int, default=5, help="CPU: interleaved rounds (orth table)")
    ap.add_argument("--cpu-shrink", type=positive_int, default=8,
                    help="CPU: divide projection sizes by this (orth table)")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="CPU: torch intra-op threads (default 1: the entropy tensors are tiny, and on a loaded "
        "shared box OpenMP's synchronisation costs 50-100x the work itself; 0 = torch's default)",
    )
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = ap.parse_args()
    check_csv_path(ap, args.csv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    backend = "triton" if device.type == "cuda" else "torch"
    rows = []

    mods = make_modules(device)
    lam, mask = stack_lam_mask(mods)
    # same answers before timing anything
    ref = entropy_loop(mods)
    got = spectral_entropy_and_slots(lam, mask, backend=backend)
    assert torch.allclose(got[0], ref[0], atol=1e-5) and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    cases = {
        "loop": lambda: entropy_loop(mods),
        "loop+item": lambda: entropy_loop(mods, item=True),
        "stack+op": lambda: spectral_entropy_and_slots(*stack_lam_mask(mods), backend=backend),
        "op": lambda: spectral_entropy_and_slots(lam, mask, backend=backend),
    }
    # the op reads λ (4 B) and mask (1 B) per slot and writes 28 B per module: launch-bound
    nbytes = lam.numel() * 5 + lam.shape[0] * 28
    for name, (t, speedup) in time_cases(cases, device, args.rounds).items():
        row = {"op": "entropy", "variant": name, "case": f"{len(mods)} modules x r_max {R_MAX}", "ms": t, "speedup_vs_loop": speedup}
        if device.type == "cuda" and name == "op":
            row["roofline_ms"] = nbytes / H100_SXM_BYTES_PER_S * 1e3
        rows.append(row)

    shrink = 1 if device.type == "cuda" else args.cpu_shrink
    fmods = make_modules(device, with_factors=True, shrink=shrink)
    params = [t for m in fmods for t in (m.P, m.Q)]
    a, b = orth_loop(fmods), orthogonal_loss(fmods, 0.1)
    assert torch.allclose(a, b, rtol=1e-4), (a, b)
    cases = {
        "loop": lambda: orth_loop(fmods).backward(),
        "batched": lambda: orthogonal_loss(fmods, 0.1).backward(),
        "in-place grad": lambda: add_orthogonal_grad_(fmods, 0.1),
    }
    for name, (t, speedup) in time_cases(cases, device, args.orth_rounds, grads=params).items():
        case = f"{len(fmods)} modules, LLaMA-7B/{shrink}"
        rows.append({"op": "orth gradient", "variant": name, "case": case, "ms": t, "speedup_vs_loop": speedup})

    # scoring cost of every metric on the same modules (one allocation event), ratio to "entropy"
    from flexlora.alloc.importance import make_importance
    from flexlora.config import IMPORTANCE_METRICS, FlexLoRAConfig

    for m in fmods:
        m.lam.grad = torch.randn_like(m.lam)
        m.P.grad, m.Q.grad = torch.randn_like(m.P), torch.randn_like(m.Q)
    metrics = {}
    for name in IMPORTANCE_METRICS:
        imp = make_importance(FlexLoRAConfig(importance=name))
        imp.update(fmods)
        metrics[name] = (lambda imp=imp: imp.scores(fmods))
    for name, (t, ratio) in time_cases(metrics, device, args.orth_rounds, base="entropy").items():
        case = f"{len(fmods)} modules, LLaMA-7B/{shrink}"
        rows.append({"op": "importance.scores", "variant": name, "case": case, "ms": t, "speedup_vs_loop": ratio})

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    timer = "triton.testing.do_bench" if device.type == "cuda" else "interleaved rounds, medians; speedup = median per-round ratio"
    print(f"device: {dev_name}; entropy backend: {backend}; timer: {timer}")
    cols = ["op", "variant", "case", "ms", "speedup_vs_loop"] + (["roofline_ms"] if device.type == "cuda" else [])
    print(format_table(rows, cols))
    if args.csv:
        write_csv([{c: r.get(c) for c in cols} for r in rows], args.csv)


if __name__ == "__main__":
    main()
