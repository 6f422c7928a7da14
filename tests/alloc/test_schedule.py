"""b(t) schedules and event steps against hand-computed tables.

Window of the tables: total_steps T = 100, t_warmup = 10, t_final = 20, so the window is
[10, 80] and p = (t - 10) / 70. Values worked out by hand (round = half-up):

cubic  b0·(1 - p)³, b0 = 8:
  t=10 p=0   8·1     = 8      t=17 p=.1 8·.729 = 5.832 -> 6    t=24 p=.2 8·.512 = 4.096 -> 4
  t=31 p=.3  8·.343  = 2.744  -> 3    t=38 p=.4 8·.216 = 1.728 -> 2    t=45 p=.5 8·.125 = 1.0 -> 1
  t=52 p=.6  8·.064  = .512   -> 1    t=59 p=.7 8·.027 = .216 -> 0     t=80 p=1  0
cubic_authors  b0·(1 - p³), b0 = 8:
  t=17 8·.999 = 7.992 -> 8   t=31 8·.973 = 7.784 -> 8   t=38 8·.936 = 7.488 -> 7
  t=45 8·.875 = 7.0   -> 7   t=52 8·.784 = 6.272 -> 6   t=59 8·.657 = 5.256 -> 5
  t=66 8·.488 = 3.904 -> 4   t=73 8·.271 = 2.168 -> 2   t=79 p=69/70 8·.0425 = .34 -> 0
"""

import pytest

from flexlora import FlexLoRAConfig
from flexlora.alloc.schedule import (
    budget_at,
    config_budget_at,
    config_is_event_step,
    config_peak_budget,
    first_event_step,
    is_event_step,
)

WINDOW = dict(total_steps=100, t_warmup=10, t_final=20)

CUBIC = [(0, 0), (9, 0), (10, 8), (17, 6), (24, 4), (31, 3), (38, 2), (45, 1), (52, 1), (59, 0), (80, 0), (81, 0), (100, 0)]
AUTHORS = [(9, 0), (10, 8), (17, 8), (31, 8), (38, 7), (45, 7), (52, 6), (59, 5), (66, 4), (73, 2), (79, 0), (80, 0), (81, 0)]
CONSTANT = [(9, 0), (10, 8), (45, 8), (80, 8), (81, 0)]


@pytest.mark.parametrize(
    "schedule,table",
    [("cubic", CUBIC), ("cubic_authors", AUTHORS), ("constant", CONSTANT)],
    ids=["cubic", "cubic_authors", "constant"],
)
def test_budget_table(schedule, table):
    got = [(t, budget_at(t, b0=8, schedule=schedule, **WINDOW)) for t, _ in table]
    assert got == table


def test_round_half_up_not_bankers():
    # T=100, no warm-up/final: p = 0.5 at t = 50; 4·(1 - .5)³ = 0.5 exactly -> 1 (Python's round gives 0).
    assert budget_at(50, b0=4, total_steps=100, t_warmup=0, t_final=0, schedule="cubic") == 1
    # 4·(1 - .5³) = 3.5 exactly -> 4 (Python's round gives 4 too; 2.5 would give 2).
    assert budget_at(50, b0=4, total_steps=100, t_warmup=0, t_final=0, schedule="cubic_authors") == 4
    # 20·(1 - .5)³ = 2.5 exactly -> 3 (Python's round gives 2).
    assert budget_at(50, b0=20, total_steps=100, t_warmup=0, t_final=0, schedule="cubic") == 3


def test_b0_zero_is_always_zero():
    assert [budget_at(t, b0=0, schedule="constant", **WINDOW) for t in (10, 40, 80)] == [0, 0, 0]


def test_event_steps():
    events = [t for t in range(0, 101) if is_event_step(t, delta_t=5, **WINDOW)]
    assert events == list(range(10, 81, 5))
    # t_warmup = 0: steps are 1-based, so the first event is at delta_t, never at 0.
    events = [t for t in range(0, 21) if is_event_step(t, total_steps=20, t_warmup=0, t_final=4, delta_t=4)]
    assert events == [4, 8, 12, 16]


def test_config_wrappers_match():
    cfg = FlexLoRAConfig(b0=8, delta_t=7, schedule="cubic", **WINDOW)
    assert [config_budget_at(t, cfg) for t, _ in CUBIC] == [b for _, b in CUBIC]
    assert [t for t in range(101) if config_is_event_step(t, cfg)] == [10, 17, 24, 31, 38, 45, 52, 59, 66, 73, 80]


def test_bad_input():
    with pytest.raises(ValueError, match="schedule must be one of"):
        budget_at(10, b0=2, schedule="linear", **WINDOW)
    with pytest.raises(ValueError, match="b0 must be >= 0"):
        budget_at(10, b0=-1, **WINDOW)
    with pytest.raises(ValueError, match="delta_t must be >= 1"):
        is_event_step(10, delta_t=0, **WINDOW)
    with pytest.raises(ValueError, match="window"):
        budget_at(10, b0=2, total_steps=100, t_warmup=80, t_final=20)
    # Invalid combinations are config errors, naming the field.
    with pytest.raises(ValueError, match="t_warmup"):
        FlexLoRAConfig(total_steps=100, t_warmup=80, t_final=20)
    with pytest.raises(ValueError, match="delta_t"):
        FlexLoRAConfig(delta_t=0)


def test_first_event_and_peak_budget_equal_a_scan_of_every_step():
    # config_peak_budget looks at the first event only (every schedule is non-increasing): it
    # must equal the maximum of b(t) over every event step, found by scanning them all
    seen_zero = seen_none = 0
    for total in (1, 2, 5, 17, 100):
        for t_warmup in range(0, total, max(1, total // 7)):
            for t_final in range(0, total - t_warmup, max(1, total // 5)):
                for delta_t in (1, 2, 3, 7, 40, 150):
                    for b0 in (0, 1, 3):
                        for schedule in ("cubic", "cubic_authors", "constant"):
                            cfg = FlexLoRAConfig(total_steps=total, t_warmup=t_warmup, t_final=t_final,
                                                 delta_t=delta_t, b0=b0, schedule=schedule)
                            events = [t for t in range(total + 1) if config_is_event_step(t, cfg)]
                            peak = max((config_budget_at(t, cfg) for t in events), default=0)
                            want = (events[0] if events else None, peak)
                            assert config_peak_budget(cfg) == want, (total, t_warmup, t_final, delta_t, b0, schedule)
                            seen_zero += want[1] == 0 and b0 > 0 and bool(events)
                            seen_none += not events
    assert seen_zero > 10 and seen_none > 10  # both ways of allocating nothing were exercised
    assert first_event_step(total_steps=100, t_warmup=0, t_final=20, delta_t=80) == 80
    assert first_event_step(total_steps=100, t_warmup=0, t_final=20, delta_t=200) is None
    with pytest.raises(ValueError, match="delta_t must be >= 1"):
        first_event_step(total_steps=100, t_warmup=0, t_final=20, delta_t=0)
