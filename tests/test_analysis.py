"""Diagnostics on generated data with known geometry: anchor coverage, suggested anchors,
views and plots."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from retinanet.analysis.anchor_search import best_iou_on_grid
from retinanet.analysis.coverage import ImageBoxes, anchor_coverage, feature_sizes, summarize
from retinanet.cli import main as cli
from retinanet.config import apply_overrides, load_config
from retinanet.data.synthetic import generate_dataset
from retinanet.model.config import AnchorConfig, InputConfig, MatcherConfig

from helpers import tiny_config, write_json

PAPER_ANCHORS = "model.anchors.sizes=[[32,40.32,50.8],[64,80.63,101.59],[128,161.27,203.19],[256,322.54,406.37]," \
                "[512,645.08,812.75]]"


def _opens_as_picture(path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 50 and image.height > 50
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 3, f"{path} is blank"


@pytest.fixture(scope="module")
def tiny_boxes(tmp_path_factory):
    """128 px images whose objects are all 8-14 px."""
    return generate_dataset(tmp_path_factory.mktemp("tiny"), num_train=40, num_val=4, image_size=128, seed=5,
                            min_objects=2, max_objects=6, min_size=8, max_size=14)


def test_hand_computed_coverage_for_two_boxes():
    """One level (stride 8) of one 16x16 anchor on a 32x32 input. Box A = [0, 0, 16, 16] sits
    exactly on the anchor at (8, 8): IoU 1. Box B = [4, 4, 12, 12] (8x8, same centre): the best
    anchor is the same one, IoU 64/256 = 0.25, but that anchor belongs to A (its IoU there is
    1), so B gets no positive at all."""
    anchors = AnchorConfig(sizes=[[16.0]], aspect_ratios=[1.0], strides=[8])
    image = ImageBoxes(32, 32, torch.tensor([[0.0, 0, 16, 16], [4, 4, 12, 12]]), torch.tensor([0, 1]),
                       torch.tensor([False, False]))
    coverage = anchor_coverage([image], anchors, MatcherConfig(), InputConfig(resize=False))
    assert coverage.best_iou.tolist() == [1.0, 0.25]
    assert coverage.positives.tolist() == [1, 0]
    report = summarize(coverage, MatcherConfig(), anchors, ["a", "b"])
    assert report["uncovered_fraction"] == 0.5 and report["below_bg_fraction"] == 0.5
    assert report["zero_positive_fraction"] == 0.5 and report["by_class"]["b"]["uncovered_fraction"] == 1.0
    # the grid shortcut of the anchor search agrees
    fast = best_iou_on_grid(image.boxes, [[16.0]], [1.0], [8])
    assert torch.allclose(fast, coverage.best_iou)


def test_feature_sizes_and_positives_equal_the_models_own(shapes_data, tmp_path):
    """The analysis derives the grid without running the network; the positive counts it
    reports equal what the model's own training forward assigns on the same images."""
    from retinanet import RetinaNet
    from retinanet.data.coco import CocoDetection
    from retinanet.engine.analyze import image_boxes
    from retinanet.model.detector import pack_targets

    cfg = tiny_config(shapes_data, tmp_path, model__input__train_min_sizes=[100], model__input__max_size=160)
    dataset = CocoDetection(shapes_data["train_images"], shapes_data["train_annotations"])
    images = image_boxes(dataset)[:6]
    coverage = anchor_coverage(images, cfg.model.anchors, cfg.model.matcher, cfg.model.input)
    model = RetinaNet.from_config(cfg.model).eval()
    expected = []
    for i in range(6):
        image, target = dataset[i]
        batch, targets = model.preprocessor([image], [target], training=True)
        with torch.no_grad():
            features = model.fpn(model.backbone(batch.tensor))
        sizes = [tuple(f.shape[-2:]) for f in features]
        assert sizes == feature_sizes(tuple(batch.tensor.shape[-2:]), cfg.model.anchors.strides)
        anchors = torch.cat(model.anchor_generator(sizes, tuple(batch.tensor.shape[-2:])))
        boxes, _, valid, crowd = pack_targets(targets, anchors.device)
        matches = model.matcher(anchors, boxes, valid, crowd)
        fg = matches.labels[0] == 1
        expected += torch.bincount(matches.gt_index[0][fg], minlength=len(target["boxes"])).tolist()
    assert coverage.positives.tolist() == expected


