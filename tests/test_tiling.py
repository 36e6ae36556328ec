"""Large images: tiles for training and prediction, and merging detections across tiles."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from retinanet.checkpoint import load_model
from retinanet.cli import main as cli
from retinanet.config import apply_overrides, load_config
from retinanet.data.dataset import zoom_crop
from retinanet.data.synthetic import render_large_scene
from retinanet.data.tiles import TiledDataset, crop_boxes, tile_windows
from retinanet.engine.tiling import merge_detections, predict_tiled
from retinanet.engine import train as train_module
from retinanet.engine.train import Trainer

from helpers import require_peer, tiny_config


def test_windows_cover_the_image_with_the_overlap():
    windows = tile_windows(3000, 4000, 800, 0.2)
    covered = torch.zeros(3000, 4000, dtype=torch.bool)
    for x0, y0, x1, y1 in windows:
        assert x1 - x0 == 800 and y1 - y0 == 800
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs = sorted({w[0] for w in windows})
    assert xs[0] == 0 and xs[-1] == 4000 - 800 and all(b - a <= 640 for a, b in zip(xs, xs[1:]))
    assert tile_windows(300, 500, 800, 0.2) == [(0, 0, 500, 300)]  # smaller than a tile: one window


def test_boxes_cut_by_a_border_follow_min_visible():
    boxes = torch.tensor([[100.0, 100, 140, 140], [780, 100, 840, 140], [790, 300, 900, 340]])
    shifted, kept, partial = crop_boxes(boxes, (0, 0, 800, 800), min_visible=0.5)
    assert kept.tolist() == [True, False, False] and partial.tolist() == [False, True, True]
    assert shifted[1].tolist() == [780.0, 100.0, 800.0, 140.0]
    shifted, kept, partial = crop_boxes(boxes, (0, 0, 800, 800), min_visible=0.3)
    assert kept.tolist() == [True, True, False]


def test_nmm_merges_an_object_cut_by_a_border_and_nms_keeps_classes_apart():
    whole = torch.tensor([600.0, 100, 700, 200])  # whole in one tile, cut at x = 640 by the other
    left = torch.tensor([600.0, 100, 640, 200])
    boxes = torch.stack([left, whole, whole + 1000])
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 1, 1])
    merged, merged_scores, _ = merge_detections(boxes, scores, labels, "nmm", 0.5)
    assert len(merged) == 2 and torch.equal(merged[0], whole) and merged_scores[0] == 0.9
    kept, _, _ = merge_detections(boxes, scores, labels, "nms", 0.5)
    assert len(kept) == 3  # IoU of the part and the whole is 0.4: NMS keeps both
    other_class = merge_detections(boxes[:2], scores[:2], torch.tensor([1, 2]), "nmm", 0.5)[0]
    assert len(other_class) == 2


class _ResolutionLimitedOracle:
    """A stand-in detector for the merging mechanics only: it reports the ground truth it
    can see in the image it is given, clipped to it, and misses objects smaller than 8 px
    after the model's resize (as a real detector misses objects that resizing erased)."""

    class_names = ["blob"]

    def __init__(self, boxes: torch.Tensor, max_side: int):
        self.boxes, self.max_side, self.offset = boxes, max_side, None

    def predict(self, images, score_threshold=None, batch_size=4):
        single = not isinstance(images, list)
        out = [self._one(im) for im in ([images] if single else images)]
        return out[0] if single else out

    def _one(self, image):
        h, w = image.shape[-2:]
        x0, y0 = self._locate(image)
        scale = min(1.0, self.max_side / max(h, w))
        window = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32)
        shifted, kept, partial = crop_boxes(self.boxes, window.tolist(), 0.0)
        visible = kept | partial
        seen = shifted[visible]
        big = ((seen[:, 2:] - seen[:, :2]) * scale >= 8).all(dim=1)
        seen = seen[big]
        return {"boxes": seen, "scores": torch.linspace(0.9, 0.5, len(seen)), "labels": torch.zeros(len(seen),
                                                                                                   dtype=torch.long)}

    def _locate(self, crop):
        # tiles are views of the one image tensor: their storage offset gives their position
        offset, width = crop.storage_offset(), crop.stride(1)
        return offset % width, offset // width


