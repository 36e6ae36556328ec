"""The deployed runtimes of `retinanet bench`, side by side on the same weights and images,
alternating in one process: torchvision's RetinaNet in eager PyTorch and through its own ONNX
export under onnxruntime; ours in eager PyTorch (as built and as `load_model` optimizes it),
and exported (`export_onnx`, `export_openvino`) under onnxruntime and OpenVINO in fp32 and
INT8. Each is timed end to end from decoded uint8 images to detections in their pixels.

A runtime whose package is not installed is left out, with the line that says how to get it.
Beside each time: the floor (the network's FLOPs over the peak of 3x3 convolutions measured in
the same run, in the runtime's arithmetic: fp32, or INT8 for the INT8 model), and the agreement
of its detections with ours in eager PyTorch (COCO AP with those taken as ground truth). With the
benchmark's random weights, near-equal scores make the agreement a harsh measure of a
runtime's numerical drift; the accuracy cost of INT8 on a trained model is measured by
`benchmarks/deployed_accuracy.py`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .bench import _models, _photos, alternate, network_gflop, optimized_copy, timed
from .evaluate import agreement_ap

REFERENCE = "ours_optimized"
# each exported runtime: the packages it needs and how to get them
EXTRAS = {"ours_onnxruntime": (("onnx", "onnxruntime"), "pip install 'retinanet[export]'"),
          "torchvision_onnxruntime": (("onnx", "onnxruntime"), "pip install 'retinanet[export]'"),
          "ours_openvino_fp32": (("openvino",), "pip install 'retinanet[openvino]'"),
          "ours_openvino_int8": (("openvino", "nncf"), "pip install 'retinanet[openvino]'")}
CONV_SHAPE = (256, 100, 152)  # channels, height, width of the peak's 3x3 convolutions (a P3 map at 800x1216)
PEAK_DEPTH = 6


def missing_packages(runtime: str) -> str | None:
    """How to install what `runtime` needs, or None when it is all there."""
    import importlib.util

    packages, install = EXTRAS.get(runtime, ((), ""))
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    return f"needs {', '.join(missing)} ({install})" if missing else None


def bench_runtimes(batch: int, size: tuple[int, int], repeat: int, *, calibration_images: int = 8,
                   models=None, work: str | Path | None = None) -> dict:
    """Every runtime at `batch` images of `size (h, w)`; medians of `repeat` alternating
    rounds after a warm-up. `models`: `(torchvision, ours, config, state)` as `bench._models`
    gives them (the default: torchvision's R-50-FPN as released, random weights, converted).
    The exports go to a temporary folder inside `work` (default: the system's), removed after."""
    device = torch.device("cpu")
    tv, ours, config, state = models or _models(device)
    tv.eval(), ours.eval()
    fast = optimized_copy(config, state, device)
    short, long = min(size), max(size)
    tv.transform.min_size, tv.transform.max_size = (short,), long
    for model in (ours, fast):
        model.preprocessor.test_min_size, model.preprocessor.max_size = short, long
    tensors = _photos(batch, *size)
    arrays = [t.permute(1, 2, 0).numpy().copy() for t in tensors]
    floats = [t.float() / 255 for t in tensors]

    runners: dict[str, Callable[[], list[dict]]] = {
        "torchvision": lambda: _numpy(tv(floats)), "ours": lambda: _numpy(ours(tensors)),
        REFERENCE: lambda: _numpy(fast(tensors))}
    skipped = {name: reason for name in EXTRAS if (reason := missing_packages(name))}
    folder = Path(tempfile.mkdtemp(prefix="bench-runtimes-", dir=work))
    export_seconds: dict[str, float] = {}
    try:
        with torch.no_grad():
            runners.update(_exported(ours, tv, arrays, floats, folder, calibration_images, skipped, export_seconds))
        peaks: dict[str, float] = {}
        with torch.no_grad():
            times = alternate(runners, repeat, device, peaks)
            detections = {name: run() for name, run in runners.items()}
            batch_tensor, _ = fast.preprocessor(tensors)
            gflop = network_gflop(ours, batch_tensor.tensor)
        conv_peaks = conv_peak_gflops(folder, int8="ours_openvino_int8" in runners)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    floors = {name: round(gflop / conv_peaks["int8" if name.endswith("int8") else "fp32"], 3) for name in times}
    agreement = {name: round(agreement_ap(detections[REFERENCE], dets), 4) for name, dets in detections.items()
                 if name != REFERENCE}
    return {"case": f"deployed runtimes, batch {batch} at {size[0]}x{size[1]}", "seconds": times,
            "images_per_second": {k: round(batch / v, 3) for k, v in times.items()},
            "ratio_vs_torchvision": {k: round(times["torchvision"] / v, 3) for k, v in times.items()},
            "floor_seconds": floors, "network_gflop": round(gflop, 1), "conv3x3_peak_gflops": conv_peaks,
            "agreement_ap_vs_ours": agreement, "export_seconds": export_seconds, "peak_memory_mb": peaks,
            "skipped": skipped, "calibration_images": calibration_images,
            "kernels_capped": bool(os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("ATEN_CPU_CAPABILITY"))}


def _numpy(outputs: list[dict]) -> list[dict]:
    return [{k: v.numpy() for k, v in out.items() if k in ("boxes", "scores", "labels")} for out in outputs]


def _exported(ours, tv, arrays: list[np.ndarray], floats: list[torch.Tensor], folder: Path, calibration_images: int,
              skipped: dict[str, str], export_seconds: dict[str, float]) -> dict[str, Callable[[], list[dict]]]:
    """The runners of the exported runtimes not in `skipped`, each exported for the batch's
    size and batch (a fixed-shape export, `retinanet export`'s default); fills
    `export_seconds` with how long each export took."""
    batch, (height, width) = len(arrays), arrays[0].shape[:2]
    runners = {}

    def export(name: str, fn):
        start = time.perf_counter()
        result = fn()
        export_seconds[name] = round(time.perf_counter() - start, 1)
        return result

    if "ours_onnxruntime" not in skipped:
        from ..export.onnx import export_onnx
        from ..export.ort_predict import OnnxDetector

        path = export("ours_onnxruntime", lambda: export_onnx(ours, folder / "ours.onnx", height, width, batch))
        onnx_detector = OnnxDetector(path, providers=["CPUExecutionProvider"])
        runners["ours_onnxruntime"] = lambda: onnx_detector.predict(arrays)
    for name, calibration in (("ours_openvino_fp32", None), ("ours_openvino_int8", calibration_images)):
        if name in skipped:
            continue
        from ..export.openvino import export_openvino
        from ..export.ov_predict import OpenVinoDetector

        images = [t.permute(1, 2, 0).numpy() for t in _photos(calibration, height, width)] if calibration else None
        export(name, lambda: export_openvino(ours, folder / name, height, width, batch, calibration=images))
        runners[name] = (lambda detector: lambda: detector.predict(arrays))(OpenVinoDetector(folder / name))
    if "torchvision_onnxruntime" not in skipped:
        runners["torchvision_onnxruntime"] = export("torchvision_onnxruntime",
                                                    lambda: _torchvision_onnx(tv, floats, folder / "tv.onnx"))
    return runners


def _torchvision_onnx(tv, floats: list[torch.Tensor], path: Path) -> Callable[[], list[dict]]:
    """torchvision's model through `torch.onnx.export` as its documentation shows it, under
    onnxruntime: its graph takes one image, so a batch is one call per image."""
    import onnxruntime

    torch.onnx.export(tv, ([floats[0]],), str(path), opset_version=17, dynamo=False, input_names=["image"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [np.ascontiguousarray(image.numpy()) for image in floats]

    def run() -> list[dict]:
        outputs = [session.run(None, {"image": image}) for image in inputs]
        return [{"boxes": boxes, "scores": scores, "labels": labels} for boxes, scores, labels in outputs]
    return run


def conv_peak_gflops(folder: Path, int8: bool) -> dict[str, float]:
    """Sustained GFLOP/s of a stack of `PEAK_DEPTH` 256-channel 3x3 convolutions with ReLU on a
    `CONV_SHAPE` map: in fp32 by PyTorch (channels-last), and with `int8`, quantized by NNCF and
    run by OpenVINO (each multiply-add counted as two operations, as for fp32). A stack, so that
    the INT8 graph's conversions of its float input and output weigh as little as in the network."""
    channels, height, width = CONV_SHAPE
    layers = [layer for _ in range(PEAK_DEPTH) for layer in (torch.nn.Conv2d(channels, channels, 3, padding=1),
                                                             torch.nn.ReLU())]
    stack = torch.nn.Sequential(*layers).eval()
    x = torch.randn(1, channels, height, width)
    flop = PEAK_DEPTH * 2 * channels * channels * 9 * height * width
    fast, fast_x = stack.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast(fast_x)
        peaks = {"fp32": round(flop / min(timed(lambda: fast(fast_x), x.device) for _ in range(3)) / 1e9, 1)}
    if int8:
        peaks["int8"] = round(flop / _openvino_int8_seconds(stack.to(memory_format=torch.contiguous_format), x,
                                                            folder) / 1e9, 1)
    return peaks


def _openvino_int8_seconds(network: torch.nn.Module, x: torch.Tensor, folder: Path) -> float:
    """The best of 3 runs of `network` on `x`, quantized by NNCF (calibrated on `x`), in OpenVINO."""
    import nncf
    import openvino as ov

    from ..export.openvino import quiet_nncf
    from ..export.ov_predict import core

    path = folder / "peak.onnx"
    torch.onnx.export(network, (x,), str(path), opset_version=17, dynamo=False, input_names=["x"])
    sample = x.numpy()
    with quiet_nncf():
        quantized = nncf.quantize(ov.convert_model(str(path)), nncf.Dataset([sample]), subset_size=1)
    request = core().compile_model(quantized, "CPU").create_infer_request()
    request.infer({"x": sample})
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        request.infer({"x": sample})
        best = min(best, time.perf_counter() - start)
    return best


def runtimes_table(case: dict) -> str:
    """One deployed-runtimes case as a markdown table: a row per runtime."""
    lines = [f"{case['case']}; agreement: COCO AP of each runtime's detections with ours (PyTorch, optimized) "
             f"taken as ground truth.", "",
             "| runtime | s/batch | images/s | vs torchvision eager | floor (s) | agreement AP | export (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, seconds in case["seconds"].items():
        agreement = case["agreement_ap_vs_ours"].get(name)
        lines.append(f"| {name} | {seconds:.3f} | {case['images_per_second'][name]:.2f} | "
                     f"{case['ratio_vs_torchvision'][name]:.2f}x | {case['floor_seconds'][name]} | "
                     f"{'reference' if agreement is None else f'{agreement:.4f}'} | "
                     f"{case['export_seconds'].get(name, '')} |")
    for name, reason in case["skipped"].items():
        lines.append(f"| {name} | left out: {reason} | | | | | |")
    if case.get("kernels_capped") and any(name.endswith("onnxruntime") for name in case["seconds"]):
        lines += ["", "onnxruntime picks its kernels by the CPU and has no switch to cap them: its rows ran with all the CPU has."]
    return "\n".join(lines) + "\n"


def summary(case: dict) -> str:
    return json.dumps({k: case[k] for k in ("case", "ratio_vs_torchvision", "skipped")})
