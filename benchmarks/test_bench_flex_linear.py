"""pytest-benchmark version of ``bench_flex_linear.py`` on CPU (fp32, scaled-down shapes).

    python -m pytest benchmarks/test_bench_flex_linear.py --benchmark-only

One benchmark per (shape, mode, case), grouped by shape and mode so that pytest-benchmark's table
puts FlexLinear, PEFT LoRA and PEFT AdaLoRA beside the frozen nn.Linear. The script prints the
ratios measured round-robin, which is steadier on a shared machine; this file gives the
pytest-benchmark statistics (min / median / IQR) of the same setups.
"""

import functools

import pytest
import torch

from bench_flex_linear import FACTORIES, MODES, Shape, cases_for
from _common import reset_grads

SHAPES = [Shape(2048, 2048, 2048), Shape(2048, 2048, 5632)]
CASES = cases_for([(64, 32), (32, 32)], ["flexlora", "peft_lora", "peft_adalora"])


@functools.lru_cache(maxsize=None)
def _setup(shape, case):
    s = FACTORIES[case.kind](shape, case, torch.float32, "cpu")
    y = s.module(s.x)  # the layer runs and gives a finite [M, N] output before it is timed
    assert y.shape == (shape.M, shape.N) and torch.isfinite(y).all(), f"{case.label}: bad output"
    return s


def _case_id(c):
    return {"frozen": "frozen", "flexlora": f"flexlora-rmax{c.r_max}-r{c.rank}"}.get(c.kind, f"{c.kind}-r{c.rank}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s.K}-N{s.N}")
def test_flex_linear(benchmark, shape, mode, case):
    s = _setup(shape, case)
    benchmark.group = f"{shape} {mode}"
    benchmark.extra_info.update(case=case.label, M=shape.M, K=shape.K, N=shape.N)
    if mode == "fwd":
        def setup():
            reset_grads(s.grads)

        benchmark.pedantic(lambda: s.module(s.x), setup=setup, rounds=5, warmup_rounds=1)
    elif mode == "bwd":
        def setup():  # a fresh graph per call, built untimed
            reset_grads(s.grads)
            return (s.module(s.x),), {}

        benchmark.pedantic(lambda y: y.backward(s.dy), setup=setup, rounds=5, warmup_rounds=1)
    else:
        def setup():
            reset_grads(s.grads)

        benchmark.pedantic(lambda: s.module(s.x).backward(s.dy), setup=setup, rounds=5, warmup_rounds=1)
    assert s.x.grad is None or torch.isfinite(s.x.grad).all()