def test_tiled_prediction_finds_each_object_once_and_beats_resizing_whole():
    """A 4000x3000 image with ~200 objects of 10-40 px, many across tile borders."""
    generator = torch.Generator().manual_seed(0)
    windows = tile_windows(3000, 4000, 800, 0.2)
    edges = sorted({w[2] for w in windows if w[2] < 4000})  # right edges of tiles inside the image
    boxes = []
    while len(boxes) < 200:  # objects that do not touch each other
        size = float(torch.randint(10, 40, (1,), generator=generator))
        y = float(torch.randint(0, 3000 - 40, (1,), generator=generator))
        if len(boxes) % 2:  # across a tile border
            x = edges[len(boxes) % len(edges)] - size / 2
        else:
            x = float(torch.randint(0, 4000 - 40, (1,), generator=generator))
        box = torch.tensor([[x, y, x + size, y + size]])
        if not boxes or box_iou(box, torch.tensor(boxes)).max() == 0:
            boxes.append(box[0].tolist())
    boxes = torch.tensor(boxes)

    def cut(box, window):
        shifted, kept, partial = crop_boxes(box[None], window, 0.0)
        return bool(partial[0] or (kept[0] and (shifted[0, 2:] - shifted[0, :2] < box[2:] - box[:2] - 1e-3).any()))

    straddling = sum(any(cut(b, w) for w in windows) for b in boxes)
    assert straddling >= 100
    image = torch.zeros(3, 3000, 4000, dtype=torch.uint8)
    oracle = _ResolutionLimitedOracle(boxes, max_side=1333)
    tiled = predict_tiled(oracle, image, 800, 0.2, merge="nmm", merge_threshold=0.5)
    whole = oracle.predict(image)
    iou = box_iou(tiled["boxes"], tiled["boxes"])
    iou.fill_diagonal_(0)
    assert (iou <= 0.5).all(), "an object was reported twice across tiles"
    recall_tiled = (box_iou(boxes, tiled["boxes"]).max(dim=1).values >= 0.5).float().mean()
    recall_whole = (box_iou(boxes, whole["boxes"]).max(dim=1).values >= 0.5).float().mean()
    assert recall_tiled == 1.0 and recall_tiled > recall_whole


