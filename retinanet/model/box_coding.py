"""Box <-> delta coding relative to anchors (the R-CNN parameterisation)."""

from __future__ import annotations

import math

import torch


class BoxCoder:
    """Encodes boxes as `(dx, dy, dw, dh)` relative to reference boxes, and back.

    `dx = wx * (gx - ax) / aw`, `dw = ww * log(gw / aw)`, and likewise for y/h. Decoding
    clamps `dw, dh` at `scale_clamp` so that `exp` cannot overflow.
    All tensors are `(..., 4)` with matching leading dims; boxes are (x0, y0, x1, y1).
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = math.log(1000.0 / 16)):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, boxes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        wx, wy, ww, wh = self.weights
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        ref_x = reference[..., 0] + 0.5 * ref_w
        ref_y = reference[..., 1] + 0.5 * ref_h
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        x = boxes[..., 0] + 0.5 * w
        y = boxes[..., 1] + 0.5 * h
        return torch.stack(
            [wx * (x - ref_x) / ref_w, wy * (y - ref_y) / ref_h, ww * torch.log(w / ref_w), wh * torch.log(h / ref_h)],
            dim=-1,
        )

    def decode(self, deltas: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        reference = reference.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        ref_x = reference[..., 0] + 0.5 * ref_w
        ref_y = reference[..., 1] + 0.5 * ref_h
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        x = dx * ref_w + ref_x
        y = dy * ref_h + ref_y
        half_w = 0.5 * (torch.exp(dw) * ref_w)
        half_h = 0.5 * (torch.exp(dh) * ref_h)
        return torch.stack([x - half_w, y - half_h, x + half_w, y + half_h], dim=-1)
