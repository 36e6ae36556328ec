"""Precision, recall, F1, the F1-optimal threshold and the confusion matrix at a working
threshold, against numbers worked out by hand, against pycocotools' own matching, and end to
end through `retinanet eval`."""

import contextlib
import io
import json

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet import save_model
from retinanet.analysis.threshold_metrics import images_from_results, threshold_metrics
from retinanet.cli import main as cli
from retinanet.config import save_config
from retinanet.data.formats import open_dataset
from retinanet.data.dataset import ImageRecord

from helpers import shapes_model, tiny_config

NAMES = ["a", "b"]
CATEGORY_IDS = [1, 2]


def _record(image_id: int, boxes: list, crowd: list | None = None) -> ImageRecord:
    """Ground truth given as (label, [x, y, w, h]) pairs."""
    return ImageRecord(image_id, f"{image_id}.png", 100, 100, [[x, y, x + w, y + h] for _, (x, y, w, h) in boxes],
                       [label for label, _ in boxes], crowd or [False] * len(boxes))


def _det(image_id: int, category_id: int, bbox: list, score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


A, B = 0, 1
RECORDS = [
    _record(1, [(A, [0, 0, 10, 10]), (B, [20, 20, 20, 20])]),
    _record(2, [(A, [50, 50, 20, 20]), (B, [0, 0, 40, 40])], crowd=[False, True]),
    _record(3, [(B, [0, 0, 30, 30])]),
]
DETECTIONS = [
    _det(1, 1, [0, 0, 10, 10], 0.9),  # a on a: true positive
    _det(1, 2, [21, 21, 20, 20], 0.7),  # b on b, IoU 361/439 = 0.82 (listed first, scored lower)
    _det(1, 1, [20, 20, 20, 20], 0.8),  # a exactly on b
    _det(2, 1, [0, 0, 10, 10], 0.95),  # a inside the crowd region of b
    _det(2, 2, [5, 5, 10, 10], 0.6),  # b inside the crowd region of b
    _det(2, 1, [49, 50, 20, 20], 0.4),  # a on a, IoU 380/420 = 0.90, below the threshold
    _det(3, 2, [15, 0, 30, 30], 0.85),  # b on b at IoU 450/1350 = 1/3
]


def test_three_images_worked_out_by_hand():
    """Score threshold 0.5, IoU 0.5; classes a, b.

    Within a class (precision/recall/F1):
    - image 1: a 0.9 TP; a 0.8 FP (no box of a there); b 0.7 TP (IoU 0.82).
    - image 2: a 0.95 FP (the crowd region is b's: it ignores b detections only); b 0.6 on
      the crowd region of b: ignored; a 0.4 is below 0.5: the a box is missed; the crowd
      region is never missed.
    - image 3: b 0.85 at IoU 1/3: FP, and the b box is missed.
    a: TP 1, FP 2, FN 1 -> P 1/3, R 1/2, F1 2/(2+2+1) = 0.4.
    b: TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 0.5.
    overall: TP 2, FP 3, FN 2 -> P 0.4, R 0.5, F1 4/9.

    Best F1 (thresholds at the detections' scores, ignored ones left out; F1 = 2TP/(kept+GT)):
    a: 0.95 F -> 0; 0.9 T -> 2/4; 0.8 F -> 2/5; 0.4 T -> 4/6: best 0.4 (P 1/2, R 1).
    b: 0.85 F -> 0; 0.7 T -> 2/4: best 0.7 (P 1/2, R 1/2).
    overall (4 boxes): .95F 0; .9T 2/6; .85F 2/7; .8F 2/8; .7T 4/9; .4T 6/10: best 0.4, F1 0.6.

    Confusion (regardless of class; rows truth a, b, background; columns predicted a, b,
    background): image 1: a 0.9 -> (a, a); a 0.8 takes the b box first -> (b, a); b 0.7 then
    finds it taken -> (background, b). Image 2: a 0.95 -> (background, a); b 0.6 ignored; the
    a box missed -> (a, background). Image 3: b 0.85 -> (background, b); the box missed ->
    (b, background)."""
    metrics = threshold_metrics(images_from_results(RECORDS, DETECTIONS, CATEGORY_IDS), NAMES, 0.5, 0.5)
    a, b, overall = metrics["per_class"]["a"], metrics["per_class"]["b"], metrics["overall"]
    assert {k: a[k] for k in ("tp", "fp", "fn")} == {"tp": 1, "fp": 2, "fn": 1}
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((1 / 3, 1 / 2, 0.4))
    assert {k: b[k] for k in ("tp", "fp", "fn")} == {"tp": 1, "fp": 1, "fn": 1}
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert {k: overall[k] for k in ("tp", "fp", "fn")} == {"tp": 2, "fp": 3, "fn": 2}
    assert (overall["precision"], overall["recall"], overall["f1"]) == pytest.approx((0.4, 0.5, 4 / 9))

    assert a["best_f1"]["threshold"] == pytest.approx(0.4)
    assert (a["best_f1"]["f1"], a["best_f1"]["precision"], a["best_f1"]["recall"]) == pytest.approx((2 / 3, 0.5, 1))
    assert b["best_f1"]["threshold"] == pytest.approx(0.7) and b["best_f1"]["f1"] == pytest.approx(0.5)
    assert overall["best_f1"]["threshold"] == pytest.approx(0.4)
    assert (overall["best_f1"]["f1"], overall["best_f1"]["recall"]) == pytest.approx((0.6, 0.75))

    matrix = metrics["confusion_matrix"]
    assert matrix["labels"] == ["a", "b", "background"]
    assert matrix["counts"] == [[1, 0, 1],
                                [1, 0, 1],
                                [1, 2, 0]]


def test_best_threshold_keeps_ties_together_and_prefers_the_higher_of_equals():
    """One box of a per image in 3 images. Scores 0.9 (TP), 0.6 (TP), 0.6 (FP), 0.3 (TP):
    at 0.9: 2*1/(1+3) = 0.5; at 0.6 (both 0.6 kept): 2*2/(3+3) = 2/3; at 0.3: 2*3/(4+3) = 6/7.
    With 0.3 made FP instead, 0.6 wins (2/3 against 2*2/(4+3) = 4/7). A threshold of 0.6 can
    not keep one 0.6 without the other. A second case of equal F1 at 0.8 and 0.5 picks 0.8."""
    records = [_record(i, [(A, [0, 0, 20, 20])]) for i in (1, 2, 3)]
    hit, miss = [0, 0, 20, 20], [60, 60, 20, 20]
    dets = [_det(1, 1, hit, 0.9), _det(2, 1, hit, 0.6), _det(3, 1, miss, 0.6), _det(3, 1, hit, 0.3)]
    best = threshold_metrics(images_from_results(records, dets, CATEGORY_IDS), NAMES)["per_class"]["a"]["best_f1"]
    assert best["threshold"] == pytest.approx(0.3) and best["f1"] == pytest.approx(6 / 7)
    dets[3]["bbox"] = miss
    best = threshold_metrics(images_from_results(records, dets, CATEGORY_IDS), NAMES)["per_class"]["a"]["best_f1"]
    assert best["threshold"] == pytest.approx(0.6) and best["f1"] == pytest.approx(2 / 3)
    assert (best["tp"], best["fp"], best["fn"]) == (2, 1, 1)

    # 0.8 TP, 0.7 FP, 0.5 TP on 2 boxes: at 0.8 2/(1+2) = 2/3, at 0.7 2/(2+2), at 0.5 4/(3+2) = 4/5;
    # one more FP at 0.75 gives at 0.8: 2/3, at 0.5: 4/(4+2) = 2/3: equal, 0.8 is kept.
    records = records[:2]
    dets = [_det(1, 1, hit, 0.8), _det(1, 1, miss, 0.75), _det(1, 1, [30, 30, 5, 5], 0.7), _det(2, 1, hit, 0.5)]
    best = threshold_metrics(images_from_results(records, dets, CATEGORY_IDS), NAMES)["per_class"]["a"]["best_f1"]
    assert best["threshold"] == pytest.approx(0.8) and best["f1"] == pytest.approx(2 / 3)


def test_crowd_regions_follow_coco():
    """A crowd region of a ignores the a detections on it, however many (not false positives),
    but not those of b; a real box under the crowd region is still matched first; the crowd
    region itself is never a missed box. Confusion: the b detection on the crowd region of a
    is a background detection of b; nothing else is counted but the true positive."""
    records = [_record(1, [(A, [0, 0, 60, 60]), (A, [10, 10, 20, 20])], crowd=[True, False])]
    dets = [_det(1, 1, [10, 10, 20, 20], 0.9),  # the real box: TP, not swallowed by the crowd
            _det(1, 1, [40, 40, 10, 10], 0.8), _det(1, 1, [35, 5, 15, 15], 0.7),  # on the crowd: ignored
            _det(1, 2, [40, 5, 10, 10], 0.6)]  # b on a's crowd region: a false positive of b
    metrics = threshold_metrics(images_from_results(records, dets, CATEGORY_IDS), NAMES, 0.5, 0.5)
    a, b = metrics["per_class"]["a"], metrics["per_class"]["b"]
    assert (a["tp"], a["fp"], a["fn"], a["precision"], a["recall"]) == (1, 0, 0, 1.0, 1.0)
    assert (b["tp"], b["fp"], b["fn"], b["precision"], b["recall"]) == (0, 1, 0, 0.0, None)
    assert metrics["confusion_matrix"]["counts"] == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]


