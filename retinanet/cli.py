"""The `retinanet` command line. Sits on top of everything; nothing imports it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXAMPLES = """examples:
  retinanet demo                                   # generate data, train from scratch, evaluate (~15 min CPU)
  retinanet train --config configs/retinanet_r50_fpn_1x_coco.yaml --output-dir runs/r50
  torchrun --nproc_per_node 8 -m retinanet.cli train --config configs/retinanet_r50_fpn_1x_coco.yaml
  retinanet eval --weights runs/r50/model_final.pt
  retinanet predict --weights model.pt photo.jpg --output-dir out
  retinanet convert --from torchvision retinanet_resnet50_fpn_coco.pth model.pt
  retinanet check-data --config configs/retinanet_r50_fpn_1x_coco.yaml
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retinanet", description="RetinaNet: train, evaluate, predict, convert.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("train", help="train on a COCO-format dataset (torchrun for several GPUs/nodes)")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--output-dir", help="where checkpoints and logs go (default: the config's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt exactly")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.base_lr=0.02")

    p = commands.add_parser("eval", help="COCO metrics of a checkpoint on the config's validation set")
    p.add_argument("--weights", required=True, help="checkpoint (ours; convert others first)")
    p.add_argument("--config", help="YAML config for the data (default: the checkpoint's config)")
    p.add_argument("--output-dir", help="where metrics.json and detections.json go (default: beside the weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    p = commands.add_parser("predict", help="detect objects in image files")
    p.add_argument("--weights", required=True)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--output-dir", required=True, help="gets predictions.json and the images with boxes drawn")
    p.add_argument("--score-threshold", type=float, help="default: the model's (0.05)")
    p.add_argument("--no-draw", action="store_true", help="write predictions.json only")
    p.add_argument("--device", default="auto")

    p = commands.add_parser("convert", help="convert torchvision / detectron2 / PaddleDetection weights",
                            description=CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=["torchvision", "detectron2", "paddle"])
    p.add_argument("src", help="the source weights file")
    p.add_argument("dst", help="our checkpoint to write")
    p.add_argument("--num-classes", type=int, help="keep backbone/FPN/heads but start a fresh N-class predictor")
    p.add_argument("--trust", action="store_true",
                   help="allow a full (code-executing) unpickle of SRC; only for files you trust")

    p = commands.add_parser("demo", help="generate a shapes dataset, train from scratch, evaluate, draw")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument("--minutes", type=float, help="training time budget (default: the demo config's)")
    p.add_argument("--num-train", type=int, default=8000)
    p.add_argument("--num-val", type=int, default=300)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    p = commands.add_parser("check-data", help="validate the config's datasets and print a report")
    p.add_argument("--config", required=True)
    p.add_argument("--decode", action="store_true", help="also decode every image (slow, finds damaged files)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except _known_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


CONVERT_HELP = """Convert published RetinaNet weights into a retinanet checkpoint whose config reproduces
the source library's behaviour (anchors, input normalisation, P6 source, post-processing).

sources:
  torchvision   a state dict (.pth) of retinanet_resnet50_fpn or retinanet_resnet50_fpn_v2
  detectron2    a model-zoo .pkl (pickled dict with numpy arrays) or a .pth of the same keys
  paddle        a PaddleDetection .pdparams (pickled dict of numpy arrays)

Pickles are read with a restricted unpickler that only admits numpy arrays and plain
containers; anything else is refused unless you pass --trust."""


def _known_errors():
    from .data.coco import DatasetError
    from .data.image_io import ImageReadError
    from .model.checkpoint import CheckpointError
    from .model.config import ConfigError

    errors = [CheckpointError, ConfigError, DatasetError, ImageReadError, FileNotFoundError]
    try:
        from .convert.common import ConversionError

        errors.append(ConversionError)
    except ImportError:
        pass
    try:
        from .engine.train import TrainingError

        errors.append(TrainingError)
    except ImportError:
        pass
    return tuple(errors)


def cmd_train(args) -> int:
    from .config import load_config
    from .engine.train import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, args.output_dir, resume=args.resume, device=args.device)
    return 128 + int(summary["signal"]) if summary["status"] == "interrupted" else 0  # 130 SIGINT, 143 SIGTERM


def cmd_eval(args) -> int:
    from .config import Config, config_from_dict, load_config
    from .data.coco import CocoDetection
    from .engine import distributed
    from .engine.checkpoint import read_checkpoint
    from .engine.evaluate import evaluate
    from .model.detector import RetinaNet

    info = distributed.setup(args.device)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        from .config import apply_overrides

        stored = read_checkpoint(args.weights).get("config", {})
        cfg = apply_overrides(config_from_dict(Config, stored if "model" in stored else {"model": stored}),
                              args.overrides)
    if not cfg.data.val_annotations:
        raise FileNotFoundError("no validation set: set data.val_images and data.val_annotations")
    model = RetinaNet.from_checkpoint(args.weights, map_location=info.device).to(info.device)
    dataset = CocoDetection(cfg.data.val_images, cfg.data.val_annotations, strict=cfg.data.strict)
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.weights).parent / "eval"
    metrics = evaluate(model, dataset, output_dir, max(1, cfg.eval.batch_size // info.world_size),
                       cfg.data.num_workers, cfg.eval.max_images, verbose=info.is_main)
    if info.is_main:
        print(f"AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}  AP75 {metrics['AP75']:.4f}  "
              f"-> {output_dir / 'metrics.json'}")
    distributed.cleanup()
    return 0


def cmd_predict(args) -> int:
    import torch

    from .engine.predict import predict_files
    from .model.detector import RetinaNet

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto"
                                                                                 else args.device)
    model = RetinaNet.from_checkpoint(args.weights, map_location=device).to(device)
    predictions, errors = predict_files(model, args.images, args.output_dir, args.score_threshold,
                                        draw=not args.no_draw)
    done = len(args.images) - len(errors)
    print(f"{len(predictions)} detections in {done} image(s) -> {Path(args.output_dir) / 'predictions.json'}"
          + (f"; {len(errors)} file(s) could not be read" if errors else ""))
    return 1 if errors else 0


def cmd_convert(args) -> int:
    from .convert import convert_file

    config = convert_file(args.source, args.src, args.dst, num_classes=args.num_classes, trust=args.trust)
    print(f"wrote {args.dst} ({config.num_classes} classes, ResNet-{config.backbone.depth}, from {args.source})")
    return 0


def cmd_demo(args) -> int:
    from .engine.demo import run_demo

    run_demo(args.output_dir, args.minutes, args.overrides, args.num_train, args.num_val)
    return 0


def cmd_check_data(args) -> int:
    from .config import load_config
    from .data.check import check_datasets

    cfg = load_config(args.config, args.overrides)
    ok = check_datasets(cfg.data, cfg.model.num_classes, decode=args.decode)
    return 0 if ok else 1


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "convert": cmd_convert,
            "demo": cmd_demo, "check-data": cmd_check_data}


if __name__ == "__main__":
    sys.exit(main())
