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
                                     "train.channels_last=true", "model.class_names=[a, b]"])
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


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
