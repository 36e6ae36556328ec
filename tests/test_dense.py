"""Dense scenes: the chunked matcher against the whole IoU matrix at 1,000 boxes per image,
its memory, and the anchor search's batched scoring against one candidate at a time."""

from pathlib import Path

import pytest
import torch

from retinanet.analysis.anchor_search import best_iou_on_grids, level_sizes
from retinanet.model.anchors import AnchorGenerator, cell_anchors
from retinanet.model.matching import BACKGROUND, FOREGROUND, IGNORE, AnchorMatcher


def reference_match(anchors, gt, valid, crowd, fg=0.5, bg=0.4, low_quality=True, crowd_ioa=0.5):
    """The whole `(B, G, A)` IoU matrix at once, torchvision's `box_iou` and `Matcher`
    semantics plus crowd boxes: `(labels, gt_index, best IoU of each GT)`."""
    lt = torch.maximum(gt[..., None, :2], anchors[:, :2])
    rb = torch.minimum(gt[..., None, 2:], anchors[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]

    def area(b):
        return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)

    iou = inter / (area(gt)[..., None] + area(anchors) - inter)
    crowd = crowd & valid
    iou = iou.masked_fill(~(valid & ~crowd)[..., None], -1.0)
    best, index = iou.max(dim=1)
    labels = torch.where(best >= fg, FOREGROUND, torch.where(best < bg, BACKGROUND, IGNORE))
    best_per_gt = iou.max(dim=2, keepdim=True).values
    if low_quality:
        labels = torch.where(((iou == best_per_gt) & (best_per_gt > 0)).any(dim=1), FOREGROUND, labels)
    ioa = inter.masked_fill(~crowd[..., None], 0.0).max(dim=1).values / area(anchors).clamp(min=1e-6)
    labels = torch.where((labels == BACKGROUND) & (ioa >= crowd_ioa), IGNORE, labels)
    return labels.to(torch.int8), index, best_per_gt[..., 0]


