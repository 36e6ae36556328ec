"""Focal classification loss and box regression losses, over a whole batch at once."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .box_coding import BoxCoder
from .matching import BACKGROUND, FOREGROUND, Matches

BOX_LOSSES = ("smooth_l1", "l1", "giou")
NORMALIZATIONS = ("batch", "ema", "per_image")

# Sums a count over all training processes: `(local count) -> (global count, number of processes)`.
ForegroundReducer = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Element-wise focal loss `-alpha_t (1 - p_t)^gamma log(p_t)` (Lin et al. 2017, eq. 5).

    `logits`, `targets` of any equal shape; `targets` in {0, 1}; `alpha < 0` disables the
    alpha weighting. Returns a tensor of the same shape, in float32 or wider.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def focal_loss_per_anchor(logits: torch.Tensor, fg: torch.Tensor, anchor_labels: torch.Tensor, alpha: float = 0.25,
                          gamma: float = 2.0) -> torch.Tensor:
    """Focal loss summed over classes for every anchor: `(B, A)` from logits `(B, A, K)`.

    The same numbers and gradients as `sigmoid_focal_loss(logits, one_hot_targets).sum(-1)`,
    where the one-hot target of a foreground anchor (`fg (B, A)`) is its class
    `anchor_labels (B, A)` (ignored elsewhere), computed the cheap way (`_FocalLossPerAnchor`).
    """
    return _FocalLossPerAnchor.apply(logits, fg, anchor_labels, alpha, gamma)


class _FocalLossPerAnchor(torch.autograd.Function):
    """`focal_loss_per_anchor` with its gradient written out and computed in the forward pass.

    Every element is charged as a negative, then each anchor's element at its label gets the
    positive term instead where the anchor is foreground: gathers and scatters of one element
    per anchor, no boolean indexing, so no host synchronisation. The gradient is formed while
    the forward's intermediates are at hand and is the one tensor kept for the backward pass,
    which is then a single multiply: about 9 passes over the `(B, A, K)` tensor in all instead
    of the ~16 autograd takes through the elementwise form, and one saved tensor instead of four.
    With p = sigmoid(x) and s = softplus(x) = -log(1 - p):
        negative  n(x) = s p^g,                  n'(x) = p^g (p + g s (1 - p))
        positive  q(x) = softplus(-x) (1 - p)^g, q'(x) = -(1 - p)^g ((1 - p) + g p softplus(-x))
    """

    @staticmethod
    def forward(ctx, logits, fg, anchor_labels, alpha: float, gamma: float):
        x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        w_neg, w_pos = (1 - alpha, alpha) if alpha >= 0 else (1.0, 1.0)
        p, s = torch.sigmoid(x), F.softplus(x)
        p_gamma = p * p if gamma == 2 else p.pow(gamma)
        wants_grad = ctx.needs_input_grad[0]  # not when the loss is only evaluated
        if wants_grad:
            grad = torch.addcmul(p, 1 - p, s, value=gamma).mul_(p_gamma).mul_(w_neg)  # w_neg n'(x)
        negative = s.mul_(p_gamma)  # n(x), in the softplus's memory
        del p, p_gamma

        label = anchor_labels.clamp(0, x.shape[-1] - 1).unsqueeze(-1)  # (B, A, 1)
        x_label = x.gather(-1, label).squeeze(-1)  # (B, A)
        p_label, q_label = torch.sigmoid(x_label), torch.sigmoid(-x_label)
        log_p = F.softplus(-x_label)  # -log(p)
        q_gamma = q_label * q_label if gamma == 2 else q_label.pow(gamma)
        positive = w_pos * log_p * q_gamma
        # The positive elements are replaced, not subtracted later: subtracting their (possibly
        # huge) negative term again would cancel the small positive term away in float32.
        negative.scatter_(-1, label, torch.where(fg, 0.0, negative.gather(-1, label).squeeze(-1)).unsqueeze(-1))
        if wants_grad:
            positive_grad = -w_pos * q_gamma * (q_label + gamma * p_label * log_p)
            grad.scatter_(-1, label, torch.where(fg, positive_grad, grad.gather(-1, label).squeeze(-1)).unsqueeze(-1))
            ctx.save_for_backward(grad)
            ctx.logits_dtype = logits.dtype
        return negative.sum(-1) * w_neg + torch.where(fg, positive, 0.0)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.unsqueeze(-1)).to(ctx.logits_dtype), None, None, None, None


def giou_loss(boxes: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """`1 - GIoU` of paired xyxy boxes `(..., 4)`: `(...)`. torchvision's
    `generalized_box_iou_loss` gives the same numbers, but it computes the intersection by
    boolean indexing, which waits for the GPU; here it is a clamp."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    tx0, ty0, tx1, ty1 = target.unbind(-1)
    inter = ((torch.minimum(x1, tx1) - torch.maximum(x0, tx0)).clamp(min=0)
             * (torch.minimum(y1, ty1) - torch.maximum(y0, ty0)).clamp(min=0))
    union = (x1 - x0) * (y1 - y0) + (tx1 - tx0) * (ty1 - ty0) - inter
    enclosing = (torch.maximum(x1, tx1) - torch.minimum(x0, tx0)) * (torch.maximum(y1, ty1) - torch.minimum(y0, ty0))
    return 1 - (inter / (union + eps) - (enclosing - union) / (enclosing + eps))


