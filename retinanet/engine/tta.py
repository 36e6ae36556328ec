"""Test-time augmentation settings (`eval.tta`, `predict --tta`) made into the model's
`TestTimeAugmentation`, checked against the model they run with."""

from __future__ import annotations

from ..model.config import ConfigError
from ..model.tta import TestTimeAugmentation


def build_tta(config, model, sizes_key: str = "eval.tta.sizes") -> TestTimeAugmentation | None:
    """The `TestTimeAugmentation` of a `TTAConfig` for `model`, or None when it asks for no
    view besides the model's own (TTA off: prediction runs exactly as without it). Extra sizes
    with a model that does not resize its input are a `ConfigError` naming `sizes_key`."""
    if config is None or not config.enabled:
        return None
    if config.sizes and not model.preprocessor.resize:
        raise ConfigError(f"{sizes_key}: {list(config.sizes)}: this model does not resize its input "
                          "(model.input.resize is false), so it has no other sizes to run at")
    return TestTimeAugmentation(config.flip, config.sizes, config.merge)
