"""The Python API's inference against torchvision's: `retinanet.load_model(path).predict(image)`
as users call it (the default, optimized model), the same with `optimize=False`, and
torchvision's RetinaNet R-50-FPN in eager mode, on the same converted weights (random init)
and the same uint8 image, batch 1, alternating A B C A B C ... in one process, torch's
default CPU threads. Prints the median seconds, the ratios against torchvision and the
machine as JSON.
Usage: python benchmarks/bench_api_predict.py [--height 800 --width 1216] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import retinanet
from retinanet.checkpoint import write_checkpoint
from retinanet.engine.bench import _models, _photos, alternate, machine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    tv, _, config, state = _models(cpu)
    tv.eval()
    tv.transform.min_size, tv.transform.max_size = (min(args.height, args.width),), max(args.height, args.width)
    config.input.test_min_size, config.input.max_size = min(args.height, args.width), max(args.height, args.width)
    path = write_checkpoint(Path(tempfile.mkdtemp()) / "converted.pt", config, state)
    default = retinanet.load_model(path)
    plain = retinanet.load_model(path, optimize=False).eval()
    image = _photos(1, args.height, args.width)[0]
    floats = image.float() / 255  # torchvision takes [0, 1] floats

    def torchvision_eager():
        with torch.no_grad():
            return tv([floats])

    seconds = alternate({"torchvision": torchvision_eager, "api_default": lambda: default.predict(image),
                         "api_optimize_false": lambda: plain.predict(image)}, args.repeat, cpu)
    a, b = default.predict(image), plain.predict(image)
    same_count = len(a["scores"]) == len(b["scores"])
    print(json.dumps({
        "case": f"inference batch 1 at {args.height}x{args.width}, Python API", "repeat": args.repeat,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "ratio_vs_torchvision": {k: round(seconds["torchvision"] / v, 3) for k, v in seconds.items()},
        "detections": {"default": len(a["scores"]), "optimize_false": len(b["scores"]),
                       "max_score_difference": float((a["scores"] - b["scores"]).abs().max()) if same_count else None},
        "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
