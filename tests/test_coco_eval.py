"""Our COCO metrics equal what pycocotools computes directly on the same data."""

import contextlib
import io
import json

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet.engine.evaluate import SUMMARY_KEYS, coco_metrics, load_coco_ground_truth

GT = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 200},
               {"id": 2, "file_name": "b.jpg", "width": 300, "height": 200}],
    "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [100, 100, 80, 90], "area": 7200, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [150, 50, 120, 140], "area": 16800, "iscrowd": 0},
        {"id": 5, "image_id": 2, "category_id": 7, "bbox": [10, 100, 60, 60], "area": 3600, "iscrowd": 1},
    ],
}
DETECTIONS = [
    {"image_id": 1, "category_id": 3, "bbox": [12, 9, 48, 42], "score": 0.9},
    {"image_id": 1, "category_id": 7, "bbox": [95, 105, 85, 80], "score": 0.8},
    {"image_id": 1, "category_id": 3, "bbox": [100, 100, 30, 30], "score": 0.6},
    {"image_id": 2, "category_id": 3, "bbox": [2, 1, 18, 22], "score": 0.4},
    {"image_id": 2, "category_id": 7, "bbox": [160, 60, 100, 120], "score": 0.7},
    {"image_id": 2, "category_id": 7, "bbox": [12, 102, 55, 58], "score": 0.95},
]


def test_metrics_equal_pycocotools(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(GT))
    ours = coco_metrics(load_coco_ground_truth(path), DETECTIONS, verbose=False)

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        evaluator = COCOeval(gt, gt.loadRes(DETECTIONS), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    for key, value in zip(SUMMARY_KEYS, evaluator.stats):
        assert ours[key] == pytest.approx(float(value)), key
    assert 0 < ours["AP"] < 1
    precision = evaluator.eval["precision"][:, :, 1, 0, -1]
    assert ours["per_class_AP"]["dog"] == pytest.approx(float(precision[precision > -1].mean()))


def test_no_detections_scores_zero(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(GT))
    metrics = coco_metrics(load_coco_ground_truth(path), [], verbose=False)
    assert metrics["AP"] == 0.0 and set(metrics["per_class_AP"]) == set()
