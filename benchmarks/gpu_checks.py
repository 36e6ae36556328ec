"""Checks on a CUDA GPU that the CPU test suite cannot make, in one short run:

1. parity: ours (plain and optimized for inference) against torchvision's RetinaNet on the
   same converted weights, fp32 with TF32 off, detections compared pair by pair;
2. host synchronisation: our training step (pre-processing, network, matching, losses)
   under `torch.cuda.set_sync_debug_mode("warn")`, the number of syncs counted, beside
   torchvision's step for contrast;
3. a profile of our bf16 training step at batch 16 and inference at batch 32 (800x1333):
   the CUDA kernels that take the time;
4. for the 500 images/s inference target: post-processing of one batch of 32, NMS of the
   shortlists image by image (torchvision's NMS) against all images at once (the model's
   GPU path, `BatchedNMS`, eager and compiled), on the same head outputs: times and how
   many agree.

Writes checks.json and profile_*.txt to --output-dir; prints one JSON line per check.
Usage: python benchmarks/gpu_checks.py --output-dir out [--device cuda] [--small]
[--only parity,syncs,profile,nms] (`--small` runs every check at a toy size, also on the
CPU, to try the script itself).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from retinanet.engine.bench import (
    _models,
    _photos,
    alternate,
    optimized_copy,
    random_targets,
    training_step,
)

from retinanet.model.postprocess import BatchedNMS, Detections, first_kept_batched, greedy_nms_per_image

RESULTS: dict = {}


def report(name: str, value, output_dir: Path) -> None:
    RESULTS[name] = value
    print(json.dumps({name: value}), flush=True)
    (output_dir / "checks.json").write_text(json.dumps(RESULTS, indent=2))


def parity(device: torch.device, size: tuple[int, int]) -> dict:
    """Max differences of matched detections, ours (plain, optimized) against torchvision."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    tv, ours, config, state = _models(device)
    fast = optimized_copy(config, state, device)
    tv.eval(), ours.eval()
    tv.transform.min_size, tv.transform.max_size = (min(size),), max(size)
    for model in (ours, fast):
        model.preprocessor.test_min_size, model.preprocessor.max_size = min(size), max(size)
    images = [im.to(device) for im in _photos(2, *size)]
    with torch.no_grad():
        expected = tv([im.float() / 255 for im in images])
        got = {"ours": ours(images), "ours_optimized": fast(images)}
    out = {}
    for name, detections in got.items():
        worst_box = worst_score = 0.0
        counts = []
        for e, g in zip(expected, detections):
            counts.append((len(e["boxes"]), len(g["boxes"])))
            n = min(len(e["boxes"]), len(g["boxes"]))
            if n:
                worst_box = max(worst_box, float((e["boxes"][:n] - g["boxes"][:n]).abs().max()))
                worst_score = max(worst_score, float((e["scores"][:n] - g["scores"][:n]).abs().max()))
        out[name] = {"detections (torchvision, ours)": counts, "max box diff px": worst_box,
                     "max score diff": worst_score}
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    return out


def _training_inputs(device, batch, size):
    images = [im.to(device) for im in _photos(batch, *size)]
    targets = random_targets(batch, size, device)
    for target in targets:
        target["iscrowd"] = torch.zeros(len(target["boxes"]), dtype=torch.long, device=device)
    return images, targets


def count_syncs(device: torch.device, batch: int, size: tuple[int, int]) -> dict:
    """Host synchronisations in one training step (after a warm-up step), ours and torchvision's."""
    tv, ours, _, _ = _models(device)
    tv.train(), ours.train()
    tv.transform.min_size, tv.transform.max_size = (min(size),), max(size)
    ours.preprocessor.train_min_sizes, ours.preprocessor.max_size = [min(size)], max(size)
    images, targets = _training_inputs(device, batch, size)
    floats = [im.float() / 255 for im in images]
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    steps = {"ours": training_step(ours, images, targets, torch.optim.SGD(ours.parameters(), lr=1e-6), True),
             "torchvision": training_step(tv, floats, tv_targets, torch.optim.SGD(tv.parameters(), lr=1e-6), True)}
    out = {}
    for name, step in steps.items():
        step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught
                 if "synchronizing" in str(w.message)]  # not the note that the mode is a prototype
        out[name] = {"syncs": len(syncs), "first": syncs[:3]}
    return out


