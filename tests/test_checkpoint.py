import pickle

import pytest
import torch

from retinanet import ModelConfig, RetinaNet
from retinanet.model.checkpoint import CheckpointError, read_checkpoint, write_checkpoint


def _small():
    cfg = ModelConfig(num_classes=3, class_names=["a", "b", "c"])
    cfg.backbone.depth = 18
    cfg.fpn.out_channels = 32
    cfg.head.num_convs = 1
    cfg.input.test_min_size, cfg.input.max_size = 96, 128
    return RetinaNet.from_config(cfg)


def test_checkpoint_alone_rebuilds_the_model(tmp_path):
    model = _small().eval()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(0.0)
    path = model.save(tmp_path / "m.pt")
    loaded = RetinaNet.from_checkpoint(path).eval()
    assert loaded.config == model.config and loaded.class_names == ["a", "b", "c"]
    image = torch.rand(3, 80, 120)
    a, b = model([image])[0], loaded([image])[0]
    assert len(a["boxes"]) > 0 and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_predict_accepts_every_input_kind(tmp_path):
    import numpy as np
    from PIL import Image

    model = _small()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(0.0)
    array = (np.random.rand(60, 90, 3) * 255).astype(np.uint8)
    Image.fromarray(array).save(tmp_path / "x.png")
    outs = [model.predict(x) for x in (array, Image.fromarray(array), torch.from_numpy(array).permute(2, 0, 1),
                                       tmp_path / "x.png", str(tmp_path / "x.png"))]
    for out in outs:
        assert set(out) == {"boxes", "scores", "labels", "class_names"}
        assert torch.equal(out["boxes"], outs[0]["boxes"])
        assert all(name in ("a", "b", "c") for name in out["class_names"])
        assert (out["boxes"][:, 2] <= 90).all() and (out["boxes"][:, 3] <= 60).all()  # original pixels
    assert len(model.predict([array, array])) == 2
    assert model.training  # predict restores the mode


def test_write_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.ones(2)}})
    original = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        write_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_truncated_file_gives_a_clear_error(tmp_path):
    path = write_checkpoint(tmp_path / "m.pt", {"model": {"w": torch.ones(1000)}})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="m.pt: cannot be read"):
        read_checkpoint(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "nope.pt")
    torch.save({"backbone.body.conv1.weight": torch.ones(1)}, tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match="convert them first"):
        read_checkpoint(tmp_path / "tv.pth")


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_code_in_a_checkpoint_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "retinanet-checkpoint", "model": {}, "payload": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        RetinaNet.from_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    assert not (tmp_path / "PWNED").exists()


def test_category_ids_follow_the_model_config():
    model = _small()
    assert model.category_ids == [0, 1, 2]  # no stored ids: the label is the id (torchvision's COCO layout)
    model.config.category_ids = [1, 5, 9]
    assert model.category_ids == [1, 5, 9]
