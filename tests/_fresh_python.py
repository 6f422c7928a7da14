"""Run a snippet in a fresh interpreter whose environment selects no backend.

Some behaviours only show at import time (triton missing, ``TRITON_INTERPRET`` set after
flexlora was imported); the suite itself runs with the interpreter switched on, so such tests
start a child process without ``TRITON_INTERPRET`` / ``FLEXLORA_BACKEND``.
"""

import os
import subprocess
import sys


def run_python(code: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -c code`` with the backend-selecting variables removed; text output captured."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLEXLORA_BACKEND")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
