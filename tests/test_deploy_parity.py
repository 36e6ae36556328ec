"""The deployed path gives the model's detections: `retinanet predict` with the checkpoint
(torch) and with its exported graph (onnxruntime) equal PyTorch's own `model.predict` on real
image files that need resizing up and down, portrait and landscape, within 1e-2 px and 1e-4 in
score; a fixed-shape graph refuses the images it cannot take whole."""

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import load_model, read_image
from retinanet.checkpoint import save_model
from retinanet.cli import main as cli

from helpers import require_peer

ort = require_peer("onnxruntime", "pip install onnxruntime (the test extra)")
require_peer("onnx", "pip install onnx onnxscript (the test extra)")

# (height, width): the tiny model's input is 128 px, so these shrink or enlarge
SIZES = {"landscape_down.jpg": (150, 230), "portrait_down.png": (250, 170), "landscape_up.png": (70, 101),
         "portrait_up.jpg": (90, 61), "landscape_down_2.png": (150, 230)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, trained_model_file):
    """A 2-iteration tiny model, its class bias lifted so that it detects with spread scores."""
    model = load_model(trained_model_file, optimize=False)  # saved again below
    with torch.no_grad():
        model.head.cls_score.bias.add_(3.0)
    return save_model(model, tmp_path_factory.mktemp("parity") / "lifted.pt")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Crops of real photographs, written as JPEG and PNG files."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    sources = [skimage.data.coffee(), skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.rocket(),
               skimage.data.coffee()[100:]]
    for (name, (h, w)), source in zip(SIZES.items(), sources):
        crop = Image.fromarray(source).resize((w * 2, h * 2)).crop((w // 2, h // 2, w // 2 + w, h // 2 + h))
        crop.save(folder / name, quality=95)
    return folder


def _by_file(predictions: list[dict]) -> dict:
    out = defaultdict(list)
    for p in predictions:
        out[p["file_name"].rsplit("/", 1)[-1]].append(p)
    return out


def _assert_equal_records(got: list[dict], expected: list[dict]) -> None:
    """Same count; each record paired with an unused one of equal category, score within 1e-4
    and bbox within 1e-2 px (the json rounds to 0.01 px: half a unit of rounding more)."""
    assert len(got) == len(expected), (len(got), len(expected))
    unused = list(range(len(expected)))
    for g in got:
        match = next((j for j in unused if expected[j]["category_id"] == g["category_id"]
                      and abs(expected[j]["score"] - g["score"]) <= 1e-4
                      and max(abs(a - b) for a, b in zip(expected[j]["bbox"], g["bbox"])) <= 1e-2 + 5e-3), None)
        assert match is not None, f"no reference detection equals {g}"
        unused.remove(match)


def _reference(checkpoint, photos) -> dict:
    """PyTorch's own detections, one image at a time, as predictions.json records."""
    from retinanet.engine.prediction_files import coco_records

    model = load_model(checkpoint).eval()
    return {name: coco_records(model.predict(read_image(photos / name)), photos / name, model.category_ids)
            for name in SIZES}


@pytest.mark.slow
def test_predict_with_each_backend_equals_pytorch_on_resized_images(checkpoint, photos, tmp_path):
    onnx_path = tmp_path / "model.onnx"
    assert cli(["export", "--weights", str(checkpoint), "--output", str(onnx_path), "--dynamic"]) == 0
    reference = _reference(checkpoint, photos)
    assert sum(len(r) for r in reference.values()) >= 5 * len(SIZES)
    for backend, weights in (("torch", checkpoint), ("onnxruntime", onnx_path)):
        out = tmp_path / backend
        assert cli(["predict", "--backend", backend, "--weights", str(weights), str(photos), "--output-dir", str(out),
                    "--batch-size", "5", "--save-txt", "csv"]) == 0
        got = _by_file(json.loads((out / "predictions.json").read_text()))
        for name in SIZES:
            _assert_equal_records(got[name], reference[name])
            stem = name.rsplit(".", 1)[0]
            assert (out / f"{stem}.jpg").is_file()  # drawn by both backends
            rows = (out / "labels" / f"{stem}.csv").read_text().splitlines()
            assert len(rows) == len(reference[name])


@pytest.mark.slow
def test_a_fixed_shape_graph_refuses_other_sizes_in_one_line(checkpoint, photos, tmp_path, capsys):
    onnx_path = tmp_path / "fixed.onnx"
    assert cli(["export", "--weights", str(checkpoint), "--output", str(onnx_path), "--height", "150", "--width",
                "230", "--batch", "2"]) == 0
    code = cli(["predict", "--backend", "onnxruntime", "--weights", str(onnx_path), str(photos), "--output-dir",
                str(tmp_path / "out"), "--no-draw"])
    err = capsys.readouterr().err
    assert code == 1
    refused = [line for line in err.splitlines() if "fixed-shape export" in line]
    assert len(refused) == 3 and f"portrait_down.png: 170x250 px, but fixed.onnx is a fixed-shape export for " \
        "230x150 px images only" in err
    got = _by_file(json.loads((tmp_path / "out" / "predictions.json").read_text()))
    assert set(got) == {"landscape_down.jpg", "landscape_down_2.png"}  # none cropped into a wrong answer
    reference = _reference(checkpoint, photos)
    for name in got:
        _assert_equal_records(got[name], reference[name])


def test_the_graphs_resize_is_torchs_under_onnxruntime(tmp_path):
    """`resize_bilinear` in an ONNX graph gives `F.interpolate`'s pixels within 1e-4 (on [0, 255]
    values) up and down, at scales where ONNX `Resize` under onnxruntime differs by up to 0.02."""
    from retinanet.export.onnx import resize_bilinear

    class Resize(torch.nn.Module):
        def forward(self, x, size):
            return resize_bilinear(x.float(), size)

    path = tmp_path / "resize.onnx"
    x = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    torch.onnx.export(Resize(), (x, torch.tensor([5, 5])), str(path), input_names=["x", "size"], dynamo=False,
                      dynamic_axes={"x": {2: "h", 3: "w"}}, opset_version=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    for (h, w), (oh, ow) in [((192, 192), (159, 159)), ((96, 140), (128, 186)), ((427, 640), (799, 1199)),
                             ((300, 451), (320, 481)), ((250, 170), (128, 87)), ((64, 64), (64, 64))]:
        image = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=generator)
        want = torch.nn.functional.interpolate(image.float(), size=(oh, ow), mode="bilinear", align_corners=False)
        got = session.run(None, {"x": image.numpy(), "size": np.array([oh, ow])})[0]
        assert got.shape == tuple(want.shape)
        assert np.abs(got - want.numpy()).max() <= 1e-4, ((h, w), (oh, ow))
