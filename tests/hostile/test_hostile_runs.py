"""Runs that once went on silently or ended in a traceback: training on a set without boxes or
on tiles far smaller than the model's input, tiling options that did nothing or multiplied the
work by thousands, evaluation of a set without boxes, `predict --backend onnxruntime` on a
decompression bomb and on an image too elongated for the model, and a checkpoint given as a
config. Each gets one `error:` (or warning) line, through the command line, on files made here."""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retinanet.cli import main as cli
from retinanet.config import save_config

from helpers import tiny_config


def _png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG of `width` x `height` with a few rows of pixel data: a bomb by its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(bytes(1 + (width + 7) // 8) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _photo(path: Path, width: int = 96, height: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(width * height).integers(0, 256, (height, width, 3), np.uint8)).save(path)
    return path


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def weights(shapes_model_file) -> Path:
    """A small random RetinaNet at 128 px (smallest anchor 16 px) that detects everywhere."""
    return shapes_model_file


def _without_boxes(annotations: str, path: Path) -> str:
    """The COCO file with every image and category but not one annotation."""
    coco = json.loads(Path(annotations).read_text())
    coco["annotations"] = []
    path.write_text(json.dumps(coco))
    return str(path)


# ------------------------------------------------------------------ case 10: training and evaluation
def test_training_on_a_set_without_boxes_is_refused_before_any_step(shapes_data, tmp_path, capsys):
    data = {"train_images": shapes_data["train_images"],
            "train_annotations": _without_boxes(shapes_data["train_annotations"], tmp_path / "empty.json")}
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(data, tmp_path / "run"), cfg)
    assert cli(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "run")]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "empty.json: the training set has no boxes in its 24 image(s)" in errors[0]
    assert not list(tmp_path.glob("run/*.pt"))


def test_a_validation_set_without_boxes_is_refused_at_the_start_of_training(shapes_data, tmp_path, capsys):
    data = dict(shapes_data, val_annotations=_without_boxes(shapes_data["val_annotations"], tmp_path / "v.json"))
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(data, tmp_path / "run"), cfg)
    assert cli(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "run")]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "v.json: the validation set has no boxes" in errors[0]
    assert "nothing to evaluate" in errors[0]


@pytest.mark.slow
def test_tiles_far_smaller_than_the_input_are_one_warning_at_start(shapes_data, tmp_path, capsys, caplog):
    coco = json.loads(Path(shapes_data["train_annotations"]).read_text())
    coco["images"] = coco["images"][:2]  # 2 images of 128 px: 32 tiles
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in {i["id"] for i in coco["images"]}]
    (tmp_path / "two.json").write_text(json.dumps(coco))
    data = {"train_images": shapes_data["train_images"], "train_annotations": str(tmp_path / "two.json")}
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(data, tmp_path / "run", train__max_iter=1, train__batch_size=2,
                            train__reference_batch_size=2, data__tile__size=40, data__tile__overlap=0.0,
                            data__num_workers=0), cfg)
    assert cli(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "run")]) == 0
    warnings = [r.getMessage() for r in caplog.records if "far smaller than the model's input" in r.getMessage()]
    assert warnings == ["data.tile.size=40: tiles of 40 px are far smaller than the model's input of 128 px: "
                        "each is enlarged 3.2x, its objects with it; give tiles the input size (128)"]


def test_tiles_that_keep_no_box_are_refused(shapes_data, tmp_path, capsys):
    """Objects of 16-80 px on 16 px tiles, of which a box must be wholly inside: none is."""
    data = {"train_images": shapes_data["train_images"], "train_annotations": shapes_data["train_annotations"]}
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(data, tmp_path / "run", data__tile__size=16, data__tile__overlap=0.0,
                            data__tile__min_visible=1.0), cfg)
    assert cli(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "run")]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "no tile of data.tile.size=16 keeps a box" in errors[0]


def test_eval_of_a_set_without_boxes_says_there_is_nothing_to_evaluate(shapes_data, weights, tmp_path, capsys):
    """Once: "AP -1.0000 ... missed 1.000" and a metrics.json of -1s, exit 0."""
    data = dict(shapes_data, val_annotations=_without_boxes(shapes_data["val_annotations"], tmp_path / "v.json"))
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(data, tmp_path), cfg)
    out = tmp_path / "eval"
    assert cli(["eval", "--weights", str(weights), "--config", str(cfg), "--output-dir", str(out)]) == 2
    errors = _errors(capsys)
    assert errors == [f"error: {tmp_path / 'v.json'}: the evaluation set has no boxes in its 8 image(s) (crowd "
                      "regions aside): there is nothing to evaluate"]
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("tile,message", [
    (["data.tile.size=8"], "tiles of 8 px are smaller than the model's smallest anchor (16 px)"),
    (["data.tile.size=100", "data.tile.overlap=0.8"], "overlap 0.8 makes 28x the tiles of overlap 0"),
])
def test_config_tiles_too_small_or_overlapping_too_much_are_refused_unless_forced(shapes_data, weights, tmp_path,
                                                                                 capsys, tile, message):
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(shapes_data, tmp_path), cfg)
    for command in (["eval", "--weights", str(weights), "--output-dir", str(tmp_path / "eval")],
                    ["train", "--output-dir", str(tmp_path / "run")]):
        assert cli(command + ["--config", str(cfg), *tile]) == 2, command
        errors = _errors(capsys)
        assert len(errors) == 1 and message in errors[0] and "set data.tile.force=true" in errors[0], errors
    assert not (tmp_path / "eval").exists() and not list(tmp_path.glob("run/*.pt"))
    if len(tile) == 2:  # forced: 9 tiles of the one image evaluated
        assert cli(["eval", "--weights", str(weights), "--config", str(cfg), "--output-dir", str(tmp_path / "eval"),
                    *tile, "data.tile.force=true", "eval.max_images=1"]) == 0
        assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_images"] == 1


