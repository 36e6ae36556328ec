"""Does starting from a trained detector pay? AP against iterations on new data for runs that
start from scratch, from a trained detector's backbone alone, and from the whole detector
(`train.weights`: classes kept by name), all else equal.

The new data is the shapes generator's with another look and other classes: colours inverted
and the image blurred, ellipses and rectangles merged into one new class "blob", crosses
renamed "plus" (new to the detector), triangles and stars kept by name. Every run trains
with the same recipe (the demo's, or `--recipe finetune` for the shipped fine-tuning one) for
the same iterations and is evaluated on the same held-out images every `--eval-period`
iterations and before its first step.

    python benchmarks/finetune_pays.py --weights demo_output/run/model_final.pt --output-dir ft_bench

Writes `curves.json`, `curves.png` and one training folder per start into --output-dir.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from retinanet.config import apply_overrides, load_config
from retinanet.data.synthetic import generate_dataset
from retinanet.engine.evaluate import evaluate
from retinanet.engine.train import Trainer

NEW_NAMES = {"ellipse": "blob", "rectangle": "blob", "triangle": "triangle", "star": "star", "cross": "plus"}


def make_data(root: Path, num_train: int, num_val: int, seed: int) -> dict:
    """Shapes with inverted, blurred images and the classes of NEW_NAMES."""
    data = generate_dataset(root, num_train=num_train, num_val=num_val, image_size=128, seed=seed)
    for split in ("train", "val"):
        for path in Path(data[f"{split}_images"]).glob("*.jpg"):
            image = Image.open(path).convert("RGB")
            inverted = Image.fromarray(255 - np.asarray(image)).filter(ImageFilter.GaussianBlur(1.0))
            inverted.save(path, quality=95)
        file = Path(data[f"{split}_annotations"])
        coco = json.loads(file.read_text())
        names = sorted(set(NEW_NAMES.values()))
        old_to_new = {c["id"]: names.index(NEW_NAMES[c["name"]]) + 1 for c in coco["categories"]}
        coco["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
        for annotation in coco["annotations"]:
            annotation["category_id"] = old_to_new[annotation["category_id"]]
        file.write_text(json.dumps(coco))
    return data


def backbone_file(weights: Path, out: Path) -> Path:
    """The detector's ResNet alone, as a torchvision ResNet state dict (train.pretrained_backbone)."""
    state = torch.load(weights, weights_only=True)["weights"]
    torch.save({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, out)
    return out


def run(name: str, cfg, out: Path) -> tuple[list[tuple[int, float]], dict]:
    """Train one start; its AP curve (iteration 0: before the first step) and per-class AP then."""
    trainer = Trainer(cfg, out, progress=False, overwrite=True).setup()
    before = evaluate(trainer.final_model, trainer.val_set, out / "eval_start", 16, 0, 0, verbose=False)
    began = time.perf_counter()
    trainer.run()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(0, before["AP"])] + [(line["iteration"], line["eval"]["AP"]) for line in lines if "eval" in line]
    per_class = before.get("per_class_AP", {})
    print(f"{name}: AP " + ", ".join(f"{i}: {ap:.3f}" for i, ap in curve)
          + f"; before the first step per class {per_class}; {time.perf_counter() - began:.0f} s", flush=True)
    return curve, per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="the trained detector (e.g. a demo run's model_final.pt)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--eval-period", type=int, default=100)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--recipe", default="demo", help="the config whose train section every run uses")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(out / "data", args.num_train, args.num_val, seed=11)
    common = [f"data.{k}={v}" for k, v in data.items()] + [
        f"train.max_iter={args.iters}", f"train.eval_period={args.eval_period}", "train.max_minutes=0",
        f"train.checkpoint_period={args.iters}", "train.log_period=50", "data.num_workers=0",
        f"train.threads={args.threads}", "train.amp=none"]
    recipe = load_config(args.recipe)

    def config(extra: list[str]):
        """The demo's model (the detector's architecture) with the recipe's training settings."""
        cfg = load_config("demo")
        cfg.train, cfg.eval = recipe.train, recipe.eval
        return apply_overrides(cfg, common + extra)

    classes = f"model.num_classes={len(set(NEW_NAMES.values()))}"
    backbone = backbone_file(Path(args.weights), out / "backbone.pth")
    runs = {"from scratch": [classes], "backbone only": [classes, f"train.pretrained_backbone={backbone}"],
            "whole detector": [f"train.weights={args.weights}"]}
    curves, before = {}, {}
    for name, extra in runs.items():
        curves[name], before[name] = run(name, config(extra), out / name.replace(" ", "_"))
    (out / "curves.json").write_text(json.dumps({"curves": curves, "per_class_AP_before_training": before,
                                                 "args": vars(args)}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(*zip(*curve), marker="o", label=name)
    ax.set_xlabel("iteration (batch 8)")
    ax.set_ylabel("COCO AP, held-out images")
    ax.set_title("Fine-tuning the demo detector on new shapes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print(f"-> {out / 'curves.json'}, {out / 'curves.png'}")


if __name__ == "__main__":
    main()
