"""ONNX export of the whole detector: normalisation, backbone, FPN, head, anchor decoding,
per-level top-k, class-aware NMS (ONNX `NonMaxSuppression`) and the final top-N.

The graph's contract: `images (B, 3, H, W)` float32 RGB in [0, 255] (uint8 values cast to
float), already resized and padded as the model's pre-processing does (`prepare_batch`
below, or the README's numpy snippet), H and W multiples of the size divisibility, and
`image_sizes (B, 2)` int64: each image's `(h, w)` after resizing, before padding. Outputs, in input pixels: `boxes (B, N, 4)`
xyxy, `scores (B, N)`, `labels (B, N)` int64, padded with zeros past `num_detections (B,)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..model.detector import RetinaNet
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


class ExportedDetector(nn.Module):
    """The model with its post-processing written with exportable, fixed-shape tensor ops."""

    def __init__(self, model: RetinaNet, postprocess: bool = True):
        super().__init__()
        self.model = model.eval()
        self.postprocess = postprocess
        pre = model.preprocessor
        scale = pre.pixel_scale / 255.0
        self.register_buffer("mean", (pre.pixel_mean / scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", (pre.pixel_std / scale).view(1, 3, 1, 1), persistent=False)
        self.bgr = pre.bgr

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

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None):
        """`image_sizes (B, 2)`: each image's `(h, w)` inside the padded batch, for clipping."""
        x = images.float()
        if self.bgr:
            x = x.flip(1)
        x = (x - self.mean) / self.std
        features = self.model.fpn(self.model.backbone(x))
        logits, deltas = self.model.head(features)
        anchors = self.anchors(features, images)
        if not self.postprocess:
            return (*logits, *deltas, *anchors)
        return self.detect(logits, deltas, anchors, image_sizes)

    def detect(self, logits, deltas, anchors, image_sizes):
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
        limit = image_sizes.to(boxes.dtype).flip(-1).repeat(1, 2)[:, None, :]  # (B, 1, 4) as (w, h, w, h)
        if post.clip_boxes == "before_nms":
            boxes = torch.minimum(boxes.clamp(min=0), limit)
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
        out_boxes = torch.gather(boxes, 1, top_idx[..., None].expand(-1, -1, 4))
        out_labels = torch.gather(labels, 1, top_idx)
        if post.clip_boxes == "after_nms":  # detectron2: clip the kept boxes, drop those left empty, re-sort
            out_boxes = torch.minimum(out_boxes.clamp(min=0), limit)
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
    """Write the ONNX graph (TorchScript-based exporter) with the class names and category ids
    in its metadata. `dynamic`: batch, height and width may vary at run time. `simplify`: fold
    constants with onnxsim when it is installed. The file is built under a temporary name and
    renamed into place (`atomic_output`): a failure leaves whatever was at `path` untouched."""
    path = Path(path)
    module = ExportedDetector(model, postprocess).eval()
    dummy = torch.randint(0, 255, (batch, 3, height, width)).float()
    dummy_sizes = torch.tensor([[height, width]] * batch, dtype=torch.long)
    levels = len(model.anchor_generator.strides)
    if postprocess:
        outputs = ["boxes", "scores", "labels", "num_detections"]
    else:
        outputs = ([f"logits_p{i + 3}" for i in range(levels)] + [f"deltas_p{i + 3}" for i in range(levels)]
                   + [f"anchors_p{i + 3}" for i in range(levels)])
    axes = None
    if dynamic:
        axes = {"images": {0: "batch", 2: "height", 3: "width"}, "image_sizes": {0: "batch"}}
        axes.update({name: {0: "batch"} for name in outputs if not name.startswith("anchors")})
    with atomic_output(path) as tmp, torch.no_grad():
        args, inputs = ((dummy, dummy_sizes), ["images", "image_sizes"]) if postprocess else ((dummy,), ["images"])
        torch.onnx.export(module, args, str(tmp), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
        _finish_graph(model, tmp, height, width, batch, dynamic, simplify)
    return path


def _finish_graph(model: RetinaNet, path: Path, height: int, width: int, batch: int, dynamic: bool,
                  simplify: bool) -> None:
    """Add the metadata to the exported graph at `path` (and simplify it), in place."""
    import onnx

    graph = onnx.load(str(path))
    config = model.config
    meta = {"class_names": json.dumps(model.class_names), "category_ids": json.dumps(model.category_ids),
            "input": json.dumps({"height": height, "width": width, "batch": batch, "dynamic": dynamic, "dtype": "float32 in [0, 255]",
                                 "layout": "NCHW RGB", "test_min_size": config.input.test_min_size if config else None,
                                 "max_size": config.input.max_size if config else None,
                                 "size_divisibility": model.preprocessor.size_divisibility,
                                 "pad_value_rgb": [round(v, 4) for v in pad_value(model).tolist()]})}
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


def pad_value(model: RetinaNet) -> torch.Tensor:
    """The RGB value (in [0, 255]) that normalises to 0: the model pads with it."""
    pre = model.preprocessor
    value = pre.pixel_mean.view(3) * 255.0 / pre.pixel_scale
    return value.flip(0) if pre.bgr else value


def prepare_batch(model: RetinaNet, images: list[torch.Tensor], height: int | None = None,
                  width: int | None = None) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
    """Images `(3, H, W)` uint8 resized exactly as the model resizes them, as a float batch in
    [0, 255] padded to `height x width` (default: the batch's own padded size). Returns the
    batch, the resized sizes and the original sizes (to scale boxes back)."""
    pre = model.preprocessor
    resized, sizes, originals = [], [], []
    for image in images:
        originals.append(tuple(image.shape[-2:]))
        x = image.float()[None]
        if pre.resize:
            scale = pre.scale_factor(tuple(image.shape[-2:]), pre.test_min_size)
            x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                                                align_corners=False)
        resized.append(x[0])
        sizes.append(tuple(x.shape[-2:]))
    d = pre.size_divisibility
    h = height or -(-max(s[0] for s in sizes) // d) * d
    w = width or -(-max(s[1] for s in sizes) // d) * d
    batch = pad_value(model).view(1, 3, 1, 1).repeat(len(images), 1, h, w)
    for out, x in zip(batch, resized):
        out[:, : x.shape[-2], : x.shape[-1]] = x
    return batch, sizes, originals
