"""Matching + losses and post-processing: ours (batched) against torchvision (per image), same inputs.

Both sides get identical head outputs, anchors and targets (torchvision's RetinaNet v1 and its
converted twin), so only the code after the head is timed. Prints the median time per call of
each side and the ratio. Usage: python benchmarks/bench_hot_paths.py [--batch 4] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from retinanet.convert.torchvision import convert_torchvision
from retinanet.model.build import build_retinanet
from retinanet.model.detector import pack_targets


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--boxes", type=int, default=20, help="ground-truth boxes per image")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
    config, state = convert_torchvision(tv.state_dict())
    ours = build_retinanet(config).eval()
    ours.load_state_dict(state)

    b, h, w = args.batch, 800, 1216
    sizes = [(h // s + (h % s > 0), w // s + (w % s > 0)) for s in (8, 16, 32, 64, 128)]
    num_anchors = [hh * ww * 9 for hh, ww in sizes]
    logits = [torch.randn(b, n, 91) - 3 for n in num_anchors]
    deltas = [torch.randn(b, n, 4) * 0.1 for n in num_anchors]
    anchors = ours.anchor_generator(sizes, (h, w))
    xy = torch.rand(b, args.boxes, 2) * torch.tensor([w - 200.0, h - 200.0])
    wh = torch.rand(b, args.boxes, 2) * 180 + 12
    targets = [{"boxes": torch.cat([xy[i], xy[i] + wh[i]], 1), "labels": torch.randint(1, 91, (args.boxes,))}
               for i in range(b)]
    image_sizes = [(h, w)] * b
    # the same anchors for both sides (the anchor order inside a location does not change the work)
    tv_anchors = [torch.cat(anchors)] * b
    tv_head = {"cls_logits": torch.cat(logits, 1), "bbox_regression": torch.cat(deltas, 1)}
    tv_level_anchors = [list(anchors)] * b

    def ours_loss():
        all_anchors = torch.cat(anchors)
        gt = pack_targets(targets, all_anchors.device)
        m = ours.matcher(all_anchors, gt[0], gt[2], gt[3])
        return ours.loss(torch.cat(logits, 1), torch.cat(deltas, 1), all_anchors, m, gt[0], gt[1])

    def tv_loss():
        return tv.compute_loss(targets, tv_head, tv_anchors)

    def ours_post():
        return ours.postprocessor(logits, deltas, anchors, image_sizes)

    def tv_post():
        split = {"cls_logits": list(logits), "bbox_regression": list(deltas)}
        return tv.postprocess_detections(split, tv_level_anchors, image_sizes)

    def with_backward(loss_fn, inputs):
        """`loss_fn` forward and backward into the head outputs `inputs` (their gradients)."""
        def run():
            for x in inputs:
                x.requires_grad_(True)
            losses = loss_fn()
            torch.autograd.grad(sum(losses.values()), inputs)
            for x in inputs:
                x.requires_grad_(False)
        return run

    with torch.no_grad():
        rows = [("matching + losses", median_time(ours_loss, args.repeat), median_time(tv_loss, args.repeat)),
                ("post-processing", median_time(ours_post, args.repeat), median_time(tv_post, args.repeat))]
    rows.insert(1, ("losses + backward", median_time(with_backward(ours_loss, logits + deltas), args.repeat),
                    median_time(with_backward(tv_loss, list(tv_head.values())), args.repeat)))
    print(f"batch {b}, {h}x{w} input ({sum(num_anchors)} anchors/image), {args.boxes} GT/image, "
          f"{torch.get_num_threads()} threads, median of {args.repeat}")
    print(f"{'part':<20} {'ours (s)':>10} {'torchvision (s)':>16} {'speed-up':>9}")
    for name, mine, theirs in rows:
        print(f"{name:<20} {mine:>10.4f} {theirs:>16.4f} {theirs / mine:>8.2f}x")


if __name__ == "__main__":
    main()
