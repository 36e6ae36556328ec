"""The RetinaNet detector: one module from images to losses (training) or detections."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .anchors import AnchorGenerator
from .fpn import FPN
from .head import RetinaNetHead
from .losses import ForegroundReducer, RetinaNetLoss
from .matching import FOREGROUND, AnchorMatcher
from .postprocess import PostProcessor
from .preprocess import ImageBatch, Preprocessor


class RetinaNet(nn.Module):
    """RetinaNet (Lin et al. 2017): ResNet + FPN (P3-P7) + shared class/box subnets.

    `forward(images, targets=None)`:
      - images: list of RGB `(3, H, W)` tensors, uint8 [0, 255] or float [0, 1], any sizes.
      - targets (training): per image `{"boxes": (N, 4) xyxy pixels, "labels": (N,) in
        [0, num_classes), optional "iscrowd": (N,)}`.
      - training returns `{"loss_cls", "loss_box"}`; eval returns per image
        `{"boxes" (D, 4) in original-image pixels, "scores" (D,), "labels" (D,)}`.

    Build one with `RetinaNet.from_config(ModelConfig(...))`, or load a checkpoint with
    `retinanet.load_model(path)`.
    """

    def __init__(self, backbone: nn.Module, fpn: FPN, head: RetinaNetHead, anchor_generator: AnchorGenerator,
                 preprocessor: Preprocessor, matcher: AnchorMatcher, loss: RetinaNetLoss,
                 postprocessor: PostProcessor, class_names: Sequence[str] = ()):
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.head = head
        self.anchor_generator = anchor_generator
        self.preprocessor = preprocessor
        self.matcher = matcher
        self.loss = loss
        self.postprocessor = postprocessor
        self.num_classes = head.num_classes
        self.class_names = list(class_names) or [str(i) for i in range(self.num_classes)]
        self.channels_last = False
        self.compiled = False  # see optimize_for_inference
        self.inference_only = False  # BatchNorm folded: see optimize_for_inference
        self.config: Any = None  # the ModelConfig this model was built from, when known
        self.assignment_stats: dict[str, torch.Tensor] = {}  # of the last training forward
        # On a CPU, training runs the box subnet at foreground locations only (see
        # `foreground_deltas`); off for GPUs, where it would need the count on the host, and
        # for torch.compile (`compile_for_training` clears it)
        self.local_box_training = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config) -> "RetinaNet":
        from .build import build_retinanet

        return build_retinanet(config)

    def optimize_for_inference(self, compile: bool = False) -> "RetinaNet":
        """Fold the backbone's BatchNorms into its convolutions and use channels-last memory
        (faster on CPUs and GPUs); detections stay equal up to float rounding. The model is
        for inference afterwards: folding cannot be undone, and training mode is refused.

        `compile`: the backbone, FPN and head go through torch.compile, and so does NMS on a
        GPU (`PostProcessor.compile`), which fuses what eager mode runs as separate kernels. On
        a CPU the weights are frozen into the compiled graph (inductor's `freezing`: oneDNN
        prepacks them and fuses each convolution with its ReLU or sum). The first batch of each
        new input size waits for the compiler, so it pays over many images of few sizes."""
        from .fuse import fold_backbone_batchnorm

        self.eval()
        fold_backbone_batchnorm(self.backbone)
        self.to_channels_last()
        self.inference_only = True
        if compile:
            for part in (self.backbone, self.fpn, self.head):
                part.compile()
            self.postprocessor.compile()
            self.compiled = True
        return self

    def to_channels_last(self) -> "RetinaNet":
        """Keep weights, and feed the network its input, in channels-last memory (faster
        convolutions on GPUs and in bf16; in place)."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def train(self, mode: bool = True) -> "RetinaNet":
        if mode and self.inference_only:
            raise RuntimeError("this model was optimized for inference (BatchNorm folded into the convolutions): "
                               "it cannot train; load it with retinanet.load_model(path, optimize=False)")
        return super().train(mode)

    @property
    def category_ids(self) -> list[int]:
        """The dataset category id of each label: the config's, else the label itself
        (torchvision's 91-way COCO output is indexed by category id)."""
        stored = self.config.category_ids if self.config is not None else []
        return list(stored) if stored else list(range(self.num_classes))

    # ------------------------------------------------------------------ forward
    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None,
                generator: torch.Generator | None = None, reduce_foreground: ForegroundReducer | None = None):
        """`generator` draws the multi-scale training sizes (torch's default generator when
        None); `reduce_foreground` sums the foreground count over processes (the trainer's
        all-reduce under DDP; this module runs no collective itself)."""
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        batch, targets = self.preprocessor(images, targets, training=self.training, generator=generator)
        x = batch.tensor
        if not self.training:
            logits, deltas, anchors = self.run_network(x)
            return self.forward_inference(logits, deltas, anchors, batch)
        # the class logits stay (B, H, W, A, K) views of the head's maps: the loss reads them as they are
        features = self.run_features(x)
        anchors = self.anchors_for(features, x)
        if self.local_box_training and x.device.type == "cpu" and self.head.regresses_locally:
            return self.forward_training(self.head.classify(features, flatten=False), None, anchors, targets,
                                         reduce_foreground, features)
        logits, deltas = self.head(features, flatten=False)
        return self.forward_training(logits, deltas, anchors, targets, reduce_foreground)

    def run_network(self, x: torch.Tensor):
        """Backbone, FPN and head on the padded batch `x (B, 3, H, W)`: per-level class logits
        `(B, A_l, K)`, box deltas `(B, A_l, 4)` and anchors `(A_l, 4)`."""
        with cpu_freezing(x.device, self.compiled):
            features = self.run_features(x)
            logits, deltas = self.head(features)
        return logits, deltas, self.anchors_for(features, x)

    def run_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone and FPN: `[P3..P7]`, each `(B, C, H_l, W_l)`."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.fpn(self.backbone(x))

    def anchors_for(self, features: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        return self.anchor_generator([tuple(f.shape[-2:]) for f in features], tuple(x.shape[-2:]), x.device)

    def forward_training(self, logits: list[torch.Tensor], deltas: list[torch.Tensor] | None,
                         anchors: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                         reduce_foreground: ForegroundReducer | None = None,
                         features: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Losses. `logits` per level, `(B, A_l, K)` or the head's `(B, H, W, A, K)` views;
        `deltas` per level `(B, A_l, 4)`, or None: the box subnet runs on `features` at the
        foreground locations only (`foreground_deltas`)."""
        all_anchors = torch.cat(anchors)
        gt_boxes, gt_labels, gt_valid, gt_crowd = pack_targets(targets, all_anchors.device)
        matches = self.matcher(all_anchors, gt_boxes, gt_valid, gt_crowd)
        fg = matches.labels == FOREGROUND
        # for the training log (read, and so synchronised, only when logged)
        self.assignment_stats = {"foreground": fg.sum().detach(), "boxes": (gt_valid & ~gt_crowd).sum().detach()}
        if deltas is None:
            deltas = [self.foreground_deltas(features, fg)]
        return self.loss(logits, torch.cat(deltas, 1), all_anchors, matches, gt_boxes, gt_labels,
                         reduce_foreground)

    def foreground_deltas(self, features: list[torch.Tensor], fg: torch.Tensor) -> torch.Tensor:
        """Box deltas `(B, A, 4)` for all anchors of all levels, computed (`head.regress_at`)
        only at the locations that hold a foreground anchor (`fg (B, A)`) and zero elsewhere,
        where the loss never reads them. Same losses and gradients as the dense subnet, for a
        fraction of its work when foreground locations are few, as they are; the windows are
        gathered per 4x4 tile of locations (`regress_at`), fewer and larger than one per
        location."""
        batch, per_location = fg.shape[0], self.head.bbox_pred.out_channels // 4
        locations, first_anchors, start = [], [], 0
        for feature in features:
            height, width = feature.shape[-2:]
            count = height * width * per_location
            at = fg[:, start : start + count].view(batch, height, width, per_location).any(-1).nonzero()
            locations.append(at)
            first_anchors.append(start + (at[:, 1] * width + at[:, 2]) * per_location)
            start += count
        local = self.head.regress_at(features, locations)  # (N, per_location, 4)
        images = torch.cat([loc[:, 0] for loc in locations])[:, None].expand(-1, per_location)
        anchor_index = torch.cat(first_anchors)[:, None] + torch.arange(per_location, device=fg.device)
        return local.new_zeros(batch, fg.shape[1], 4).index_put((images, anchor_index), local)

    def forward_inference(self, logits, deltas, anchors, batch: ImageBatch,
                          score_threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        detections = self.postprocessor.batched(logits, deltas, anchors, batch.image_sizes, score_threshold)
        detections = detections.scaled(batch.image_sizes, batch.original_sizes)
        if self.postprocessor.clip_boxes == "after_nms":
            detections = detections.clipped(batch.original_sizes)
        return detections.split()

    # ------------------------------------------------------------------ convenience
    @torch.inference_mode()
    def predict(self, images: Any, score_threshold: float | None = None, batch_size: int = 4,
                tta: Any = None) -> list[dict[str, Any]] | dict[str, Any]:
        """Detect objects in one image or a list of them.

        Images are `(3, H, W)` uint8 RGB tensors (float in [0, 1] also works) or `(H, W, 3)`
        uint8 RGB arrays; read files with `retinanet.read_image(path)`. Returns per image
        `{"boxes" (D, 4) xyxy, "scores" (D,), "labels" (D,), "class_names": [str] * D}` in
        original-image pixels, on the CPU. `tta`: a `TestTimeAugmentation` (`model.tta`) that
        runs each image's views and merges their detections; None: the image as it is.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        outputs = []
        try:
            for start in range(0, len(items), batch_size):
                tensors = [to_image_tensor(item).to(device) for item in items[start : start + batch_size]]
                if tta is not None:
                    detections = tta(self, tensors, score_threshold)
                else:
                    batch, _ = self.preprocessor(tensors)
                    logits, deltas, anchors = self.run_network(batch.tensor)
                    detections = self.forward_inference(logits, deltas, anchors, batch, score_threshold)
                for det in detections:
                    det = {k: v.cpu() for k, v in det.items()}
                    det["class_names"] = [self.class_names[i] for i in det["labels"].tolist()]
                    outputs.append(det)
        finally:
            self.train(was_training)
        return outputs[0] if single else outputs


def pack_targets(targets: list[dict[str, torch.Tensor]], device: torch.device):
    """Pad per-image targets into `boxes (B, G, 4)`, `labels (B, G)`, `valid (B, G)` and
    `crowd (B, G)` with G >= 1, so that matching and losses run batched."""
    counts = [len(t["boxes"]) for t in targets]
    g = max(1, max(counts, default=0))
    b = len(targets)
    boxes = torch.zeros(b, g, 4, device=device)
    labels = torch.zeros(b, g, dtype=torch.long, device=device)
    valid = torch.zeros(b, g, dtype=torch.bool, device=device)
    crowd = torch.zeros(b, g, dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, counts)):
        if n == 0:
            continue
        boxes[i, :n] = t["boxes"].to(device=device, dtype=torch.float32)
        labels[i, :n] = t["labels"].to(device)
        valid[i, :n] = True
        if "iscrowd" in t:
            crowd[i, :n] = t["iscrowd"].to(device).bool()
    return boxes, labels, valid, crowd


def to_image_tensor(image: Any) -> torch.Tensor:
    """A `(3, H, W)` tensor, or an `(H, W, 3)` / `(H, W)` uint8 array, as an RGB tensor."""
    if isinstance(image, torch.Tensor):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) array, got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    raise TypeError(f"cannot take an image from {type(image).__name__}: pass a tensor or an array "
                    "(files: retinanet.read_image(path))")


def cpu_freezing(device: torch.device, compiled: bool = True):
    """Inductor's `freezing` (weights constant-folded into the graph; oneDNN prepacks them and
    fuses conv+ReLU/add) around calls that may compile, when `compiled` and on a CPU (see
    `RetinaNet.optimize_for_inference`). Set around the call, not as an option of torch.compile:
    dynamo reads it while tracing too, and as an option it gave ~2% instead of ~8%."""
    if not (compiled and device.type == "cpu"):
        return nullcontext()
    from torch._inductor import config as inductor_config

    return inductor_config.patch(freezing=True)
