import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from retinanet.model.matching import BACKGROUND, FOREGROUND, IGNORE, AnchorMatcher, batched_iou


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_iou_matches_torchvision():
    a = torch.rand(7, 2) * 100
    gt = torch.cat([a, a + torch.rand(7, 2) * 50 + 1], 1)
    b = torch.rand(30, 2) * 100
    anchors = torch.cat([b, b + torch.rand(30, 2) * 50 + 1], 1)
    assert torch.allclose(batched_iou(gt[None], anchors)[0], box_iou(gt, anchors))


def test_thresholds_by_hand():
    gt = boxes([0, 0, 10, 10])[None]
    anchors = boxes(
        [0, 0, 10, 10],  # IoU 1.0 -> fg
        [0, 0, 10, 20],  # IoU 0.5 -> fg (>= 0.5)
        [0, 0, 10, 22],  # IoU 0.4545 -> ignored
        [0, 0, 10, 25],  # IoU 0.4 -> ignored (>= 0.4 is not background)
        [0, 0, 10, 26],  # IoU 0.385 -> bg
        [50, 50, 60, 60],  # IoU 0 -> bg
    )
    m = AnchorMatcher(0.5, 0.4, allow_low_quality_matches=False)(anchors, gt, torch.ones(1, 1, dtype=torch.bool))
    assert m.labels[0].tolist() == [FOREGROUND, FOREGROUND, IGNORE, IGNORE, BACKGROUND, BACKGROUND]


def test_low_quality_match_gives_every_gt_its_best_anchor():
    gt = boxes([0, 0, 10, 10], [100, 100, 130, 130])[None]
    anchors = boxes([0, 0, 10, 10], [100, 100, 120, 150], [100, 100, 125, 160], [300, 300, 310, 310])
    valid = torch.ones(1, 2, dtype=torch.bool)
    without = AnchorMatcher(allow_low_quality_matches=False)(anchors, gt, valid)
    with_lq = AnchorMatcher(allow_low_quality_matches=True)(anchors, gt, valid)
    # gt 1's IoUs: anchor 1 0.4615 (its best), anchor 2 0.4545: both ignored without low-quality
    # matches; with them the best one becomes foreground, the other stays ignored
    assert without.labels[0].tolist() == [FOREGROUND, IGNORE, IGNORE, BACKGROUND]
    assert with_lq.labels[0].tolist() == [FOREGROUND, FOREGROUND, IGNORE, BACKGROUND]
    assert with_lq.gt_index[0, 1] == 1


def test_zero_gt_images_are_all_background():
    anchors = boxes([0, 0, 10, 10], [5, 5, 20, 20])
    gt = torch.zeros(2, 1, 4)
    valid = torch.zeros(2, 1, dtype=torch.bool)
    m = AnchorMatcher()(anchors, gt, valid)
    assert (m.labels == BACKGROUND).all()
    m = AnchorMatcher()(anchors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert (m.labels == BACKGROUND).all() and m.labels.shape == (2, 2)


def test_padding_in_a_batch_does_not_leak_between_images():
    anchors = boxes([0, 0, 10, 10], [50, 50, 60, 60])
    gt = torch.stack([boxes([0, 0, 10, 10], [0, 0, 0, 0]), boxes([50, 50, 60, 60], [0, 0, 10, 10])])
    valid = torch.tensor([[True, False], [True, False]])
    m = AnchorMatcher()(anchors, gt, valid)
    assert m.labels.tolist() == [[FOREGROUND, BACKGROUND], [BACKGROUND, FOREGROUND]]


def test_crowd_boxes_match_nothing_and_ignore_what_they_cover():
    gt = boxes([0, 0, 10, 10], [100, 100, 200, 200])[None]
    crowd = torch.tensor([[False, True]])
    anchors = boxes([0, 0, 10, 10], [100, 100, 200, 200], [120, 120, 140, 140], [190, 190, 230, 230], [400, 400, 410, 410])
    m = AnchorMatcher()(anchors, gt, torch.ones(1, 2, dtype=torch.bool), crowd)
    # inside the crowd region -> ignored; mostly outside (IoA 0.0625) -> background
    assert m.labels[0].tolist() == [FOREGROUND, IGNORE, IGNORE, BACKGROUND, BACKGROUND]


def test_agrees_with_torchvision_matcher_on_random_boxes():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        a = torch.rand(6, 2, generator=g) * 200
        gt = torch.cat([a, a + torch.rand(6, 2, generator=g) * 100 + 5], 1)
        b = torch.rand(500, 2, generator=g) * 250
        anchors = torch.cat([b, b + torch.rand(500, 2, generator=g) * 100 + 5], 1)
        tv = Matcher(0.5, 0.4, allow_low_quality_matches=True)(box_iou(gt, anchors))
        ours = AnchorMatcher(0.5, 0.4, allow_low_quality_matches=True)(anchors, gt[None], torch.ones(1, 6, dtype=torch.bool))
        expected = torch.where(tv >= 0, FOREGROUND, torch.where(tv == -1, BACKGROUND, IGNORE))
        assert torch.equal(ours.labels[0].long(), expected)
        fg = tv >= 0
        assert torch.equal(ours.gt_index[0][fg], tv[fg])
