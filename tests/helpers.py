"""What the tests share besides fixtures: `from helpers import ...` (pyproject's pytest
`pythonpath` puts tests/ on sys.path). Fixtures stay in conftest.py."""

import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from retinanet import RetinaNet
from retinanet.config import Config, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
SHAPES = ["ellipse", "rectangle", "triangle", "star", "cross"]  # conftest's shapes_data, category ids 1-5


def require_peer(module: str, install: str):
    """Import a peer library for a parity test. Without it the test is skipped on a
    developer's machine, but under CI (`CI=true`) a missing or broken peer fails the run."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        try:
            return importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any import failure of the peer must be loud in CI
            pytest.fail(f"parity peer {module!r} cannot be imported under CI ({type(err).__name__}: {err}); "
                        f"{install}", pytrace=False)
    return pytest.importorskip(module, reason=f"{module} is not installed: {install}")


def assert_same_detections(got: dict, expected: dict, box_tol: float = 1e-2, score_tol: float = 1e-4) -> None:
    """Same count; each detection paired with an unused one of equal label, score within
    `score_tol` and box within `box_tol` px (equal scores may come in either order)."""
    assert len(got["scores"]) == len(expected["scores"]), (len(got["scores"]), len(expected["scores"]))
    unused = list(range(len(expected["scores"])))
    for box, score, label in zip(got["boxes"], got["scores"], got["labels"]):
        match = next((j for j in unused if int(expected["labels"][j]) == int(label)
                      and abs(float(expected["scores"][j]) - float(score)) <= score_tol
                      and float((expected["boxes"][j] - box).abs().max()) <= box_tol), None)
        assert match is not None, f"no expected detection equals {int(label)}, {float(score)}, {box.tolist()}"
        unused.remove(match)


def tiny_config(data: dict, output_dir: Path, **overrides) -> Config:
    """A fast configuration for tests: small ResNet-18 RetinaNet at 128 px."""
    cfg = load_config("demo")
    items = [f"data.{k}={v}" for k, v in data.items()] + [
        f"output_dir={output_dir}",
        "model.input.train_min_sizes=[128]", "model.input.test_min_size=128", "model.input.max_size=128",
        "model.fpn.out_channels=32", "model.head.num_convs=1",
        "train.max_minutes=0", "train.max_iter=4", "train.batch_size=4", "train.reference_batch_size=4",
        "train.warmup_iters=2", "train.log_period=1", "train.checkpoint_period=1000", "train.ema_decay=0",
        "eval.batch_size=4", "train.amp=none",  # fp32 everywhere: the tests compare bit for bit
    ] + [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return apply_overrides(cfg, items)


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def shapes_model(class_names: list[str] = SHAPES, category_ids: list[int] | None = None,
                 **overrides) -> RetinaNet:
    """An untrained `tiny_config` RetinaNet (`overrides` as there; FPN width 64, so that GroupNorm
    has 2 channels a group) with random weights from seed 0, for the classes `class_names`
    (category ids 1..n unless given: `shapes_data`'s by default) and its class bias at 0, so
    that it detects everywhere with scores near 0.5."""
    cfg = tiny_config({}, Path("unused"), **{"model__fpn__out_channels": 64, **overrides}).model
    cfg.class_names, cfg.num_classes = list(class_names), len(class_names)
    cfg.category_ids = list(category_ids or range(1, len(class_names) + 1))
    torch.manual_seed(0)
    model = RetinaNet.from_config(cfg)
    with torch.no_grad():
        model.head.cls_score.bias.fill_(0.0)
    return model
