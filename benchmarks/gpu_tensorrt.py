"""TensorRT fp16 through ONNX Runtime's TensorRT execution provider, against our compiled
PyTorch path, on one CUDA GPU. Needs `pip install onnxruntime-gpu tensorrt-cu12` (both on PyPI)
beside the project; `benchmarks/gpu.sh` runs it with TENSORRT=1.

The model: torchvision's R-50-FPN RetinaNet as released (random weights, classification bias
-2 so that it detects), converted to ours, exported by `export_onnx` (uint8 images in, resize,
NMS and top-k inside the graph) for each batch size at a fixed size. Measured, alternating in
one process after a warm-up (TensorRT builds its engine on the first run; it is cached in
`--output-dir`):
- agreement: COCO AP of TensorRT's detections with ours (PyTorch fp32 on the GPU) taken as
  ground truth, and the largest box and score differences of matched detections;
- images/s at each batch size: TensorRT fp16 (host uint8 arrays in, detections out) against
  ours optimized and compiled under bf16 autocast (`predict --compile --amp bf16`), uint8
  tensors on the GPU in.

    python benchmarks/gpu_tensorrt.py --output-dir bench_gpu/tensorrt [--batches 1 32] [--size 800 1216]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from retinanet.engine.bench import _models, _photos, optimized_copy
from retinanet.engine.evaluate import agreement_ap
from retinanet.export.onnx import export_onnx
from retinanet.export.ort_predict import OnnxDetector


def tensorrt_providers(cache: Path) -> list:
    return [("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                           "trt_engine_cache_path": str(cache), "device_id": 0}),
            ("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]


def largest_differences(reference: list[dict], got: list[dict]) -> dict:
    """Largest box (px) and score differences between each reference detection scored >= 0.3
    and the same-label detection of `got` that overlaps it most."""
    from torchvision.ops import box_iou

    box, score = 0.0, 0.0
    for ref, det in zip(reference, got):
        keep = ref["scores"] >= 0.3
        if not keep.any() or not len(det["scores"]):
            continue
        iou = box_iou(torch.as_tensor(ref["boxes"][keep]).float(), torch.as_tensor(det["boxes"]).float())
        iou[torch.as_tensor(ref["labels"][keep])[:, None] != torch.as_tensor(det["labels"])[None]] = -1
        best = iou.argmax(1).numpy()
        box = max(box, float(np.abs(ref["boxes"][keep] - det["boxes"][best]).max()))
        score = max(score, float(np.abs(ref["scores"][keep] - det["scores"][best]).max()))
    return {"max_box_px": round(box, 3), "max_score": round(score, 5)}


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="bench_gpu/tensorrt")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    import onnxruntime

    assert "TensorrtExecutionProvider" in onnxruntime.get_available_providers(), (
        "onnxruntime has no TensorRT provider: pip install onnxruntime-gpu tensorrt-cu12")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    height, width = args.size
    _, ours, config, state = _models(torch.device("cpu"))
    reference_model = optimized_copy(config, state, device)
    compiled = optimized_copy(config, state, device, compile=True)
    for model in (ours.eval(), reference_model, compiled):
        model.preprocessor.test_min_size, model.preprocessor.max_size = min(args.size), max(args.size)
    results = {"gpu": torch.cuda.get_device_name(0), "onnxruntime": onnxruntime.__version__, "size": args.size,
               "cases": []}
    for batch in args.batches:
        path = export_onnx(ours, out / f"ours_b{batch}.onnx", height, width, batch)
        session = OnnxDetector(path, providers=tensorrt_providers(out / "engines"))
        tensors = _photos(batch, height, width)
        arrays = [t.permute(1, 2, 0).numpy().copy() for t in tensors]
        on_gpu = [t.to(device) for t in tensors]
        with torch.no_grad():
            reference = [{k: v.cpu().numpy() for k, v in d.items() if k in ("boxes", "scores", "labels")}
                         for d in reference_model(on_gpu)]
        trt = session.predict(arrays)  # builds (or loads) the engine
        row = {"batch": batch, "agreement_ap": round(agreement_ap(reference, trt), 4),
               **largest_differences(reference, trt)}

        def run_compiled():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                compiled(on_gpu)
        run_compiled()
        seconds = {"tensorrt_fp16": [], "ours_compiled_bf16": []}
        for _ in range(args.repeat):
            seconds["tensorrt_fp16"].append(timed(lambda: session.predict(arrays), 1))
            seconds["ours_compiled_bf16"].append(timed(run_compiled, 1))
        row["images_per_second"] = {k: round(batch / statistics.median(v), 1) for k, v in seconds.items()}
        print(json.dumps(row), flush=True)
        results["cases"].append(row)
    (out / "tensorrt.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['gpu']}, onnxruntime {results['onnxruntime']}, {width}x{height}, median of {args.repeat}")
    print("| batch | TensorRT fp16 (images/s) | ours compiled bf16 (images/s) | agreement AP | max box diff (px) |")
    print("|---|---|---|---|---|")
    for row in results["cases"]:
        ips = row["images_per_second"]
        print(f"| {row['batch']} | {ips['tensorrt_fp16']} | {ips['ours_compiled_bf16']} | {row['agreement_ap']} | "
              f"{row['max_box_px']} |")


if __name__ == "__main__":
    main()
