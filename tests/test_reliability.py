"""What happens when things go wrong: NaNs, interruptions, damaged checkpoints, bad data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retinanet.checkpoint import read_checkpoint
from retinanet.cli import main as cli
from retinanet.engine.train import Trainer, TrainingError

from helpers import tiny_config


def _poison(trainer, at_iteration):
    """Make the model's loss NaN from `at_iteration` on."""
    forward = trainer.model.forward

    def poisoned(images, targets=None, **kwargs):
        out = forward(images, targets, **kwargs)
        if trainer.iteration >= at_iteration:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    trainer.model.forward = poisoned


@pytest.mark.slow
def test_nan_loss_stops_with_iteration_and_intact_checkpoint(shapes_data, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(shapes_data, out, train__max_iter=6, train__checkpoint_period=2),
                      progress=False).setup()
    _poison(trainer, 3)
    with pytest.raises(TrainingError, match=r"non-finite loss at iteration 4.*last\.pt is left intact"):
        trainer.run()
    saved = read_checkpoint(out / "last.pt")
    assert saved.training["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in saved.weights.values() if v.is_floating_point())


@pytest.mark.slow
def test_nan_loss_can_be_skipped(shapes_data, tmp_path):
    trainer = Trainer(tiny_config(shapes_data, tmp_path / "run", train__max_iter=4, train__nonfinite_loss="skip",
                                  data__val_annotations="''"), progress=False).setup()
    _poison(trainer, 2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.run()
    assert summary["nonfinite_skipped"] == 2 and summary["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_resume_continues(shapes_data, tmp_path, sig):
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    from retinanet.config import save_config

    save_config(tiny_config(shapes_data, out, train__max_iter=10000, data__val_annotations="''"), cfg_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "retinanet.cli", "train", "--config", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while time.time() < deadline:
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if len(lines) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "continue with --resume" in err
    stopped_at = read_checkpoint(out / "last.pt").training["iteration"]
    assert stopped_at >= 3
    code = cli(["train", "--config", str(cfg_path), "--resume", f"train.max_iter={stopped_at + 2}"])
    assert code == 0
    assert read_checkpoint(out / "last.pt").training["iteration"] == stopped_at + 2


@pytest.mark.slow
def test_damaged_last_checkpoint_is_reported_on_resume(shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"PK\x03\x04 torn")
    cfg_path = tmp_path / "cfg.yaml"
    from retinanet.config import save_config

    save_config(tiny_config(shapes_data, out), cfg_path)
    assert cli(["train", "--config", str(cfg_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "last.pt: cannot be read as a checkpoint" in err and "Traceback" not in err


def test_check_data_reports_problems(shapes_data, tmp_path, capsys):
    ann = json.loads(Path(shapes_data["train_annotations"]).read_text())
    ann["annotations"][0]["bbox"] = [5, 5, -3, 4]
    ann["images"].append({"id": 999, "file_name": "missing.jpg", "width": 10, "height": 10})
    (tmp_path / "train.json").write_text(json.dumps(ann))
    cfg_path = tmp_path / "cfg.yaml"
    from retinanet.config import save_config

    save_config(tiny_config(dict(shapes_data, train_annotations=str(tmp_path / "train.json")), tmp_path), cfg_path)
    assert cli(["check-data", "--config", str(cfg_path), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "1 degenerate boxes will be dropped" in out and "1 image files are missing" in out
    assert cli(["check-data", "--config", str(cfg_path), "model.num_classes=3"]) == 1
    assert "model.num_classes=3 but the file has 5 categories" in capsys.readouterr().out


def test_empty_dataset_is_one_clear_error(shapes_data, tmp_path, capsys):
    (tmp_path / "empty.json").write_text(json.dumps({"images": [], "annotations": [], "categories": [
        {"id": i, "name": n} for i, n in enumerate(["ellipse", "rectangle", "triangle", "star", "cross"], 1)]}))
    cfg_path = tmp_path / "cfg.yaml"
    from retinanet.config import save_config

    save_config(tiny_config(dict(shapes_data, train_annotations=str(tmp_path / "empty.json")), tmp_path / "run"),
                cfg_path)
    assert cli(["train", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "empty.json: the training set has no images" in err and "Traceback" not in err
    assert cli(["check-data", "--config", str(cfg_path)]) == 1
    assert "ERROR the dataset has no images" in capsys.readouterr().out
