"""The OpenVINO export through the command line: `export --format openvino` gives an IR whose
detections through `predict --backend openvino` equal PyTorch's on real files that need
resizing up and down, portrait and landscape, at batch 1 and 4; its INT8 version agrees with
it within a stated bound; a damaged IR or a missing package is one line."""

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retinanet.cli import main as cli
from retinanet.config import save_config

from helpers import require_peer, tiny_config
from test_deploy_parity import SIZES, _assert_equal_records, _by_file, _reference, checkpoint, photos  # noqa: F401

require_peer("openvino", "pip install 'retinanet[openvino]' (the test extra)")
require_peer("nncf", "pip install 'retinanet[openvino]' (the test extra)")


@pytest.fixture(scope="module")
def ir(checkpoint, tmp_path_factory):
    """The lifted tiny model's `--dynamic` fp32 IR folder."""
    folder = tmp_path_factory.mktemp("ir") / "fp32"
    assert cli(["export", "--format", "openvino", "--weights", str(checkpoint), "--output", str(folder),
                "--dynamic"]) == 0
    return folder


def _predict(weights, inputs, out, *options) -> dict:
    assert cli(["predict", "--backend", "openvino", "--weights", str(weights), *map(str, inputs), "--output-dir",
                str(out), "--no-draw", *options]) == 0
    return _by_file(json.loads((out / "predictions.json").read_text()))


def test_the_ir_writes_the_model_and_its_metadata(ir):
    from retinanet.export.ov_predict import OpenVinoDetector

    assert sorted(p.name for p in ir.iterdir()) == ["model.bin", "model.xml"]  # no temporary left
    detector = OpenVinoDetector(ir / "model.xml")
    assert detector.class_names == ["ellipse", "rectangle", "triangle", "star", "cross"]
    assert detector.category_ids == [1, 2, 3, 4, 5]
    assert detector.input["dynamic"] and detector.input["test_min_size"] == 128


def test_predict_equals_pytorch_at_batch_1_and_4(checkpoint, photos, ir, tmp_path):
    """Resized down and up, portrait and landscape; batch 4 holds four different images of
    one size (a batch holds images of one size)."""
    reference = _reference(checkpoint, photos)
    got = _predict(ir, [photos], tmp_path / "b1", "--batch-size", "1")
    for name in SIZES:
        _assert_equal_records(got[name], reference[name])
    four = tmp_path / "four"
    four.mkdir()
    for i, name in enumerate(SIZES):
        Image.open(photos / name).convert("RGB").resize((170, 250)).save(four / f"{i}.png")
    reference = {name: recs for name, recs in _reference_files(checkpoint, four).items()}
    got = _predict(ir, [four], tmp_path / "b4", "--batch-size", "4")
    assert len(reference) == 5 and sum(map(len, reference.values())) >= 25
    for name in reference:
        _assert_equal_records(got.get(name, []), reference[name])


def _reference_files(checkpoint, folder) -> dict:
    from retinanet import load_model, read_image
    from retinanet.engine.prediction_files import coco_records

    model = load_model(checkpoint).eval()
    return {p.name: coco_records(model.predict(read_image(p)), p, model.category_ids)
            for p in sorted(folder.iterdir())}


