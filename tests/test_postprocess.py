import torch

from retinanet.model.box_coding import BoxCoder
from retinanet.model.postprocess import PostProcessor


def _level(scores_by_anchor, num_classes=3):
    """Logits for one level from a dict {(anchor, class): prob}; everything else very unlikely."""
    logits = torch.full((1, 4, num_classes), -20.0)
    for (a, k), p in scores_by_anchor.items():
        logits[0, a, k] = torch.logit(torch.tensor(p))
    return logits


ANCHORS = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [95, 95, 120, 120]])


def test_threshold_nms_per_class_and_clip():
    post = PostProcessor(BoxCoder(), score_threshold=0.05, topk_candidates=1000, nms_threshold=0.5,
                         detections_per_image=100)
    logits = _level({(0, 0): 0.9, (1, 0): 0.8, (1, 1): 0.7, (2, 2): 0.04, (3, 1): 0.6})
    out = post([logits], [torch.zeros(1, 4, 4)], [ANCHORS], [(100, 100)])[0]
    # anchor 1 class 0 is suppressed by anchor 0 (IoU 0.68); class 1 on anchor 1 survives (other class);
    # anchor 2 is under the threshold; anchor 3 is clipped to the 100x100 image
    assert out["scores"].tolist() == torch.tensor([0.9, 0.7, 0.6]).tolist()
    assert out["labels"].tolist() == [0, 1, 1]
    assert torch.allclose(out["boxes"][2], torch.tensor([95.0, 95, 100, 100]))


def test_topk_per_level_and_max_detections():
    post = PostProcessor(BoxCoder(), topk_candidates=2, detections_per_image=1)
    far = torch.tensor([[0.0, 0, 10, 10], [30, 30, 40, 40], [60, 60, 70, 70], [90, 90, 99, 99]])
    logits = _level({(0, 0): 0.5, (1, 0): 0.6, (2, 0): 0.7, (3, 0): 0.8})
    out = post([logits], [torch.zeros(1, 4, 4)], [far], [(100, 100)])[0]
    assert out["scores"].tolist() == [torch.tensor(0.8).item()]
    post.detections_per_image = 10
    out = post([logits], [torch.zeros(1, 4, 4)], [far], [(100, 100)])[0]
    assert len(out["scores"]) == 2  # top-2 candidates only


def test_images_never_suppress_each_other_and_empty_boxes_dropped():
    post = PostProcessor(BoxCoder(), detections_per_image=100)
    logits = torch.cat([_level({(0, 0): 0.9}), _level({(0, 0): 0.8, (3, 1): 0.7})])
    deltas = torch.zeros(2, 4, 4)
    out = post([logits], [deltas], [ANCHORS], [(100, 100), (90, 90)])
    assert [len(o["scores"]) for o in out] == [1, 1]  # image 2: anchor 3 lies outside 90x90 -> empty -> dropped
    assert torch.equal(out[0]["boxes"], out[1]["boxes"])


def test_levels_are_combined_before_nms():
    post = PostProcessor(BoxCoder())
    l0 = _level({(0, 0): 0.9})
    l1 = _level({(1, 0): 0.95})
    out = post([l0, l1], [torch.zeros(1, 4, 4)] * 2, [ANCHORS, ANCHORS], [(100, 100)])[0]
    assert out["scores"].tolist() == [torch.tensor(0.95).item()]


def test_nothing_over_threshold():
    post = PostProcessor(BoxCoder())
    out = post([torch.full((2, 4, 3), -10.0)], [torch.zeros(2, 4, 4)], [ANCHORS], [(100, 100)] * 2)
    assert all(len(o["boxes"]) == 0 for o in out)
