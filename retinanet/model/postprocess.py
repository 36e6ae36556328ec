"""Turning head outputs into detections, batched over images and levels."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torchvision.ops import nms

from .box_coding import BoxCoder
from .preprocess import scale_ratios


@dataclass
class Detections:
    """A batch's detections, padded: `boxes (B, D, 4)`, `scores (B, D)`, `labels (B, D)`;
    image b's are the first `counts[b]` of its row, best first, and the rest is padding."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    counts: list[int]

    def scaled(self, from_sizes: list[tuple[int, int]], to_sizes: list[tuple[int, int]]) -> "Detections":
        """Boxes scaled from images of `from_sizes (h, w)` to `to_sizes` (`scale_ratios`)."""
        ratios = [scale_ratios(size, to_size) for size, to_size in zip(from_sizes, to_sizes)]
        factor = torch.tensor([[rw, rh, rw, rh] for rh, rw in ratios], dtype=torch.float32).to(self.boxes.device)
        return replace(self, boxes=self.boxes * factor[:, None, :])

    def clipped(self, sizes: list[tuple[int, int]]) -> "Detections":
        """Boxes clipped to `sizes (h, w)`, those left empty dropped (order kept)."""
        boxes = clip_to_sizes(self.boxes, sizes)
        counts = torch.tensor(self.counts, device=boxes.device)
        keep = ((boxes[..., 2:] - boxes[..., :2]) > 0).all(-1)
        keep &= torch.arange(boxes.shape[1], device=boxes.device) < counts[:, None]
        order = (~keep).to(torch.uint8).argsort(dim=1, stable=True)  # the kept first, in their order
        return Detections(boxes.gather(1, order[..., None].expand(-1, -1, 4)), self.scores.gather(1, order),
                          self.labels.gather(1, order), keep.sum(1).tolist())

    def split(self) -> list[dict[str, torch.Tensor]]:
        """Per image `{"boxes": (D_b, 4), "scores": (D_b,), "labels": (D_b,)}` (views)."""
        return [{"boxes": self.boxes[b, :n], "scores": self.scores[b, :n], "labels": self.labels[b, :n]}
                for b, n in enumerate(self.counts)]


