#!/usr/bin/env bash
# The GPU inference target of issue 17 (>= 500 images/s on one H100: batch 32, 800x1333, bf16) in
# about 5 minutes of device time, where benchmarks/gpu.sh measures everything:
#   1. `retinanet bench --device cuda --only 'inference, bf16 compiled' --cudnn-benchmark`: ours
#      (BatchNorm folded, channels-last, network and NMS compiled) against torchvision (network
#      compiled), alternating in one process, split by stage;
#   2. the same with the compiled networks of both replayed as CUDA graphs (--cuda-graphs);
#   3. benchmarks/gpu_checks.py --only nms_profile: where the compiled post-processing spends its time.
# Usage: bash benchmarks/gpu_inference.sh [output dir, default bench_gpu]; RESULTS=path appends the
# tables there (default benchmarks/RESULTS.md); PYTHON=python picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench_gpu}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT_DIR"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" || exit 1
status=0
for graphs in "" "--cuda-graphs"; do
  "$PYTHON" -m retinanet.cli bench --device cuda --only "inference, bf16 compiled" --cudnn-benchmark $graphs \
    --output-dir "$OUT_DIR/inference${graphs:+_graphs}" --append-results "${RESULTS:-benchmarks/RESULTS.md}" || status=1
done
PYTHONPATH=. "$PYTHON" benchmarks/gpu_checks.py --output-dir "$OUT_DIR/checks" --only nms_profile || status=1
exit $status
