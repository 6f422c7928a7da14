"""The per-event budget b(t): how many modules are pruned (and expanded) at step t.

Allocation events happen at the optimizer steps t with t_warmup <= t <= T - t_final and
(t - t_warmup) % delta_t == 0 (T = total_steps; steps are 1-based counts of optimizer steps, so
with t_warmup = 0 the first event is at t = delta_t). With p = (t - t_warmup) / (T - t_final -
t_warmup) in [0, 1]:

- ``cubic`` (the paper):        b(t) = round(b0 · (1 - p)³)
- ``cubic_authors`` (their code): b(t) = round(b0 · (1 - p³))
- ``constant``:                 b(t) = b0

clamped to [0, b0] inside the window and 0 outside. ``round`` is round-half-up (floor(x + 0.5)),
not Python's banker's rounding, so b(t) never depends on the parity of a tie.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

from ..config import SCHEDULES, FlexLoRAConfig


def window_progress(step: int, total_steps: int, t_warmup: int, t_final: int) -> float:
    """p = (step - t_warmup) / (T - t_final - t_warmup); < 0 before and > 1 after the window."""
    span = total_steps - t_final - t_warmup
    if span <= 0:
        raise ValueError(
            f"window_progress: the window [t_warmup={t_warmup}, total_steps - t_final="
            f"{total_steps - t_final}] is empty"
        )
    return (step - t_warmup) / span


def budget_at(
    step: int,
    *,
    b0: int,
    total_steps: int,
    t_warmup: int,
    t_final: int,
    schedule: str = "cubic",
) -> int:
    """b(step) for the given schedule (0 outside [t_warmup, total_steps - t_final]).

    This is the schedule's value at any step; whether ``step`` is an allocation event is
    :func:`is_event_step`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"budget_at: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if b0 < 0:
        raise ValueError(f"budget_at: b0 must be >= 0, got {b0!r}")
    p = window_progress(step, total_steps, t_warmup, t_final)
    if p < 0.0 or p > 1.0:
        return 0
    if schedule == "cubic":
        value = b0 * (1.0 - p) ** 3
    elif schedule == "cubic_authors":
        value = b0 * (1.0 - p**3)
    else:
        value = float(b0)
    return int(min(max(math.floor(value + 0.5), 0), b0))


def is_event_step(step: int, *, total_steps: int, t_warmup: int, t_final: int, delta_t: int) -> bool:
    """Whether an allocation event happens after optimizer step ``step`` (1-based)."""
    if delta_t < 1:
        raise ValueError(f"is_event_step: delta_t must be >= 1, got {delta_t!r}")
    return step >= 1 and t_warmup <= step <= total_steps - t_final and (step - t_warmup) % delta_t == 0


def first_event_step(*, total_steps: int, t_warmup: int, t_final: int, delta_t: int) -> Optional[int]:
    """The first step at which :func:`is_event_step` holds, or None when the window has none."""
    if delta_t < 1:
        raise ValueError(f"first_event_step: delta_t must be >= 1, got {delta_t!r}")
    step = t_warmup if t_warmup >= 1 else delta_t  # steps are 1-based: step 0 is never an event
    return step if step <= total_steps - t_final else None


def event_steps_between(after: int, before: int, config: FlexLoRAConfig, limit: int = 3) -> List[int]:
    """Up to ``limit`` event steps t with after < t < before, in order (O(limit), whatever the gap)."""
    first = first_event_step(
        total_steps=config.total_steps, t_warmup=config.t_warmup, t_final=config.t_final, delta_t=config.delta_t
    )
    if first is None:
        return []
    last = min(before - 1, config.total_steps - config.t_final)
    t = max(after + 1, first)
    t = config.t_warmup + -(-(t - config.t_warmup) // config.delta_t) * config.delta_t  # next on the grid
    out = []
    while t <= last and len(out) < limit:
        out.append(t)
        t += config.delta_t
    return out


def config_peak_budget(config: FlexLoRAConfig) -> Tuple[Optional[int], int]:
    """(first event step or None, the largest b(t) over all event steps; 0 when there is none).

    Every schedule is non-increasing in t (cubic, cubic_authors) or constant, so the largest
    b(t) is the one at the first event: O(1), whatever total_steps."""
    first = first_event_step(
        total_steps=config.total_steps, t_warmup=config.t_warmup, t_final=config.t_final, delta_t=config.delta_t
    )
    return first, (0 if first is None else config_budget_at(first, config))


def config_budget_at(step: int, config: FlexLoRAConfig) -> int:
    """:func:`budget_at` with the fields of a :class:`~flexlora.FlexLoRAConfig`."""
    return budget_at(
        step,
        b0=config.b0,
        total_steps=config.total_steps,
        t_warmup=config.t_warmup,
        t_final=config.t_final,
        schedule=config.schedule,
    )


def config_is_event_step(step: int, config: FlexLoRAConfig) -> bool:
    """:func:`is_event_step` with the fields of a :class:`~flexlora.FlexLoRAConfig`."""
    return is_event_step(
        step,
        total_steps=config.total_steps,
        t_warmup=config.t_warmup,
        t_final=config.t_final,
        delta_t=config.delta_t,
    )