# ------------------------------------------------------------------ case 10: predict's tiling options
@pytest.mark.parametrize("option", [["--overlap", "0.5"], ["--merge", "nmm"], ["--full-image"],
                                    ["--value-range", "0,4095"], ["--force-tiling"]])
def test_tiling_options_without_tile_are_refused(weights, tmp_path, capsys, option):
    photo = _photo(tmp_path / "a.png")
    out = tmp_path / "out"
    assert cli(["predict", "--weights", str(weights), str(photo), "--output-dir", str(out), *option]) == 2
    errors = _errors(capsys)
    assert errors == [f"error: {option[0]} only applies to prediction on tiles: add --tile N (e.g. the model's "
                      "input size), or leave it out"]
    assert not out.exists()


@pytest.mark.parametrize("options,message", [
    (["--tile", "1"], "tiles of 1 px are smaller than the model's smallest anchor (16 px)"),
    (["--tile", "512", "--overlap", "0.99"], "overlap 0.99 makes 10,486x the tiles of overlap 0"),
])
def test_tiny_tiles_and_huge_overlaps_are_refused_unless_forced(weights, tmp_path, capsys, options, message):
    photo = _photo(tmp_path / "a.png", 12, 12)
    out = tmp_path / "out"
    assert cli(["predict", "--weights", str(weights), str(photo), "--output-dir", str(out), *options]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and message in errors[0] and "pass --force-tiling" in errors[0]
    assert not out.exists()
    forced = ["--tile", "8"] if options[1] == "1" else options  # 4 tiles of the 12 px image, or 1
    assert cli(["predict", "--weights", str(weights), str(photo), "--output-dir", str(out), *forced,
                "--force-tiling", "--no-draw"]) == 0
    assert json.loads((out / "predictions.json").read_text())


# ------------------------------------------------------------------ case 13: onnxruntime predict, --config
@pytest.fixture(scope="module")
def onnx_weights(weights, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"  # not beside the session's weights
    assert cli(["export", "--weights", str(weights), "--output", str(path), "--dynamic"]) == 0
    return path


def test_onnxruntime_predict_refuses_a_bomb_and_an_elongated_image_and_reads_folders(onnx_weights, tmp_path, capsys):
    """Once: a DecompressionBombError and a Pillow resize ValueError traceback, and "Is a
    directory" for a folder; now one line each, as the torch backend, and folders and globs."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(60000, 60000))
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 20000), (40, 90, 160)).save(thin)
    good = _photo(tmp_path / "set" / "a.png")
    nested = _photo(tmp_path / "set" / "sub" / "b.jpg")
    globbed = _photo(tmp_path / "more" / "c.png")
    out = tmp_path / "out"
    code = cli(["predict", "--backend", "onnxruntime", "--weights", str(onnx_weights), str(bomb), str(thin),
                str(tmp_path / "set"), str(tmp_path / "more" / "*.png"), "--output-dir", str(out)])
    assert code == 1
    assert _errors(capsys) == [
        f"error: {bomb}: 3,600,000,000 pixels is over Pillow's decompression-bomb limit of "
        f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels; if you trust the file, raise the limit (retinanet predict "
        "--max-pixels N)",
        f"error: {thin}: 1x20000 px is too elongated for an input of at most 128 px (a side would be 0 px after "
        "resizing); crop or tile it"]
    predicted = {p["file_name"] for p in json.loads((out / "predictions.json").read_text())}
    assert predicted == {str(good), str(nested), str(globbed)}


COMMANDS_WITH_CONFIG = [["train"], ["eval", "--weights", "{ckpt}"], ["check-data"], ["analyze"],
                        ["anchors", "--output", "{tmp}/a.png"], ["assign", "--image-id", "1", "--output", "{tmp}/b.png"]]


@pytest.mark.parametrize("command", COMMANDS_WITH_CONFIG, ids=[c[0] for c in COMMANDS_WITH_CONFIG])
def test_a_checkpoint_given_as_config_is_one_line(weights, tmp_path, capsys, monkeypatch, command):
    """Once: a UnicodeDecodeError traceback."""
    monkeypatch.chdir(tmp_path)
    args = [a.format(ckpt=weights, tmp=tmp_path) for a in command]
    assert cli(args + ["--config", str(weights)]) == 2
    assert _errors(capsys) == [f"error: not a YAML config: {weights} (a binary file; checkpoints go to --weights)"]
    assert list(tmp_path.iterdir()) == []
