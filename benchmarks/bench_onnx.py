"""Exported models under onnxruntime: ours (`retinanet export`, run by `OnnxDetector`) against
torchvision's `retinanet_resnet50_fpn` exported by `torch.onnx.export`, same weights, same photo.

Both are timed end to end from a decoded `(H, W, 3)` uint8 image to final detections in
original pixels; both graphs hold their own resize and normalisation (ours is exported for
images of the photo's size). torchvision's export takes one image, so the case is batch 1. The two sessions alternate (A B A B ...), both with onnxruntime's default
CPU threads; prints the medians, the ratio and how far the two sets of detections differ.
Usage: python benchmarks/bench_onnx.py [--height 800 --width 1067] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from retinanet.engine.bench import _models, machine, optimized_copy
from retinanet.export.onnx import export_onnx
from retinanet.export.ort_predict import OnnxDetector


def photo(height: int, width: int) -> np.ndarray:
    import skimage.data

    image = torch.from_numpy(np.ascontiguousarray(skimage.data.coffee())).permute(2, 0, 1)[None].float()
    resized = F.interpolate(image, size=(height, width), mode="bilinear")[0].clamp(0, 255).to(torch.uint8)
    return resized.permute(1, 2, 0).contiguous().numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1067)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    tv, _, config, state = _models(torch.device("cpu"))
    tv.eval()
    ours = optimized_copy(config, state, torch.device("cpu"))
    image = photo(args.height, args.width)
    folder = Path(tempfile.mkdtemp())
    export_onnx(ours, folder / "ours.onnx", args.height, args.width)  # the graph resizes as the model does
    tv_input = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        torch.onnx.export(tv, ([tv_input],), str(folder / "tv.onnx"), opset_version=17, dynamo=False,
                          input_names=["images"])
    ours_session = OnnxDetector(folder / "ours.onnx", providers=["CPUExecutionProvider"])
    tv_session = ort.InferenceSession(str(folder / "tv.onnx"), providers=["CPUExecutionProvider"])

    def run_ours():
        return ours_session.predict([image])[0]

    def run_tv():
        x = image.astype(np.float32).transpose(2, 0, 1) / 255
        boxes, scores, labels = tv_session.run(None, {"images": np.ascontiguousarray(x)})
        return {"boxes": boxes, "scores": scores, "labels": labels}

    results = {"ours": run_ours(), "torchvision": run_tv()}  # warm-up
    times = {"ours": [], "torchvision": []}
    for _ in range(args.repeat):
        for name, fn in (("ours", run_ours), ("torchvision", run_tv)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ours_t, tv_t = statistics.median(times["ours"]), statistics.median(times["torchvision"])
    host = machine()
    print(f"# {time.strftime('%Y-%m-%d')}, {host['cpu']} ({', '.join(host['cpu_flags'])}), "
          f"onnxruntime {ort.__version__}, torch {torch.__version__}, image {args.height}x{args.width}, "
          f"median of {args.repeat}")
    print(f"ours        {ours_t:.3f} s  {[round(t, 3) for t in times['ours']]}")
    print(f"torchvision {tv_t:.3f} s  {[round(t, 3) for t in times['torchvision']]}")
    print(f"ours / torchvision speed: {tv_t / ours_t:.2f}x")
    a, b = results["ours"], results["torchvision"]
    n = min(len(a["scores"]), len(b["scores"]))
    print(f"detections: ours {len(a['scores'])}, torchvision {len(b['scores'])}; best {n}: scores differ by at "
          f"most {np.abs(a['scores'][:n] - b['scores'][:n]).max():.2e}, labels equal {np.mean(a['labels'][:n] == b['labels'][:n]):.0%}")


if __name__ == "__main__":
    main()
