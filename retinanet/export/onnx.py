"""ONNX export of the whole detector: pre-processing (normalisation, resize, padding),
backbone, FPN, head, anchor decoding, per-level top-k, class-aware NMS (ONNX
`NonMaxSuppression`) and the final top-N.

The graph's contract: `images (B, 3, H, W)` uint8 RGB, the original images (a batch holds
images of one size), which the graph resizes and pads exactly as the model's `Preprocessor`
does (`resize_like_model`), so no runtime's own resize can make its detections differ.
Outputs, in the input images' pixels: `boxes (B, N, 4)` xyxy, `scores (B, N)`, `labels
(B, N)` int64, padded with zeros past `num_detections (B,)`. A fixed-shape graph (not
`dynamic`) takes images of its export size only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..model.detector import RetinaNet
from ..model.preprocess import resize_scale
from ..outputs import atomic_output


class MultiClassNMS(torch.autograd.Function):
    """Per image and class NMS, exported as ONNX `NonMaxSuppression`.

    `boxes (B, K, 4)`, `scores (B, C, K)`: returns the selected `(M, 3)` triples `[image,
    class, box]`, as ONNX defines them (boxes scoring at or below `score_threshold` never
    selected, at most `max_per_class` per image and class, best first within each)."""

    @staticmethod
    def forward(ctx, boxes, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
        from torchvision.ops import nms

        out = []
        for b in range(scores.shape[0]):
            for c in range(scores.shape[1]):
                candidates = (scores[b, c] > score_threshold).nonzero().flatten()
                if len(candidates) == 0:
                    continue
                keep = candidates[nms(boxes[b, candidates], scores[b, c, candidates], iou_threshold)][:max_per_class]
                out.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], dim=1))
        return torch.cat(out) if out else torch.zeros(0, 3, dtype=torch.long, device=boxes.device)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
        return g.op("NonMaxSuppression", boxes, scores,
                    g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.long)),
                    g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float)),
                    g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float)),
                    center_point_box_i=0)


def _shape(x: torch.Tensor) -> torch.Tensor:
    """`x.shape` as an int64 tensor, recorded in the graph while exporting (so that it can vary)."""
    return torch._shape_as_tensor(x) if torch.jit.is_tracing() else torch.tensor(x.shape)


def linear_source(n_in: torch.Tensor, n_out: torch.Tensor):
    """Bilinear (`align_corners=False`) source indices and weights along one axis, computed as
    torch's CPU kernel computes them: scale `n_in / n_out` in float32, source `scale * (i + 0.5)
    - 0.5` rounded once (torch fuses it into one FMA: emulated in float64, where the product is
    exact), clamped at 0. Returns `(i0, i1, w0, w1)`, each `(n_out,)`."""
    scale = n_in.to(torch.float32) / n_out.to(torch.float32)
    dst = torch.arange(n_out, dtype=torch.float32).to(torch.float64) + 0.5
    src = (scale.to(torch.float64) * dst - 0.5).to(torch.float32).clamp(min=0)
    last = n_in - 1
    i0 = torch.minimum(src.floor().to(torch.int64), last)
    w1 = (src - i0.to(torch.float32)).clamp(0, 1)
    return i0, torch.minimum(i0 + 1, last), 1 - w1, w1


def floor_product(n: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`floor(n * scale)` for int64 sides `n` below 2**18 and a float32 0-dim `scale` in
    [2**-19, 2**12), exact as in float64 (as `F.interpolate` rounds output sizes), with float32
    ops whose results are exact and integers below 2**31: runtimes that run float64 as float32
    and int64 as int32 (OpenVINO's CPU plugin) give the same sizes. `scale` is split into its
    24-bit integer mantissa `m` and exponent `e` (from comparisons with powers of two, exact),
    and `floor(n * m / 2**k)` is taken in two 12-bit halves of `m`."""
    count = (scale >= 2.0 ** torch.arange(-19, 12, dtype=torch.float32)).sum()  # scale in [2**(count-20), ...)
    to_mantissa = 2.0 ** torch.arange(42, 11, -1, dtype=torch.float32)  # 2**(43 - count), by count - 1
    divisor = 2 ** torch.arange(30, -1, -1)  # 2**(31 - count): the mantissa's weight beyond its low 12 bits
    mantissa = (scale * to_mantissa[count - 1]).to(torch.int64)  # in [2**23, 2**24)
    high, low = torch.div(mantissa, 4096, rounding_mode="floor"), mantissa % 4096
    return torch.div(n * high + torch.div(n * low, 4096, rounding_mode="floor"), divisor[count - 1],
                     rounding_mode="floor")


def resize_bilinear(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)` written with Gather, Mul
    and Add, so that every runtime gives torch's numbers (ONNX `Resize` under onnxruntime
    differs by up to 0.02 on [0, 255] pixel values at some scales: its source coordinates are
    rounded differently). Rows are blended after columns, as torch's kernel does."""
    shape = _shape(x)
    i0, i1, w0, w1 = linear_source(shape[3], size[1])
    x = x.index_select(3, i0) * w0 + x.index_select(3, i1) * w1
    i0, i1, w0, w1 = linear_source(shape[2], size[0])
    return x.index_select(2, i0) * w0[:, None] + x.index_select(2, i1) * w1[:, None]