def test_no_detections():
    """Nothing found: precision is 0/0 (None), recall and F1 0, no best threshold, every box
    in the background column."""
    metrics = threshold_metrics(images_from_results(RECORDS, [], CATEGORY_IDS), NAMES)
    overall = metrics["overall"]
    assert (overall["precision"], overall["recall"], overall["f1"], overall["fn"]) == (None, 0.0, 0.0, 4)
    assert overall["best_f1"]["threshold"] is None
    assert metrics["per_class"]["a"]["best_f1"]["threshold"] is None
    assert metrics["confusion_matrix"]["counts"] == [[0, 0, 2], [0, 0, 2], [0, 0, 0]]


def test_counts_equal_pycocotools_matching():
    """TP and FP per class at IoU 0.5 and score >= 0.5 equal those read from COCOeval's own
    per-image matches (area all, 100 detections; crowd-ignored detections left out), on the
    data of tests/test_coco_eval.py, whose crowd box catches the highest-scored detection."""
    from test_coco_eval import DETECTIONS as COCO_DETECTIONS, GT

    gt = json.loads(json.dumps(GT))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(json.loads(json.dumps(COCO_DETECTIONS))), "bbox")
        evaluator.evaluate()
    expected = {}
    for e in evaluator.evalImgs:
        if e is None or e["aRng"] != [0, 1e10]:
            continue
        tp, fp = expected.get(e["category_id"], (0, 0))
        for score, matched, ignored in zip(e["dtScores"], e["dtMatches"][0], e["dtIgnore"][0]):
            if score >= 0.5 and not ignored:
                tp, fp = tp + (matched > 0), fp + (matched == 0)
        expected[e["category_id"]] = (tp, fp)
    records = []
    for img in gt["images"]:
        anns = [ann for ann in gt["annotations"] if ann["image_id"] == img["id"]]
        records.append(_record(img["id"], [([3, 7].index(ann["category_id"]), ann["bbox"]) for ann in anns],
                               [bool(ann["iscrowd"]) for ann in anns]))
    metrics = threshold_metrics(images_from_results(records, COCO_DETECTIONS, [3, 7]), ["cat", "dog"], 0.5, 0.5)
    got = {cid: (metrics["per_class"][name]["tp"], metrics["per_class"][name]["fp"])
           for cid, name in ((3, "cat"), (7, "dog"))}
    assert got == expected
    assert expected[7] == (2, 0)  # the dog at 0.95 on the crowd region is ignored, not a false positive


