"""A hostile but realistic user: nothing of theirs is destroyed, one bad input never sinks
the rest, and every wrong option gets one line before any work starts."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import save_model
from retinanet.cli import main as cli
from retinanet.config import save_config

from helpers import SHAPES, shapes_model, tiny_config


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_file(tmp_path, shapes_model_file) -> Path:
    """The session's shapes model, copied into the test's folder (eval writes beside it)."""
    return Path(shutil.copyfile(shapes_model_file, tmp_path / "model.pt"))


def _photo(path: Path, size=(96, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.rand(size[1], size[0], 3) * 255).astype(np.uint8)).save(path)
    return path


# ------------------------------------------------------------------ never destroy a user's file
def test_predict_never_writes_over_an_input(model_file, tmp_path):
    photos = tmp_path / "photos"
    holiday = _photo(photos / "holiday.jpg")
    before = _digest(holiday)
    assert cli(["predict", "--weights", str(model_file), str(holiday), "--output-dir", str(photos)]) == 0
    assert _digest(holiday) == before
    assert (photos / "holiday_2.jpg").is_file()  # the drawing lands beside it, under its own name


def test_inputs_with_the_same_stem_get_distinct_drawings(model_file, tmp_path):
    inputs = [_photo(tmp_path / "a" / "img.jpg"), _photo(tmp_path / "b" / "img.jpg"),
              _photo(tmp_path / "x.webp"), _photo(tmp_path / "x.bmp")]
    out = tmp_path / "out"
    assert cli(["predict", "--weights", str(model_file), *map(str, inputs), "--output-dir", str(out)]) == 0
    drawn = sorted(p.name for p in out.glob("*.jpg"))
    assert drawn == ["img.jpg", "img_2.jpg", "x.jpg", "x_2.jpg"]


def test_convert_refuses_to_destroy_the_source_or_an_existing_file(tmp_path, capsys):
    from torchvision.models.detection import retinanet_resnet50_fpn

    tv = tmp_path / "tv.pth"
    torch.save(retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), tv)
    before = _digest(tv)
    assert cli(["convert", "--from", "torchvision", str(tv), str(tv)]) == 2
    assert "the destination is the source" in capsys.readouterr().err and _digest(tv) == before
    assert cli(["convert", "--from", "torchvision", str(tv), str(tmp_path / "ours.pt")]) == 0
    first = _digest(tmp_path / "ours.pt")
    assert cli(["convert", "--from", "torchvision", str(tv), str(tmp_path / "ours.pt"), "--num-classes", "3"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert _digest(tmp_path / "ours.pt") == first
    assert cli(["convert", "--from", "torchvision", str(tv), str(tmp_path / "ours.pt"), "--num-classes", "3",
                "--force"]) == 0
    assert _digest(tmp_path / "ours.pt") != first


@pytest.mark.slow
def test_train_refuses_a_folder_that_holds_a_run(shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    save_config(tiny_config(shapes_data, out, train__max_iter=2, data__val_annotations="''"), cfg_path)
    assert cli(["train", "--config", str(cfg_path)]) == 0
    files = {name: _digest(out / name) for name in ("model_final.pt", "last.pt", "config.yaml", "metrics.jsonl")}
    assert cli(["train", "--config", str(cfg_path), "train.max_iter=3"]) == 2
    err = capsys.readouterr().err
    assert "holds a training run already" in err and "--resume" in err and "--overwrite" in err
    assert files == {name: _digest(out / name) for name in files}
    assert cli(["train", "--config", str(cfg_path), "--overwrite", "train.max_iter=3"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["iteration"] for l in lines] == [1, 2, 3]  # replaced, not appended


@pytest.mark.slow
def test_resume_checks_before_writing_anything(shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    save_config(tiny_config(shapes_data, out, train__max_iter=2, data__val_annotations="''"), cfg_path)
    assert cli(["train", "--config", str(cfg_path), "--resume"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err and not (out / "config.yaml").exists()
    assert cli(["train", "--config", str(cfg_path)]) == 0
    before = _digest(out / "config.yaml"), _digest(out / "last.pt")
    assert cli(["train", "--config", str(cfg_path), "--resume", "model.fpn.out_channels=48",
                "train.max_iter=4"]) == 2
    err = capsys.readouterr().err
    assert "model.fpn.out_channels: 32 in the checkpoint, 48 in the config" in err and "Traceback" not in err
    assert (_digest(out / "config.yaml"), _digest(out / "last.pt")) == before


def test_eval_writes_beside_earlier_evaluations(shapes_data, model_file, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(shapes_data, tmp_path), cfg)
    args = ["eval", "--weights", str(model_file), "--config", str(cfg), "eval.max_images=2"]
    assert cli(args) == 0 and cli(args) == 0
    first = json.loads((tmp_path / "eval_model" / "metrics.json").read_text())
    second = json.loads((tmp_path / "eval_model_2" / "metrics.json").read_text())
    assert first["AP"] == second["AP"] and first["num_images"] == 2


# ------------------------------------------------------------------ one bad input must not sink the rest
def test_extreme_aspect_ratio_and_huge_images_are_reported_and_skipped(model_file, tmp_path, capsys, monkeypatch):
    good = _photo(tmp_path / "good.png")
    thin = _photo(tmp_path / "thin.png", size=(4000, 1))
    huge = _photo(tmp_path / "huge.png", size=(300, 300))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # huge.png is 90,000 px: over 2x the limit
    out = tmp_path / "out"
    code = cli(["predict", "--weights", str(model_file), str(thin), str(good), str(huge), "--output-dir", str(out)])
    # one line per refused image; the untrained model also fills the detection cap, which is a note
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert code == 1 and len(err) == 2
    assert "thin.png: 4000x1 px is too elongated" in err[0]
    assert "huge.png: 90,000 pixels is over Pillow's decompression-bomb limit" in err[1] and "--max-pixels" in err[1]
    preds = json.loads((out / "predictions.json").read_text())
    assert {p["file_name"] for p in preds} == {str(good)}
    assert cli(["predict", "--weights", str(model_file), str(huge), "--output-dir", str(out),
                "--max-pixels", "100000"]) == 0  # the documented override


def test_folders_and_globs_are_predicted(model_file, tmp_path, capsys):
    a = _photo(tmp_path / "set" / "a.jpg")
    b = _photo(tmp_path / "set" / "sub" / "b.png")
    (tmp_path / "set" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert cli(["predict", "--weights", str(model_file), str(tmp_path / "set"), "--output-dir", str(out)]) == 0
    assert {p["file_name"] for p in json.loads((out / "predictions.json").read_text())} == {str(a), str(b)}
    assert cli(["predict", "--weights", str(model_file), str(tmp_path / "set" / "*.jpg"), "--output-dir",
                str(out)]) == 0
    assert {p["file_name"] for p in json.loads((out / "predictions.json").read_text())} == {str(a)}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["predict", "--weights", str(model_file), str(empty), "--output-dir", str(out)]) == 1
    assert "a folder without image files" in capsys.readouterr().err


def test_trainable_batchnorm_at_one_image_per_process_is_refused(shapes_data, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(shapes_data, tmp_path / "run", train__batch_size=1, model__backbone__norm="bn"), cfg)
    assert cli(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "needs at least 2 images per process" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_large_images_under_the_limit_print_no_raw_pillow_warning(tmp_path, monkeypatch, recwarn):
    from retinanet import read_image

    path = _photo(tmp_path / "big.png", size=(300, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # 60,000 px: over the limit, under twice it
    assert read_image(path).shape == (3, 200, 300)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.slow
def test_trainable_batchnorm_batch_shrunk_to_one_is_skipped(shapes_data, tmp_path):
    """Batch 2 whose other image is unreadable, with a 1x1 C5 (32 px input): BatchNorm would
    fail on one value per channel; the step is skipped instead."""
    from retinanet.data.coco import CocoDetection
    from retinanet.data.sampler import TrainBatchSampler
    from retinanet.engine.train import Trainer

    cfg = tiny_config(shapes_data, tmp_path / "run", train__max_iter=2, train__batch_size=2,
                      train__reference_batch_size=2, model__backbone__norm="bn", model__fpn__out_channels=64,
                      model__input__train_min_sizes=[32], model__input__max_size=32, data__val_annotations="''")
    dataset = CocoDetection(shapes_data["train_images"], shapes_data["train_annotations"])
    first = next(iter(TrainBatchSampler(dataset.aspect_ratios(), 2, cfg.train.seed, flip_prob=0.5)))
    images = tmp_path / "images"
    shutil.copytree(shapes_data["train_images"], images)
    (images / dataset.records[first[1][0]].file_name).unlink()  # the first batch keeps one image
    cfg.data.train_images = str(images)
    summary = Trainer(cfg, progress=False).run()
    assert summary["status"] == "finished" and summary["iteration"] == 2
    assert len(summary["skipped_images"]) == 1


@pytest.mark.slow
def test_a_batch_without_readable_images_is_skipped(shapes_data, tmp_path):
    from retinanet.engine.train import Trainer

    data = dict(shapes_data)
    images = tmp_path / "images"
    shutil.copytree(shapes_data["train_images"], images)
    for path in images.iterdir():
        path.unlink()  # every training image is gone
    data["train_images"] = str(images)
    trainer = Trainer(tiny_config(data, tmp_path / "run", train__max_iter=2, data__val_annotations="''"),
                      progress=False).setup()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.run()
    assert summary["status"] == "finished" and summary["iteration"] == 2
    assert len((tmp_path / "run" / "skipped_images.txt").read_text().splitlines()) == 8
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


# ------------------------------------------------------------------ data and evaluation checks that tell the truth
def test_check_data_fails_when_no_image_can_be_read(shapes_data, tmp_path, capsys):
    images = tmp_path / "nothing"
    images.mkdir()
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(dict(shapes_data, train_images=str(images)), tmp_path, data__val_annotations="''"), cfg)
    assert cli(["check-data", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "ERROR none of the 24 image files exists" in out and "FAILED" in out and "OK" not in out


def test_check_data_reports_every_problem_of_a_file(shapes_data, tmp_path, capsys):
    ann = json.loads(Path(shapes_data["train_annotations"]).read_text())
    ann["annotations"][0]["category_id"] = 77
    ann["annotations"][1]["image_id"] = 12345
    ann["images"][2].pop("width")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(ann))
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(dict(shapes_data, train_annotations=str(path)), tmp_path, data__val_annotations="''"),
                cfg)
    assert cli(["check-data", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "category id 77" in out and "unknown image id 12345" in out and "images[2] needs id" in out


def test_check_data_without_a_dataset_says_so(tmp_path, capsys):
    assert cli(["check-data", "--config", "demo"]) == 1
    assert "no dataset configured" in capsys.readouterr().out


def test_check_data_decode_flags_sizes_that_disagree(shapes_data, tmp_path, capsys):
    ann = json.loads(Path(shapes_data["val_annotations"]).read_text())
    ann["images"][0]["width"] = 256
    path = tmp_path / "val.json"
    path.write_text(json.dumps(ann))
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(dict(shapes_data, val_annotations=str(path)), tmp_path), cfg)
    assert cli(["check-data", "--config", str(cfg), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "1 images differ in size from the annotation file" in out and "the annotation file says 256x128" in out


@pytest.mark.parametrize("model", [
    {"class_names": [f"c{i}" for i in range(91)], "category_ids": list(range(91))},  # 91-class on 5 categories
    {"class_names": SHAPES[:4] + ["x"]},  # same ids, one name differs
    {"class_names": SHAPES, "category_ids": [11, 12, 13, 14, 15]},  # ids 11-15 against 1-5
], ids=["91-class", "renamed", "shifted-ids"])
def test_eval_stops_when_categories_do_not_match(shapes_data, tmp_path, capsys, model):
    weights = save_model(shapes_model(**model), tmp_path / "model.pt")
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(shapes_data, tmp_path), cfg)
    assert cli(["eval", "--weights", str(weights), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "categories do not match the model's" in err and "Traceback" not in err


def test_eval_of_a_dataset_with_more_categories_and_of_an_empty_one(shapes_data, model_file, tmp_path, capsys):
    weights = model_file
    ann = json.loads(Path(shapes_data["val_annotations"]).read_text())
    ann["categories"].append({"id": 6, "name": "hexagon"})
    (tmp_path / "six.json").write_text(json.dumps(ann))
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(dict(shapes_data, val_annotations=str(tmp_path / "six.json")), tmp_path), cfg)
    assert cli(["eval", "--weights", str(weights), "--config", str(cfg)]) == 2
    assert "id 6 (hexagon) is not among the model's" in capsys.readouterr().err
    ann["images"], ann["annotations"] = [], []
    (tmp_path / "six.json").write_text(json.dumps(ann))
    assert cli(["eval", "--weights", str(weights), "--config", str(cfg)]) == 2
    assert "the evaluation set has no images" in capsys.readouterr().err


def test_train_without_data_names_the_missing_setting(tmp_path, capsys):
    assert cli(["train", "--config", "demo", "--output-dir", str(tmp_path / "run")]) == 2
    assert "set data.train_annotations" in capsys.readouterr().err


# ------------------------------------------------------------------ options checked before any work
@pytest.mark.parametrize("value", ["2", "-1", "nan"])
def test_score_threshold_out_of_range(model_file, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        cli(["predict", "--weights", str(model_file), "x.jpg", "--output-dir", str(tmp_path / "o"),
             "--score-threshold", value])
    assert exit_info.value.code == 2 and "not a score in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,message", [
    (["demo", "--minutes", "-1"], "not a number of minutes"),
    (["convert", "--from", "torchvision", "a.pth", "b.pt", "--num-classes", "0"], "not a whole number >= 1"),
    (["convert", "--from", "torchvision", "a.pth", "b.pt", "--num-classes", "-3"], "not a whole number >= 1"),
    (["train", "--config", "demo", "--device", "cuda"], "CUDA is not available"),
    (["predict", "--weights", "m.pt", "x.jpg", "--output-dir", "o", "--device", "cuda"], "CUDA is not available"),
    (["predict", "--weights", "m.pt", "x.jpg", "--output-dir", "o", "--device", "tpu"], "choose auto, cpu"),
])
def test_bad_options_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        cli(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_output_dir_that_is_a_file(shapes_data, model_file, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("mine")
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(shapes_data, tmp_path), cfg)
    for args in (["eval", "--weights", str(model_file), "--config", str(cfg), "--output-dir", str(blocker)],
                 ["predict", "--weights", str(model_file), str(model_file), "--output-dir", str(blocker)],
                 ["train", "--config", str(cfg), "--output-dir", str(blocker)]):
        assert cli(args) == 2, args
        err = capsys.readouterr().err
        assert "taken" in err and ("is an existing file" in err or "is a file" in err)
    assert blocker.read_text() == "mine"


def test_convert_trust_on_random_bytes_says_not_a_weight_file(tmp_path, capsys):
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(bytes(range(256)) * 20)
    for extra in ([], ["--trust"]):
        assert cli(["convert", "--from", "detectron2", str(junk), str(tmp_path / "o.pt"), *extra]) == 2
        err = capsys.readouterr().err
        assert "not a weight file" in err and "pass --trust" not in err
