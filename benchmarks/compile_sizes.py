"""What `predict --compile` / `serve --compile` cost when the input size changes: a compiled
model (`optimize_for_inference(compile=True)`) predicts images of several sizes in turn;
for each, the seconds it took and how many graphs dynamo has compiled so far. A size that
needs no new graph runs at the compiled speed at once.

    python benchmarks/compile_sizes.py [--config demo] [--min-size 320] [--max-size 640]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._dynamo.utils import counters

from retinanet.config import load_config
from retinanet.model.build import build_retinanet

SIZES = [(300, 400), (320, 480), (400, 300), (500, 640), (333, 555), (720, 540), (300, 400)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--min-size", type=int, default=320, help="the model's test size (short side)")
    parser.add_argument("--max-size", type=int, default=640)
    args = parser.parse_args()
    cfg = load_config(args.config)
    cfg.model.input.test_min_size, cfg.model.input.max_size = args.min_size, args.max_size
    model = build_retinanet(cfg.model).eval().optimize_for_inference(compile=True)
    generator = torch.Generator().manual_seed(0)
    for height, width in SIZES:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        start = time.perf_counter()
        with torch.no_grad():
            model.predict(image)
        print(f"{height}x{width}: {time.perf_counter() - start:6.2f} s, "
              f"graphs compiled so far {counters['stats']['unique_graphs']}", flush=True)


if __name__ == "__main__":
    main()
