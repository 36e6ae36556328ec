"""The two ONNX exporters of torch on our detector, alternating in one process: the
TorchScript-based one that `retinanet.export.onnx.export_onnx` uses, and the torch.export-based
one (`dynamo=True`, torch's default since 2.9). Times both exports of a `--dynamic` graph and
checks each graph under onnxruntime against PyTorch's own detections at several image sizes and
batches.

    python benchmarks/bench_dynamo_export.py --weights model_final.pt [--rounds 2]

torch.export cannot take the graph as `export_onnx` writes it; the variant here is what it
needs (kept as the starting point for when the TorchScript exporter is removed):
- `torch._shape_as_tensor` fails under torch.export: the input's shape becomes a tensor by
  stacking its symbolic sizes;
- the resized size is computed from tensor values (float32 scale, float64 floor, as the model
  rounds it), so torch.export sees data-dependent sizes: read with `.item()` and bounded with
  `torch._check(size >= 1)`, else the first convolution fails on "Could not guard on
  data-dependent expression Eq(64*((((u0 + u2 - 1)//2)) + 1)*..., 0)"; the pads and the
  resize's index ranges are then symbolic integers, and top-k sizes `torch.sym_min`;
- the NMS autograd Function's `symbolic` is TorchScript-only: NMS becomes a
  `torch.library.custom_op` with a fake implementation of data-dependent length, written as
  ONNX `NonMaxSuppression` through `custom_translation_table` (onnxscript).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from onnxscript import opset18 as op

from retinanet import load_model
from retinanet.export import onnx as ex
from retinanet.export.ort_predict import OnnxDetector
from retinanet.model.preprocess import resize_scale


@torch.library.custom_op("retinanet_bench::multiclass_nms", mutates_args=())
def multiclass_nms(boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_threshold: float,
                   score_threshold: float) -> torch.Tensor:
    return ex.MultiClassNMS.forward(None, boxes, scores, max_per_class, iou_threshold, score_threshold)


@multiclass_nms.register_fake
def _(boxes, scores, max_per_class, iou_threshold, score_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(), 3), dtype=torch.long)


def nms_onnx(boxes, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
    return op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[max_per_class]),
                                op.Constant(value_floats=[iou_threshold]), op.Constant(value_floats=[score_threshold]),
                                center_point_box=0)


class CustomOpNMS:
    apply = staticmethod(torch.ops.retinanet_bench.multiclass_nms)


def linear_source(n_in: torch.Tensor, n_out: torch.Tensor, length):
    """`ex.linear_source` with the output length as a (symbolic) integer."""
    scale = n_in.to(torch.float32) / n_out.to(torch.float32)
    src = (scale.to(torch.float64) * (torch.arange(length, dtype=torch.float32).to(torch.float64) + 0.5) - 0.5)
    src = src.to(torch.float32).clamp(min=0)
    i0 = torch.minimum(src.floor().to(torch.int64), n_in - 1)
    w1 = (src - i0.to(torch.float32)).clamp(0, 1)
    return i0, torch.minimum(i0 + 1, n_in - 1), 1 - w1, w1


class DynamoExportedDetector(ex.ExportedDetector):
    """`ExportedDetector` with the pre-processing and anchors torch.export can trace."""

    def preprocess(self, images):
        pre = self.model.preprocessor
        x = pre.normalize(images)
        original = torch.stack([torch.scalar_tensor(n, dtype=torch.int64) for n in images.shape[2:]])
        size, h, w = original, images.shape[2], images.shape[3]
        if pre.resize:
            scale = resize_scale(original.to(torch.float32), pre.test_min_size, pre.max_size)
            size = torch.floor(original.to(torch.float64) * scale.to(torch.float64)).to(torch.int64)
            h, w = size[0].item(), size[1].item()
            torch._check(h >= 1)
            torch._check(w >= 1)
            i0, i1, w0, w1 = linear_source(original[1], size[1], w)
            x = x.index_select(3, i0) * w0 + x.index_select(3, i1) * w1
            i0, i1, w0, w1 = linear_source(original[0], size[0], h)
            x = x.index_select(2, i0) * w0[:, None] + x.index_select(2, i1) * w1[:, None]
        d = pre.size_divisibility
        x = torch.nn.functional.pad(x, [0, (w + d - 1) // d * d - w, 0, (h + d - 1) // d * d - h])
        return x, original, size

    def anchors(self, features, images):
        generator = self.model.anchor_generator
        sizes = [tuple(f.shape[-2:]) for f in features]
        return generator.grids(sizes, generator.level_strides(sizes, tuple(images.shape[-2:])), images.device)


def export_dynamo(model, path: Path, height: int, width: int) -> None:
    saved = ex.MultiClassNMS, ex._topk_min
    ex.MultiClassNMS, ex._topk_min = CustomOpNMS, lambda x, k: torch.sym_min(k, x.shape[1])
    try:
        dummy = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8)  # batch 2: 1 would specialise
        dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=2),
                3: torch.export.Dim("width", min=2)}
        with torch.no_grad():
            torch.onnx.export(DynamoExportedDetector(model).eval(), (dummy,), str(path), input_names=["images"],
                              output_names=["boxes", "scores", "labels", "num_detections"], dynamic_shapes=(dims,),
                              opset_version=18, dynamo=True, verbose=False,
                              custom_translation_table={torch.ops.retinanet_bench.multiclass_nms.default: nms_onnx})
        ex._finish_graph(model, path, height, width, 1, True, False)
    finally:
        ex.MultiClassNMS, ex._topk_min = saved


def export_torchscript(model, path: Path, height: int, width: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the deprecation this benchmark is about
        ex.export_onnx(model, path, height, width, dynamic=True)


def parity(model, path: Path) -> str:
    """Largest score and box differences of the graph under onnxruntime against
    `model.predict`, on a photograph cropped and scaled to sizes the model shrinks and enlarges."""
    import skimage.data

    detector, photo = OnnxDetector(path), torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)
    score_diff = box_diff = 0.0
    count = 0
    for (h, w), batch in [((150, 230), 1), ((250, 170), 2), ((70, 101), 1), ((90, 61), 3), ((401, 333), 1)]:
        image = torch.nn.functional.interpolate(photo[None].float(), size=(h, w), mode="bilinear")[0]
        images = [image.round().clamp(0, 255).to(torch.uint8)] * batch
        want = model.predict(images, batch_size=batch)
        got = detector.predict([i.permute(1, 2, 0).numpy() for i in images])
        for g, r in zip(got, want):
            assert len(g["scores"]) == len(r["scores"]), (h, w, len(g["scores"]), len(r["scores"]))
            order, ref = np.argsort(-g["scores"], kind="stable"), np.argsort(-r["scores"].numpy(), kind="stable")
            score_diff = max(score_diff, float(np.abs(g["scores"][order] - r["scores"].numpy()[ref]).max(initial=0)))
            box_diff = max(box_diff, float(np.abs(g["boxes"][order] - r["boxes"].numpy()[ref]).max(initial=0)))
            count += len(g["scores"])
    return f"{count} detections, scores within {score_diff:.1e}, boxes within {box_diff:.1e} px"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = load_model(args.weights, optimize=False).eval()  # exported as `retinanet export` does
    height, width = model.preprocessor.test_min_size, model.preprocessor.max_size
    folder = Path(tempfile.mkdtemp())
    times = {"torchscript": [], "dynamo": []}
    for _ in range(args.rounds):
        for name, export in (("torchscript", export_torchscript), ("dynamo", export_dynamo)):
            start = time.perf_counter()
            export(model, folder / f"{name}.onnx", height, width)
            times[name].append(time.perf_counter() - start)
            print(f"{name}: export {times[name][-1]:.1f} s", flush=True)
    for name in times:
        print(f"{name}: export {min(times[name]):.1f}-{max(times[name]):.1f} s; {parity(model, folder / f'{name}.onnx')}")


if __name__ == "__main__":
    main()
