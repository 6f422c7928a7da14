"""flex_linear kernels compile for an H100 (sm_90) from the launchers' real arguments, no GPU needed.

The interpreter runs the kernels' math but accepts code the GPU compiler would reject and says
nothing about tensor cores or shared memory; this compiles every launch of one forward +
backward with Triton's compiler and ptxas (see _flex_linear_sm90.py) and checks the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("_flex_linear_sm90.py")
H100_MAX_SHARED = 232448  # bytes of shared memory one H100 block may opt into (227 KiB)

EXPECTED = {
    "bf16": ["bf16 u", "bf16 y 128x256", "bf16 y 256x128", "bf16 dv", "bf16 dx 128x256", "bf16 dP", "bf16 dQ",
             "bf16 dx_lora"],
    "fp16-r256": ["fp16-r256 y", "fp16-r256 dv"],
    "fp32-tf32": ["fp32-tf32 u", "fp32-tf32 y", "fp32-tf32 dv", "fp32-tf32 dx", "fp32-tf32 dP", "fp32-tf32 dQ"],
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_kernels_compile_for_sm90_with_wgmma(case):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HELPER.parents[2]), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(HELPER), case], env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, f"sm_90 compile failed:\n{done.stderr[-3000:]}"
    rows = {r["kernel"]: r for r in map(json.loads, done.stdout.strip().splitlines())}
    assert sorted(rows) == sorted(EXPECTED[case]), f"compiled {sorted(rows)}"
    for name, r in rows.items():
        assert r["shared"] <= H100_MAX_SHARED, f"{name}: {r['shared']} B shared memory > H100's {H100_MAX_SHARED}"
        assert r["wgmma"] > 0 and r["mma_sync"] == 0, f"{name}: not on Hopper tensor cores (wgmma): {r}"
        if name != "bf16 dx_lora":  # every kernel with a reduction loop streams it through cp.async stages
            assert r["cp_async"] > 0, f"{name}: loads are not pipelined: {r}"