class ExportedDetector(nn.Module):
    """The model with its pre- and post-processing written with exportable tensor ops: uint8
    images `(B, 3, H, W)` in, detections in their pixels out."""

    def __init__(self, model: RetinaNet, postprocess: bool = True):
        super().__init__()
        self.model = model.eval()
        self.postprocess = postprocess

    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`Preprocessor` on a batch of one size, with sizes read inside the graph: normalise,
        resize (short side to `test_min_size`, long side at most `max_size`, each side
        `floor(side * scale)` in float64 as `F.interpolate` rounds it), pad with zeros to a
        multiple of the size divisibility. Returns the padded batch, the original `(h, w)` and
        the resized `(h, w)` (int64)."""
        pre = self.model.preprocessor
        x = pre.normalize(images)
        original = _shape(images)[2:]
        size = original
        if pre.resize:
            scale = resize_scale(original.to(torch.float32), pre.test_min_size, pre.max_size)
            size = floor_product(original, scale)
            x = resize_bilinear(x, size)
        d = pre.size_divisibility
        resized = _shape(x)[2:]  # equal to `size`; read from the tensor, OpenVINO's CPU plugin mis-sizes the
        pad = (resized + d - 1) // d * d - resized  # resize's Gather when the pads come from `size` itself
        x = nn.functional.pad(x, [0, pad[1], 0, pad[0]])
        return x, original, size

    def level_candidates(self, level_logits: torch.Tensor):
        """`PostProcessor._level_candidates` with top-k sizes that follow the input size in the
        graph (a small input has levels with fewer than `topk_candidates` entries). Both modes
        first take the top-k anchors by their best class (`per_anchor` keeps all their classes;
        `per_class` then the top-k of those pairs, which are the level's best pairs: `top_pairs`)."""
        post = self.model.postprocessor
        batch, _, num_classes = level_logits.shape
        best = level_logits.amax(-1)
        anchor_idx = best.topk(_topk_min(best, post.topk_candidates), dim=1).indices  # (B, k)
        top_logits = torch.gather(level_logits, 1, anchor_idx[..., None].expand(-1, -1, num_classes))
        if post.candidates == "per_anchor":
            labels = torch.arange(num_classes, device=level_logits.device).expand_as(top_logits)
            anchor_idx = anchor_idx[..., None].expand_as(top_logits)
            return top_logits.reshape(batch, -1), anchor_idx.reshape(batch, -1), labels.reshape(batch, -1)
        flat = top_logits.reshape(batch, -1)
        top_logits, top_idx = flat.topk(_topk_min(flat, post.topk_candidates), dim=1)
        anchor_idx = anchor_idx.gather(1, torch.div(top_idx, num_classes, rounding_mode="floor"))
        return top_logits, anchor_idx, top_idx % num_classes

    def anchors(self, features: list[torch.Tensor], images: torch.Tensor) -> list[torch.Tensor]:
        """The model's own anchors, from sizes read inside the graph (so that they follow a
        dynamic input size, torchvision's `image size // feature size` strides included)."""
        def size(x):
            return tuple(torch._shape_as_tensor(x)[-2:]) if torch.jit.is_tracing() else tuple(x.shape[-2:])

        generator = self.model.anchor_generator
        sizes = [size(f) for f in features]
        return generator.grids(sizes, generator.level_strides(sizes, size(images)), images.device)

    def forward(self, images: torch.Tensor):
        x, original, size = self.preprocess(images)
        features = self.model.fpn(self.model.backbone(x))
        logits, deltas = self.model.head(features)
        anchors = self.anchors(features, x)
        if not self.postprocess:
            return (*logits, *deltas, *anchors, size)
        return self.detect(logits, deltas, anchors, size, original)

    def detect(self, logits, deltas, anchors, size: torch.Tensor, original: torch.Tensor):
        """`PostProcessor.batched` for images resized to `size (h, w)`, then, as
        `RetinaNet.forward_inference`, boxes scaled to `original (h, w)` (and clipped there
        when `clip_boxes` is "after_nms")."""
        post = self.model.postprocessor
        num_classes = logits[0].shape[-1]
        boxes, scores, labels = [], [], []
        for level_logits, level_deltas, level_anchors in zip(logits, deltas, anchors):
            top_logits, anchor_idx, label = self.level_candidates(level_logits)
            picked = torch.gather(level_deltas, 1, anchor_idx[..., None].expand(-1, -1, 4))
            boxes.append(post.box_coder.decode(picked, level_anchors[anchor_idx]))
            scores.append(torch.sigmoid(top_logits))
            labels.append(label)
        boxes, scores, labels = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1)  # (B, K, ...)
        if post.clip_boxes == "before_nms":
            boxes = torch.minimum(boxes.clamp(min=0), size.to(boxes.dtype).flip(0).repeat(2))
        if post.clip_boxes != "after_nms":
            wide = ((boxes[..., 2:] - boxes[..., :2]) > post.min_box_size).all(-1)
            scores = torch.where(wide, scores, torch.zeros_like(scores))
        class_scores = scores[:, None, :] * (labels[:, None, :] == torch.arange(num_classes, device=labels.device)
                                             [None, :, None]).to(scores.dtype)  # (B, C, K)
        selected = MultiClassNMS.apply(boxes, class_scores, post.detections_per_image, post.nms_threshold,
                                       post.score_threshold)
        # keep the selected candidates, then the best N of each image
        keep = torch.zeros_like(scores)
        keep = keep.index_put((selected[:, 0], selected[:, 2]), torch.ones_like(selected[:, 0], dtype=scores.dtype))
        kept_scores = torch.where(keep > 0, scores, torch.full_like(scores, -1.0))
        top_scores, top_idx = kept_scores.topk(_topk_min(kept_scores, post.detections_per_image), dim=1)
        valid = top_scores > 0
        ratio = original.to(torch.float32) / size.to(torch.float32)  # (h, w), as preprocess.scale_ratios
        out_boxes = torch.gather(boxes, 1, top_idx[..., None].expand(-1, -1, 4)) * ratio.flip(0).repeat(2)
        out_labels = torch.gather(labels, 1, top_idx)
        if post.clip_boxes == "after_nms":  # detectron2: clip the kept boxes, drop those left empty, re-sort
            out_boxes = torch.minimum(out_boxes.clamp(min=0), original.to(boxes.dtype).flip(0).repeat(2))
            valid = valid & ((out_boxes[..., 2:] - out_boxes[..., :2]) > 0).all(-1)
            ranked = torch.where(valid, top_scores, torch.full_like(top_scores, -1.0))
            top_scores, order = ranked.topk(_topk_min(ranked, post.detections_per_image), dim=1)
            out_boxes = torch.gather(out_boxes, 1, order[..., None].expand(-1, -1, 4))
            out_labels = torch.gather(out_labels, 1, order)
            valid = top_scores > 0
        return (out_boxes * valid[..., None], top_scores.clamp(min=0) * valid, out_labels * valid,
                valid.sum(1))


