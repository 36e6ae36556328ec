"""Batch-1 CPU inference at 800x1216: torchvision's RetinaNet in eager PyTorch against ours
exported to OpenVINO (fp32 IR run in fp32, the same IR in OpenVINO's bf16, and the INT8 IR),
alternating in one process so that every runtime sees the same machine load.

The weights are torchvision's retinanet_resnet50_fpn with random initialisation, converted
to our checkpoint (speed does not depend on the values); the INT8 IR is calibrated on
`--calibration-images` crops of scikit-image's photographs at the benchmark size.

    python benchmarks/bench_openvino.py --work /tmp/bench_ov --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def build(work: Path) -> Path:
    """torchvision's R-50 RetinaNet (random weights, classification bias -1), converted to ours."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    from retinanet.cli import main as cli

    checkpoint = work / "ours.pt"
    if not checkpoint.exists():
        torch.manual_seed(0)
        tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None)
        with torch.no_grad():
            tv.head.classification_head.cls_logits.bias.fill_(-1.0)
        torch.save(tv.state_dict(), work / "tv.pth")
        assert cli(["convert", "--from", "torchvision", str(work / "tv.pth"), str(checkpoint)]) == 0
    return checkpoint


def photos(height: int, width: int, count: int) -> list[np.ndarray]:
    """`count` photographs resized to `height x width`, `(H, W, 3)` uint8."""
    import skimage.data
    from PIL import Image

    sources = [skimage.data.coffee(), skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.rocket()]
    return [np.asarray(Image.fromarray(sources[i % len(sources)]).resize((width, height))) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="bench_openvino_work", help="folder for the checkpoint and the IRs")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--calibration-images", type=int, default=8)
    args = parser.parse_args()

    from torchvision.models.detection import retinanet_resnet50_fpn

    from retinanet import load_model
    from retinanet.export.openvino import export_openvino
    from retinanet.export.ov_predict import OpenVinoDetector

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = build(work)
    model = load_model(checkpoint, optimize=False).eval()
    h, w = args.height, args.width
    for name, calibration in (("fp32", None), ("int8", photos(h, w, args.calibration_images))):
        if not (work / name / "model.xml").exists():
            start = time.perf_counter()
            export_openvino(model, work / name, h, w, calibration=calibration)
            print(f"exported {name} in {time.perf_counter() - start:.0f} s")

    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
    image = photos(h, w, 1)[0]
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    runners = {
        "torchvision eager (fp32)": lambda: tv([tensor]),
        "ours, OpenVINO fp32": OpenVinoDetector(work / "fp32").predict,
        "ours, OpenVINO fp32 IR in bf16": OpenVinoDetector(work / "fp32", precision="bf16").predict,
        "ours, OpenVINO INT8": OpenVinoDetector(work / "int8").predict,
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for round_ in range(args.repeats + 1):
            for name, run in runners.items():
                start = time.perf_counter()
                run() if name.startswith("torchvision") else run([image])
                if round_:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torchvision eager (fp32)"])
    print(f"batch 1, {w}x{h}, torch threads {torch.get_num_threads()}, {args.repeats} rounds (median)")
    print("| runtime | s/image | images/s | vs torchvision |\n|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {1 / median:.2f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
