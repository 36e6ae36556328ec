"""Dense scenes: one training step (forward, backward, SGD update) of ours and of torchvision's
RetinaNet at many boxes per image, each case in a fresh process, one at a time.

Both libraries get the same weights (R-50-FPN with frozen BatchNorm, torchvision's released
layout converted to ours: `retinanet.engine.bench._models`), the same images and the same
boxes (seeded; `--min-side`-`--max-side` px, anywhere in the image). Each case reports the
median step time and its process's peak resident set (VmHWM, model building included), so
that the growth from the fewest to the most boxes is the cost of the boxes alone.

    python benchmarks/bench_dense.py                                  # batch 2 at 800x1216
    python benchmarks/bench_dense.py --size 512 512 --batch 1 --boxes 50 1000 --repeat 1

A watchdog kills a case whose resident memory passes `--abort-gb` (the case is then reported
as aborted), so that a run cannot take a shared machine down.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

LIBRARIES = ("ours", "torchvision")


def dense_targets(batch: int, size: tuple[int, int], boxes: int, min_side: float, max_side: float):
    """`boxes` boxes per image of `size (h, w)`, sides in [min_side, max_side], labels 1-90; seeded."""
    import torch

    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        wh = min_side + torch.rand(boxes, 2, generator=generator) * (max_side - min_side)
        xy = torch.rand(boxes, 2, generator=generator) * (torch.tensor([size[1], size[0]]) - wh)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(1, 91, (boxes,), generator=generator)})
    return targets


def run_case(library: str, boxes: int, args) -> dict:
    """In this process: `args.repeat` timed steps of `library` after one warm-up step."""
    import torch

    from retinanet.engine.bench import _models, _photos, training_step

    if args.threads:
        torch.set_num_threads(args.threads)
    tv, ours, _, _ = _models(torch.device("cpu"))
    size = tuple(args.size)
    tv.transform.min_size, tv.transform.max_size = (min(size),), max(size)
    ours.preprocessor.train_min_sizes, ours.preprocessor.max_size = [min(size)], max(size)
    model = ours if library == "ours" else tv
    del tv, ours
    model.train()
    images = _photos(args.batch, *size)
    inputs = images if library == "ours" else [im.float() / 255 for im in images]
    targets = dense_targets(args.batch, size, boxes, args.min_side, args.max_side)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    step = training_step(model, inputs, targets, optimizer)
    losses = model(inputs, targets)
    step()
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_mb = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
    return {"library": library, "boxes": boxes, "seconds": round(statistics.median(times), 3),
            "peak_rss_mb": round(peak_mb), "losses": {k: float(v) for k, v in losses.items()}}


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_guarded(library: str, boxes: int, argv: list[str], abort_mb: float) -> dict:
    """The case in a fresh Python process, killed if its resident memory passes `abort_mb`."""
    child = subprocess.Popen([sys.executable, __file__, "--case", library, str(boxes), *argv],
                             stdout=subprocess.PIPE, text=True)
    aborted = []

    def watch():
        while child.poll() is None:
            if rss_mb(child.pid) > abort_mb:
                aborted.append(rss_mb(child.pid))
                child.kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = child.communicate()
    watcher.join()
    if aborted:
        return {"library": library, "boxes": boxes, "aborted_above_mb": round(abort_mb)}
    if child.returncode != 0:
        return {"library": library, "boxes": boxes, "error": f"exit status {child.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--boxes", type=int, nargs="+", default=[50, 300, 1000], help="boxes per image, one case each")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--min-side", type=float, default=16.0)
    parser.add_argument("--max-side", type=float, default=96.0)
    parser.add_argument("--repeat", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--abort-gb", type=float, default=16.0, help="kill a case above this resident memory")
    parser.add_argument("--case", nargs=2, metavar=("LIBRARY", "BOXES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args)), flush=True)
        return
    common = ["--size", str(args.size[0]), str(args.size[1]), f"--batch={args.batch}", f"--repeat={args.repeat}",
              f"--min-side={args.min_side}", f"--max-side={args.max_side}", f"--threads={args.threads}"]
    results = []
    for boxes in args.boxes:
        for library in args.libraries:
            result = run_guarded(library, boxes, common, args.abort_gb * 1024)
            print(json.dumps(result), flush=True)
            results.append(result)
    ours = {r["boxes"]: r for r in results if r["library"] == "ours" and "seconds" in r}
    theirs = {r["boxes"]: r for r in results if r["library"] == "torchvision" and "seconds" in r}
    summary = {"size": args.size, "batch": args.batch,
               "ours_peak_growth_mb": (ours[max(ours)]["peak_rss_mb"] - ours[min(ours)]["peak_rss_mb"]) if ours else None,
               "speedup_vs_torchvision": {b: round(theirs[b]["seconds"] / ours[b]["seconds"], 3)
                                          for b in ours if b in theirs}}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
