"""Prediction over image files with a PyTorch model: the backend that runs it for the shared
loop (`prediction_files.predict_files`), and tiled prediction, which runs with torch only."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from .precision import autocast
from .prediction_files import Shard, detection_cap, size_groups
from .prediction_files import predict_files as predict_with_backend
from .tiled_files import TiledFiles


class TorchBackend:
    """A RetinaNet (or any object with its `predict`, `class_names` and `category_ids`) as a
    backend of the shared prediction loop: `(H, W, 3)` uint8 arrays in, numpy detections out.
    Images of one size run together (`size_groups`), as the exported graph runs them. `tta`:
    a `TestTimeAugmentation` that the model's `predict` runs (None: the images as they are)."""

    raise_cap = "retinanet predict --max-detections N (model.inference.detections_per_image)"

    def __init__(self, model, tta=None):
        self.model = model
        self.detections_per_image = detection_cap(model)
        self.run = model.predict if tta is None else functools.partial(model.predict, tta=tta)
        self.class_names, self.category_ids = model.class_names, model.category_ids
        preprocessor = getattr(model, "preprocessor", None)
        self.size_check = getattr(preprocessor, "check_size", None)

    def check_size(self, height: int, width: int, name: str = "image") -> None:
        if self.size_check is not None:
            self.size_check((height, width), name=name)

    def predict(self, images: list, score_threshold: float | None = None) -> list[dict]:
        out: list[dict] = [{}] * len(images)
        for group in size_groups(images):
            tensors = [torch.from_numpy(images[i]).permute(2, 0, 1) for i in group]
            for i, det in zip(group, self.run(tensors, score_threshold=score_threshold)):
                out[i] = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in det.items()}
        return out


def predict_files(model, inputs: list[str | Path], output_dir: str | Path, score_threshold: float | None = None,
                  draw: bool = True, batch_size: int = 4, tiling: dict | None = None, workers: int = 2,
                  save_txt: str | None = None, progress: bool = True, amp: str = "none",
                  tta=None, shard: Shard | None = None, resume: bool = False) -> tuple[list[dict], list[str]]:
    """`prediction_files.predict_files` (inputs, decoding, batches, outputs) with `model`
    (`TorchBackend`). With `tiling` (`tile`, `overlap`, `merge`, `full_image`, optional
    `value_range`), each image is predicted on overlapping tiles at full resolution, the
    processes sharing its tiles (`engine.tiled_files`). `amp` ("none", "bf16" or "fp16", as `resolve_amp` gives it): the
    network runs in that autocast precision. `tta`: a `TestTimeAugmentation`
    (`engine.tta.build_tta`) run on each image, or each tile. `shard` and `resume`: a run
    shared by processes, and resumed (see `prediction_files.predict_files`). Returns the
    predictions and the error lines."""
    device_type = next(model.parameters()).device.type if amp != "none" else "cpu"
    tiled = None if tiling is None else TiledFiles(model, tiling, score_threshold=score_threshold,
                                                   batch_size=batch_size, draw=draw, save_txt=save_txt, tta=tta)
    with autocast(amp, device_type):
        return predict_with_backend(TorchBackend(model, tta), inputs, output_dir, score_threshold, draw=draw,
                                    batch_size=batch_size, workers=workers, save_txt=save_txt, progress=progress,
                                    tiled=tiled, shard=shard, resume=resume)


def predict_checkpoint(weights: str, inputs: list[str | Path], output_dir: Path, info, *, amp: str = "none",
                       compile: bool = False, score_threshold: float | None = None, max_detections: int | None = None,
                       draw: bool = True, batch_size: int = 4, workers: int = 2, save_txt: str | None = None,
                       tiling: dict | None = None, tta=None, resume: bool = False) -> tuple[list[dict], list[str]]:
    """`retinanet predict` with a checkpoint or zoo name on this process's device
    (`info`: `distributed.setup`'s); under torchrun each process takes its share of the
    inputs (`Shard`) and the first writes the merged predictions.json. `tiling` (`tile`,
    `overlap`, `merge`, `full_image`, `value_range`, `force`): refused (`ConfigError`) when
    `tiling_problem` objects unless `force`, with a one-line warning for tiles far smaller
    than the model's input. `tta`: an `eval.tta` config (`TTAConfig`) or None."""
    from ..checkpoint import load_model
    from ..model.config import ConfigError
    from ..zoo import resolve_weights
    from . import distributed
    from .prediction_files import Shard
    from .tiling import small_tile_warning, tiling_problem
    from .tta import build_tta

    overrides = [f"inference.detections_per_image={max_detections}"] if max_detections else []
    model = load_model(str(resolve_weights(weights)), map_location=info.device, overrides=overrides, compile=compile)
    if tiling is not None:
        problem = tiling_problem(tiling["tile"], tiling["overlap"], model.config.anchors.sizes)
        if problem and not tiling.get("force"):
            raise ConfigError(f"--tile {tiling['tile']} --overlap {tiling['overlap']:g}: {problem}; pass "
                              "--force-tiling to run it anyway")
        warning = small_tile_warning(tiling["tile"], model.config.input)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    return predict_files(model, inputs, output_dir, score_threshold, draw=draw, batch_size=batch_size, tiling=tiling,
                         workers=workers, save_txt=save_txt, amp=amp,
                         tta=None if tta is None else build_tta(tta, model, sizes_key="--tta-sizes"),
                         shard=Shard(info.rank, info.world_size, distributed.barrier), resume=resume)
