"""Does onnxruntime's static INT8 quantization pay for our exported graph? A probe.

The graph of `export_onnx` (uint8 images in, resize, NMS inside) for torchvision's R-50-FPN as
released (random weights, converted), at one size; its convolutions in backbone, FPN and head
quantized by `onnxruntime.quantization.quantize_static` (QDQ, per-channel weights, calibrated on
`--calibration-images` generated scenes), the heads' last convolutions and everything outside the
network left in fp32, as the OpenVINO INT8 export does. The fp32 and INT8 sessions alternate in
one process; prints their medians, the ratio, and the agreement of INT8's detections with fp32's.

    python benchmarks/ort_int8.py --work /tmp/ort_int8 [--size 800 1216] [--repeat 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from retinanet.engine.bench import _models, _photos, machine
from retinanet.engine.evaluate import agreement_ap
from retinanet.export.onnx import export_onnx
from retinanet.export.openvino import HEAD_OUTPUTS
from retinanet.export.ort_predict import OnnxDetector


class Scenes:
    """onnxruntime's CalibrationDataReader over uint8 `(1, 3, H, W)` images."""

    def __init__(self, images: list[np.ndarray]):
        self.images = iter(images)

    def get_next(self):
        image = next(self.images, None)
        return None if image is None else {"images": image}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calibration-images", type=int, default=8)
    args = parser.parse_args()
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    height, width = args.size
    _, ours, _, _ = _models(torch.device("cpu"))
    ours.eval()
    ours.preprocessor.test_min_size, ours.preprocessor.max_size = min(args.size), max(args.size)
    fp32 = export_onnx(ours, work / "fp32.onnx", height, width)
    graph = onnx.load(str(fp32))
    network = re.compile(r"^/(backbone|fpn|head)/")
    excluded = [n.name for n in graph.graph.node if n.op_type == "Conv" and
                (not network.match(n.name) or re.match(HEAD_OUTPUTS, n.name))]
    calibration = [t[None].numpy() for t in _photos(args.calibration_images, height, width)]
    start = time.perf_counter()
    quantize_static(str(fp32), str(work / "int8.onnx"), Scenes(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv"], nodes_to_exclude=excluded)
    print(f"quantized in {time.perf_counter() - start:.0f} s; {len(excluded)} convolutions left in fp32")
    sessions = {name: OnnxDetector(work / f"{name}.onnx", providers=["CPUExecutionProvider"])
                for name in ("fp32", "int8")}
    image = [_photos(1, height, width)[0].permute(1, 2, 0).numpy().copy()]
    detections = {name: session.predict(image) for name, session in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.repeat):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.predict(image)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    host = machine()
    print(f"{host['cpu']} ({', '.join(host['cpu_flags'])}), {host['threads']} threads, batch 1 at {width}x{height}, "
          f"median of {args.repeat}")
    for name, seconds in medians.items():
        print(f"onnxruntime {name}: {seconds:.3f} s")
    print(f"INT8 / fp32 speed: {medians['fp32'] / medians['int8']:.2f}x; agreement AP of INT8 with fp32: "
          f"{agreement_ap(detections['fp32'], detections['int8']):.4f}")


if __name__ == "__main__":
    main()