def profile(device: torch.device, batch_train: int, batch_infer: int, size, output_dir: Path) -> dict:
    """Top CUDA kernels of our bf16 training step (channels-last) and bf16 inference."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, ours, config, state = _models(device)
    ours.train().to_channels_last()
    ours.preprocessor.train_min_sizes, ours.preprocessor.max_size = [min(size)], max(size)
    images, targets = _training_inputs(device, batch_train, size)
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1e-6)
    step = training_step(ours, images, targets, optimizer, True)
    fast = optimized_copy(config, state, device)
    fast.preprocessor.test_min_size, fast.preprocessor.max_size = min(size), max(size)
    infer_images = [im.to(device) for im in _photos(batch_infer, *size)]

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            fast(infer_images)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for name, fn in (("train", step), ("infer", infer)):
        fn(), fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        started = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            fn()
            torch.cuda.synchronize() if device.type == "cuda" else None
        wall_ms = (time.perf_counter() - started) * 1000
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        (output_dir / f"profile_{name}.txt").write_text(table)
        events = prof.key_averages()
        total = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) for e in events)
        out[name] = {"device_ms": round(total / 1000, 2), "wall_ms_profiled": round(wall_ms, 1)}
    return out


def _head_outputs(device: torch.device, batch: int, size: tuple[int, int]):
    """The optimized model and its bf16 (on a GPU) head outputs for `batch` photos of `size`:
    model, prepared batch, logits, deltas, anchors."""
    _, _, config, state = _models(device)
    fast = optimized_copy(config, state, device)
    fast.preprocessor.test_min_size, fast.preprocessor.max_size = min(size), max(size)
    images = [im.to(device) for im in _photos(batch, *size)]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        prepared, _ = fast.preprocessor(images, None, training=False)
        logits, deltas, anchors = fast.run_network(prepared.tensor)
    return fast, prepared, logits, deltas, anchors


def nms_experiment(device: torch.device, batch: int, size: tuple[int, int], repeat: int = 10) -> dict:
    """Post-processing of one batch (bf16 head outputs of the optimized model on photos):
    NMS of the shortlists image by image (torchvision's NMS, one call per image) against all
    images at once (`BatchedNMS`, eager and compiled), all through `first_kept_batched`;
    median seconds of the selection and of the whole post-processing as the compiled model
    runs it (`forward_inference`), and how many images' detections equal the per-image ones
    (up to the order of tied scores)."""
    fast, prepared, logits, deltas, anchors = _head_outputs(device, batch, size)
    post = fast.postprocessor
    boxes, scores, labels, keep = post.gather_candidates(logits, deltas, anchors, prepared.image_sizes)

    def select(nms):
        index, counts = first_kept_batched(boxes, scores, labels, keep, post.nms_threshold, post.detections_per_image,
                                           nms)
        return Detections(boxes.gather(1, index[..., None].expand(-1, -1, 4)), scores.gather(1, index),
                          labels.gather(1, index), counts).split()

    ways = {"per_image": greedy_nms_per_image, "all_at_once": BatchedNMS(),
            "all_at_once_compiled": BatchedNMS(compiled=True)}
    with torch.no_grad():
        times = alternate({name: (lambda nms=nms: select(nms)) for name, nms in ways.items()}, repeat, device)
        fast.postprocessor.compile()
        times["whole_postprocessing_compiled"] = alternate(
            {"whole": lambda: fast.forward_inference(logits, deltas, anchors, prepared)}, repeat, device)["whole"]
        results = {name: select(nms) for name, nms in ways.items()}

    def rows(det):  # order-free: equal scores may come out in either order
        table = torch.cat([det["scores"][:, None], det["boxes"], det["labels"][:, None].to(det["boxes"].dtype)], 1)
        return sorted(map(tuple, table.tolist()))

    reference = results["per_image"]
    same = {name: f"{sum(rows(x) == rows(y) for x, y in zip(reference, got))}/{len(got)}"
            for name, got in results.items() if name != "per_image"}
    return {"seconds": {k: round(t, 5) for k, t in times.items()}, "images_equal_to_per_image": same,
            "detections": sum(len(x["scores"]) for x in reference), "candidates": int(keep.sum())}


def nms_profile(device: torch.device, batch: int, size: tuple[int, int], output_dir: Path) -> dict:
    """Where the compiled post-processing of one batch spends its time: CUDA kernels of one
    `forward_inference` (profile_postprocess.txt), the NMS rounds taken and the images that
    fell back to NMS over all their candidates."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fast, prepared, logits, deltas, anchors = _head_outputs(device, batch, size)
    post = fast.postprocessor.compile()
    rounds = []
    step = post.gpu_nms.round
    post.gpu_nms.round = lambda *args: rounds.append(1) or step(*args)
    with torch.no_grad():
        for _ in range(2):
            fast.forward_inference(logits, deltas, anchors, prepared)
        rounds.clear()
        boxes, scores, labels, keep = post.gather_candidates(logits, deltas, anchors, prepared.image_sizes)
        _, counts = first_kept_batched(boxes, scores, labels, keep, post.nms_threshold, post.detections_per_image,
                                       post.gpu_nms)
        taken = len(rounds)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            fast.forward_inference(logits, deltas, anchors, prepared)
            torch.cuda.synchronize() if device.type == "cuda" else None
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    (output_dir / "profile_postprocess.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
    short = 8 * post.detections_per_image
    fell_back = sum(1 for c, v in zip(counts, keep.sum(1).tolist()) if c < post.detections_per_image and v > short)
    return {"nms_rounds": taken, "images_falling_back_to_all_candidates": fell_back, "kept": sum(counts)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", default="gpu_checks")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="toy sizes, to try the script")
    parser.add_argument("--only", default="parity,syncs,profile,nms", help="the checks to run, comma-separated")
    args = parser.parse_args()
    only = set(args.only.split(","))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    size, train_batch, infer_batch = ((128, 192), 2, 2) if args.small else ((800, 1333), 16, 32)
    report("environment", {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)
                           if device.type == "cuda" else "cpu"}, output_dir)
    if "parity" in only:
        report("parity fp32 (vs torchvision)", parity(device, (128, 192) if args.small else (800, 1216)), output_dir)
    if "syncs" in only and device.type == "cuda":
        report("host syncs in one training step", count_syncs(device, 2 if args.small else 4, size), output_dir)
    if "profile" in only:
        report("profile", profile(device, train_batch, infer_batch, size, output_dir), output_dir)
    if "nms_profile" in only:
        report("post-processing profile", nms_profile(device, infer_batch, size, output_dir), output_dir)
    if "nms" in only:
        report("post-processing: NMS image by image vs all images at once", nms_experiment(device, infer_batch, size),
               output_dir)


if __name__ == "__main__":
    main()