def dense_scene(dtype, boxes=1000, seed=0):
    """Two 128 px images' anchors (the model's grid) and 1,000 boxes each, with what breaks
    a careless chunking: GT boxes equal to anchors (exact IoU 1 ties), the same box at the
    first and the last index (a tie across chunks), boxes equal to each other, zero-area
    boxes, one on a zero-area anchor (IoU 0/0), padding and crowd boxes."""
    g = torch.Generator().manual_seed(seed)
    sizes = [[16 * 2**i * 2 ** (j / 3) for j in range(3)] for i in range(5)]
    generator = AnchorGenerator(sizes, [0.5, 1.0, 2.0], [8, 16, 32, 64, 128])
    anchors = torch.cat(generator([(-(-128 // s), -(-128 // s)) for s in (8, 16, 32, 64, 128)], (128, 128))).to(dtype)
    anchors[7, 2:] = anchors[7, :2]  # a zero-area anchor
    xy = torch.rand(2, boxes, 2, generator=g, dtype=dtype) * 110
    gt = torch.cat([xy, xy + 4 + torch.rand(2, boxes, 2, generator=g, dtype=dtype) * 40], -1)
    gt[:, :300] = anchors[torch.randint(0, len(anchors), (2, 300), generator=g)]
    gt[:, -1] = gt[:, 0]
    gt[:, 500:520] = gt[:, 520:540]
    gt[:, 600, 2:] = gt[:, 600, :2]
    gt[:, 601] = anchors[7]
    valid = torch.ones(2, boxes, dtype=torch.bool)
    valid[1, 900:] = False  # the second image has fewer boxes: padding
    crowd = torch.rand(2, boxes, generator=g) > 0.97
    return anchors, gt, valid, crowd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("low_quality", [True, False])
def test_chunked_matcher_equals_the_whole_matrix_at_1000_boxes(dtype, low_quality):
    anchors, gt, valid, crowd = dense_scene(dtype)
    expected_labels, expected_index, expected_best = reference_match(anchors, gt, valid, crowd,
                                                                     low_quality=low_quality)
    assert (expected_labels == FOREGROUND).sum() > 500 and (expected_labels == IGNORE).sum() > 100
    assert expected_best.isnan().any()  # the 0/0 case is in the scene
    for chunk_elements in (1 << 22, 7 * 2 * len(anchors) + 5):  # the default (2 chunks here), 7 GT boxes
        matcher = AnchorMatcher(0.5, 0.4, allow_low_quality_matches=low_quality, crowd_ioa_threshold=0.5)
        matcher.chunk_elements = chunk_elements
        got = matcher(anchors, gt, valid, crowd)
        assert torch.equal(got.labels, expected_labels)
        assert torch.equal(got.gt_index, expected_index)
        assert torch.equal(got.gt_best_iou.nan_to_num(7.0), expected_best.nan_to_num(7.0))


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def test_matching_memory_does_not_grow_with_the_boxes():
    """2,000 boxes on 2 x 24,000 anchors: the IoU matrix alone would take 384 MB (and its
    intersections and corners several times that); the matcher's chunks stay well under it."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(24000, 2, generator=g) * 500
    anchors = torch.cat([xy, xy + 8 + torch.rand(24000, 2, generator=g) * 90], 1)
    xy = torch.rand(2, 2000, 2, generator=g) * 500
    gt = torch.cat([xy, xy + 8 + torch.rand(2, 2000, 2, generator=g) * 60], -1)
    valid, crowd = torch.ones(2, 2000, dtype=torch.bool), torch.zeros(2, 2000, dtype=torch.bool)
    crowd[:, ::50] = True
    matcher = AnchorMatcher()
    matcher(anchors, gt[:, :10], valid[:, :10], crowd[:, :10])  # warm-up
    before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    matches = matcher(anchors, gt, valid, crowd)
    growth_mb = (_rss_kb("VmHWM") - before) / 1024
    assert (matches.labels == FOREGROUND).any()
    assert growth_mb < 160, f"matching 2 x 2,000 boxes took {growth_mb:.0f} MB"


def test_batched_anchor_scoring_equals_one_candidate_at_a_time():
    """`best_iou_on_grids` scores many size sets in groups; each row is the one-set formula's
    result bit for bit (ties and boxes between grid points included)."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 400
    boxes = torch.cat([xy, xy + 2 + torch.rand(300, 2, generator=g) ** 2 * 250], 1)
    boxes[:50] = torch.tensor([8.0, 8.0, 40.0, 40.0])
    strides, ratios = [8, 16, 32, 64, 128], [0.5, 1.0, 2.0]
    size_sets = [level_sizes(base, len(strides), 3) for base in (4.0, 9.3, 16.0, 31.7, 50.0)]
    for offset in (0.0, 0.5):
        batched = best_iou_on_grids(boxes, size_sets, ratios, strides, offset, max_elements=3000)
        for row, sizes in zip(batched, size_sets):
            expected = torch.zeros(len(boxes))
            centres, wh = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
            for level, stride in zip(sizes, strides):
                cells = cell_anchors(level, ratios)
                d = (centres - (torch.round(centres / stride - offset) + offset) * stride).abs()
                a_wh = cells[:, 2:] - cells[:, :2]
                overlap = ((wh[:, None] + a_wh[None]) / 2 - d[:, None]).clamp(min=0)
                overlap = torch.minimum(overlap, torch.minimum(wh[:, None], a_wh[None].expand_as(overlap)))
                inter = overlap[..., 0] * overlap[..., 1]
                union = (wh[:, 0] * wh[:, 1])[:, None] + (a_wh[:, 0] * a_wh[:, 1])[None] - inter
                expected = torch.maximum(expected, (inter / union).max(dim=1).values)
            assert torch.equal(row, expected)
