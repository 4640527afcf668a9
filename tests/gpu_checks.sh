#!/usr/bin/env bash
# Every GPU check in one run, for a session lent a GPU (CI has none): the CUDA variants of the suite, then
# the benchmark on the GPU. Outputs go to $OUT (or ./gpu-out), one log each.
#   bash tests/gpu_checks.sh          # about 10 minutes on an H200
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
# The CUDA half of the suite (the cpu variants ran in CI already).
timeout 420 python3 -m pytest -q -p no:cacheprovider -k "cuda" -x > "$out/pytest-cuda.log" 2>&1
echo "pytest cuda: exit $?" | tee -a "$out/summary.txt"
tail -3 "$out/pytest-cuda.log" >> "$out/summary.txt"
# The benchmark on the GPU: ours against transformers, interleaved.
timeout 300 python3 tests/bench.py --device cuda --quick > "$out/bench-cuda.log" 2>&1
echo "bench cuda: exit $?" | tee -a "$out/summary.txt"
tail -15 "$out/bench-cuda.log" >> "$out/summary.txt"
cat "$out/summary.txt"