def _topk_min(x: torch.Tensor, k: int):
    """`min(k, x.shape[1])`, recorded in the graph while exporting (so that the size can vary)."""
    if not torch.jit.is_tracing():
        return min(k, x.shape[1])
    size = torch._shape_as_tensor(x)[1].unsqueeze(0)
    return torch.min(torch.cat([torch.tensor([k], dtype=size.dtype), size]))


def export_onnx(model: RetinaNet, path: str | Path, height: int, width: int, batch: int = 1, dynamic: bool = False,
                opset: int = 17, postprocess: bool = True, simplify: bool = False) -> Path:
    """Write the ONNX graph (TorchScript-based exporter) for uint8 images of `height x width`
    (any size and batch with `dynamic`), with the class names, category ids and the input
    contract in its metadata. `simplify`: fold constants with onnxsim when it is installed.
    The file is built under a temporary name and renamed into place (`atomic_output`): a
    failure leaves whatever was at `path` untouched."""
    path = Path(path)
    module = ExportedDetector(model, postprocess).eval()
    dummy = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8)
    levels = len(model.anchor_generator.strides)
    if postprocess:
        outputs = ["boxes", "scores", "labels", "num_detections"]
    else:
        outputs = ([f"logits_p{i + 3}" for i in range(levels)] + [f"deltas_p{i + 3}" for i in range(levels)]
                   + [f"anchors_p{i + 3}" for i in range(levels)] + ["resized_size"])
    axes = None
    if dynamic:
        axes = {"images": {0: "batch", 2: "height", 3: "width"}}
        axes.update({name: {0: "batch"} for name in outputs if name.split("_")[0] in ("boxes", "scores", "labels",
                                                                                         "num", "logits", "deltas")})
    with atomic_output(path) as tmp, torch.no_grad():
        torch.onnx.export(module, (dummy,), str(tmp), input_names=["images"], output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
        _finish_graph(model, tmp, height, width, batch, dynamic, simplify)
    return path


def _finish_graph(model: RetinaNet, path: Path, height: int, width: int, batch: int, dynamic: bool,
                  simplify: bool) -> None:
    """Add the metadata to the exported graph at `path` (and simplify it), in place."""
    import onnx

    graph = onnx.load(str(path))
    pre = model.preprocessor
    contract = {"images": "uint8 NCHW RGB, original images of one size per batch, resized in the graph",
                "height": None if dynamic else height, "width": None if dynamic else width,
                "batch": None if dynamic else batch, "dynamic": dynamic, "resize": pre.resize,
                "test_min_size": pre.test_min_size, "max_size": pre.max_size,
                "size_divisibility": pre.size_divisibility,
                "score_threshold": model.postprocessor.score_threshold,
                "detections_per_image": model.postprocessor.detections_per_image}
    meta = {"class_names": json.dumps(model.class_names), "category_ids": json.dumps(model.category_ids),
            "input": json.dumps(contract)}
    for key, value in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    if simplify:
        try:
            from onnxsim import simplify as onnxsim_simplify
        except ImportError:
            pass  # the caller says so
        else:
            simplified, ok = onnxsim_simplify(graph)
            if ok:
                graph = simplified
    onnx.save(graph, str(path))
