"""pytest-benchmark settings for ``python -m pytest benchmarks/ --benchmark-only``.

The benchmark files (``test_bench_*.py``) are collected only under ``--benchmark-only``: a bare
``pytest`` at the repository root then never spends minutes timing layers, and CI (``pytest tests``)
never sees this folder at all.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in bench_flex_linear.py: see the reason there

import torch  # noqa: E402

if not torch.cuda.is_available():
    # on CPU the torch path is what runs (and what is timed), never Triton's interpreter
    os.environ.setdefault("FLEXLORA_BACKEND", "torch")
    torch.set_num_threads(int(os.environ.get("FLEXLORA_BENCH_THREADS", "2")))


def pytest_ignore_collect(collection_path, config):
    if collection_path.name.startswith("test_bench_") and not config.getoption("benchmark_only", False):
        return True
    return None