@pytest.mark.slow
def test_tiled_training_and_prediction_run_end_to_end(shapes_data, tmp_path, monkeypatch):
    from retinanet.data.coco import CocoDetection

    base = CocoDetection(shapes_data["train_images"], shapes_data["train_annotations"])
    tiled = TiledDataset(base, 64, 0.25, 0.5)
    assert len(tiled) > len(base)
    image, target = tiled[0]
    assert image.shape[-2:] == (64, 64) and (target["boxes"][:, 2:] <= 64).all()
    index, (x0, y0, x1, y1) = tiled.windows[0]
    full, _ = base[index]
    assert torch.equal(image, full[:, y0:y1, x0:x1])
    zoomed, zoomed_target = tiled[(0, False, (2.0, 0.0, 1.0))]  # the tile's bottom-left quarter
    assert torch.equal(zoomed, image[:, 32:, :32])
    assert torch.equal(zoomed_target["boxes"], zoom_crop(image, target, 2.0, 0.0, 1.0)[1]["boxes"])

    out = tmp_path / "run"
    cfg = tiny_config(shapes_data, out, train__max_iter=2, data__tile__size=64, data__tile__overlap=0.25,
                      model__input__train_min_sizes=[64], model__input__test_min_size=64, model__input__max_size=64,
                      model__fpn__out_channels=64, data__max_zoom=1.5)
    samplers = []

    class RecordingSampler(train_module.TrainBatchSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(self)

    monkeypatch.setattr(train_module, "TrainBatchSampler", RecordingSampler)
    summary = Trainer(cfg, progress=False).run()
    assert [s.max_zoom for s in samplers] == [1.5]
    assert summary["status"] == "finished" and summary["metrics"]["num_images"] == 8

    big = tmp_path / "big.png"
    Image.fromarray((np.random.rand(300, 500, 3) * 255).astype(np.uint8)).save(big)
    pred = tmp_path / "pred"
    assert cli(["predict", "--weights", str(out / "model_final.pt"), str(big), "--output-dir", str(pred),
                "--tile", "64", "--overlap", "0.2", "--merge", "nmm", "--score-threshold", "0.0"]) == 0
    detections = json.loads((pred / "predictions.json").read_text())
    assert detections and all(d["bbox"][0] + d["bbox"][2] <= 500.01 and d["bbox"][1] + d["bbox"][3] <= 300.01
                              for d in detections)
    assert max(d["bbox"][0] for d in detections) > 64  # boxes shifted back from tiles beyond the first

    # the same pixels as a GeoTIFF: the same detections, and a GeoJSON of them in its CRS
    rasterio = require_peer("rasterio", "pip install -e '.[geo]'")
    with rasterio.open(tmp_path / "big.tif", "w", driver="GTiff", width=500, height=300, count=3, dtype="uint8",
                       crs="EPSG:3857", transform=rasterio.transform.Affine(2.0, 0, 1000.0, 0, -2.0, 5000.0)) as dst:
        dst.write(np.asarray(Image.open(big)).transpose(2, 0, 1))
    geo = tmp_path / "geo"
    assert cli(["predict", "--weights", str(out / "model_final.pt"), str(tmp_path / "big.tif"), "--output-dir",
                str(geo), "--tile", "64", "--overlap", "0.2", "--merge", "nmm", "--score-threshold", "0.0"]) == 0
    from_tiff = json.loads((geo / "predictions.json").read_text())
    assert [(d["bbox"], d["score"]) for d in from_tiff] == [(d["bbox"], d["score"]) for d in detections]
    features = json.loads((geo / "big.geojson").read_text())["features"]
    assert len(features) == len(detections)
    x, y, w, h = from_tiff[0]["bbox"]
    corner = features[0]["geometry"]["coordinates"][0][0]
    assert abs(corner[0] - (1000.0 + 2.0 * x)) < 0.05 and abs(corner[1] - (5000.0 - 2.0 * y)) < 0.05


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_a_model_trained_on_tiles_finds_each_object_of_a_large_image_once(tmp_path):
    """The user's path: large GeoTIFF-free TIFFs with a DeepForest CSV, trained on 128 px tiles
    (read by windows), then a 4,000 x 3,000 image with 200 objects of 12-40 px, half of them
    across tile borders, predicted on tiles: each object found once, and far more of them than
    by the image resized whole (which shrinks them under 2 px)."""
    rasterio = require_peer("rasterio", "pip install -e '.[geo]'")
    rng = np.random.default_rng(0)
    rows = ["image_path,xmin,ymin,xmax,ymax,label"]
    for i in range(3):
        image, boxes = render_large_scene(rng, 1024, 768, 60)
        with rasterio.open(tmp_path / f"train_{i}.tif", "w", driver="GTiff", width=1024, height=768, count=3,
                           dtype="uint8", tiled=True, blockxsize=128, blockysize=128) as dst:
            dst.write(np.asarray(image).transpose(2, 0, 1))
        rows += [f"train_{i}.tif,{x0:.1f},{y0:.1f},{x1:.1f},{y1:.1f},blob" for x0, y0, x1, y1 in boxes.tolist()]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    cfg = apply_overrides(load_config("demo"), [
        "data.format=csv", f"data.train_annotations={tmp_path / 'train.csv'}", f"output_dir={run}",
        "model.num_classes=1", "data.tile.size=128", "data.tile.overlap=0.2", "data.num_workers=0",
        "train.max_iter=200", "train.warmup_iters=30", "train.ema_decay=0", "train.amp=none",
        "train.checkpoint_period=100000",
        # the recipe the bars below were measured with, whatever the demo's becomes
        "train.base_lr=0.002", "model.loss.box_loss=smooth_l1", "train.channels_last=true",
        "model.input.test_min_size=128", "model.input.max_size=128"])
    assert Trainer(cfg, progress=False).run()["status"] == "finished"
    model = load_model(run / "model_final.pt")

    windows = tile_windows(3000, 4000, 128, 0.2)
    borders = sorted({x1 for _, _, x1, _ in windows if x1 < 4000})
    image, boxes = render_large_scene(np.random.default_rng(1), 4000, 3000, 200, borders)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    tiled = predict_tiled(model, pixels, 128, 0.2, batch_size=16, merge="nmm", score_threshold=0.3)
    whole = model.predict(pixels, score_threshold=0.3)

    iou = box_iou(boxes, tiled["boxes"])
    recall_tiled = (iou.max(dim=1).values >= 0.5).float().mean().item()
    found_twice = int(((iou > 0.5).sum(dim=1) > 1).sum())
    recall_whole = (box_iou(boxes, whole["boxes"]).max(dim=1).values >= 0.5).float().mean().item() \
        if len(whole["boxes"]) else 0.0
    precision = (iou.max(dim=0).values >= 0.5).float().mean().item()
    print(f"tiled recall {recall_tiled:.3f} precision {precision:.3f}, found twice {found_twice}, "
          f"whole recall {recall_whole:.3f}")
    # measured 0.990 / 0.971 (2 threads) and 0.905 / 0.863 (docs/tiled_large_scene.sh, 1 thread): float
    # noise of other kernels changes the model a little; the bar leaves room for that
    assert recall_tiled >= 0.85 and precision >= 0.8
    assert found_twice <= 2  # of 200, 100 of them across a border
    assert recall_tiled > recall_whole + 0.5
