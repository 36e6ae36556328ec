"""Test-time augmentation: views mapped back to the image, merged by NMS or weighted box
fusion, in predict (whole images and tiles) and eval; off, nothing changes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import RetinaNet, load_model, read_image, save_model
from retinanet.cli import main as cli
from retinanet.config import TTAConfig, load_config, save_config
from retinanet.data.formats import open_dataset
from retinanet.engine.evaluate import to_coco_results
from retinanet.engine.tta import build_tta
from retinanet.model.tta import TestTimeAugmentation, merge_views, mirror_boxes, weighted_box_fusion

from helpers import assert_same_detections, tiny_config


def _view(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


# two views of one image: class 0 found by both, slightly shifted; class 1 twice by the second only
VIEW_A = _view([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.5], [0, 1])
VIEW_B = _view([[1, 0, 11, 10], [0, 0, 10, 10]], [0.6, 0.7], [0, 1])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, shapes_data):
    """An untrained tiny model whose class prior (0.3) gives it detections, saved with a config
    for the shapes data."""
    folder = tmp_path_factory.mktemp("tta")
    cfg = tiny_config(shapes_data, folder, model__head__prior_prob=0.3, eval__max_images=4)
    cfg.model.class_names = ["ellipse", "rectangle", "triangle", "star", "cross"]
    cfg.model.num_classes, cfg.model.category_ids = 5, [1, 2, 3, 4, 5]
    torch.manual_seed(0)
    save_config(cfg, folder / "cfg.yaml")
    return save_model(RetinaNet.from_config(cfg.model), folder / "model.pt"), folder / "cfg.yaml"


def _model(path):
    return load_model(path).optimize_for_inference()  # as predict and eval run it


def test_a_mirrored_box_maps_back_by_the_image_width():
    boxes = torch.tensor([[10.0, 20, 30, 40], [0, 5, 100, 6]])
    assert mirror_boxes(boxes, 100).tolist() == [[70.0, 20, 90, 40], [0, 5, 100, 6]]


def test_the_mirrored_view_of_an_image_gives_the_image_detections_mirrored_exactly(model_file):
    """The mirrored view of the mirror image is the image itself: its detections, mapped back,
    are the image's own detections (same batch) mirrored, to the bit."""
    model = _model(model_file[0])
    image = torch.randint(0, 256, (3, 96, 136), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mirror = image.flip(-1)
    _, mirrored_view = TestTimeAugmentation(flip=True).view_detections(model, [mirror])[0]
    direct = model.predict([mirror, image])[1]  # the same batch as the views': the mirror, then the image
    assert len(direct["boxes"]) > 0
    assert torch.equal(mirrored_view["boxes"], mirror_boxes(direct["boxes"], 136))
    assert torch.equal(mirrored_view["scores"], direct["scores"])
    assert torch.equal(mirrored_view["labels"], direct["labels"])


def test_a_size_view_runs_the_model_at_that_input_scaled(model_file):
    """A view at another size is the model's input scaled: short side and long-side cap alike
    (a 100x300 image, 43x128 px at the model's 128, goes in at 21x64 at 64, and comes back in
    image pixels)."""
    model = _model(model_file[0])
    image = torch.randint(0, 256, (3, 100, 300), dtype=torch.uint8)
    (view,) = TestTimeAugmentation(sizes=[64]).view_detections(model, [image])[0][1:]
    model.preprocessor.test_min_size, model.preprocessor.max_size = 64, 64
    direct = model.predict(image)
    assert len(view["boxes"]) > 0
    assert torch.equal(view["boxes"], direct["boxes"]) and torch.equal(view["scores"], direct["scores"])


def test_nms_merge_keeps_the_best_box_of_each_class():
    merged = merge_views([VIEW_A, VIEW_B], "nms", iou_threshold=0.5, max_detections=100)
    # class 0: IoU 90/110 = 0.82 > 0.5, the 0.6 box goes; class 1: apart, both stay
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.7, 0.5])
    assert merged["labels"].tolist() == [0, 1, 1]
    assert merged["boxes"].tolist() == [[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]
    assert merge_views([VIEW_A, VIEW_B], "nms", 0.5, max_detections=2)["labels"].tolist() == [0, 1]


def test_weighted_box_fusion_averages_clusters_by_score():
    merged = merge_views([VIEW_A, VIEW_B], "wbf", iou_threshold=0.5, max_detections=100)
    # class 0: (0 * 0.9 + 1 * 0.6) / 1.5 = 0.4 and (10 * 0.9 + 11 * 0.6) / 1.5 = 10.4, score
    # (0.9 + 0.6) / 2 views; class 1: each box alone, its score halved (one view of two)
    assert merged["scores"].tolist() == pytest.approx([0.75, 0.35, 0.25])
    assert merged["labels"].tolist() == [0, 1, 1]
    assert merged["boxes"][0].tolist() == pytest.approx([0.4, 0, 10.4, 10])
    assert merged["boxes"][1:].tolist() == [[0, 0, 10, 10], [20, 20, 30, 30]]


def test_weighted_box_fusion_matches_boxes_to_the_leader_and_averages_big_clusters():
    # M overlaps the leader L (IoU 80/120); N overlaps M (70/130) but not L (50/150): its own cluster
    boxes = torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10], [5, 0, 15, 10]])
    fused, scores, labels = weighted_box_fusion(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([3, 3, 3]), 0.5, 2)
    torch.testing.assert_close(fused, torch.tensor([[1.6 / 1.7, 0, 18.6 / 1.7, 10], [5, 0, 15, 10]]))
    assert scores.tolist() == pytest.approx([0.85, 0.35]) and labels.tolist() == [3, 3]
    # three boxes of one cluster from two views: the mean score, not a sum over two views
    same = torch.tensor([[0.0, 0, 10, 10]] * 3)
    fused, scores, _ = weighted_box_fusion(same, torch.tensor([0.9, 0.8, 0.6]), torch.zeros(3, dtype=torch.long),
                                           0.5, 2)
    assert scores.tolist() == pytest.approx([2.3 / 3]) and fused.tolist() == [[0, 0, 10, 10]]
    empty = weighted_box_fusion(boxes[:0], torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5, 2)
    assert [len(t) for t in empty] == [0, 0, 0]


