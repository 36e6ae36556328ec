"""The demo's training step in NCHW and in channels-last memory, at batch 8 and 16, alternating
in one process on the same generated images (the demo's own data generator), so that the
machine's drift over time affects every variant alike. Prints milliseconds per image.

Run it twice to see what the kernels' instruction set does (the AVX2-only machines are
approximated on an AVX-512 CPU by capping the kernels):
    python benchmarks/bench_demo_layout.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_demo_layout.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from retinanet.config import apply_overrides, load_config
from retinanet.data.formats import open_dataset
from retinanet.data.synthetic import generate_dataset
from retinanet.engine.bench import demo_training_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        paths = generate_dataset(root, num_train=16, num_val=1, image_size=128, seed=0)
        cfg = load_config("demo")
        cfg = apply_overrides(cfg, [f"data.{k}={v}" for k, v in paths.items()])
        dataset = open_dataset(cfg.data, "train")
        items = [dataset[i] for i in range(16)]
    images = [image for image, _ in items]
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in items]
    cpu = torch.device("cpu")
    variants = {(layout, batch): (demo_training_step(cfg, images[:batch], targets[:batch], cpu,
                                                     layout == "channels-last"), batch)
                for batch in (8, 16) for layout in ("NCHW", "channels-last")}
    for step, _ in variants.values():
        for _ in range(3):
            step()
    per_image = {key: [] for key in variants}
    for _ in range(args.repeat):
        for key, (step, batch) in variants.items():
            start = time.perf_counter()
            step()
            per_image[key].append((time.perf_counter() - start) / batch)
    print(f"kernels: ATen {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    for (layout, batch), times in per_image.items():
        print(f"batch {batch:2d} {layout:13s} {1e3 * statistics.median(times):6.1f} ms per image")
    print_max_pool(args.repeat)


def print_max_pool(repeat: int) -> None:
    """The stem's max-pooling over a batch of 8 (64 channels at 64x64), forward with the
    indices that training keeps: one of the layout's largest differences."""
    pool = torch.nn.MaxPool2d(3, 2, 1)
    x = torch.randn(8, 64, 64, 64, requires_grad=True)
    for layout, tensor in (("NCHW", x), ("channels-last", x.contiguous(memory_format=torch.channels_last))):
        pool(tensor)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            pool(tensor)
            times.append(time.perf_counter() - start)
        print(f"max-pool forward {layout:13s} {1e3 * statistics.median(times):6.2f} ms per batch of 8")


if __name__ == "__main__":
    main()
