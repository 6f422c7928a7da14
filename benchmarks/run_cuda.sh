#!/usr/bin/env bash
# Everything a CUDA machine should check and time, in one go (about 8 minutes on an H100):
#   1. the compiled Triton kernels against float64 (tests/kernels/test_kernels_cuda.py) and
#      `flexlora train` on the GPU against the CPU run (tests/test_train_cuda.py),
#   2. the adapter-op microbenchmark (Triton kernels and the torch path, vs frozen / PEFT),
#   3. the LLaMA-3-8B-shaped training step (default path, then FLEXLORA_BACKEND=triton),
#   4. the entropy / orthogonality benchmark, 5. the per-product profile of the adapter op.
# Logs and CSVs go to $OUT (default benchmarks/results/cuda); the tables are printed last.
#     bash benchmarks/run_cuda.sh            # all steps
#     bash benchmarks/run_cuda.sh bench      # skip the tests
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/cuda}
mkdir -p "$OUT"
# this run's logs only: a summary or a tests.log left by an earlier run would print as current
rm -f "$OUT/summary.log" "$OUT"/tests.log "$OUT"/bench_*.log "$OUT"/profile.log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
what=${1:-all}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.log"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.log"
}

if [ "$what" = all ]; then
  # pytest-xdist (not a test extra: CI has 2 cores) spreads the tests over 8 workers where present
  xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
  step tests 240 python3 -m pytest -q -p no:cacheprovider $xdist --maxfail=20 tests/kernels/test_kernels_cuda.py tests/test_train_cuda.py
fi
step bench_flex_linear 150 python3 benchmarks/bench_flex_linear.py --csv "$OUT/flex_linear_cuda.csv"
step bench_llama 120 python3 benchmarks/bench_llama.py --csv "$OUT/llama_cuda.csv"
FLEXLORA_BACKEND=triton step bench_llama_triton 120 python3 benchmarks/bench_llama.py --csv "$OUT/llama_cuda_triton.csv"
step bench_spectral_entropy 60 python3 benchmarks/bench_spectral_entropy.py --csv "$OUT/spectral_entropy_cuda.csv"
step profile 90 python3 benchmarks/profile_flex_linear_cuda.py

for f in tests bench_spectral_entropy bench_flex_linear bench_llama bench_llama_triton; do
  [ -f "$OUT/$f.log" ] || continue
  echo "################ $f"
  case $f in
    tests) grep -E "passed|failed|error|Error|assert" "$OUT/$f.log" | tail -25 ;;
    bench_flex_linear) sed -n '/^ratios to the frozen/,$p' "$OUT/$f.log" ;;
    *) tail -8 "$OUT/$f.log" ;;
  esac
done
cat "$OUT/summary.log"