def test_tta_settings_are_checked_and_off_by_default(model_file, capsys):
    assert build_tta(TTAConfig(), None) is None and build_tta(TTAConfig(merge="wbf"), None) is None
    model = _model(model_file[0])
    assert build_tta(TTAConfig(flip=True, sizes=[96, 160]), model).num_views(128) == 6
    model.preprocessor.resize = False
    with pytest.raises(ValueError, match=r"^eval\.tta\.sizes: \[96\]: this model does not resize its input"):
        build_tta(TTAConfig(sizes=[96]), model)
    assert cli(["predict", "--weights", str(model_file[0]), "x.png", "--output-dir", "out", "--tta-merge", "wbf"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --tta-merge merges the views of test-time augmentation: add "
                                               "--tta or --tta-sizes, or leave it out")
    assert cli(["predict", "--backend", "onnxruntime", "--weights", "m.onnx", "x.png", "--output-dir", "out",
                "--tta"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --tta, --tta-sizes and --tta-merge run with the torch backend "
                                               "only: an ONNX model runs as it was exported")


def _write_images(folder, count=2):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (90 + 20 * i, 150, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return sorted(folder.glob("*.png"))


@pytest.mark.parametrize("tiled", [False, True])
def test_predict_tta_writes_the_merged_detections(model_file, tmp_path, tiled):
    """`retinanet predict --tta --tta-sizes --tta-merge wbf` writes each image's views merged:
    the detections of `model.predict(..., tta=...)`, not those of the image alone; with
    --tile, each tile's views are merged before the tiles are."""
    from retinanet.engine.tiling import predict_tiled

    images = _write_images(tmp_path / "images", count=1 if tiled else 2)
    tile = ["--tile", "96"] if tiled else []
    assert cli(["predict", "--weights", str(model_file[0]), *map(str, images), "--output-dir", str(tmp_path / "out"),
                "--no-draw", *tile, "--tta", "--tta-sizes", "96", "--tta-merge", "wbf"]) == 0
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    model = _model(model_file[0])
    tta = TestTimeAugmentation(flip=True, sizes=[96], merge="wbf")
    for path in images:
        image = read_image(path)
        run = (lambda **kw: predict_tiled(model, image, 96, 0.2, **kw)) if tiled else (
            lambda **kw: model.predict(image, **kw))
        expected, plain = run(tta=tta), run()
        got = _as_detections([p for p in written if p["file_name"].endswith(path.name)])
        assert len(got["scores"]) == len(expected["scores"]) > 0
        assert_same_detections(got, expected, box_tol=0.02, score_tol=1e-4)
        assert not torch.equal(expected["scores"], plain["scores"][: len(expected["scores"])])


def _as_detections(records: list[dict]) -> dict:
    boxes = torch.tensor([r["bbox"] for r in records], dtype=torch.float32).reshape(-1, 4)
    return {"boxes": torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1),
            "scores": torch.tensor([r["score"] for r in records]),
            "labels": torch.tensor([r["category_id"] - 1 for r in records])}


def test_eval_with_tta_runs_and_without_it_gives_the_model_own_detections(model_file, tmp_path):
    """`retinanet eval eval.tta...` scores the merged detections; with TTA off (no flip and no
    sizes, whatever the merge) detections.json is the model's own output to the bit."""
    weights, config = model_file
    runs = {"off": ["eval.tta.merge=wbf"], "tta": ["eval.tta.flip=true", "eval.tta.sizes=[96]", "eval.tta.merge=wbf"]}
    written = {}
    for name, overrides in runs.items():
        assert cli(["eval", "--weights", str(weights), "--config", str(config), "--output-dir",
                    str(tmp_path / name), *overrides]) == 0
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert 0 <= metrics["AP"] <= 1 and metrics["num_images"] == 4
        keys = ("image_id", "category_id", "bbox", "score")
        written[name] = [{k: d[k] for k in keys} for d in json.loads((tmp_path / name / "detections.json").read_text())]
    model = _model(weights)
    dataset = open_dataset(load_config(config).data, "val", model.class_names)
    own = []
    items = [dataset[i] for i in range(4)]  # eval.max_images 4 in one batch of eval.batch_size 4
    for (image, target), det in zip(items, model.predict([im for im, _ in items])):
        own.extend(to_coco_results(det, target["image_id"], model.category_ids))
    assert written["off"] == own
    assert written["tta"] != own and len(written["tta"]) > 0
