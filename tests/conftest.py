"""Fixtures shared by the tests; plain helper functions live in helpers.py."""

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import shapes_model, tiny_config
from retinanet import save_model
from retinanet.data.synthetic import generate_dataset


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def photo_path(tmp_path_factory) -> Path:
    """A real photograph (scikit-image's 'coffee', shipped in the package) as a JPEG."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photograph")
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "coffee.jpg"
    Image.fromarray(skimage_data.coffee()).save(path, quality=95)
    return path


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> dict:
    """A small generated COCO dataset (128 px images)."""
    root = tmp_path_factory.mktemp("shapes")
    return generate_dataset(root, num_train=24, num_val=8, image_size=128, seed=3, max_objects=4, min_size=16,
                            max_size=80)


@pytest.fixture(scope="session")
def shapes_model_file(tmp_path_factory) -> Path:
    """`helpers.shapes_model()` saved once for the session (untrained, detects everywhere). Shared:
    a test must not write beside it (eval without --output-dir does), nor change it."""
    return save_model(shapes_model(), tmp_path_factory.mktemp("shapes_model") / "model.pt")


@pytest.fixture(scope="session")
def trained_model_file(tmp_path_factory, shapes_data) -> Path:
    """A `tiny_config` detector of the 5 shape classes trained for 2 iterations on `shapes_data`
    (no evaluation): its `model_final.pt`. Shared: a test must not write beside it, nor change it."""
    from retinanet.engine.train import Trainer

    out = tmp_path_factory.mktemp("trained") / "run"
    torch.manual_seed(0)
    Trainer(tiny_config(shapes_data, out, train__max_iter=2, data__val_annotations="''"), progress=False).run()
    return out / "model_final.pt"


@pytest.fixture(scope="session")
def converted_torchvision(tmp_path_factory) -> Path:
    """torchvision's retinanet_resnet50_fpn with random weights (classification bias -1, so that
    there are detections), converted to our checkpoint by the CLI."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    from retinanet.cli import main as cli

    folder = tmp_path_factory.mktemp("tv")
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.fill_(-1.0)
    torch.save(tv.state_dict(), folder / "tv.pth")
    assert cli(["convert", "--from", "torchvision", str(folder / "tv.pth"), str(folder / "ours.pt")]) == 0
    return folder / "ours.pt"


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside every output folder that hostile inputs aim at (through `..`, absolute
    paths or symlinks); it must still read "keep me" afterwards."""
    path = tmp_path / "victim" / "pwn.txt"
    path.parent.mkdir()
    path.write_text("keep me\n")
    return path
