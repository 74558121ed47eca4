#!/usr/bin/env bash
# GPU check of zoo.kernels, under 7 minutes on one H100/H200:
#   1. editable install without dependencies (the GPU machine has torch + triton already),
#   2. the kernel tests with compiled Triton kernels (TRITON_INTERPRET=0; tests/conftest.py only sets a default),
#   3. tools/bench_ops.py on CUDA: attention and deformable attention (JSON + markdown + PNG).
# Everything lands in $OUT (default /tmp/gpu_check_out); env.txt records each step's exit status.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
pip install --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)" >> "$OUT/env.txt"
export TRITON_INTERPRET=0
timeout 240 python -m pytest -q -p no:cacheprovider tests/kernels/test_attention_gpu.py \
    --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/env.txt"
timeout 150 python tools/bench_ops.py --device cuda --dtype float16 --reps 10 \
    --json "$OUT/kernels_bench_cuda.json" --plot "$OUT/kernels_bench_cuda.png" --card "$OUT/kernels.md" \
    > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/env.txt"
tail -n 3 "$OUT/gpu_tests.log"; tail -n 30 "$OUT/bench.log"