@pytest.mark.slow
def test_tiny_boxes_uncovered_then_covered_by_the_suggestion(tiny_boxes, tmp_path):
    cfg = load_config("demo", [f"data.{k}={v}" for k, v in tiny_boxes.items()] + [PAPER_ANCHORS])
    from retinanet.engine.analyze import analyze

    report = analyze(cfg, output_dir=tmp_path / "analysis", plots=False)
    assert report["uncovered_fraction"] >= 0.95  # 8-14 px boxes, anchors from 32 px
    suggested = report["suggested"]
    assert suggested["uncovered_fraction"] < 0.05 and suggested["zero_positive_fraction"] == 0.0
    assert json.loads((tmp_path / "analysis" / "report.json").read_text())["suggested"] == suggested
    assert {"boxes", "uncovered_fraction", "zero_positive_fraction", "by_size", "by_class"} <= set(report)
    assert suggested["anchors_per_location"] <= 9  # never more than needed

    # a few training iterations with the suggestion: the matcher gives every box positives
    trial = tiny_config(tiny_boxes, tmp_path / "run", train__max_iter=2, data__val_annotations="''")
    trial = apply_overrides(trial, suggested["config_overrides"])
    from retinanet.engine.train import Trainer

    summary = Trainer(trial, progress=False).run()
    assert summary["status"] == "finished"
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["positives_per_box"] >= 1 for r in rows if "loss" in r)
    from retinanet.data.coco import CocoDetection
    from retinanet.engine.analyze import image_boxes

    images = image_boxes(CocoDetection(tiny_boxes["train_images"], tiny_boxes["train_annotations"]))
    after = anchor_coverage(images, trial.model.anchors, trial.model.matcher, trial.model.input)
    assert int((after.positives == 0).sum()) == 0


def test_elongated_boxes_get_elongated_anchors(tmp_path):
    """Boxes of aspect 1:6 (wide and tall): the paper's ratios leave most uncovered; the
    suggestion finds ratios near 1/6 and 6. No image is needed: analyze reads the json only."""
    generator = torch.Generator().manual_seed(0)
    images, annotations = [], []
    for image_id in range(1, 41):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 640, "height": 640})
        for j in range(4):
            long_side = float(torch.randint(60, 200, (1,), generator=generator))
            w, h = (long_side, long_side / 6) if j % 2 else (long_side / 6, long_side)
            x, y = (float(v) for v in torch.rand(2, generator=generator) * (640 - long_side))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1 + j % 2,
                                "bbox": [x, y, w, h], "iscrowd": 0})
    ann = write_json(tmp_path / "long.json", {"images": images, "annotations": annotations,
                                              "categories": [{"id": 1, "name": "tall"}, {"id": 2, "name": "wide"}]})
    (tmp_path / "images").mkdir()
    cfg = load_config("retinanet_r50_fpn_1x_coco", [f"data.train_annotations={ann}",
                                                    f"data.train_images={tmp_path / 'images'}", "model.num_classes=2",
                                                    "model.input.train_min_sizes=[640]", "model.input.max_size=640"])
    from retinanet.engine.analyze import analyze

    report = analyze(cfg, output_dir=tmp_path / "out", plots=False)
    assert report["uncovered_fraction"] > 0.5
    suggested = report["suggested"]
    assert suggested["uncovered_fraction"] < 0.05 and suggested["input_scale"] == 1.0
    ratios = suggested["anchors"]["aspect_ratios"]
    assert min(ratios) < 0.3 and max(ratios) > 3.5