class PostProcessor:
    """Sigmoid scores -> per level top-k over a threshold -> decode -> clip -> class-aware
    NMS -> best `detections_per_image` -> drop empty boxes.

    All images are processed together (one top-k per level for the whole batch, one
    decode, one NMS over every image and class: `first_kept_batched`), with no loop over
    images; detections are identical to processing the images one at a time.

    `clip_boxes`: "before_nms" (torchvision, the paper's reproductions), "after_nms"
    (detectron2: NMS on unclipped boxes; the caller clips in original-image pixels with
    `Detections.clipped`) or "none" (PaddleDetection).

    `candidates="per_class"` takes the top-k (anchor, class) pairs of a level (torchvision,
    detectron2); `"per_anchor"` the top-k anchors by their best class score, with all their
    classes (PaddleDetection). `nms_pre_per_class > 0` lets at most that many boxes of a class
    into NMS (PaddleDetection's `nms_top_k`).
    """

    def __init__(self, box_coder: BoxCoder, *, score_threshold: float = 0.05, topk_candidates: int = 1000,
                 nms_threshold: float = 0.5, detections_per_image: int = 100, clip_boxes: str = "before_nms",
                 min_box_size: float = 0.0, candidates: str = "per_class", nms_pre_per_class: int = 0):
        if clip_boxes not in ("before_nms", "after_nms", "none"):
            raise ValueError(f"clip_boxes must be 'before_nms', 'after_nms' or 'none', got {clip_boxes!r}")
        if candidates not in ("per_class", "per_anchor"):
            raise ValueError(f"candidates must be 'per_class' or 'per_anchor', got {candidates!r}")
        self.candidates = candidates
        self.nms_pre_per_class = nms_pre_per_class
        self.box_coder = box_coder
        self.score_threshold = score_threshold
        self.topk_candidates = topk_candidates
        self.nms_threshold = nms_threshold
        self.detections_per_image = detections_per_image
        self.clip_boxes = clip_boxes
        self.min_box_size = min_box_size
        self.gpu_nms = BatchedNMS()  # `compile()` swaps in the compiled one

    def compile(self) -> "PostProcessor":
        """On a GPU, run NMS through torch.compile'd kernels (`BatchedNMS(compiled=True)`):
        the pairwise IoUs in one kernel instead of ~10 passes over memory. On a CPU NMS
        stays image by image."""
        self.gpu_nms = BatchedNMS(compiled=True)
        return self

    def shortlist_nms(self, device: torch.device):
        """NMS of the shortlists (see `first_kept_batched`) on `device`: on a GPU all images at
        once (`self.gpu_nms`: a read-back per `rounds_per_check` rounds and one for the counts,
        where image by image costs launches and a read-back per image); on a CPU one torchvision
        call per image, which skips suppressed boxes (the batched rounds do all the pairs, slower
        there)."""
        return greedy_nms_per_image if device.type == "cpu" else self.gpu_nms

    def __call__(self, logits: list[torch.Tensor], deltas: list[torch.Tensor], anchors: list[torch.Tensor],
                 image_sizes: list[tuple[int, int]], score_threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        """
        Args:
            logits: per level `(B, A_l, K)`; deltas: per level `(B, A_l, 4)`; anchors: per level `(A_l, 4)`.
            image_sizes: `(h, w)` of each image before padding, for clipping.
        Returns:
            per image `{"boxes": (D, 4), "scores": (D,), "labels": (D,)}`, best first.
        """
        return self.batched(logits, deltas, anchors, image_sizes, score_threshold).split()

    def batched(self, logits: list[torch.Tensor], deltas: list[torch.Tensor], anchors: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], score_threshold: float | None = None) -> "Detections":
        """As `__call__`, as padded batch tensors (`Detections`)."""
        boxes, scores, labels, keep = self.gather_candidates(logits, deltas, anchors, image_sizes, score_threshold)
        if self.nms_pre_per_class > 0:
            keep = keep & (rank_in_group(scores, labels, keep) < self.nms_pre_per_class)
        index, counts = first_kept_batched(boxes, scores, labels, keep, self.nms_threshold,
                                           self.detections_per_image, self.shortlist_nms(boxes.device))
        return Detections(boxes.gather(1, index[..., None].expand(-1, -1, 4)), scores.gather(1, index),
                          labels.gather(1, index), counts)

    def gather_candidates(self, logits: list[torch.Tensor], deltas: list[torch.Tensor], anchors: list[torch.Tensor],
                          image_sizes: list[tuple[int, int]], score_threshold: float | None = None):
        """Every image's candidates before NMS, as padded batch tensors: boxes `(B, C, 4)`
        (decoded, clipped unless `clip_boxes` is "after_nms"), scores `(B, C)`, labels `(B, C)`
        and `keep (B, C)`, the ones over the score threshold and not empty. Reads nothing back."""
        threshold = self.score_threshold if score_threshold is None else score_threshold
        boxes, scores, labels = [], [], []
        for level_logits, level_deltas, level_anchors in zip(logits, deltas, anchors):
            top_logits, anchor_idx, label = self._level_candidates(level_logits)
            picked = torch.gather(level_deltas, 1, anchor_idx[..., None].expand(-1, -1, 4))
            boxes.append(self.box_coder.decode(picked.float(), level_anchors[anchor_idx]))
            scores.append(torch.sigmoid(top_logits.float()))
            labels.append(label)
        boxes, scores, labels = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1)  # (B, C, ...)

        keep = scores > threshold
        if self.clip_boxes == "before_nms":
            boxes = clip_to_sizes(boxes, image_sizes)
        if self.clip_boxes != "after_nms":
            keep &= (boxes[..., 2:] - boxes[..., :2] > self.min_box_size).all(-1)
        return boxes, scores, labels, keep

    def _level_candidates(self, level_logits: torch.Tensor):
        """Top candidates of one level `(B, A_l, K)`: logits, anchor index and label, each `(B, C)`."""
        batch, num_anchors, num_classes = level_logits.shape
        if self.candidates == "per_anchor":
            k = min(self.topk_candidates, num_anchors)
            anchor_idx = level_logits.max(-1).values.topk(k, dim=1).indices  # (B, k)
            top_logits = torch.gather(level_logits, 1, anchor_idx[..., None].expand(-1, -1, num_classes))
            labels = torch.arange(num_classes, device=level_logits.device).expand(batch, k, num_classes)
            anchor_idx = anchor_idx[..., None].expand(-1, -1, num_classes)
            return top_logits.reshape(batch, -1), anchor_idx.reshape(batch, -1), labels.reshape(batch, -1)
        return top_pairs(level_logits, self.topk_candidates)  # sigmoid is monotonic: select on logits


