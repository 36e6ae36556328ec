import pytest
import yaml

from retinanet.config import Config, ConfigError, load_config, save_config
from retinanet.model.config import ModelConfig, apply_overrides, config_from_dict, config_to_dict


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(Config(), ["model.num_classes=3", "train.steps=[10, 20]", "model.fpn.p6_source=p5"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_overrides_parse_values_as_yaml():
    cfg = apply_overrides(Config(), ["train.base_lr=0.02", "model.input.train_min_sizes=[640, 672]",
                                     "train.channels_last=true", "model.num_classes=2",
                                     "model.class_names=[a, b]"])
    assert cfg.train.base_lr == 0.02 and cfg.model.input.train_min_sizes == [640, 672]
    assert cfg.train.channels_last is True and cfg.model.class_names == ["a", "b"]


@pytest.mark.parametrize("override,fragment", [
    ("train.base_rate=1", "base_rate"),
    ("model.backbone.depth=fifty", "model.backbone.depth"),
    ("train.amp", "key=value"),
    ("model.fpn=3", "fpn"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides(Config(), [override])


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_clases": 3}}))
    with pytest.raises(ConfigError, match="model.num_clases"):
        load_config(path)


def test_yaml_with_python_tags_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_model_config_dict_round_trip():
    cfg = ModelConfig(num_classes=7)
    assert config_from_dict(ModelConfig, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("override,allowed", [
    ("train.amp=bfloat16", "none, bf16, fp16"),
    ("train.amp=bf17", "none, bf16, fp16"),
    ("train.nonfinite_loss=skp", "stop, skip"),
    ("train.max_iter=-5", ">= 1"),
    ("train.schedule=cosin", "step, cosine"),
    ("model.head.norm=bn", "none, gn"),
    ("model.backbone.depth=19", "18, 34, 50, 101"),
    ("train.optimizer=adam", "sgd, adamw"),
    ("train.schedule=linear", "step, cosine"),
    ("train.base_lr=-1", "> 0"),
    ("train.batch_size=0", ">= 1"),
    ("model.matcher.fg_iou_threshold=1.5", "[0, 1]"),
    ("model.inference.score_threshold=.nan", "finite"),
    ("model.backbone.norm=batchnorm", "frozen_bn, bn, gn"),
    ("model.inference.clip_boxes=always", "before_nms, after_nms, none"),
])
def test_every_choice_and_bound_is_checked_at_load(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as info:
        load_config("demo", [override])
    message = str(info.value)
    assert message.startswith(key + ":") and allowed in message and "\n" not in message
    assert value.lstrip(".") in message


def test_choices_are_checked_in_files_too(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"amp": "bfloat16"}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: train.amp: 'bfloat16' is not allowed"):
        load_config(path)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="bg_iou_threshold 0.6 is above fg_iou_threshold 0.5"):
        apply_overrides(Config(), ["model.matcher.bg_iou_threshold=0.6"])
    with pytest.raises(ConfigError, match="4 levels of sizes but 5 strides"):
        apply_overrides(Config(), ["model.anchors.sizes=[[32], [64], [128], [256]]"])


def test_a_string_setting_can_be_emptied_from_the_command_line():
    cfg = load_config("retinanet_r50_fpn_1x_coco", ["train.pretrained_backbone="])
    assert cfg.train.pretrained_backbone == ""


def test_cli_prints_config_errors_in_one_line(capsys):
    from retinanet.cli import main as cli

    assert cli(["train", "--config", "demo", "train.optimizer=adam"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: train.optimizer: 'adam' is not allowed (choose from sgd, adamw)"


def test_shipped_configs_by_name_and_in_help(capsys):
    from retinanet.cli import main as cli
    from retinanet.config import resolve_config, shipped_configs

    names = shipped_configs()
    assert {"demo", "retinanet_r50_fpn_1x_coco", "retinanet_r50_fpn_1x_coco_ms"} <= set(names)
    assert resolve_config("demo") == resolve_config("demo.yaml")
    assert resolve_config("demo").parent.parent.name == "retinanet"  # inside the package
    with pytest.raises(ConfigError, match="not a shipped config"):
        load_config("dmeo")
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in names)


@pytest.mark.parametrize("name", ["demo", "retinanet_r18_fpn_1x_coco", "retinanet_r50_fpn_1x_coco",
                                  "retinanet_r50_fpn_1x_coco_ms", "retinanet_r101_fpn_1x_coco"])
def test_every_shipped_config_builds_and_runs(name):
    import torch

    from retinanet import RetinaNet
    from retinanet.config import shipped_configs

    assert name in shipped_configs()
    cfg = load_config(name, ["model.input.test_min_size=64", "model.input.max_size=96"])
    model = RetinaNet.from_config(cfg.model).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 50, 70)])[0]
    assert set(out) == {"boxes", "scores", "labels"} and out["boxes"].shape[1] == 4


def test_linear_scaling_is_logged(caplog):
    from retinanet.engine.optimization import describe_scaling, scaled_schedule

    cfg = load_config("retinanet_r50_fpn_1x_coco", ["train.batch_size=2", "train.max_iter=2"]).train
    line = describe_scaling(cfg, scaled_schedule(cfg))
    assert "batch 2 vs the config's reference batch 16" in line and "lr 0.01 -> 0.00125" in line
    assert "max_iter 2 -> 16" in line
    same = load_config("retinanet_r50_fpn_1x_coco").train
    assert describe_scaling(same, scaled_schedule(same)) is None
