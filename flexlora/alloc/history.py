"""Allocation history: one row per module per event, CSV output and a rank heat map (paper Fig. 2).

A row is a plain dict ``{"step": int, "module": str, "rank": int, "score": float}`` (Python
scalars only, so a history pickles with ``torch.save`` and loads with ``weights_only=True``).
The allocator writes one row per module at step 0 (initial ranks) and one after every event
(ranks after the event, the score that drove it).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Dict, Iterable, List, Sequence, Tuple, Union

from .._atomic import replace_file

HISTORY_FIELDS = ("step", "module", "rank", "score")

Row = Dict[str, Union[int, float, str]]


def make_rows(step: int, names: Sequence[str], ranks: Sequence[int], scores: Sequence[float]) -> List[Row]:
    """One row per module: names, ranks and scores are parallel sequences of Python scalars."""
    if not len(names) == len(ranks) == len(scores):
        raise ValueError(
            f"make_rows: names, ranks and scores must have one entry per module, got "
            f"{len(names)}, {len(ranks)}, {len(scores)}"
        )
    return [
        {"step": int(step), "module": str(n), "rank": int(r), "score": float(s)}
        for n, r, s in zip(names, ranks, scores)
    ]


def write_history_csv(history: Iterable[Row], path: Union[str, os.PathLike]) -> str:
    """Write rows as CSV with header ``step,module,rank,score``; returns the path.

    Written to a temporary file then renamed, so a failed write leaves any previous file intact.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in HISTORY_FIELDS})
    path = os.fspath(path)
    replace_file(path, buf.getvalue(), newline="")
    return path


def read_history_csv(path: Union[str, os.PathLike]) -> List[Row]:
    """Inverse of :func:`write_history_csv`."""
    with open(path, newline="") as f:
        return [
            {"step": int(r["step"]), "module": r["module"], "rank": int(r["rank"]), "score": float(r["score"])}
            for r in csv.DictReader(f)
        ]


def rank_matrix(history: Iterable[Row]) -> Tuple[List[str], List[int], List[List[int]]]:
    """(modules in first-seen order, sorted steps, ranks[module][step]); -1 where a module has no row."""
    modules: List[str] = []
    seen = {}
    steps = set()
    cell = {}
    for row in history:
        m = row["module"]
        if m not in seen:
            seen[m] = len(modules)
            modules.append(m)
        steps.add(int(row["step"]))
        cell[(m, int(row["step"]))] = int(row["rank"])
    step_list = sorted(steps)
    mat = [[cell.get((m, s), -1) for s in step_list] for m in modules]
    return modules, step_list, mat


def plot_rank_heatmap(history, path: Union[str, os.PathLike], *, title: str = "FlexLoRA ranks") -> str:
    """Heat map of every module's rank over training (like Fig. 2 of the FlexLoRA paper).

    Args:
        history: a list of rows ``{"step", "module", "rank", "score"}`` (``allocator.history``),
            a :class:`~flexlora.RankAllocator`, or the path of a CSV written by ``history_csv``.
        path: where the PNG goes (its folder must exist).
        title: the figure title.

    Rows are modules in model order (shallow at the top, deep at the bottom), columns are the
    event steps; the colour is the active rank. Uses matplotlib's Agg canvas directly, so the
    caller's pyplot backend is never touched. Returns ``path``.
    """
    if hasattr(history, "history") and not isinstance(history, (list, tuple)):
        history = history.history
    elif isinstance(history, (str, os.PathLike)):
        history = read_history_csv(history)
    history = list(history)
    if not history:
        raise ValueError("plot_rank_heatmap: history is empty (no allocator rows to plot)")
    missing = [k for k in HISTORY_FIELDS if k not in history[0]]
    if missing:
        raise ValueError(f"plot_rank_heatmap: history rows need keys {HISTORY_FIELDS}, first row lacks {missing}")

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modules, steps, mat = rank_matrix(history)
    data = np.ma.masked_less(np.asarray(mat, dtype=float), 0)
    height = min(2.0 + 0.18 * len(modules), 40.0)
    width = min(4.0 + 0.12 * len(steps), 24.0)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax, label="active rank")

    # At most ~40 labels per axis: dense labels are unreadable at 200+ modules.
    y_every = max(1, len(modules) // 40)
    ax.set_yticks(range(0, len(modules), y_every))
    ax.set_yticklabels([_short(modules[i]) for i in range(0, len(modules), y_every)], fontsize=6)
    x_every = max(1, len(steps) // 20)
    ax.set_xticks(range(0, len(steps), x_every))
    ax.set_xticklabels([str(steps[i]) for i in range(0, len(steps), x_every)], fontsize=7, rotation=45)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("module (by depth)")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = os.fspath(path)
    replace_file(path, buf.getvalue())  # beside it, then renamed: a failed write keeps a previous plot
    return path


def _short(name: str, keep: int = 3) -> str:
    """From the last layer index on: 'bert.encoder.layer.3.attention.self.query' ->
    '3.attention.self.query' (the index tells repeated names apart); the last ``keep`` dotted
    components when the name holds no index."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[i:])
    return ".".join(parts[-keep:])
