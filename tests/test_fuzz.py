"""Property-based tests over box coding, matching, transforms and the COCO reader."""

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retinanet.data.coco import CocoDetection, DatasetError, hflip
from retinanet.model.box_coding import BoxCoder
from retinanet.model.matching import BACKGROUND, FOREGROUND, IGNORE, AnchorMatcher, batched_iou
from retinanet.model.preprocess import Preprocessor, scale_boxes

coord = st.floats(0, 500, allow_nan=False, width=32)
size = st.floats(1, 300, allow_nan=False, width=32)


@st.composite
def boxes(draw, n_min=0, n_max=12):
    n = draw(st.integers(n_min, n_max))
    rows = [(x, y, x + w, y + h) for x, y, w, h in
            (draw(st.tuples(coord, coord, size, size)) for _ in range(n))]
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


@settings(max_examples=60, deadline=None)
@given(boxes(1), boxes(1))
def test_box_coding_round_trip(gt, anchors):
    n = min(len(gt), len(anchors))
    gt, anchors = gt[:n], anchors[:n]
    coder = BoxCoder(scale_clamp=20.0)
    back = coder.decode(coder.encode(gt, anchors), anchors)
    assert torch.allclose(back, gt, atol=1e-2, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(boxes(0), boxes(1, 40), st.floats(0.3, 0.7), st.floats(0.0, 0.3))
def test_matcher_invariants(gt, anchors, fg, gap):
    bg = max(0.0, fg - gap)
    valid = torch.ones(1, len(gt), dtype=torch.bool)
    m = AnchorMatcher(fg, bg, allow_low_quality_matches=True)(anchors, gt[None], valid)
    labels = m.labels[0]
    assert set(labels.unique().tolist()) <= {FOREGROUND, BACKGROUND, IGNORE}
    if len(gt) == 0:
        assert (labels == BACKGROUND).all()
        return
    iou = batched_iou(gt[None], anchors)[0]
    best = iou.max(0).values
    assert (labels[best >= fg] == FOREGROUND).all()
    assert (labels[best < bg] != IGNORE).all()
    for j in range(len(gt)):  # every GT that overlaps any anchor gets a foreground anchor
        if iou[j].max() > 0:
            assert (labels[iou[j] == iou[j].max()] == FOREGROUND).all()
    fg_idx = (labels == FOREGROUND).nonzero()[:, 0]
    assert torch.equal(iou[m.gt_index[0][fg_idx], fg_idx], best[fg_idx])  # matched to its best GT


@settings(max_examples=40, deadline=None)
@given(st.integers(8, 64), st.integers(8, 64), st.data())
def test_flip_is_an_involution_and_keeps_boxes_inside(h, w, data):
    n = data.draw(st.integers(0, 5))
    xs = [sorted(data.draw(st.tuples(st.floats(0, w), st.floats(0, w)))) for _ in range(n)]
    ys = [sorted(data.draw(st.tuples(st.floats(0, h), st.floats(0, h)))) for _ in range(n)]
    b = torch.tensor([[x[0], y[0], x[1], y[1]] for x, y in zip(xs, ys)], dtype=torch.float32).reshape(-1, 4)
    image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
    flipped_image, flipped = hflip(image, b)
    assert (flipped[:, 0] >= -1e-4).all() and (flipped[:, 2] <= w + 1e-4).all()
    assert (flipped[:, 2] >= flipped[:, 0]).all()
    again_image, again = hflip(flipped_image, flipped)
    assert torch.equal(again_image, image) and torch.allclose(again, b, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.integers(20, 300), st.integers(20, 300), st.integers(16, 128), boxes(0, 5))
def test_resize_scales_boxes_exactly_with_the_image(h, w, min_size, b):
    pre = Preprocessor([min_size], min_size, 2 * min_size, [0, 0, 0], [1, 1, 1], size_divisibility=1)
    batch, targets = pre([torch.rand(3, h, w)], [{"boxes": b.clone()}], training=True)
    nh, nw = batch.image_sizes[0]
    assert min(nh, nw) <= min_size + 1 and max(nh, nw) <= 2 * min_size + 1
    expected = b * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    assert torch.allclose(targets[0]["boxes"], expected, rtol=1e-5, atol=1e-4)
    assert torch.allclose(scale_boxes(targets[0]["boxes"], (nh, nw), (h, w)), b, rtol=1e-5, atol=1e-3)


junk = st.one_of(st.none(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=3),
                 st.lists(st.one_of(st.floats(-10, 50), st.just(float("nan"))), max_size=5))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.fixed_dictionaries({"image_id": st.sampled_from([1, 2, 3]), "category_id": st.sampled_from([1, 2]),
                                       "bbox": junk}), max_size=8),
       st.dictionaries(st.sampled_from(["id", "file_name", "width", "height"]), junk, max_size=4))
def test_coco_reader_never_crashes_unexpectedly(tmp_path, annotations, extra_image):
    images = [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
              {"id": 2, "file_name": "b.jpg", "width": 10, "height": 50}]
    if extra_image:
        images.append(dict({"id": 3, "file_name": "c.jpg", "width": 5, "height": 5}, **extra_image))
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1}, {"id": 2}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    image_ids = {1, 2}
    valid_image = not extra_image or _valid_extra(extra_image)
    if extra_image and valid_image:
        image_ids.add(dict({"id": 3}, **extra_image)["id"])
    valid_image = valid_image and all(a["image_id"] in image_ids for a in annotations)
    try:
        ds = CocoDetection(tmp_path, path)
    except DatasetError as err:
        assert str(path) in str(err)
        # bad image entries and references to unknown images are fatal; bad boxes are dropped
        assert not valid_image, f"a valid file was rejected: {err}"
        return
    assert valid_image, "an invalid image entry was accepted"
    assert len(ds) == len(images)
    kept = sum(len(r.boxes) for r in ds.records)
    assert kept + ds.report.dropped_boxes == len(annotations)
    for record in ds.records:
        for x0, y0, x1, y1 in record.boxes:
            assert 0 <= x0 < x1 <= record.width and 0 <= y0 < y1 <= record.height


def _valid_extra(extra: dict) -> bool:
    """Whether image 3, `{"id": 3, "file_name": "c.jpg", "width": 5, "height": 5}` updated
    with `extra`, is a usable COCO image entry."""
    image = dict({"id": 3, "file_name": "c.jpg", "width": 5, "height": 5}, **extra)
    try:
        width, height = int(image["width"]), int(image["height"])
    except (TypeError, ValueError, OverflowError):
        return False
    ok_id = isinstance(image["id"], (int, str)) and not isinstance(image["id"], bool) and image["id"] not in (1, 2)
    return ok_id and width > 0 and height > 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.floats(0, 20), st.floats(0, 10),
                          st.floats(2, 20), st.floats(2, 20)), max_size=8))
def test_valid_coco_files_always_load_with_every_box(tmp_path, boxes):
    images = [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
              {"id": 2, "file_name": "b.jpg", "width": 60, "height": 50}]
    annotations = [{"id": i, "image_id": img, "category_id": cat, "bbox": [x, y, w, h]}
                   for i, (img, cat, x, y, w, h) in enumerate(boxes)]
    path = tmp_path / "valid.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    ds = CocoDetection(tmp_path, path)
    assert len(ds) == 2 and ds.report.dropped_boxes == 0
    for record in ds.records:
        expected = [b for b in boxes if b[0] == record.image_id]
        assert record.labels == [b[1] - 1 for b in expected]
        assert record.boxes == [[x, y, x + w, y + h] for _, _, x, y, w, h in expected]