def test_training_warns_about_uncovered_boxes(tiny_boxes, tmp_path, caplog):
    from retinanet.engine.train import Trainer

    cfg = tiny_config(tiny_boxes, tmp_path / "run", train__max_iter=1, data__val_annotations="''")
    cfg = apply_overrides(cfg, [PAPER_ANCHORS])
    with caplog.at_level(logging.WARNING):
        Trainer(cfg, progress=False).setup()
    warnings = [r.getMessage() for r in caplog.records if "have no anchor at IoU" in r.getMessage()]
    assert len(warnings) == 1 and "retinanet analyze" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the demo's anchors (from 16 px) on ordinary shapes: silent
        Trainer(tiny_config(generate_dataset(tmp_path / "ok", 8, 2, 128, seed=2, min_size=24, max_size=90),
                            tmp_path / "run2"), progress=False).setup()
    assert not [r for r in caplog.records if "have no anchor at IoU" in r.getMessage()]


def test_analyze_cli_views_and_plots(tiny_boxes, tmp_path, capsys):
    overrides = [f"data.{k}={v}" for k, v in tiny_boxes.items()] + [PAPER_ANCHORS]
    out = tmp_path / "analysis"
    assert cli(["analyze", "--config", "demo", "--output-dir", str(out), *overrides]) == 0
    console = capsys.readouterr().out
    assert "uncovered (no anchor at IoU >= 0.5)" in console and "model.anchors.sizes=" in console
    report = json.loads((out / "report.json").read_text())
    assert len(report["plots"]) == 5
    for path in report["plots"]:
        _opens_as_picture(path)

    assert cli(["anchors", "--config", "demo", "--output", str(tmp_path / "anchors.png"), "--level", "1"]) == 0
    _opens_as_picture(tmp_path / "anchors.png")
    image = tmp_path / "scene.jpg"  # one of the generated images, 128 px
    image.write_bytes((Path(tiny_boxes["train_images"]) / "000001.jpg").read_bytes())
    assert cli(["anchors", "--config", "demo", "--image", str(image), "--location", "40,60",
                "--output", str(tmp_path / "anchors_image.png")]) == 0
    _opens_as_picture(tmp_path / "anchors_image.png")
    assert cli(["anchors", "--config", "demo", "--level", "9", "--output", str(tmp_path / "x.png")]) == 2

    assert cli(["assign", "--config", "demo", "--image-id", "3", "--output", str(tmp_path / "assign.png"),
                *overrides]) == 0
    line = capsys.readouterr().out
    assert "uncovered, drawn red" in line
    _opens_as_picture(tmp_path / "assign.png")
    with Image.open(tmp_path / "assign.png") as picture:  # uncovered boxes are drawn in red
        assert (255, 0, 0) in {c for _, c in picture.convert("RGB").getcolors(1 << 20)}
    assert cli(["assign", "--config", "demo", "--image-id", "999", "--output", str(tmp_path / "a.png"),
                *overrides]) == 2


