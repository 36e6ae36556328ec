"""Fine-tuning: `retinanet train --weights SRC` from our checkpoints and from the peers' files."""

import json
import logging
import math
import pickle
from pathlib import Path

import pytest
import torch

from retinanet.cli import main as cli
from retinanet.config import ConfigError
from retinanet.convert import convert_state, read_detector
from retinanet.engine.finetune import finetune_config, match_classes
from retinanet.engine.train import Trainer

from helpers import require_peer

PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)
TINY = ["train.max_iter=1", "train.batch_size=2", "train.reference_batch_size=2", "train.warmup_iters=0",
        "train.log_period=1", "train.eval_period=0", "train.amp=none", "data.num_workers=0"]
SMALL_INPUT = ["model.input.train_min_sizes=[128]", "model.input.test_min_size=128", "model.input.max_size=128"]


@pytest.fixture(scope="module")
def trained(trained_model_file) -> Path:
    """A tiny detector of the 5 shape classes, trained for 2 iterations."""
    return trained_model_file


def renamed_data(shapes_data, folder: Path, names: list[str]) -> list[str]:
    """The shapes training set with its 5 categories renamed; as `data.*` overrides."""
    coco = json.loads(Path(shapes_data["train_annotations"]).read_text())
    for category, name in zip(coco["categories"], names):
        category["name"] = name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(coco))
    return [f"data.train_images={shapes_data['train_images']}", f"data.train_annotations={folder / 'train.json'}"]


def rows_of(weights: dict, num_classes: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k's classifier rows (every anchor's) of a state dict."""
    w, b = weights["head.cls_score.weight"], weights["head.cls_score.bias"]
    return w.view(-1, num_classes, *w.shape[1:])[:, k], b.view(-1, num_classes)[:, k]


def assert_start(trainer: Trainer, source: dict, source_classes: int, expected_rows: list):
    """Kept classes carry the source's rows bit for bit, new ones the prior bias; every other
    weight is the source's."""
    state = trainer.model.state_dict()
    k_new = trainer.model.num_classes
    assert trainer.class_rows == expected_rows
    for k, row in enumerate(expected_rows):
        weight, bias = rows_of(state, k_new, k)
        if row is None:
            assert torch.all(bias == torch.tensor(PRIOR_BIAS, dtype=bias.dtype))
            assert weight.abs().max() < 0.1  # the fresh N(0, 0.01) initialisation, not a source's row
        else:
            src_weight, src_bias = rows_of(source, source_classes, row)
            assert torch.equal(weight, src_weight) and torch.equal(bias, src_bias)
    for key, value in source.items():
        if not key.startswith("head.cls_score.") and key in state:
            assert torch.equal(state[key], value.to(state[key].dtype)), key


def test_match_classes_by_name_case_and_map():
    source = ["__background__", "person", "bicycle", "car", "N/A", "truck", "Dog"]
    assert match_classes(["Person", "dog", "widget", "n/a"], source) == [1, 6, None, None]
    assert match_classes(["car", "lorry"], source, "lorry:Truck") == [3, 5]
    assert match_classes(["car"], source, "car:truck") == [5]
    with pytest.raises(ConfigError, match="'lorry' is not a class of the weights"):
        match_classes(["car"], source, "car:lorry")
    with pytest.raises(ConfigError, match="'bus' is not a class of the data"):
        match_classes(["car"], source, "bus:car")
    with pytest.raises(ConfigError, match="is not mine:theirs"):
        match_classes(["car"], source, "car")


