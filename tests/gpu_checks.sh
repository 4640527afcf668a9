#!/usr/bin/env bash
# Every GPU check in one run, for a session lent a GPU (CI has none): the CUDA variants of the suite, then
# the benchmark on the GPU. Outputs go to $OUT (or ./gpu-out), one log each.
#   bash tests/gpu_checks.sh          # at most 12 minutes on an H200 (the steps' timeouts: 300 s + 420 s)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
# The CUDA half of the suite (the cpu variants ran in CI already).
timeout 300 python3 -m pytest -q -p no:cacheprovider -k "cuda" -x > "$out/pytest-cuda.log" 2>&1
echo "pytest cuda: exit $?" | tee -a "$out/summary.txt"
tail -3 "$out/pytest-cuda.log" >> "$out/summary.txt"
# The benchmark on the GPU: ours against transformers, interleaved. --device cuda includes train-gpu (GPT-2
# 124M training at T=1024: tokens/s and MFU), run first; --compile adds ours' generate(..., compile=True).
# Each section prints its figures when done, so a timeout still leaves the ones measured.
timeout 420 python3 tests/bench.py --device cuda --quick --compile --dtype bfloat16 > "$out/bench-cuda.log" 2>&1
echo "bench cuda: exit $?" | tee -a "$out/summary.txt"
grep -E "^train-gpu: MFU|^  train-gpu (ours|transformers):" "$out/bench-cuda.log" >> "$out/summary.txt"
tail -26 "$out/bench-cuda.log" >> "$out/summary.txt"
cat "$out/summary.txt"
