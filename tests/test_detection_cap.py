"""Dense scenes: a run whose images reach `inference.detections_per_image` says so, once,
with how to raise the cap (predict, eval, exported graphs, the service), and raising it
writes the detections the cap dropped."""

import json
from collections import Counter
from pathlib import Path

import pytest

from retinanet.cli import main as cli
from retinanet.config import save_config

from helpers import tiny_config

CAP_LINE = "reached the cap of"


def cap_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if CAP_LINE in line]


def per_image(output_dir: Path) -> Counter:
    return Counter(r["file_name"] for r in json.loads((output_dir / "predictions.json").read_text()))


def test_predict_says_once_that_images_reached_the_cap_and_max_detections_raises_it(shapes_data, shapes_model_file,
                                                                                    tmp_path, capsys):
    """The untrained shapes model detects everywhere: with a cap of 5 every image of the run is
    cut to 5, and one line (not one per image or per batch) says how many reached it and how
    to raise it; with the cap raised, more detections per image and no line."""
    images = [str(p) for p in sorted(Path(shapes_data["val_images"]).glob("*.jpg"))[:3]]
    count = len(images)
    assert cli(["predict", "--weights", str(shapes_model_file), *images, "--output-dir", str(tmp_path / "capped"),
                "--no-draw", "--batch-size", "2", "--max-detections", "5"]) == 0
    lines = cap_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert f"{count} image(s) reached the cap of 5 detections per image" in lines[0]
    assert "--max-detections N" in lines[0]
    assert set(per_image(tmp_path / "capped").values()) == {5}

    assert cli(["predict", "--weights", str(shapes_model_file), *images, "--output-dir", str(tmp_path / "raised"),
                "--no-draw", "--max-detections", "100000"]) == 0
    assert cap_lines(capsys.readouterr().err) == []
    raised = per_image(tmp_path / "raised")
    assert len(raised) == count and min(raised.values()) > 5


def test_an_exported_graph_reports_its_own_cap(shapes_data, shapes_model_file, tmp_path, capsys):
    """`export --max-detections` puts the cap in the graph and its metadata; onnxruntime's
    `num_detections` reaches it, the shared prediction loop says so once (how to raise it:
    export again), and asking predict for another cap than the graph's is one line."""
    pytest.importorskip("onnxruntime")
    from retinanet.export.ort_predict import OnnxDetector
    from retinanet.data.image_io import read_rgb

    onnx_path = tmp_path / "capped.onnx"
    assert cli(["export", "--weights", str(shapes_model_file), "--output", str(onnx_path), "--dynamic",
                "--max-detections", "4"]) == 0
    detector = OnnxDetector(onnx_path)
    assert detector.detections_per_image == 4
    images = [str(p) for p in sorted(Path(shapes_data["val_images"]).glob("*.jpg"))[:3]]
    image = read_rgb(images[0])
    *_, counts = detector._infer(image.transpose(2, 0, 1)[None].copy())
    assert counts.tolist() == [4]
    capsys.readouterr()
    assert cli(["predict", "--weights", str(onnx_path), "--backend", "onnxruntime", *images,
                "--output-dir", str(tmp_path / "out"), "--no-draw", "--batch-size", "2"]) == 0
    lines = cap_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "cap of 4 detections" in lines[0] and "export --max-detections N" in lines[0], lines
    assert set(per_image(tmp_path / "out").values()) == {4}

    assert cli(["predict", "--weights", str(onnx_path), "--backend", "onnxruntime", *images,
                "--output-dir", str(tmp_path / "more"), "--max-detections", "50"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --max-detections 50: {onnx_path} holds its cap of 4 detections "
                                               "per image in the graph; export it again with --max-detections 50")


def test_eval_says_once_that_images_reached_the_cap(shapes_data, shapes_model_file, tmp_path, capsys):
    """eval of a checkpoint: one line naming the override that raises the cap; none with the
    cap raised."""
    save_config(tiny_config(shapes_data, tmp_path, eval__max_images=3), tmp_path / "cfg.yaml")
    base = ["eval", "--weights", str(shapes_model_file), "--config", str(tmp_path / "cfg.yaml")]
    assert cli([*base, "--output-dir", str(tmp_path / "capped"), "model.inference.detections_per_image=3"]) == 0
    lines = cap_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "cap of 3 detections" in lines[0], lines
    assert "model.inference.detections_per_image=N" in lines[0]
    assert cli([*base, "--output-dir", str(tmp_path / "raised"), "model.inference.detections_per_image=100000"]) == 0
    assert cap_lines(capsys.readouterr().err) == []


def test_the_service_logs_the_cap_once(shapes_model_file, caplog):
    """The service's predictor logs the first request whose image reaches the cap, and only
    that one; `max_detections` (serve --max-detections) raises it."""
    import numpy as np

    from retinanet.serve import Predictor

    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    capped = Predictor(shapes_model_file, max_detections=3)
    with caplog.at_level("WARNING", logger="retinanet.serve"):
        for _ in range(3):
            assert len(capped.predict([image, image])[0]["scores"]) == 3
    lines = cap_lines(caplog.text)
    assert len(lines) == 1 and "2 image(s) reached the cap of 3" in lines[0] and "--max-detections N" in lines[0]
    caplog.clear()
    raised = Predictor(shapes_model_file, max_detections=100000)
    with caplog.at_level("WARNING", logger="retinanet.serve"):
        assert len(raised.predict([image])[0]["scores"]) > 3
    assert cap_lines(caplog.text) == []