def clip_to_sizes(boxes: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """`boxes (B, N, 4)` xyxy clipped to each image's `(h, w)` in `sizes`."""
    limit = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(boxes.clamp(min=0), limit[:, None, :])


def top_pairs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best `k` (anchor, class) pairs of `logits (B, A, K)`: values, anchor indices and
    classes, each `(B, k)`, best first (the same values as one top-k over all A x K pairs;
    indices may differ among exact ties).

    They lie among the k anchors whose best class scores highest: an anchor outside those has
    k better pairs (each of those anchors' best one) above every pair of its own. So one pass
    takes each anchor's best class and a top-k runs over A anchors and then k x K pairs,
    instead of over A x K pairs (12M at P3 of an 800x1216 image, 91 classes)."""
    batch, num_anchors, num_classes = logits.shape
    k = min(k, num_anchors * num_classes)
    if num_anchors > k:
        anchors = chunked_topk(logits.amax(-1), k)[1]  # (B, k)
        logits = torch.gather(logits, 1, anchors[..., None].expand(-1, -1, num_classes))
    else:
        anchors = torch.arange(num_anchors, device=logits.device).expand(batch, -1)
    values, index = logits.reshape(batch, -1).topk(k, dim=1)
    return values, anchors.gather(1, index // num_classes), index % num_classes


def chunked_topk(values: torch.Tensor, k: int, chunks: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """`values.topk(k, dim=1)` for `(B, N)` with large N: the top k of each of `chunks` slices
    first, then the top k of those. The same values (indices may differ among exact ties);
    torch's top-k runs one thread per row, so one long row (batch 1: 12M logits at P3 of an
    800x1216 image) is several times slower than the slices, which run in parallel."""
    batch, n = values.shape
    if n < chunks * k * 4:
        return values.topk(k, dim=1)
    width = n // chunks
    main = values[:, : chunks * width].reshape(batch, chunks, width)
    top, idx = main.topk(k, dim=2)
    idx = idx + torch.arange(0, chunks * width, width, device=values.device)[None, :, None]
    top, idx = top.reshape(batch, -1), idx.reshape(batch, -1)
    if chunks * width < n:  # the few left over
        top = torch.cat([top, values[:, chunks * width :]], dim=1)
        idx = torch.cat([idx, torch.arange(chunks * width, n, device=values.device).expand(batch, -1)], dim=1)
    best, pick = top.topk(k, dim=1)
    return best, torch.gather(idx, 1, pick)


def first_kept_batched(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
                       iou_threshold: float, count: int, nms) -> tuple[torch.Tensor, list[int]]:
    """Greedy NMS within each group (class) for every image of a batch at once.

    Args:
        boxes `(B, N, 4)`, scores `(B, N)`, groups `(B, N)` and valid `(B, N)`: each image's
        candidates; invalid ones neither survive nor suppress.
    Returns:
        index `(B, D)`, D = min(count, N): per image the candidates kept first, best first
        (equal scores in candidate order), padded past the image's count; and the counts.

    Whether greedy NMS keeps a box depends only on the boxes scored above it, so the best
    `8 * count` candidates of every image go through `nms` (a `BatchedNMS` or
    `greedy_nms_per_image`), and only an image that keeps fewer than `count` of them while
    it has more candidates takes `grouped_nms` over all of them. NMS costs the square of its
    input: 800 boxes an image instead of 5,000 cost ~40x less. (`PostProcessor.shortlist_nms`
    picks `nms` by device.)
    """
    batch = scores.shape[0]
    order = scores.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    shortlist = order[:, : 8 * count]
    width = min(count, shortlist.shape[1])
    kept = nms(boxes.gather(1, shortlist[..., None].expand(-1, -1, 4)), groups.gather(1, shortlist),
               valid.gather(1, shortlist), iou_threshold)
    rank = kept.cumsum(1)
    kept &= rank <= count
    kept_count = kept.sum(1)
    needs_all = (kept_count < count) & (valid.sum(1) > shortlist.shape[1])
    counts, needs_all = torch.stack([kept_count, needs_all]).tolist()
    slot = torch.where(kept, rank - 1, width)  # everything not kept goes to a spare column
    index = torch.zeros(batch, width + 1, dtype=torch.long, device=scores.device)
    index = index.scatter_(1, slot, shortlist)[:, :width]
    for b in (b for b, flag in enumerate(needs_all) if flag):
        candidates = valid[b].nonzero()[:, 0]
        picked = grouped_nms(boxes[b, candidates], scores[b, candidates], groups[b, candidates], iou_threshold)[:count]
        index[b, : len(picked)] = candidates[picked]
        counts[b] = len(picked)
    return index, counts


class BatchedNMS:
    """Which of `boxes (B, S, 4)`, sorted best first, greedy NMS keeps within each group
    (`groups (B, S)`), over all images at once: `(B, S)` bool; invalid boxes (`valid (B, S)`)
    neither survive nor suppress.

    Box i is kept iff no kept box before it in its group overlaps it by IoU > threshold.
    Starting from "all kept", applying that rule to the whole row at once is right for the
    first r boxes after r rounds; it stops at the first round that changes nothing, whose
    result satisfies the rule everywhere and so is the greedy one (few rounds in practice:
    as many as the longest chain of boxes that suppress each other). IoUs in float64, as
    `grouped_nms` computes them.

    Eager, every pair costs ~200 bytes of temporaries, so images go in chunks of at most 2^25
    pairs; `compiled=True` (for GPUs) fuses the pairwise work into one kernel that writes one
    bit a pair, 64 to a word, so that each round reads 1/8 of the bytes (torch.compile, the
    first call waits for the compiler), and takes 2^28 pairs.
    """

    def __init__(self, compiled: bool = False):
        self.compiled = compiled
        self.max_pairs = 2**28 if compiled else 2**25
        # rounds between two checks (each a read-back that stalls the host): a packed round reads
        # 1/8 of the bytes of an eager one, less than a read-back costs on a GPU, so the compiled
        # one checks every 8 rounds
        self.rounds_per_check = 8 if compiled else 2
        # shapes are specialised first (index arithmetic with constants is much cheaper in the
        # kernels) and made dynamic if they change
        self.suppression = torch.compile(packed_suppression_matrix) if compiled else suppression_matrix
        self.round = torch.compile(_packed_nms_round) if compiled else _nms_round

    def __call__(self, boxes: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
                 iou_threshold: float) -> torch.Tensor:
        batch, size = groups.shape
        chunk = max(1, self.max_pairs // max(1, size * size))
        kept = []
        for start in range(0, batch, chunk):
            part = slice(start, start + chunk)
            suppressed_by = self.suppression(boxes[part], groups[part], valid[part], iou_threshold)
            current = valid[part]
            # r rounds settle the first r boxes, so size + 1 rounds always reach the fixed point
            for _ in range(size // self.rounds_per_check + 2):
                for _ in range(self.rounds_per_check):
                    previous, current = current, self.round(suppressed_by, current, valid[part])
                if torch.equal(previous, current):  # a fixed point: one read-back per check
                    break
            else:
                raise RuntimeError("NMS rounds did not settle: the suppression matrix is not triangular")
            kept.append(current)
        return torch.cat(kept) if kept else valid.clone()


def suppression_matrix(boxes: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
                       iou_threshold: float) -> torch.Tensor:
    """`(B, S, S)` bool: [b, i, j] when box j (valid, of i's group, before i) overlaps box i
    by IoU > `iou_threshold` (a row per box, so that a round reduces contiguous memory)."""
    size = groups.shape[1]
    position = torch.arange(size, device=groups.device)
    earlier = position[None, :] < position[:, None]
    return (_iou_above(boxes.double(), iou_threshold) & (groups[:, :, None] == groups[:, None, :])
            & valid[:, None, :] & earlier)


def _nms_round(suppressed_by: torch.Tensor, kept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return valid & ~(suppressed_by & kept[:, None, :]).any(-1)


def packed_suppression_matrix(boxes: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
                              iou_threshold: float) -> torch.Tensor:
    """`suppression_matrix` with each row's flags packed into int64 words: `(B, S, ceil(S / 64))`."""
    return _pack_bits(suppression_matrix(boxes, groups, valid, iou_threshold))


def _packed_nms_round(suppressed_by: torch.Tensor, kept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return valid & ((suppressed_by & _pack_bits(kept)[:, None, :]) == 0).all(-1)


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """`(..., N)` bool as `(..., ceil(N / 64))` int64: flag 64 w + k is bit k of word w."""
    words = torch.nn.functional.pad(flags.to(torch.int64), (0, -flags.shape[-1] % 64)).unflatten(-1, (-1, 64))
    return (words << torch.arange(64, device=flags.device)).sum(-1)  # distinct bits: the sum is their OR


def greedy_nms_per_image(boxes: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
                         iou_threshold: float) -> torch.Tensor:
    """`BatchedNMS` with one `grouped_nms` call per image."""
    kept = torch.zeros_like(valid)
    for b in range(len(valid)):
        index = valid[b].nonzero()[:, 0]
        rank = -index.to(torch.float64)  # already best first: keep that order
        kept[b, index[grouped_nms(boxes[b, index], rank, groups[b, index], iou_threshold)]] = True
    return kept


def _iou_above(boxes: torch.Tensor, threshold: float) -> torch.Tensor:
    """`(B, S, S)` bool: IoU of boxes i and j `(B, S, 4)` over `threshold`, computed as
    torchvision's NMS kernels do (intersection / (area_i + area_j - intersection))."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    inter = torch.minimum(x2[:, :, None], x2[:, None]).sub_(torch.maximum(x1[:, :, None], x1[:, None])).clamp_(min=0)
    height = torch.minimum(y2[:, :, None], y2[:, None]).sub_(torch.maximum(y1[:, :, None], y1[:, None])).clamp_(min=0)
    inter.mul_(height)
    del height
    union = (area[:, :, None] + area[:, None]).sub_(inter)
    return inter.div_(union) > threshold


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each group (class): indices of the kept boxes, best first.

    Boxes are shifted apart per group in float64: the shifts (~1e5 px for 91 classes) leave
    float32 coordinates exact there, whereas in float32 they would round them to ~0.01 px.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.double()
    shift = groups.to(boxes.dtype) * (boxes.max() - boxes.min() + 1).ceil()
    return nms(boxes + shift[:, None], scores.double(), iou_threshold)


def rank_in_group(scores: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`(B, N)`: how many valid candidates of the same image and group (class) score higher
    (equal scores: earlier ones count as higher); meaningless where not valid."""
    batch, num = scores.shape
    order = scores.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    by_group = groups.gather(1, order).sort(dim=1, stable=True)  # groups in a row, best first within each
    first = torch.searchsorted(by_group.values, by_group.values)  # where each group starts
    rank_sorted = torch.arange(num, device=scores.device) - first
    rank = torch.empty_like(rank_sorted)
    rank.scatter_(1, order.gather(1, by_group.indices), rank_sorted)
    return rank
