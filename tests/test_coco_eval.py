"""Our COCO metrics equal what pycocotools computes directly on the same data."""

import contextlib
import copy
import io
import json
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet.cli import main as cli
from retinanet.config import save_config
from retinanet.data.dataset import coco_api
from retinanet.engine import evaluate as evaluate_module
from retinanet.engine.evaluate import SUMMARY_KEYS, coco_classes, coco_metrics, load_coco_ground_truth

from helpers import require_peer, tiny_config

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


def test_faster_coco_eval_gives_the_numbers_of_pycocotools():
    """`eval.coco_backend`: faster-coco-eval's summary, per-class AP, error breakdown and
    precision array equal pycocotools' (to rounding), on the case above (a crowd region, two
    classes) and on the error-breakdown case of test_analysis (confusion, localisation,
    background, a miss); "auto" picks it where installed."""
    faster = require_peer("faster_coco_eval", "pip install faster-coco-eval")
    error_gt = {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}"} for i in (1, 2, 3)],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "iscrowd": 0},
                                {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 40, 40], "iscrowd": 0},
                                {"id": 3, "image_id": 3, "category_id": 1, "bbox": [20, 20, 30, 30], "iscrowd": 0}],
                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    error_detections = [{"image_id": 1, "category_id": 2, "bbox": [10, 10, 40, 40], "score": 0.9},
                        {"image_id": 2, "category_id": 2, "bbox": [58, 58, 40, 40], "score": 0.8},
                        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.95}]
    for gt, detections in ((GT, DETECTIONS), (error_gt, error_detections)):
        runs = [coco_metrics(coco_api(copy.deepcopy(gt)), copy.deepcopy(detections), verbose=False,
                             return_precision=True, backend=backend) for backend in ("pycocotools", "faster-coco-eval")]
        (reference, reference_precision), (ours, precision) = runs
        assert set(ours) == set(reference)
        for key in SUMMARY_KEYS:
            assert ours[key] == pytest.approx(reference[key], abs=1e-12), key
        assert ours["per_class_AP"] == pytest.approx(reference["per_class_AP"], abs=1e-12)
        assert ours["error_breakdown"] == reference["error_breakdown"]
        assert np.abs(precision - reference_precision).max() < 1e-12
    assert coco_classes("auto")[0] is faster.COCO
    assert coco_classes("pycocotools") == (COCO, COCOeval)


def test_a_missing_backend_stops_eval_before_predicting(shapes_data, shapes_model_file, tmp_path, capsys,
                                                         monkeypatch):
    """Without faster-coco-eval, "auto" falls back to pycocotools, and `retinanet eval
    eval.coco_backend=faster-coco-eval` ends in one line saying how to install it, with
    nothing predicted."""
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import fails as when not installed
    assert coco_classes("auto") == (COCO, COCOeval)
    weights = shapes_model_file
    save_config(tiny_config(shapes_data, tmp_path), tmp_path / "cfg.yaml")
    monkeypatch.setattr(evaluate_module, "predict_dataset", lambda *a, **k: pytest.fail("predicted"))
    assert cli(["eval", "--weights", str(weights), "--config", str(tmp_path / "cfg.yaml"), "--output-dir",
                str(tmp_path / "ev"), "eval.coco_backend=faster-coco-eval"]) == 2
    assert capsys.readouterr().err.strip() == ("error: eval.coco_backend: faster-coco-eval is not installed "
                                               "(pip install faster-coco-eval)")