def test_eval_writes_pr_curves_and_error_breakdown(tmp_path):
    """A case with one error of each kind, against the COCO analysis tool's levels worked out by
    hand (101 recall points; precision made monotone from the right):
    image 1: right box, wrong class (confusion); image 2: the right class at IoU 0.47
    (localisation) and a class-a box on nothing (background, scored highest); image 3: missed.
    - C50, C75: class a has no true positive, class b none at IoU 0.5: 0.
    - Loc (IoU 0.1, by class): a 0; b: FP 0.9 then TP 0.8 -> precision 0.5 at every recall: 0.25.
    - Oth (IoU 0.1, class-agnostic, 3 boxes): FP 0.95, TP 0.9, TP 0.8 -> precision 2/3 up to
      recall 2/3, i.e. at 67 of the 101 points: 2/3 * 67/101 = 0.4422.
    - BG (background removed): precision 1 up to recall 2/3: 67/101 = 0.6634; FN: 1."""
    from retinanet.engine.evaluate import coco_metrics, load_coco_ground_truth

    gt = {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}"} for i in (1, 2, 3)],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 40, 40], "iscrowd": 0},
                          {"id": 3, "image_id": 3, "category_id": 1, "bbox": [20, 20, 30, 30], "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    path = write_json(tmp_path / "gt.json", gt)
    detections = [{"image_id": 1, "category_id": 2, "bbox": [10, 10, 40, 40], "score": 0.9},
                  {"image_id": 2, "category_id": 2, "bbox": [58, 58, 40, 40], "score": 0.8},  # IoU 0.47
                  {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.95}]
    metrics = coco_metrics(load_coco_ground_truth(path), detections, verbose=False)
    levels = metrics["error_breakdown"]
    expected = {"C75": 0.0, "C50": 0.0, "Loc": 0.25, "Oth": round(2 / 3 * 67 / 101, 4), "BG": round(67 / 101, 4),
                "FN": 1.0}
    assert {k: levels[k] for k in expected} == expected
    assert levels["costs"] == {"localisation": 0.25, "confusion": round(expected["Oth"] - 0.25, 4),
                               "background": round(expected["BG"] - expected["Oth"], 4),
                               "missed": round(1 - expected["BG"], 4)}


@pytest.mark.slow
def test_eval_pictures_and_plot_command(shapes_data, tmp_path, capsys):
    from retinanet.engine.train import Trainer

    out = tmp_path / "run"
    Trainer(tiny_config(shapes_data, out, train__max_iter=2, model__inference__score_threshold=0.0),
            progress=False).run()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert {"C75", "C50", "Loc", "Oth", "BG", "FN", "costs"} <= set(metrics["error_breakdown"])
    for path in metrics["plots"]:
        _opens_as_picture(path)
    assert sorted(p.split("/")[-1] for p in metrics["plots"]) == ["confusion_matrix.png", "error_breakdown.png",
                                                                  "pr_curves.png"]
    assert cli(["plot", str(out), str(out), "--output", str(tmp_path / "curves.png")]) == 0
    _opens_as_picture(tmp_path / "curves.png")
    assert cli(["plot", str(tmp_path), "--output", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["analyze", "anchors", "assign", "plot"])
def test_every_diagnostic_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli([command, "--help"])
    assert info.value.code == 0 and "usage: retinanet " + command in capsys.readouterr().out


def test_analyze_looks_at_tiles_when_training_on_tiles(tmp_path):
    """24 px objects in 512 px images: resized whole to the demo's 128 px input they are 6 px
    and uncovered; cut into 128 px tiles (what the network is trained on) they are covered."""
    folder = tmp_path / "images"
    folder.mkdir()
    images, annotations = [], []
    for image_id in (1, 2):
        Image.new("RGB", (512, 512), (90, 90, 90)).save(folder / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 512, "height": 512})
        for k in range(16):
            x, y = 20 + (k % 4) * 120, 20 + (k // 4) * 120
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [x, y, 24, 24], "area": 576, "iscrowd": 0})
    ann = write_json(tmp_path / "train.json", {"images": images, "annotations": annotations,
                                                "categories": [{"id": 1, "name": "dot"}]})
    from retinanet.engine.analyze import analyze

    cfg = load_config("demo", [f"data.train_images={folder}", f"data.train_annotations={ann}", "model.num_classes=1"])
    whole = analyze(cfg, output_dir=tmp_path / "whole", plots=False)
    tiled = analyze(apply_overrides(cfg, ["data.tile.size=128", "data.tile.overlap=0.0"]),
                    output_dir=tmp_path / "tiled", plots=False)
    assert whole["images"] == 2 and whole["uncovered_fraction"] > 0.9
    assert tiled["images"] == 2 * 16 and tiled["uncovered_fraction"] < 0.1
