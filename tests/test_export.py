"""ONNX export: onnxruntime gives the same detections as PyTorch from the original images, in
the cases where peers' exports break (batch > 1 with different images, dynamic sizes, an image
without detections)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from retinanet import load_model, read_image
from retinanet.cli import main as cli

from helpers import require_peer

ort = require_peer("onnxruntime", "pip install onnxruntime (the test extra)")
onnx = require_peer("onnx", "pip install onnx onnxscript (the test extra)")


def _photos():
    import skimage.data

    return [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
            for a in (skimage.data.coffee(), skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.rocket())]


def _reference(model, images):
    """PyTorch's own detections, in the images' pixels."""
    return model.predict(images, batch_size=len(images))


def _run(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": torch.stack(images).numpy()})


def _assert_same(outputs, expected, min_detections=1):
    boxes, scores, labels, counts = outputs
    for i, ref in enumerate(expected):
        n = int(counts[i])
        assert n == len(ref["scores"]) and n >= min_detections, (i, n, len(ref["scores"]))
        # equal scores (ties) may come in either order: pair each detection with an equal one
        unused = list(range(n))
        for box, score, label in zip(boxes[i, :n], scores[i, :n], labels[i, :n]):
            match = next((j for j in unused if int(ref["labels"][j]) == int(label)
                          and abs(float(ref["scores"][j]) - float(score)) <= 1e-4
                          and np.abs(ref["boxes"][j].numpy() - box).max() <= 1e-3), None)
            assert match is not None, f"image {i}: no PyTorch detection equals {label}, {score}, {box}"
            unused.remove(match)
        assert np.all(np.diff(scores[i, :n]) <= 0)  # best first
        assert (scores[i, n:] == 0).all() and (boxes[i, n:] == 0).all()  # padding


@pytest.fixture(scope="module")
def torchvision_checkpoint(converted_torchvision):
    return converted_torchvision


@pytest.fixture(scope="module")
def demo_checkpoint(trained_model_file):
    return trained_model_file


def test_converted_torchvision_model_batch_1_and_4_static(torchvision_checkpoint, tmp_path):
    model = load_model(torchvision_checkpoint).eval()
    model.preprocessor.test_min_size, model.preprocessor.max_size = 320, 480  # keep the test fast
    photos = [p[:, :300, :451].contiguous() for p in _photos()]  # enlarged to 319 x 480 in the graph
    for batch in (1, 4):
        path = tmp_path / f"b{batch}.onnx"
        from retinanet.export.onnx import export_onnx

        export_onnx(model, path, 300, 451, batch=batch)
        images = photos[:batch]
        _assert_same(_run(path, images), _reference(model, images), min_detections=20)


@pytest.mark.slow
def test_trained_model_dynamic_sizes_blank_image_and_metadata(demo_checkpoint, tmp_path, capsys):
    path = tmp_path / "demo.onnx"
    assert cli(["export", "--weights", str(demo_checkpoint), "--output", str(path), "--dynamic"]) == 0
    model = load_model(demo_checkpoint).eval()
    with torch.no_grad():
        model.head.cls_score.bias.add_(3.0)  # a 2-iteration model: lift scores so there is something to compare
    from retinanet.export.onnx import export_onnx

    export_onnx(model, path, 128, 128, dynamic=True)
    photos = _photos()
    for height, width in ((280, 300), (90, 130)):  # two image sizes through the same graph: down and up
        images = [p[:, :height, :width].contiguous() for p in photos[:3]]
        _assert_same(_run(path, images), _reference(model, images))
    blank = [torch.zeros(3, 128, 128, dtype=torch.uint8)]
    with torch.no_grad():
        model.head.cls_score.bias.fill_(-30.0)  # nothing above the threshold
    export_onnx(model, tmp_path / "blank.onnx", 128, 128, dynamic=True)
    outputs = _run(tmp_path / "blank.onnx", blank + [photos[0][:, :128, :128].contiguous()])
    assert outputs[3].tolist() == [0, 0] and _reference(model, blank)[0]["scores"].numel() == 0
    meta = onnx.load(str(path)).metadata_props
    values = {p.key: p.value for p in meta}
    assert json.loads(values["class_names"]) == model.class_names
    assert json.loads(values["category_ids"]) == model.category_ids


@pytest.mark.slow
def test_raw_outputs_without_postprocessing(demo_checkpoint, tmp_path):
    path = tmp_path / "raw.onnx"
    assert cli(["export", "--weights", str(demo_checkpoint), "--output", str(path), "--no-postprocess",
                "--dynamic"]) == 0
    model = load_model(demo_checkpoint).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()][:2] == ["logits_p3", "logits_p4"]
    image = _photos()[0][:, :300, :250].contiguous()
    outputs = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"images": image[None].numpy()})))
    assert [i.name for i in session.get_inputs()] == ["images"]
    with torch.no_grad():
        ref_batch, _ = model.preprocessor([image])
        logits, deltas, anchors = model.run_network(ref_batch.tensor)
    assert outputs["resized_size"].tolist() == list(ref_batch.image_sizes[0])
    assert np.allclose(outputs["logits_p3"], logits[0].numpy(), atol=1e-4)
    assert np.allclose(outputs["anchors_p4"], anchors[1].numpy())


@pytest.mark.slow
def test_onnxruntime_backend_and_numpy_only_path(demo_checkpoint, tmp_path, photo_path):
    path = tmp_path / "m.onnx"
    assert cli(["export", "--weights", str(demo_checkpoint), "--output", str(path), "--dynamic"]) == 0
    assert cli(["export", "--weights", str(demo_checkpoint), "--output", str(path)]) == 2  # exists: --force
    bad = tmp_path / "bad.jpg"
    bad.write_text("no image")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "coffee.jpg").write_bytes(photo_path.read_bytes())
    script = (
        "import sys\n"
        "from retinanet.cli import main\n"
        f"code = main(['predict', '--weights', {str(path)!r}, {str(folder)!r}, {str(bad)!r}, "
        f"'--output-dir', {str(tmp_path / 'out')!r}, '--backend', 'onnxruntime', '--save-txt', 'yolo'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]  # the bad file is named, the folder's photo predicted
    assert "bad.jpg: not an image (unrecognised format)" in run.stderr  # the one decoder's words
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {p["file_name"] for p in predictions} <= {str(folder / "coffee.jpg")}
    assert (tmp_path / "out" / "coffee.jpg").is_file()  # drawn, and labelled, like the torch backend's
    assert len((tmp_path / "out" / "labels" / "coffee.txt").read_text().splitlines()) == len(predictions)


def test_graph_anchors_equal_the_models_for_torchvision_strides(torchvision_checkpoint, tmp_path):
    """torchvision's strides are `image size // feature size` (P7 of a 320x480 input: 106 x 120,
    not 128): the graph's anchors must follow the model's generator, not the nominal strides."""
    from retinanet.export.onnx import export_onnx

    model = load_model(torchvision_checkpoint).eval()
    model.preprocessor.test_min_size, model.preprocessor.max_size = 320, 480  # a 320 x 480 image is not resized
    assert model.anchor_generator.stride_from_image_size
    export_onnx(model, tmp_path / "raw.onnx", 320, 480, postprocess=False)
    session = ort.InferenceSession(str(tmp_path / "raw.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"images": np.zeros((1, 3, 320, 480), np.uint8)})))
    with torch.no_grad():
        _, _, anchors = model.run_network(torch.zeros(1, 3, 320, 480))
    for level, expected in enumerate(anchors):
        assert np.allclose(outputs[f"anchors_p{level + 3}"], expected.numpy(), atol=1e-3), level
