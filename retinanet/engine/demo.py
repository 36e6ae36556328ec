"""The embedded demo: generate shapes, train a small RetinaNet from scratch, evaluate, draw."""

from __future__ import annotations

import json
import time
from pathlib import Path


from ..checkpoint import load_model
from ..config import Config, apply_overrides, load_config
from ..data.formats import open_dataset
from ..data.synthetic import SHAPE_CLASSES, generate_dataset
from ..model.detector import RetinaNet
from ..outputs import save_image, write_text
from ..analysis.drawing import draw_detections
from .train import TrainingError, train


def demo_config(output_dir: str | Path, minutes: float | None = None, overrides: list[str] | None = None,
                num_train: int = 8000, num_val: int = 300, seed: int = 0) -> Config:
    output_dir = Path(output_dir)
    t0 = time.perf_counter()
    budget = [f"train.max_minutes={minutes}", "train.max_iter=1000000"] if minutes is not None else []
    cfg = load_config("demo", list(overrides or []) + budget)  # shipped inside the package; checked before any work
    # images are made at the training size (no resizing while training); the demo tests them upscaled
    size = max(cfg.model.input.train_min_sizes)
    paths = generate_dataset(output_dir / "data", num_train=num_train, num_val=num_val, image_size=size, seed=seed)
    print(f"data: {num_train} train / {num_val} val images in {output_dir / 'data'} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    cfg = apply_overrides(cfg, [f"data.{k}={v}" for k, v in paths.items()] + [f"output_dir={output_dir / 'run'}"])
    cfg.model.class_names = list(SHAPE_CLASSES)
    return cfg


def run_demo(output_dir: str | Path = "demo_output", minutes: float | None = None,
             overrides: list[str] | None = None, num_train: int = 8000, num_val: int = 300,
             overwrite: bool = False) -> dict:
    """Generate, train, evaluate, draw. A folder holding an earlier demo run is refused
    before any work unless `overwrite`."""
    start = time.perf_counter()
    if (Path(output_dir) / "run").exists() and not overwrite:
        raise TrainingError(f"{output_dir} holds an earlier demo run: pass --overwrite to replace it, or choose "
                            "another --output-dir")
    cfg = demo_config(output_dir, minutes, overrides, num_train, num_val)
    summary = train(cfg, cfg.output_dir, overwrite=overwrite)
    if summary["status"] == "interrupted":
        return {"status": "interrupted", "signal": summary["signal"], "iterations": summary["iteration"]}
    metrics = summary["metrics"] or {}
    model = load_model(Path(cfg.output_dir) / "model_final.pt")
    drawn = draw_examples(model, cfg, Path(output_dir) / "predictions")
    elapsed = time.perf_counter() - start
    result = {"status": "finished", "AP": metrics.get("AP"), "AP50": metrics.get("AP50"), "iterations": summary["iteration"],
              "images_seen": summary["iteration"] * cfg.train.batch_size, "minutes": round(elapsed / 60, 2),
              "drawn": [str(p) for p in drawn]}
    write_text(Path(output_dir) / "demo_result.json", json.dumps(result, indent=2))
    print(f"demo: AP {result['AP']:.3f}, AP50 {result['AP50']:.3f} on {num_val} validation images after "
          f"{result['images_seen']} training images; total {elapsed / 60:.1f} min; pictures in {output_dir}/predictions")
    return result


def draw_examples(model: RetinaNet, cfg: Config, folder: Path, count: int = 6) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(cfg.data, "val")
    paths = []
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        det = model.predict(image, score_threshold=0.3)
        path = folder / f"val_{i:02d}.png"
        save_image(draw_detections(image, det, scale=3, ground_truth=target["boxes"]), path, sync=False)
        paths.append(path)
    return paths
