#!/usr/bin/env bash
# The GPU figures of issue 17, in one run on a machine with one CUDA GPU (e.g. an H100):
#   inference at batch 32, 800x1333, bf16 autocast (ours: BatchNorm folded + channels-last);
#   training at batch 16, 800x1333, bf16 autocast + channels-last + torch.compile on the networks
#   of both libraries, SGD, frozen BN. Ours and torchvision's alternate in one process.
# Targets on one H100: training >= 1.5x torchvision's images/s and >= 150 images/s; inference >= 500 images/s.
# Appends the table (machine, command, date, commit) to benchmarks/RESULTS.md; JSON and a chart in bench_gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
"$PY" -m retinanet.cli bench --device cuda ${QUICK:+--quick} --output-dir bench_gpu --append-results benchmarks/RESULTS.md
