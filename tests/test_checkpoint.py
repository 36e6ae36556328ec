import pickle

import numpy as np
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

import retinanet
from retinanet import ModelConfig, RetinaNet, load_model, save_model
from retinanet.checkpoint import (CHECKPOINT_VERSION, CheckpointError, atomic_torch_save, read_checkpoint,
                                  write_checkpoint)
from retinanet.cli import main as cli
from retinanet.model.config import config_to_dict

from helpers import assert_same_detections


def _small():
    cfg = ModelConfig(num_classes=3, class_names=["a", "b", "c"], category_ids=[1, 5, 9])
    cfg.backbone.depth = 18
    cfg.fpn.out_channels = 32
    cfg.head.num_convs = 1
    cfg.input.test_min_size, cfg.input.max_size = 96, 128
    return RetinaNet.from_config(cfg)


def _weights():
    return {"w": torch.ones(2)}


def test_checkpoint_alone_rebuilds_the_model(tmp_path):
    model = _small().eval()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(0.0)
    path = save_model(model, tmp_path / "m.pt")
    loaded = load_model(path, optimize=False).eval()
    assert loaded.config == model.config and loaded.class_names == ["a", "b", "c"]
    assert loaded.category_ids == [1, 5, 9]
    image = torch.rand(3, 80, 120)
    a, b = model([image])[0], loaded([image])[0]
    assert len(a["boxes"]) > 0 and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_one_layout_for_every_writer(tmp_path):
    """Saved, converted and trained checkpoints share one versioned layout."""
    model = _small()
    save_model(model, tmp_path / "saved.pt")
    write_checkpoint(tmp_path / "trained.pt", model.config, model.state_dict(), run_config={"train": {}},
                     training={"iteration": 3})
    for name in ("saved.pt", "trained.pt"):
        raw = torch.load(tmp_path / name, weights_only=True)
        assert raw["format"] == "retinanet-checkpoint" and raw["version"] == CHECKPOINT_VERSION
        assert set(raw) >= {"model_config", "weights"} and "config" not in raw and "model" not in raw
    assert read_checkpoint(tmp_path / "trained.pt").training == {"iteration": 3}


def test_newer_version_is_refused_with_a_clear_message(tmp_path):
    model = _small()
    path = save_model(model, tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    raw["version"] = CHECKPOINT_VERSION + 1
    torch.save(raw, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match=r"new\.pt: written by a newer retinanet .*version 3.*upgrade"):
        read_checkpoint(tmp_path / "new.pt")


def test_version_1_files_are_upgraded(tmp_path):
    """The layout of the first release: `config` (model or full) + `model`, a bool clip flag."""
    model = _small()
    model_dict = config_to_dict(model.config)
    model_dict["inference"]["clip_boxes"] = False
    torch.save({"format": "retinanet-checkpoint", "version": 1, "config": {"model": model_dict, "train": {}},
                "model": model.state_dict(), "iteration": 7, "optimizer": {}}, tmp_path / "v1.pt")
    checkpoint = read_checkpoint(tmp_path / "v1.pt")
    assert checkpoint.model_config.inference.clip_boxes == "none"
    assert checkpoint.training["iteration"] == 7 and checkpoint.run_config["train"] == {}
    loaded = load_model(tmp_path / "v1.pt")
    assert torch.equal(loaded.head.cls_score.weight, model.head.cls_score.weight)


def _saved_with_batchnorm_statistics(tmp_path):
    """A small model whose frozen BatchNorms compute a non-trivial affine map (so that folding
    them changes the weights), scoring many boxes on a 160 px input, saved as a checkpoint."""
    model = _small()
    model.preprocessor.test_min_size, model.preprocessor.max_size = 160, 256
    model.config.input.test_min_size, model.config.input.max_size = 160, 256
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.1, 0.1)
            bn.running_mean.uniform_(-0.1, 0.1), bn.running_var.uniform_(0.5, 1.5)
        model.head.cls_score.bias.fill_(0.0)
    return save_model(model, tmp_path / "m.pt")


