import math

import pytest
import torch

from retinanet.model.anchors import AnchorGenerator, cell_anchors
from retinanet.model.config import AnchorConfig


def test_nine_anchors_per_location_with_paper_sizes():
    cfg = AnchorConfig()
    assert [round(s, 1) for s in cfg.sizes[0]] == [32.0, 40.3, 50.8]
    gen = AnchorGenerator(cfg.sizes, cfg.aspect_ratios, cfg.strides)
    assert gen.num_anchors == 9
    sizes = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]
    anchors = gen(sizes, (800, 1216))
    assert [len(a) for a in anchors] == [h * w * 9 for h, w in sizes]


def test_first_location_coordinates_by_hand():
    cfg = AnchorConfig()
    gen = AnchorGenerator(cfg.sizes, cfg.aspect_ratios, cfg.strides)
    level0 = gen([(2, 3)], (16, 24))[0]
    # location (row 0, col 0), size 32, ratio 1: a 32x32 box centred at the origin
    assert torch.allclose(level0[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    # ratio 0.5 (h/w): w = 32*sqrt(2), h = 32/sqrt(2), same area
    w, h = 32 * math.sqrt(2), 32 / math.sqrt(2)
    assert torch.allclose(level0[0], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))
    # second size of the first level is 32 * 2^(1/3)
    s = 32 * 2 ** (1 / 3)
    assert torch.allclose(level0[4], torch.tensor([-s / 2, -s / 2, s / 2, s / 2]), atol=1e-4)
    # next location to the right is shifted by the stride (8), next row likewise
    assert torch.allclose(level0[9] - level0[0], torch.tensor([8.0, 0, 8, 0]))
    assert torch.allclose(level0[27] - level0[0], torch.tensor([0.0, 8, 0, 8]))


def test_every_anchor_of_a_size_has_the_same_area():
    cells = cell_anchors([64.0], [0.5, 1.0, 2.0])
    areas = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
    assert torch.allclose(areas, torch.full((3,), 64.0 * 64.0))


def test_offset_moves_centres_by_half_a_stride():
    gen = AnchorGenerator([[32.0]], [1.0], [8], offset=0.5)
    a = gen([(1, 1)], (8, 8))[0]
    assert torch.allclose((a[0, :2] + a[0, 2:]) / 2, torch.tensor([4.0, 4.0]))


def test_matches_torchvision_anchor_generator_exactly():
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from retinanet.convert.torchvision import _ratio_major_to_size_major, torchvision_config

    cfg = torchvision_config(1).anchors
    ours = AnchorGenerator(cfg.sizes, cfg.aspect_ratios, cfg.strides, offset=cfg.offset,
                           round_to_int=cfg.round_cell_anchors, stride_from_image_size=cfg.stride_from_image_size)
    sizes = tuple(tuple(int(s) for s in level) for level in cfg.sizes)
    tv = TVAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    grid = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]
    feats = [torch.zeros(1, 1, h, w) for h, w in grid]
    theirs = tv(ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1216)]), feats)[0]
    perm = _ratio_major_to_size_major(3, 3)
    start = 0
    for level, (h, w) in zip(ours(grid, (800, 1216)), grid):
        expected = theirs[start : start + h * w * 9].view(h * w, 9, 4)[:, perm].reshape(-1, 4)
        start += h * w * 9
        assert torch.equal(level, expected)


def test_cache_returns_the_same_tensors():
    cfg = AnchorConfig()
    gen = AnchorGenerator(cfg.sizes, cfg.aspect_ratios, cfg.strides)
    a = gen([(4, 4)] * 5, (32, 32))
    assert gen([(4, 4)] * 5, (32, 32))[0] is a[0]


def test_mismatched_levels_rejected():
    with pytest.raises(ValueError):
        AnchorGenerator([[32.0]], [1.0], [8, 16])