@pytest.mark.slow
def test_finetune_from_our_checkpoint_keeps_rows_by_name(trained, shapes_data, tmp_path, caplog):
    # ellipse by case, rectangle through class_map, star by name; widget and gadget are new
    data = renamed_data(shapes_data, tmp_path / "data", ["Ellipse", "box", "widget", "star", "gadget"])
    cfg, start = finetune_config(None, str(trained), data + TINY + ["train.class_map=box:rectangle"])
    assert cfg.model.backbone.depth == 18 and cfg.model.fpn.out_channels == 32  # the model is the source's
    assert cfg.train.base_lr == 0.0025  # the recipe is the shipped finetune config
    trainer = Trainer(cfg, tmp_path / "run", progress=False, start=start)
    with caplog.at_level(logging.INFO, logger="retinanet.engine.train"):
        trainer.setup()
    source = torch.load(trained, weights_only=True)["weights"]
    assert_start(trainer, source, 5, [0, 1, None, 3, None])
    table = caplog.text
    assert "3 of 5 start from the weights' classifier, 2 are new" in table
    assert "box" in table and "kept: 'rectangle'" in table and "widget" in table and "prior-probability" in table


@pytest.mark.slow
def test_train_weights_through_the_cli_runs_and_stores_the_datas_classes(trained, shapes_data, tmp_path):
    data = renamed_data(shapes_data, tmp_path / "data", ["ellipse", "a", "b", "c", "star"])
    out = tmp_path / "run"
    assert cli(["train", "--weights", str(trained), "--output-dir", str(out), *data, *TINY]) == 0
    final = torch.load(out / "model_final.pt", weights_only=True)
    assert final["model_config"]["class_names"] == ["ellipse", "a", "b", "c", "star"]
    assert final["run_config"]["train"]["weights"] == str(trained)
    # resuming the fine-tuned run reads its own checkpoint, not the start again
    assert cli(["train", "--config", str(out / "config.yaml"), "--output-dir", str(out), "--resume",
                "train.max_iter=2"]) == 0


@pytest.mark.slow
def test_weights_with_resume_and_a_config_that_does_not_fit_are_one_line_errors(trained, shapes_data, tmp_path,
                                                                               capsys):
    data = renamed_data(shapes_data, tmp_path / "data", ["ellipse", "a", "b", "c", "star"])
    assert cli(["train", "--weights", str(trained), "--resume", "--output-dir", str(tmp_path / "r"), *data]) == 2
    assert "give one of them" in capsys.readouterr().err
    # a config with a model section must describe the weights' architecture; nothing is read or written
    assert cli(["train", "--weights", str(trained), "--config", "retinanet_r18_fpn_1x_coco", "--output-dir",
                str(tmp_path / "r"), "data.train_annotations=/nonexistent.json", "data.train_images=/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit train.weights" in err
    assert "fpn.out_channels: 32 in the weights, 256 in the config" in err and "head.num_convs" in err
    assert not (tmp_path / "r").exists()
    assert cli(["train", "--weights", str(tmp_path / "nothing.pt"), "--output-dir", str(tmp_path / "r")]) == 2
    assert "not a zoo name" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("freeze, frozen, trained_parts", [
    ("backbone", ["backbone."], ["fpn.", "head."]),
    ("backbone+fpn", ["backbone.", "fpn."], ["head."]),
    (1, ["backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2", "backbone.layer3"],
     ["backbone.layer4", "fpn."]),
])
def test_freeze_leaves_frozen_weights_bit_for_bit(trained, shapes_data, tmp_path, freeze, frozen, trained_parts):
    data = renamed_data(shapes_data, tmp_path / "data", ["ellipse", "rectangle", "triangle", "star", "cross"])
    # the demo's trainable BatchNorm: frozen stages must keep their running statistics too
    cfg, start = finetune_config(None, str(trained), data + TINY + [f"train.freeze={freeze}", "train.max_iter=2",
                                                                    "train.base_lr=0.05"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False, start=start).setup()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    for key, value in before.items():
        if key.endswith("num_batches_tracked"):
            continue
        if any(key.startswith(p) for p in frozen):
            assert torch.equal(after[key], value), f"{key} changed though frozen"
    for part in trained_parts:
        assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith(part)), part


@pytest.mark.slow
def test_finetune_from_torchvision_keeps_coco_rows(shapes_data, tmp_path):
    from torchvision.models.detection import retinanet_resnet50_fpn

    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    data = renamed_data(shapes_data, tmp_path / "data", ["person", "DOG", "widget", "giraffe", "truck"])
    cfg, start = finetune_config(None, str(tmp_path / "tv.pth"), data + TINY + SMALL_INPUT)
    assert start.source == "torchvision" and cfg.model.fpn.p6_source == "p5"  # v1, read by content
    trainer = Trainer(cfg, tmp_path / "run", progress=False, start=start).setup()
    _, converted = convert_state("torchvision", read_detector(tmp_path / "tv.pth")[1])
    # torchvision's 91-way layout: person 1, dog 18, giraffe 25, truck 8
    assert_start(trainer, converted, 91, [1, 18, None, 25, 8])
    assert trainer.run()["status"] == "finished"


@pytest.mark.slow
def test_finetune_from_detectron2_pickle(shapes_data, tmp_path):
    import torchvision

    from retinanet.model.fpn import FPN
    from retinanet.model.head import RetinaNetHead
    from test_convert_detectron2 import to_detectron2_names

    resnet = torchvision.models.resnet18(weights=None)
    state = to_detectron2_names(resnet.state_dict(), FPN([128, 256, 512], 256, "c5").state_dict(),
                                RetinaNetHead(256, 9, 80).state_dict())
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "Detectron2 Model Zoo"}, f)
    data = renamed_data(shapes_data, tmp_path / "data", ["person", "cat", "widget", "kite", "bus"])
    out = tmp_path / "run"
    assert cli(["train", "--weights", str(path), "--output-dir", str(out), *data, *TINY, *SMALL_INPUT]) == 0
    cfg, start = finetune_config(None, str(path), data + TINY + SMALL_INPUT)
    assert start.source == "detectron2" and cfg.model.input.channel_order == "BGR"
    trainer = Trainer(cfg, tmp_path / "again", progress=False, start=start).setup()
    _, converted = convert_state("detectron2", read_detector(path)[1])
    assert_start(trainer, converted, 80, [0, 15, None, 33, 5])  # COCO's 80 contiguous classes