def test_eval_cli_threshold_setting_metrics_json_and_picture(shapes_data, tmp_path, capsys):
    """`retinanet eval ... eval.score_threshold=T` (T: the median score on the first image)
    counts at T: the counts in metrics.json agree with
    detections.json and the ground-truth file, the matrix holds every box and every detection
    once, the console shows the line, and confusion_matrix.png is a picture."""
    cfg = tiny_config(shapes_data, tmp_path, model__inference__score_threshold=0.3)
    net = shapes_model(model__inference__score_threshold=0.3)  # detections everywhere
    weights = save_model(net, tmp_path / "model.pt")
    save_config(cfg, tmp_path / "cfg.yaml")
    net.eval()
    with torch.no_grad():  # the median score on the first image, the threshold to report at
        scores = net([open_dataset(cfg.data, "val")[0][0]])[0]["scores"]
    threshold = round(float(scores.median()), 3)
    args = ["eval", "--weights", str(weights), "--config", str(tmp_path / "cfg.yaml"), "--output-dir"]
    assert cli(args + [str(tmp_path / "ev"), "eval.max_images=2", f"eval.score_threshold={threshold}"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["threshold_metrics"]
    detections = json.loads((tmp_path / "ev" / "detections.json").read_text())
    annotations = json.loads(open(shapes_data["val_annotations"]).read())
    images = [img["id"] for img in annotations["images"]][:2]
    boxes = [a for a in annotations["annotations"] if a["image_id"] in images and not a.get("iscrowd")]
    kept = [d for d in detections if d["score"] >= threshold]
    assert metrics["score_threshold"] == threshold and metrics["iou"] == 0.5
    assert 0 < len(kept) < len(detections) and boxes
    overall = metrics["overall"]
    assert overall["tp"] + overall["fp"] == len(kept) and overall["tp"] + overall["fn"] == len(boxes)
    counts = metrics["confusion_matrix"]["counts"]
    assert sum(map(sum, counts)) - sum(row[-1] for row in counts[:-1]) == len(kept)  # every detection once
    assert sum(sum(row) for row in counts[:-1]) == len(boxes)  # every box once
    assert f"at score >= {threshold:.2f}, IoU 0.50: precision {overall['precision']:.3f}" in out
    with Image.open(tmp_path / "ev" / "confusion_matrix.png") as picture:
        assert picture.format == "PNG" and picture.width > 200