def test_load_model_gives_the_optimized_model_and_optimize_false_the_plain_one(tmp_path):
    path = _saved_with_batchnorm_statistics(tmp_path)
    fast = load_model(path)
    assert not fast.training and fast.inference_only
    assert not any(isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)) for m in fast.modules())
    assert fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match=r"optimized for inference.*optimize=False"):
        fast.train()
    with pytest.raises(ValueError, match="optimize=False"):
        save_model(fast, tmp_path / "folded.pt")  # its weights would not load into its config
    plain = load_model(path, optimize=False)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in plain.modules()) > 10
    assert plain.state_dict().keys() == read_checkpoint(path).weights.keys()
    assert plain.train().training  # trainable as built
    with pytest.raises(ValueError, match="compile=True needs optimize=True"):
        load_model(path, optimize=False, compile=True)


def test_optimized_and_plain_models_detect_the_same_on_a_photo(tmp_path, photo_path):
    """The default (folded, channels-last) and `optimize=False` through the public API, on a
    decoded JPEG: the same detections within the parity tolerances."""
    path = _saved_with_batchnorm_statistics(tmp_path)
    image = retinanet.read_image(photo_path)
    fast = retinanet.load_model(path).predict(image)
    plain = retinanet.load_model(path, optimize=False).predict(image)
    assert len(plain["scores"]) == 100  # detections_per_image: a full list to compare
    assert_same_detections(fast, plain, box_tol=1e-2, score_tol=1e-4)


def test_predict_accepts_tensors_and_arrays(tmp_path):
    from retinanet import read_image
    from PIL import Image

    model = _small()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(0.0)
    array = (np.random.rand(60, 90, 3) * 255).astype(np.uint8)
    Image.fromarray(array).save(tmp_path / "x.png")
    outs = [model.predict(x) for x in (array, torch.from_numpy(array).permute(2, 0, 1), read_image(tmp_path / "x.png"))]
    for out in outs:
        assert set(out) == {"boxes", "scores", "labels", "class_names"}
        assert torch.equal(out["boxes"], outs[0]["boxes"])
        assert all(name in ("a", "b", "c") for name in out["class_names"])
        assert (out["boxes"][:, 2] <= 90).all() and (out["boxes"][:, 3] <= 60).all()  # original pixels
    assert len(model.predict([array, array])) == 2
    assert model.training  # predict restores the mode
    with pytest.raises(TypeError, match="retinanet.read_image"):
        model.predict(str(tmp_path / "x.png"))  # the model reads no files


def test_write_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    model = _small()
    path = write_checkpoint(tmp_path / "last.pt", model.config, _weights())
    original = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        write_checkpoint(path, model.config, {"w": torch.zeros(2)})
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_truncated_file_gives_a_clear_error(tmp_path):
    path = write_checkpoint(tmp_path / "m.pt", _small().config, {"w": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="m.pt: cannot be read"):
        read_checkpoint(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path)
    torch.save({"backbone.body.conv1.weight": torch.ones(1)}, tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match="convert them first"):
        read_checkpoint(tmp_path / "tv.pth")


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_code_in_a_weight_file_never_runs(tmp_path, monkeypatch, capsys):
    """A payload that runs code on unpickling, fed to every loader we have."""
    monkeypatch.chdir(tmp_path)
    atomic_torch_save({"format": "retinanet-checkpoint", "version": 2, "model_config": {}, "weights": {},
                       "payload": _Evil()}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"head.cls_score.weight": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(tmp_path / "evil.pt")
    assert cli(["predict", "--weights", "evil.pt", "x.jpg", "--output-dir", "out"]) == 2
    assert cli(["eval", "--weights", "evil.pt"]) == 2
    for source, name in [("torchvision", "evil.pt"), ("detectron2", "evil.pkl"), ("paddle", "evil.pkl"),
                         ("detectron2", "evil.pt")]:
        assert cli(["convert", "--from", source, name, f"out_{source}.pt"]) == 2, source
        assert "--trust" in capsys.readouterr().err  # refused, with the way to override named
    assert not (tmp_path / "PWNED").exists()


def test_category_ids_follow_the_model_config():
    model = _small()
    assert model.category_ids == [1, 5, 9]
    model.config.category_ids = []
    assert model.category_ids == [0, 1, 2]  # no stored ids: the label is the id (torchvision's COCO layout)