@pytest.mark.slow
def test_finetune_from_paddledetection_pdparams(shapes_data, tmp_path):
    paddle = require_peer("paddle", "pip install paddlepaddle==3.3.1 (see .ci/run)")
    require_peer("ppdet", "pip install --no-deps paddledet==2.6.0 (see .ci/run)")
    from test_paddle_parity import build_paddle_retinanet

    path = tmp_path / "retinanet.pdparams"
    paddle.save(build_paddle_retinanet().state_dict(), str(path))
    data = renamed_data(shapes_data, tmp_path / "data", ["Person", "horse", "widget", "zebra", "car"])
    cfg, start = finetune_config(None, str(path), data + TINY + SMALL_INPUT)
    assert start.source == "paddle" and cfg.model.inference.candidates == "per_anchor"
    trainer = Trainer(cfg, tmp_path / "run", progress=False, start=start).setup()
    _, converted = convert_state("paddle", read_detector(path)[1])
    assert_start(trainer, converted, 80, [0, 17, None, 22, 2])
    assert trainer.run()["status"] == "finished"


def test_check_data_with_the_finetune_recipe_checks_the_data_not_a_class_count(shapes_data, capsys):
    data = [f"data.train_images={shapes_data['train_images']}",
            f"data.train_annotations={shapes_data['train_annotations']}"]
    assert cli(["check-data", "--config", "finetune", *data]) == 0  # 5 classes; the recipe's model is the weights'
    assert "model.num_classes" not in capsys.readouterr().out
    assert cli(["check-data", "--config", "retinanet_r18_fpn_1x_coco", *data]) == 1  # 80 classes there
    assert "model.num_classes=80 but the file has 5 categories" in capsys.readouterr().out