def test_a_fixed_shape_ir_and_a_blank_image(trained_model_file, photos, tmp_path, capsys):
    """A fixed-shape IR (the model untrained enough to find nothing in a blank image): the
    blank image of its size gives no detections, as PyTorch finds none, and no error; an image
    of another size is refused in one line."""
    folder = tmp_path / "fixed"
    assert cli(["export", "--format", "openvino", "--weights", str(trained_model_file), "--output", str(folder),
                "--height", "120", "--width", "200"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (200, 120), (0, 0, 0)).save(images / "blank.png")
    assert _reference_files(trained_model_file, images)["blank.png"] == []
    Image.open(photos / "portrait_down.png").save(images / "other.png")
    out = tmp_path / "out"
    code = cli(["predict", "--backend", "openvino", "--weights", str(folder), str(images), "--output-dir", str(out)])
    assert code == 1 and json.loads((out / "predictions.json").read_text()) == []
    assert (out / "blank.jpg").is_file()  # drawn, without boxes
    refused = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert refused == [f"error: {images / 'other.png'}: 170x250 px, but fixed is a fixed-shape export for 200x120 px "
                       "images only (export with --dynamic for any size)"]


def test_int8_agrees_with_fp32(checkpoint, shapes_data, ir, tmp_path):
    """INT8 calibrated on 8 training images through --calibration's config; its detections
    of the validation images scored as COCO AP against the fp32 IR's best (scored >= 0.25)
    taken as ground truth. The bound: this barely trained model scores every detection
    between 0.2 and 0.3, so INT8's small score changes reorder near-ties (a trained model's
    INT8 cost is in docs/deployment.md)."""
    config = tmp_path / "calibration.yaml"
    save_config(tiny_config(shapes_data, tmp_path / "unused"), config)
    int8 = tmp_path / "int8"
    assert cli(["export", "--format", "openvino", "--weights", str(checkpoint), "--output", str(int8), "--dynamic",
                "--int8", "--calibration", str(config), "--calibration-images", "8"]) == 0
    val = shapes_data["val_images"]
    fp32 = _predict(ir, [val], tmp_path / "fp32")
    quantized = _predict(int8, [val], tmp_path / "int8_out")
    assert _agreement(fp32, quantized, min_score=0.25) >= 0.8


def _agreement(truth: dict, got: dict, min_score: float) -> float:
    """`agreement_ap` of `got`'s records (per file, as predictions.json holds them) with `truth`'s."""
    from retinanet.engine.evaluate import agreement_ap

    def arrays(records: list[dict]) -> dict:
        xywh = np.array([r["bbox"] for r in records], dtype=np.float32).reshape(-1, 4)
        return {"boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                "scores": np.array([r["score"] for r in records]), "labels": np.array([r["category_id"] for r in records])}

    names = sorted(set(truth) | set(got))
    return agreement_ap([arrays(truth.get(n, [])) for n in names], [arrays(got.get(n, [])) for n in names], min_score)


def _damaged(ir, tmp_path, part: str, damage) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(ir, folder)
    damage(folder / part)
    return folder


@pytest.mark.parametrize("part, damage, problem", [
    ("model.bin", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "the IR's weights cannot be loaded"),
    ("model.bin", lambda p: p.unlink(), "no such file"),
    ("model.xml", lambda p: p.write_text("<net><layers>garbage"), "not an OpenVINO IR that can be read"),
    ("model.xml", lambda p: p.write_text(re.sub(r"<retinanet>.*</retinanet>", "", p.read_text(), flags=re.S)),
     "not a model written by `retinanet export` (no input metadata)"),
])
def test_a_damaged_ir_is_one_line_naming_the_file(ir, photos, tmp_path, capsys, part, damage, problem):
    folder = _damaged(ir, tmp_path, part, damage)
    code = cli(["predict", "--backend", "openvino", "--weights", str(folder), str(photos), "--output-dir",
                str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"error: {folder / part}: ") and problem in err, err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_without_the_extra_one_line_says_how_to_get_it(checkpoint, ir, photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails as when it is not installed
    monkeypatch.delitem(sys.modules, "retinanet.export.ov_predict", raising=False)
    out = tmp_path / "ir"
    assert cli(["export", "--format", "openvino", "--weights", str(checkpoint), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == ("error: the OpenVINO export needs the 'openvino' package, which is "
                                               "not installed (pip install 'retinanet[openvino]')")
    assert not out.exists()
    assert cli(["predict", "--backend", "openvino", "--weights", str(ir), str(photos), "--output-dir",
                str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'retinanet[openvino]'" in err, err


@pytest.mark.slow
def test_serve_answers_with_the_ir_as_pytorch_would(checkpoint, photos, ir):
    """`serve --backend openvino --weights DIR`: real uploads of files that need resizing up and
    down, answered with PyTorch's detections of the same files (boxes within 1e-2 px, scores
    within 1e-4); /info says which backend answers."""
    import httpx

    from test_serve import start_server, stop_server

    reference = _reference(checkpoint, photos)
    proc, url = start_server(ir, "--backend", "openvino")
    try:
        assert httpx.get(url + "/info").json()["backend"] == "openvino"
        for name in SIZES:
            response = httpx.post(url + "/predict", files={"file": (name, (photos / name).read_bytes())}, timeout=60)
            assert response.status_code == 200, response.text
            got = [{"category_id": d["category_id"], "score": d["score"],
                    "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]]}
                   for d in response.json()["detections"]]
            _assert_equal_records(got, reference[name])
    finally:
        stop_server(proc)


def test_ctrl_c_after_two_models_interrupts_instead_of_crashing(ir):
    """Two models opened and closed in the order they were opened, then Ctrl-C: the process
    is interrupted as Python interrupts it. With a Core per model, the second Core's CPU plugin
    put back the first one's alternate signal stack, already unmapped: SIGSEGV instead."""
    import subprocess

    script = """
import gc, os, signal, sys, time
import numpy as np
from retinanet.export.ov_predict import OpenVinoDetector
first, second = OpenVinoDetector(sys.argv[1]), OpenVinoDetector(sys.argv[1])
image = np.zeros((64, 96, 3), np.uint8)
first.predict([image]), second.predict([image])
del first
gc.collect()
del second
gc.collect()
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(10)
except KeyboardInterrupt:
    print("interrupted")
"""
    done = subprocess.run([sys.executable, "-c", script, str(ir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "interrupted", (done.returncode, done.stderr[-2000:])
