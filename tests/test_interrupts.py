"""Ctrl-C (SIGINT, exit 130) and SIGTERM (exit 143) in every phase of a command: one line,
no traceback, and nothing already written is lost. (The training loop itself, with a real
signal to a subprocess, is tested in test_reliability.py.)"""

import os
import shutil
import signal
import time

import pytest

from retinanet.cli import main as cli
from retinanet.config import save_config

from helpers import tiny_config


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Ctrl-C as a terminal delivers it, to Python's own SIGINT handler. A process started from
    a background shell inherits SIGINT ignored and Python keeps it so (as it should: such a
    process is not meant to be interrupted), which would make these tests depend on how the
    suite was launched."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _send(sig):
    def raiser(*args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("the signal did not interrupt")

    return raiser


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", ["parsing", "building", "final-eval"])
def test_train_interrupted_in_any_phase(shapes_data, tmp_path, capsys, monkeypatch, sig, phase):
    from retinanet.engine import train as train_module

    target = {"parsing": (train_module, "open_dataset"), "building": (train_module.RetinaNet, "from_config"),
              "final-eval": (train_module, "evaluate")}[phase]
    monkeypatch.setattr(*target, _send(sig))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config(shapes_data, out, train__max_iter=2), cfg)
    assert cli(["train", "--config", str(cfg)]) == 128 + sig
    err = capsys.readouterr().err
    assert f"interrupted ({signal.Signals(sig).name}) during train" in err and "Traceback" not in err
    if phase == "final-eval":  # training had finished: its checkpoints are there
        assert (out / "last.pt").is_file() and (out / "model_final.pt").is_file()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored


@pytest.mark.slow
def test_demo_interrupted_during_training(tmp_path, capsys, monkeypatch):
    from retinanet.engine.callbacks import StopOnSignal

    monkeypatch.setattr(StopOnSignal, "requested", lambda self: True)
    code = cli(["demo", "--output-dir", str(tmp_path / "demo"), "--num-train", "8", "--num-val", "2",
                "--minutes", "1", "model.input.train_min_sizes=[64]", "model.input.test_min_size=64",
                "model.input.max_size=64"])
    assert code == 130
    err = capsys.readouterr().err
    assert "demo interrupted at iteration 1" in err and "Traceback" not in err


def test_sigterm_while_evaluating_from_the_cli(shapes_data, shapes_model_file, tmp_path, capsys, monkeypatch):
    from retinanet.engine import evaluate as evaluate_module

    shutil.copyfile(shapes_model_file, tmp_path / "m.pt")  # eval writes beside its weights
    save_config(tiny_config(shapes_data, tmp_path), tmp_path / "cfg.yaml")
    monkeypatch.setattr(evaluate_module, "predict_dataset", _send(signal.SIGTERM))
    assert cli(["eval", "--weights", str(tmp_path / "m.pt"), "--config", str(tmp_path / "cfg.yaml")]) == 143
    assert "interrupted (SIGTERM) during eval" in capsys.readouterr().err