def smooth_l1(x: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Element-wise smooth-L1 (Huber / beta); beta = 0 is plain L1."""
    diff = (x - target).abs()
    if beta <= 0:
        return diff
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


class RetinaNetLoss(nn.Module):
    """Computes `{"loss_cls", "loss_box"}` for a batch of matched anchors.

    Normalisation of both sums:
      - "batch": by the number of foreground anchors in the whole (global, under DDP) batch,
      - "ema": by an exponential moving average of that number (detectron2),
      - "per_image": each image by its own count, then averaged over images (torchvision).
    With `reduce_foreground` (the trainer's all-reduce under DDP) the count is the global
    one and the losses are scaled so that DDP's gradient averaging yields exactly the
    single-process gradient of the global batch. The module itself runs no collective.
    """

    def __init__(self, box_coder: BoxCoder, *, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 box_loss: str = "smooth_l1", smooth_l1_beta: float = 0.1, box_loss_weight: float = 1.0,
                 normalization: str = "batch", ema_momentum: float = 0.9, ema_initial: float = 100.0):
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"unknown box loss {box_loss!r} (choose from {BOX_LOSSES})")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown loss normalization {normalization!r} (choose from {NORMALIZATIONS})")
        self.box_coder = box_coder
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_loss, self.smooth_l1_beta, self.box_loss_weight = box_loss, smooth_l1_beta, box_loss_weight
        self.normalization, self.ema_momentum = normalization, ema_momentum
        self.register_buffer("ema_num_foreground", torch.tensor(float(ema_initial)))

    def forward(self, logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, matches: Matches,
                gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                reduce_foreground: ForegroundReducer | None = None) -> dict[str, torch.Tensor]:
        """
        Args:
            logits: `(B, A, K)` class logits, or a list of them per level, each `(B, ..., K)`
                whose middle dimensions flatten to that level's anchors in order (e.g. the
                head's `(B, H, W, A, K)` views of its NCHW maps: then nothing copies them).
            deltas: `(B, A, 4)`; anchors: `(A, 4)`.
            matches: from `AnchorMatcher`; gt_boxes `(B, G, 4)`, gt_labels `(B, G)` in [0, K).
            reduce_foreground: sums the foreground count over processes (None: one process).
        """
        fg = matches.labels == FOREGROUND
        valid = fg | (matches.labels == BACKGROUND)
        batch_idx = torch.arange(fg.shape[0], device=fg.device)[:, None]
        anchor_labels = gt_labels[batch_idx, matches.gt_index]  # (B, A), meaningful where fg
        cls = (self._focal_loss(logits, fg, anchor_labels) * valid).sum(-1)  # (B,)

        box = self._box_loss(deltas, anchors, gt_boxes[batch_idx, matches.gt_index], fg)  # (B,)
        norm = self._normalizer(fg, reduce_foreground)
        return {
            "loss_cls": (cls / norm).sum(),
            "loss_box": self.box_loss_weight * (box / norm).sum(),
        }

    def _focal_loss(self, logits: torch.Tensor | list[torch.Tensor], fg: torch.Tensor,
                    anchor_labels: torch.Tensor) -> torch.Tensor:
        """Focal loss of each anchor `(B, A)`, for logits whole (one level) or per level."""
        levels = [logits] if isinstance(logits, torch.Tensor) else logits
        per_anchor, start = [], 0
        for level in levels:
            shape = level.shape[:-1]
            stop = start + shape[1:].numel()
            per_anchor.append(focal_loss_per_anchor(level, fg[:, start:stop].view(shape),
                                                    anchor_labels[:, start:stop].view(shape), self.focal_alpha,
                                                    self.focal_gamma).reshape(fg.shape[0], -1))
            start = stop
        if start != fg.shape[1]:
            raise ValueError(f"the levels' logits hold {start} anchors, the matches {fg.shape[1]}")
        return torch.cat(per_anchor, 1)

    def _box_loss(self, deltas, anchors, matched_boxes, fg) -> torch.Tensor:
        """Sum of the box loss over each image's foreground anchors: `(B,)`.

        Computed densely over all anchors and then selected (the few foreground anchors are
        not gathered first: that would need their count on the host). Non-foreground anchors
        are compared with themselves, so that every element, and its gradient, is finite."""
        anchors = anchors.expand(fg.shape[0], -1, -1)  # (B, A, 4)
        target_boxes = torch.where(fg.unsqueeze(-1), matched_boxes, anchors)
        pred = deltas.float()
        if self.box_loss == "giou":
            loss = giou_loss(self.box_coder.decode(pred, anchors), target_boxes)
        else:
            target = self.box_coder.encode(target_boxes, anchors)
            beta = 0.0 if self.box_loss == "l1" else self.smooth_l1_beta
            loss = smooth_l1(pred, target, beta).sum(-1)
        return torch.where(fg, loss, 0.0).sum(-1)

    def _normalizer(self, fg: torch.Tensor, reduce_foreground: ForegroundReducer | None) -> torch.Tensor:
        """Per-image divisors `(B,)` such that summing `loss / divisor` over images is the loss."""
        per_image = fg.sum(-1).float()
        if self.normalization == "per_image":
            return per_image.clamp(min=1) * fg.shape[0]
        total, world = per_image.sum(), 1
        if reduce_foreground is not None:
            total, world = reduce_foreground(total.detach().clone())
        if self.normalization == "batch":
            divisor = total.clamp(min=1) / world
        else:
            if self.training:
                m = self.ema_momentum
                self.ema_num_foreground.mul_(m).add_((1 - m) * total.clamp(min=1) / world)
            divisor = self.ema_num_foreground.clone()
        return divisor.expand(fg.shape[0])

