import os

# Triton reads TRITON_INTERPRET when it is imported: set it before anything imports triton, so
# kernel tests can run Triton kernels on the CPU. Model-level tests default to the torch path
# (FLEXLORA_BACKEND), because the interpreter is far too slow for them; kernel tests pass
# backend="triton" explicitly.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FLEXLORA_BACKEND", "torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The GPU tests (files named *_cuda.py) need a GPU and the interpreter off (TRITON_INTERPRET=0 on
# the command line); elsewhere they are not collected at all, rather than reported as skipped.
if not (torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] == "0"):
    collect_ignore_glob = ["*_cuda.py", "*/*_cuda.py"]


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # The tests' tensors are tiny: a thread pool only adds a barrier per op, and on a shared
    # machine each barrier can wait a whole scheduler slice (10-100x slower steps were measured).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "autotuned: a CUDA test that keeps the fused GEMM's autotuner on")
