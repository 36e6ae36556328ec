#!/usr/bin/env bash
# The GPU figures of issue 17, in one run on a machine with one CUDA GPU (e.g. an H100):
#   1. benchmarks/gpu_checks.py: parity with torchvision on the GPU (fp32), host syncs in one
#      training step (ours and torchvision's), a kernel profile of our training and inference, and the
#      post-processing experiment (NMS image by image vs all images at once, eager and compiled,
#      same head outputs);
#   2. `retinanet bench --device cuda --cudnn-benchmark`: inference at batch 32, 800x1333, bf16
#      autocast (ours: BatchNorm folded + channels-last); training at batch 16, 800x1333, bf16 +
#      channels-last, eager, then with torch.compile on the networks of both libraries (ours:
#      matching and losses in training, NMS in inference, too). Ours and torchvision's alternate
#      in one process; cuDNN picks its algorithms by timing them, for both (the sizes are fixed).
# Targets on one H100: training >= 1.5x torchvision's images/s and >= 150 images/s; inference >= 500 images/s.
# INFERENCE_ONLY=1 measures the inference target alone in about 5 minutes of device time: the
# compiled inference case with and without --cuda-graphs (both libraries' compiled networks replayed
# as CUDA graphs), then where the compiled post-processing spends its time (gpu_checks nms_profile).
# TENSORRT=1 measures TensorRT fp16 (ONNX Runtime's TensorRT execution provider, on our exported
# graph) against our compiled bf16 path at batch 1 and 32, 800x1216, with the agreement of their
# detections (benchmarks/gpu_tensorrt.py; needs `pip install onnxruntime-gpu tensorrt-cu12`).
# Usage: bash benchmarks/gpu.sh [output dir, default bench_gpu]; RESULTS=path appends the table there
# (default benchmarks/RESULTS.md); PYTHON=python picks the interpreter (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench_gpu}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT_DIR"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" || exit 1
status=0
if [ -n "${TENSORRT:-}" ]; then
  PYTHONPATH=. "$PYTHON" benchmarks/gpu_tensorrt.py --output-dir "$OUT_DIR/tensorrt" || status=1
  exit $status
fi
if [ -n "${INFERENCE_ONLY:-}" ]; then
  for graphs in "" "--cuda-graphs"; do
    "$PYTHON" -m retinanet.cli bench --device cuda --only "inference, bf16 compiled" --cudnn-benchmark $graphs \
      --output-dir "$OUT_DIR/inference${graphs:+_graphs}" --append-results "${RESULTS:-benchmarks/RESULTS.md}" || status=1
  done
  PYTHONPATH=. "$PYTHON" benchmarks/gpu_checks.py --output-dir "$OUT_DIR/checks" --only nms_profile || status=1
  exit $status
fi
PYTHONPATH=. "$PYTHON" benchmarks/gpu_checks.py --output-dir "$OUT_DIR" || status=1
"$PYTHON" -m retinanet.cli bench --device cuda --cudnn-benchmark ${QUICK:+--quick} --output-dir "$OUT_DIR" \
  --append-results "${RESULTS:-benchmarks/RESULTS.md}" || status=1
exit $status
