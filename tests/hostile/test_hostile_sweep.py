"""The hostile corpus through every command that reads files: damaged, foreign, bomb and
elongated images, traversal and broken annotations, weight files that are not weights, a
checkpoint given as a config. Each run must end in an exit code (0, 1 or 2) with no traceback,
and each bad input must be named on one `error:` line (or skipped and listed), never read as
pixels or boxes. The files are made here; the cases the other hostile tests pin one by one are
swept here command by command."""

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retinanet.cli import main as cli

from helpers import tiny_config

BAD_IMAGES = ["cut.png", "cut.jpg", "empty.jpg", "text.png", "noise.jpg", "bomb.png", "strip.png"]


def _png(width: int, height: int, rows: int = 4) -> bytes:
    """A 1-bit PNG whose header says `width` x `height` (a bomb when large), with `rows` rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    data = zlib.compress(bytes(1 + (width + 7) // 8) * rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shapes_data, shapes_model_file) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (96, 128, 3), np.uint8)
    Image.fromarray(photo).save(images / "good.jpg", quality=90)
    Image.fromarray(photo).save(root / "full.png")
    Image.fromarray(photo).save(root / "full.jpg", quality=90)
    (images / "cut.png").write_bytes((root / "full.png").read_bytes()[:4000])
    (images / "cut.jpg").write_bytes((root / "full.jpg").read_bytes()[:1500])
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.png").write_text("this is not a picture\n")
    (images / "noise.jpg").write_bytes(rng.integers(0, 256, 3000, np.uint8).tobytes())
    (images / "bomb.png").write_bytes(_png(60000, 60000))
    (images / "strip.png").write_bytes(_png(20000, 1, rows=1))
    names = ["good.jpg", *BAD_IMAGES]
    coco = {"images": [{"id": i, "file_name": n, "width": 128, "height": 96} for i, n in enumerate(names, 1)],
            "annotations": [{"id": i, "image_id": i, "category_id": 1 + i % 5, "bbox": [10, 10, 40, 30], "iscrowd": 0}
                            for i in range(1, len(names) + 1)],
            "categories": json.loads(Path(shapes_data["train_annotations"]).read_text())["categories"]}
    (root / "coco.json").write_text(json.dumps(coco))
    traversal = dict(coco, images=[dict(im, file_name=f"../../escape/{im['file_name']}") for im in coco["images"]])
    (root / "traversal.json").write_text(json.dumps(traversal))
    (root / "broken.json").write_text('{"images": [')
    (root / "noise.json").write_bytes(rng.integers(0, 256, 2000, np.uint8).tobytes())
    (root / "noise.pt").write_bytes(rng.integers(0, 256, 2000, np.uint8).tobytes())
    (root / "text.onnx").write_text("not a model")
    cfg = tiny_config(shapes_data, root / "run")
    weights = Path(shutil.copyfile(shapes_model_file, root / "model.pt"))  # the corpus's own copy
    (root / "cut.pt").write_bytes(weights.read_bytes()[:5000])
    config = root / "config.yaml"
    from retinanet.config import apply_overrides, save_config

    save_config(apply_overrides(cfg, [f"data.train_images={images}", f"data.train_annotations={root / 'coco.json'}",
                                      f"data.val_images={images}", f"data.val_annotations={root / 'coco.json'}",
                                      "train.max_iter=1", "train.batch_size=2", "train.reference_batch_size=2",
                                      "data.num_workers=0", "eval.batch_size=2"]), config)
    return {"root": root, "images": images, "weights": weights, "config": config}


def _run(capsys, argv: list[str], codes=(0, 1, 2)) -> tuple[int, list[str]]:
    """Run a command in this process: it must return (not raise) one of `codes` and print no
    traceback; returns the code and its `error:` lines (the rest of stdout in `_run.out`)."""
    code = cli(argv)
    out, err = capsys.readouterr()
    assert code in codes, (argv, code, err[-2000:])
    assert "Traceback" not in err + out, err
    _run.out = out
    return code, [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("extra", [[], ["--tile", "64", "--overlap", "0.25"]])
def test_predict_names_every_bad_image_once_and_predicts_the_good_one(corpus, tmp_path, capsys, extra):
    # a 20000x1 strip is a fine input on tiles (read window by window), too elongated whole
    bad = [name for name in BAD_IMAGES if not (extra and name == "strip.png")]
    inputs = [str(corpus["images"] / name) for name in ["good.jpg", *bad]] if extra else [str(corpus["images"])]
    code, errors = _run(capsys, ["predict", "--weights", str(corpus["weights"]), *inputs,
                                 "--output-dir", str(tmp_path / "out"), "--score-threshold", "0", *extra])
    assert code == 1
    for name in bad:
        assert sum(name in line for line in errors) == 1, (name, errors)
    predicted = {Path(p["file_name"]).name for p in json.loads((tmp_path / "out" / "predictions.json").read_text())}
    assert predicted <= {"good.jpg"}
    assert not any((tmp_path / "out" / name).exists() for name in BAD_IMAGES)  # no drawing of garbage


def test_data_commands_on_the_corpus(corpus, tmp_path, capsys):
    root = corpus["root"]
    _run(capsys, ["check-data", "--config", str(corpus["config"]), "--decode"])
    undecodable = [line for line in _run.out.splitlines() if "cannot be decoded" in line or "/images/" in line]
    for name in BAD_IMAGES:  # each named (the strip as not the size its annotation says)
        assert any(f"/{name}:" in line for line in undecodable), (name, _run.out)
    for annotations in ("traversal.json", "broken.json", "noise.json"):
        code, errors = _run(capsys, ["data", "convert", "--from", "coco", str(root / annotations), "--images",
                                     str(corpus["images"]), "--to", "yolo", "--output", str(tmp_path / annotations)])
        assert code == 2 and len(errors) == 1 and annotations in errors[0], (annotations, errors)
    assert not (root.parent / "escape").exists()
    _run(capsys, ["analyze", "--config", str(corpus["config"]), "--output-dir", str(tmp_path / "analysis"),
                  "--no-plots"])


@pytest.mark.slow
def test_training_and_evaluation_skip_and_list_the_bad_images(corpus, tmp_path, capsys):
    code, _ = _run(capsys, ["train", "--config", str(corpus["config"]), "--output-dir", str(tmp_path / "run")])
    assert code == 0
    code, _ = _run(capsys, ["eval", "--weights", str(tmp_path / "run" / "model_final.pt"), "--config",
                            str(corpus["config"]), "--output-dir", str(tmp_path / "eval")])
    assert code == 0
    skipped = json.loads((tmp_path / "eval" / "metrics.json").read_text()).get("skipped_images", [])
    assert {Path(s.split(":")[0]).name for s in skipped} >= set(BAD_IMAGES) - {"strip.png"}, skipped


@pytest.mark.parametrize("weights", ["noise.pt", "cut.pt", "text.onnx", "coco.json"])
def test_files_that_are_not_weights_are_one_line_for_every_command(corpus, tmp_path, capsys, weights):
    path = str(corpus["root"] / weights)
    good = str(corpus["images"] / "good.jpg")
    for argv in (["predict", "--weights", path, good, "--output-dir", str(tmp_path / "p")],
                 ["eval", "--weights", path, "--config", str(corpus["config"]), "--output-dir", str(tmp_path / "e")],
                 ["export", "--weights", path, "--output", str(tmp_path / "m.onnx")],
                 ["train", "--weights", path, "--output-dir", str(tmp_path / "t")],
                 *(["convert", "--from", source, path, str(tmp_path / "c.pt")]
                   for source in ("torchvision", "detectron2", "paddle"))):
        code, errors = _run(capsys, argv)
        assert code == 2 and len(errors) == 1 and weights in errors[0], (argv, errors)


def test_a_binary_file_given_as_a_config_is_one_line(corpus, tmp_path, capsys):
    for command in (["train"], ["check-data"], ["analyze", "--output-dir", str(tmp_path / "a")]):
        code, errors = _run(capsys, [command[0], "--config", str(corpus["weights"]), *command[1:]])
        assert code == 2 and len(errors) == 1 and "not a YAML config" in errors[0], errors
