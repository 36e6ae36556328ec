"""The `retinanet` command line. Sits on top of everything; nothing imports it."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

EXAMPLES = """examples:
  retinanet demo                                   # generate data, train from scratch, evaluate (10-13 min, 2-core CPU)
  retinanet train --config retinanet_r50_fpn_1x_coco --output-dir runs/r50
  torchrun --nproc_per_node 8 -m retinanet.cli train --config retinanet_r50_fpn_1x_coco
  retinanet eval --weights runs/r50/model_final.pt
  retinanet zoo                                    # the published COCO RetinaNets: any --weights takes their names
  retinanet predict --weights torchvision/retinanet_resnet50_fpn_v2_coco photo.jpg --output-dir out
  retinanet predict --weights model.pt photo.jpg photos/ "shots/*.png" --output-dir out
  retinanet convert --from torchvision retinanet_resnet50_fpn_coco.pth model.pt
  retinanet check-data --config my_config.yaml
  retinanet analyze --config my_config.yaml        # do the anchors cover my boxes? suggested anchors
  retinanet plot runs/a runs/b --output curves.png
"""


class Interrupted(BaseException):
    """SIGINT or SIGTERM outside the training loop (which stops cleanly by itself)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _config_help() -> str:
    from . import configs

    return "YAML config: a file, or the name of a shipped config (" + ", ".join(configs.names()) + ")"


def _score_threshold(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a score in [0, 1]")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1)")
    return value


def _value_range(text: str) -> tuple[float, float]:
    from .data.value_range import check_value_range

    try:
        return check_value_range([float(v) for v in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH with LOW < HIGH") from None


def _sizes(text: str) -> list[int]:
    try:
        return [_positive_int(v) for v in text.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not sizes N[,N...], each a whole number >= 1") from None


def _positive_minutes(text: str) -> float:
    value = float(text)
    if not (value > 0 and value < 60 * 24 * 7):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes > 0")
    return value


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not x,y") from None
    return x, y


def _device(text: str) -> str:
    if text in ("auto", "cpu"):
        return text  # no torch import for what needs no check
    from .engine.distributed import DeviceError, resolve_device

    try:
        resolve_device(text)
    except DeviceError as err:
        raise argparse.ArgumentTypeError(str(err).replace("--device ", "")) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each command's options are added by its own function."""
    parser = argparse.ArgumentParser(prog="retinanet", description="RetinaNet: train, evaluate, predict, convert.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in (_add_train_parser, _add_eval_parser, _add_predict_parser, _add_convert_parser,
                       _add_demo_parser, _add_check_data_parser, _add_analyze_parser, _add_anchors_parser,
                       _add_assign_parser, _add_export_parser, _add_serve_parser, _add_bench_parser,
                       _add_data_parser, _add_plot_parser, _add_zoo_parser, _add_augment_parser):
        add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if _main_thread() else None
    from .allocator import keep_freed_memory

    keep_freed_memory()  # a CPU training step ~6% faster; see its docstring
    try:
        return COMMANDS[args.command](args)
    except _known_errors() as err:
        print(f"error: {err}{_kept_note(args.command, err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a full, read-only or forbidden disk, wherever the write was
        from .outputs import describe_disk_failure, disk_failure

        failure = disk_failure(err)
        if failure is None:
            raise
        where = None  # a failed write() names no file: name the command's output
        if not failure.filename:
            folder = getattr(args, "output_dir", None)
            where = f"a file in {folder}" if folder else getattr(args, "output", None)
        print(f"error: {describe_disk_failure(failure, where)}{_kept_note(args.command, failure)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as err:
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name}) during {args.command}: stopped; files already written "
              "are intact (checkpoints are written atomically)"
              + ("; `retinanet train --resume` continues from the last checkpoint" if args.command == "train"
                 else ""), file=sys.stderr)
        return 128 + int(signum)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _add_train_parser(commands) -> None:
    p = commands.add_parser("train", help="train, or fine-tune a trained detector, on a dataset (torchrun for "
                                          "several GPUs/nodes)")
    p.add_argument("--config", help=_config_help() + "; with --weights and no --config: the shipped finetune "
                                    "recipe, the model from the weights")
    p.add_argument("--weights", help="start from this detector: our checkpoint, a torchvision / detectron2 / "
                                     "PaddleDetection weight file, or a zoo name (retinanet zoo); the data's "
                                     "classes keep the rows of the detector's classes of the same name")
    p.add_argument("--trust", action="store_true",
                   help="allow a full (code-executing) unpickle of a --weights file; only for files you trust")
    p.add_argument("--output-dir", help="where checkpoints and logs go (default: the config's output_dir)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", nargs="?", const=True, default=False, metavar="auto",
                     help="continue from OUTPUT_DIR/last.pt exactly; `--resume auto`: if there is one, else start "
                          "(what a worker restarted by torchrun --max-restarts does)")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in OUTPUT_DIR")
    p.add_argument("--device", default="auto", type=_device, help="auto | cpu | cuda")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.base_lr=0.02")


def _add_eval_parser(commands) -> None:
    from .export.runtimes import EXPORTED_BACKENDS

    p = commands.add_parser("eval", help="COCO metrics of a checkpoint or an exported model on the config's "
                                         "validation set")
    p.add_argument("--weights", required=True, help="checkpoint (ours; convert others first), a zoo name "
                                                    "(retinanet zoo), or with --backend the exported model")
    p.add_argument("--backend", choices=["torch", *EXPORTED_BACKENDS], default="torch",
                   help="torch: a checkpoint; onnxruntime (.onnx) or openvino: the exported file you deploy, "
                        "with --config for the data (its classes must be the data's)")
    p.add_argument("--config", help="config for the data (default: the checkpoint's own); " + _config_help())
    p.add_argument("--output-dir", help="where metrics.json and detections.json go (default: a new folder "
                                        "eval_<weights>[_N] beside the weights)")
    p.add_argument("--device", default="auto", type=_device)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides; model.* ones apply to the checkpoint's model (e.g. "
                        "model.inference.score_threshold=0.01)")


def _add_predict_parser(commands) -> None:
    p = commands.add_parser("predict", help="detect objects in image files, folders or glob patterns")
    p.add_argument("--weights", required=True, help="checkpoint, zoo name (retinanet zoo) or, with --backend "
                                                    "onnxruntime, an exported .onnx; openvino: the IR's folder "
                                                    "or .xml")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders (searched recursively) or globs")
    p.add_argument("--output-dir", required=True, help="gets predictions.json and the images with boxes drawn")
    p.add_argument("--score-threshold", type=_score_threshold, help="in [0, 1]; default: the model's (0.05)")
    p.add_argument("--max-detections", type=_positive_int, metavar="N",
                   help="keep at most N detections per image (model.inference.detections_per_image; default: the "
                        "model's, 100): raise it for dense scenes")
    p.add_argument("--no-draw", action="store_true", help="write predictions.json only")
    p.add_argument("--max-pixels", type=_positive_int,
                   help="accept images up to this many pixels (Pillow's decompression-bomb limit; only for "
                        "files you trust)")
    p.add_argument("--tile", type=_positive_int, help="predict on overlapping tiles of this many pixels at full "
                                                       "resolution (large images; give the model's input size)")
    # the options below are None when not given, so that giving them without --tile is refused
    p.add_argument("--overlap", type=_fraction, help="with --tile: share of a tile that neighbours share (0.2)")
    p.add_argument("--merge", choices=["nms", "nmm"],
                   help="with --tile: merge tiles' detections by class-aware NMS (default), or greedy merging by "
                        "intersection over the smaller box (nmm: an object cut by a border comes out whole)")
    p.add_argument("--full-image", action="store_true", default=None,
                   help="with --tile: also predict the whole image resized")
    p.add_argument("--force-tiling", action="store_true", default=None,
                   help="with --tile: run a tiling refused otherwise (tiles smaller than the model's smallest "
                        "anchor, or an overlap making many times the tiles of overlap 0)")
    p.add_argument("--value-range", type=_value_range, metavar="LOW,HIGH",
                   help="with --tile: the values of a 16-bit or float image that map to black and white (e.g. "
                        "0,4095; --value-range=-1,1 for a negative LOW); default: the data's own range, as logged")
    p.add_argument("--batch-size", type=_positive_int, default=4,
                   help="images run together (4); images of one size run as one batch")
    p.add_argument("--resume", action="store_true",
                   help="skip the images that OUTPUT_DIR/parts holds, from a run stopped part way (under "
                        "torchrun each process predicts every N-th image; the parts are flushed every batch)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads (0: decode in the main thread)")
    p.add_argument("--save-txt", choices=["yolo", "csv"],
                   help="also one label file per image in OUTPUT_DIR/labels: YOLO txt or CSV rows")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: also predict each image (each tile) mirrored, and merge "
                        "(eval.tta.flip)")
    p.add_argument("--tta-sizes", type=_sizes, metavar="N[,N...]",
                   help="test-time augmentation: also predict at these input sizes, short sides as "
                        "model.input.test_min_size (eval.tta.sizes)")
    p.add_argument("--tta-merge", choices=["nms", "wbf"],
                   help="with --tta or --tta-sizes: merge the views by class-aware NMS (default) or weighted "
                        "box fusion (eval.tta.merge)")
    _add_speed_options(p)
    p.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"], default="torch",
                   help="onnxruntime / openvino: run the exported .onnx / OpenVINO IR given as --weights (no torch "
                        "needed; same outputs, no --tile)")
    p.add_argument("--device", default="auto", type=_device)


def _add_convert_parser(commands) -> None:
    p = commands.add_parser("convert", help="convert torchvision / detectron2 / PaddleDetection weights",
                            description=CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=["torchvision", "detectron2", "paddle"])
    p.add_argument("src", help="the source weights file")
    p.add_argument("dst", help="our checkpoint to write (never the source; an existing file only with --force)")
    p.add_argument("--num-classes", type=_positive_int,
                   help="keep backbone/FPN/heads but start a fresh N-class predictor")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--trust", action="store_true",
                   help="allow a full (code-executing) unpickle of SRC; only for files you trust")


def _add_demo_parser(commands) -> None:
    p = commands.add_parser("demo", help="generate a shapes dataset, train from scratch, evaluate, draw")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument("--minutes", type=_positive_minutes, help="train for this wall-clock budget instead of the fixed train.max_iter of configs/demo.yaml")
    p.add_argument("--num-train", type=_positive_int, default=8000)
    p.add_argument("--num-val", type=_positive_int, default=300)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in OUTPUT_DIR")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def _add_check_data_parser(commands) -> None:
    p = commands.add_parser("check-data", help="validate the config's datasets and print a report")
    p.add_argument("--config", required=True, help=_config_help())
    p.add_argument("--decode", action="store_true", help="also decode every image (slow, finds damaged files)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def _add_analyze_parser(commands) -> None:
    p = commands.add_parser("analyze", help="dataset statistics, anchor coverage and suggested anchors")
    p.add_argument("--config", required=True, help=_config_help())
    p.add_argument("--split", choices=["train", "val"], default="train")
    p.add_argument("--output-dir", default="analysis", help="gets report.json and the plots (default: analysis)")
    p.add_argument("--max-images", type=_positive_int, help="analyse a fixed random sample of this many images")
    p.add_argument("--no-plots", action="store_true", help="report.json and the console table only")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def _add_anchors_parser(commands) -> None:
    p = commands.add_parser("anchors", help="draw the anchors of one location and the anchor grid of a level")
    p.add_argument("--config", required=True, help=_config_help())
    p.add_argument("--image", help="draw over this image, resized as the network sees it (default: a blank canvas)")
    p.add_argument("--level", type=int, default=0, help="0 = P3 (stride 8), 1 = P4, ...")
    p.add_argument("--location", type=_point, help="x,y in image pixels (default: the centre)")
    p.add_argument("--output", required=True, help="PNG to write (never the --image)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def _add_assign_parser(commands) -> None:
    p = commands.add_parser("assign", help="draw one training image with the anchors the matcher assigns")
    p.add_argument("--config", required=True, help=_config_help())
    p.add_argument("--image-id", required=True, help="the image's id in the annotation file")
    p.add_argument("--split", choices=["train", "val"], default="train")
    p.add_argument("--output", required=True, help="PNG to write (outside the dataset's image folder)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def _add_export_parser(commands) -> None:
    p = commands.add_parser("export", help="export a checkpoint to ONNX or OpenVINO: uint8 images in, resized in "
                                           "the graph; detections out")
    p.add_argument("--weights", required=True, help="checkpoint to export, or a zoo name (retinanet zoo)")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx",
                   help="onnx: one .onnx file; openvino: an IR folder (model.xml, model.bin; pip install "
                        "'retinanet[openvino]')")
    p.add_argument("--output", required=True, help="the .onnx file to write, or the folder of the OpenVINO IR")
    p.add_argument("--height", type=_positive_int, help="height of the images a fixed-shape graph takes (default: "
                                                         "the model's test size)")
    p.add_argument("--width", type=_positive_int, help="width of those images (default: the model's max size)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size of a fixed-shape graph (1)")
    p.add_argument("--max-detections", type=_positive_int, metavar="N",
                   help="the graph keeps at most N detections per image (model.inference.detections_per_image; "
                        "default: the checkpoint's)")
    p.add_argument("--dynamic", action="store_true", help="images of any size and batches of any size (a batch holds "
                                                          "images of one size)")
    p.add_argument("--opset", type=_positive_int, default=17)
    p.add_argument("--no-postprocess", action="store_true",
                   help="raw per-level class logits, box deltas and anchors (and the resized size), for your own "
                        "NMS")
    p.add_argument("--simplify", action="store_true", help="fold constants with onnxsim when it is installed")
    p.add_argument("--int8", action="store_true",
                   help="openvino: quantize to INT8 with NNCF, calibrated on --calibration's images (the pre- and "
                        "post-processing and the heads' last convolutions stay in floating point)")
    p.add_argument("--calibration", metavar="CONFIG",
                   help="with --int8: a config whose data (any data.format) gives the calibration images (its "
                        "training set, else its validation set); " + _config_help())
    p.add_argument("--calibration-images", type=_positive_int, default=300, metavar="N",
                   help="with --int8: how many images, spread over the set (300)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1 to 65535)")
    return value


def _add_serve_parser(commands) -> None:
    from .serve import DEFAULT_MAX_PIXELS

    p = commands.add_parser("serve", help="an HTTP service: POST /predict, GET /health, GET /info")
    p.add_argument("--weights", required=True, help="a checkpoint, a zoo name (retinanet zoo), an exported .onnx "
                                                    "(onnxruntime) or, with --backend openvino, an IR's folder "
                                                    "or .xml")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"],
                   help="the runtime (default: onnxruntime for a .onnx, else torch)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-bytes", type=_positive_int, default=20 * 1024 * 1024,
                   help="largest request body accepted (default 20 MiB)")
    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest image accepted, in pixels, known from its header before decoding: larger "
                        f"ones get HTTP 413 (default {DEFAULT_MAX_PIXELS:,}; what one request may cost in memory "
                        "grows with it)")
    p.add_argument("--max-detections", type=_positive_int, metavar="N",
                   help="a checkpoint gives at most N detections per image (model.inference.detections_per_image; "
                        "default: its own)")
    p.add_argument("--max-batch", type=_positive_int, default=1,
                   help="run up to this many concurrent requests of one image size as one batch (default 1: "
                        "each alone, so an answer never depends on other traffic; more is faster on a GPU, "
                        "but scores can then differ in the fifth decimal)")
    p.add_argument("--device", default="auto", type=_device)
    _add_speed_options(p)


def _add_bench_parser(commands) -> None:
    p = commands.add_parser("bench", help="speed against torchvision's RetinaNet, side by side in one run")
    p.add_argument("--device", default="cpu", type=_device, help="cpu | cuda")
    p.add_argument("--quick", action="store_true", help="batch 1 at 800x1216 only, 2 repeats")
    p.add_argument("--only", default="", help="run only the cases whose name holds this text (e.g. inference)")
    p.add_argument("--output-dir", default="bench_output", help="gets bench.json and bench.png")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms at each new input size (both libraries)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="compiled cases: the networks of both libraries replay as CUDA graphs")
    p.add_argument("--append-results", metavar="MARKDOWN",
                   help="also append the markdown table to this file (a results log of your own)")


def _add_data_parser(commands) -> None:
    p = commands.add_parser("data", help="dataset tools: convert between COCO, CSV, VOC and YOLO")
    data_commands = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = data_commands.add_parser("convert", help="rewrite annotations in another format",
                                 description="Read annotations in one format and write them in another: "
                                             "COCO json (default) or YOLO txt labels.")
    p.add_argument("--from", dest="source_format", required=True, choices=["coco", "csv", "voc", "yolo"])
    p.add_argument("src", help="coco: json; csv: the CSV; voc: folder of XML; yolo: the images folder")
    p.add_argument("--images", help="image folder (coco, voc; csv: paths are relative to it, default the CSV's "
                                    "folder; yolo: SRC itself)")
    p.add_argument("--labels", help="yolo: labels folder (default: SRC with images -> labels)")
    p.add_argument("--classes", help="class list: YOLO data.yaml / classes.txt, or a classes CSV")
    p.add_argument("--to", dest="target_format", choices=["coco", "yolo"], default="coco")
    p.add_argument("--output", required=True, help="coco: the json to write; yolo: the labels folder to fill")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def _add_plot_parser(commands) -> None:
    p = commands.add_parser("plot", help="loss, learning-rate and AP curves of one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output folders (with metrics.jsonl)")
    p.add_argument("--output", default="training_curves.png", help="PNG to write")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")


def _add_zoo_parser(commands) -> None:
    commands.add_parser("zoo", help="list the published COCO RetinaNets that --weights accepts by name",
                        description="The published COCO RetinaNets. Every --weights (eval, predict, export, "
                                    "serve, train) takes a name below: the file is downloaded into torch's hub "
                                    "cache and converted on first use; with no network, put the file at the "
                                    "path the error names.")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


CONVERT_HELP = """Convert published RetinaNet weights into a retinanet checkpoint whose config reproduces
the source library's behaviour (anchors, input normalisation, P6 source, post-processing).

sources:
  torchvision   a state dict (.pth) of retinanet_resnet50_fpn or retinanet_resnet50_fpn_v2
  detectron2    a model-zoo .pkl (pickled dict with numpy arrays) or a .pth of the same keys
  paddle        a PaddleDetection .pdparams (pickled dict of numpy arrays)

Pickles are read with a restricted unpickler that only admits numpy arrays and plain
containers; anything else is refused unless you pass --trust."""


def _add_speed_options(p) -> None:
    """`--amp` and `--compile` of the commands that run a checkpoint for inference."""
    p.add_argument("--amp", choices=["none", "auto", "bf16", "fp16"], default="none",
                   help="autocast precision (checkpoints): none = fp32 (default); auto = bf16 on GPUs and "
                        "CPUs with native bf16, fp32 elsewhere")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network and NMS (checkpoints; on a CPU with the weights frozen "
                        "in): pays over many images of few sizes (each new input size waits for the compiler)")


def _resolved_amp(amp: str, device) -> str:
    """`--amp` resolved for `device` (`resolve_amp`), said on stderr unless it is the default."""
    from .engine.precision import resolve_amp

    resolved, why = resolve_amp(amp, device)
    if amp != "none":
        print(f"precision: {'fp32' if resolved == 'none' else resolved} ({why})", file=sys.stderr)
    return resolved


def _add_augment_parser(commands) -> None:
    p = commands.add_parser("augment", help="draw training images as data.augment makes them, with their boxes")
    p.add_argument("--config", required=True, help=_config_help())
    p.add_argument("--output", required=True, help="folder for the pictures (refused if it exists and is not "
                                                   "empty, unless --force)")
    p.add_argument("--count", type=_positive_int, default=16, help="how many pictures (default: 16)")
    p.add_argument("--split", choices=["train", "val"], default="train")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUTPUT (replacing its pictures)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def _known_errors():
    from .checkpoint import CheckpointError
    from .convert.common import ConversionError
    from .data.coco import DatasetError
    from .data.image_io import ImageReadError
    from .engine.distributed import DeviceError
    from .engine.train import TrainingError
    from .export.runtimes import ExportedModelError
    from .model.config import ConfigError
    from .outputs import OutputNotWritten, OutputRefused
    from .zoo import ZooError

    return (CheckpointError, ConfigError, DatasetError, ImageReadError, FileNotFoundError, ConversionError,
            TrainingError, DeviceError, OutputError, ZooError, OutputRefused, OutputNotWritten, ExportedModelError)


def _kept_note(command: str, err: BaseException) -> str:
    """What a failed write of `train` left intact (checkpoints are written atomically)."""
    from .outputs import OutputNotWritten, UnwritableFolder, disk_failure

    if isinstance(err, UnwritableFolder):  # refused before any work
        return ""
    if command == "train" and (isinstance(err, OutputNotWritten) or disk_failure(err) is not None):
        return ("; the checkpoints written before are intact: free space, then `retinanet train --resume` "
                "continues from the last one")
    return ""


class OutputError(ValueError):
    """An output path cannot be used (e.g. it is an existing file where a folder is needed)."""


def _output_folder(path: str | Path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: --output-dir is an existing file, not a folder")
    return path


def _unique_folder(base: Path) -> Path:
    """`base`, or `base_2`, `base_3`, ... : the first that does not exist yet."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}_{n}")
    return candidate


def _resolve_weights(args) -> None:
    """`--weights` as a model-zoo name becomes its cached checkpoint (downloaded and converted on
    first use); a file stays itself."""
    from .zoo import resolve_weights

    args.weights = str(resolve_weights(args.weights))


def cmd_train(args) -> int:
    from .config import load_config
    from .engine.train import train

    _resume_value(args)
    if args.weights and args.resume is True:
        raise OutputError("--weights starts a new run from a detector, --resume continues the run in the output "
                          "folder: give one of them")
    if not (args.config or args.weights):
        raise OutputError("train needs --config (a recipe), --weights (a detector to fine-tune), or both")
    start = None
    if args.weights:
        from .engine.finetune import finetune_config

        cfg, start = finetune_config(args.config, args.weights, args.overrides, trust=args.trust)
    else:
        cfg = load_config(args.config, args.overrides)
    summary = train(cfg, args.output_dir, resume=args.resume, device=args.device, overwrite=args.overwrite,
                    start=start, trust_weights=args.trust)
    return 128 + int(summary["signal"]) if summary["status"] == "interrupted" else 0  # 130 SIGINT, 143 SIGTERM


def _resume_value(args) -> None:
    """`--resume` takes an optional `auto`; a KEY=VALUE that argparse took for its value is an override."""
    if args.resume in (True, False, "auto"):
        return
    if "=" not in args.resume:
        raise OutputError(f"--resume {args.resume}: --resume takes no value, or auto")
    args.overrides.insert(0, args.resume)
    args.resume = True


def cmd_eval(args) -> int:
    from .engine.evaluate import evaluate_weights

    output_dir = (_output_folder(args.output_dir) if args.output_dir  # a zoo name: ./<publisher>/eval_<model>
                  else _unique_folder(Path(args.weights).parent / f"eval_{Path(args.weights).stem}"))
    metrics = evaluate_weights(args.weights, output_dir, args.config, args.overrides, args.backend, args.device)
    if metrics is not None:
        _print_eval(metrics, output_dir)
    return 0


def _print_eval(metrics: dict, output_dir: Path) -> None:
    print(f"AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}  AP75 {metrics['AP75']:.4f}  "
          f"-> {output_dir / 'metrics.json'}")


def cmd_predict(args) -> int:
    from PIL import Image

    _tiling_options(args)
    if args.max_pixels:
        Image.MAX_IMAGE_PIXELS = args.max_pixels
    if args.backend != "torch":
        predictions, errors = _predict_exported(args)
    else:
        from .engine import distributed

        info = distributed.setup(args.device, distributed.LONG_WAIT)  # under torchrun: the images' sharing
        try:
            predictions, errors = _predict_torch(args, info)
        finally:
            distributed.cleanup()
        if not info.is_main:
            return 1 if errors else 0
    images = len({p["file_name"] for p in predictions})
    print(f"{len(predictions)} detections in {images} image(s) with detections ({args.backend}) -> "
          f"{Path(args.output_dir) / 'predictions.json'}"
          + (f"; {len(errors)} input(s) could not be used" if errors else ""))
    return 1 if errors else 0


def _predict_torch(args, info) -> tuple[list[dict], list[str]]:
    from .engine.predict import predict_checkpoint

    tiling = None
    if args.tile:
        tiling = {"tile": args.tile, "overlap": args.overlap, "merge": args.merge, "full_image": args.full_image,
                  "value_range": args.value_range, "force": args.force_tiling}
    return predict_checkpoint(args.weights, args.images, _output_folder(args.output_dir), info,
                              amp=_resolved_amp(args.amp, info.device), compile=args.compile,
                              score_threshold=args.score_threshold, max_detections=args.max_detections,
                              draw=not args.no_draw, batch_size=args.batch_size, workers=max(0, args.workers),
                              save_txt=args.save_txt, tiling=tiling, tta=_tta_config(args), resume=args.resume)


def _tta_config(args):
    """predict's --tta, --tta-sizes and --tta-merge as the `eval.tta` setting (`TTAConfig`);
    --tta-merge alone is refused (there would be nothing to merge)."""
    from .config import TTAConfig, config_from_dict

    if args.tta_merge and not (args.tta or args.tta_sizes):
        raise OutputError("--tta-merge merges the views of test-time augmentation: add --tta or --tta-sizes, "
                          "or leave it out")
    return config_from_dict(TTAConfig, {"flip": args.tta, "sizes": args.tta_sizes or [],
                                        "merge": args.tta_merge or "nms"})


TILING_DEFAULTS = {"overlap": 0.2, "merge": "nms", "full_image": False, "force_tiling": False}


def _tiling_options(args) -> None:
    """Refuse predict's tiling options given without --tile (they would be ignored), then
    fill in their defaults."""
    given = [f"--{name.replace('_', '-')}" for name in [*TILING_DEFAULTS, "value_range"]
             if getattr(args, name) is not None]
    if given and not args.tile:
        raise OutputError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to prediction on tiles: "
                          "add --tile N (e.g. the model's input size), or leave "
                          f"{'it' if len(given) == 1 else 'them'} out")
    for name, default in TILING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _predict_exported(args) -> tuple[list[dict], list[str]]:
    """The shared prediction loop (`engine.prediction_files`) with an exported model under
    its runtime (`export.runtimes.open_exported`): no torch is imported."""
    from .engine.prediction_files import predict_exported

    if args.compile or args.amp != "none":
        raise OutputError("--compile and --amp apply to a checkpoint; an exported model runs as it was exported")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise OutputError("a prediction shared by processes (torchrun) runs with the torch backend, whose process "
                          "group they wait for: predict with the checkpoint, or with one process per output folder")
    if args.tile:
        raise OutputError("--tile runs with the torch backend only: predict on tiles with the checkpoint")
    if args.tta or args.tta_sizes or args.tta_merge:
        raise OutputError("--tta, --tta-sizes and --tta-merge run with the torch backend only: an ONNX model runs "
                          "as it was exported")
    return predict_exported(args.backend, args.weights, args.images, _output_folder(args.output_dir),
                            score_threshold=args.score_threshold, max_detections=args.max_detections,
                            draw=not args.no_draw, batch_size=args.batch_size, workers=max(0, args.workers),
                            save_txt=args.save_txt, resume=args.resume)


def cmd_bench(args) -> int:
    from .engine.bench import markdown_table, run_bench

    results = run_bench(args.device, args.quick, args.output_dir, args.only, args.cudnn_benchmark, args.cuda_graphs)
    flags = [f"--device {args.device}"] + (["--quick"] if args.quick else []) + (
        [f"--only '{args.only}'"] if args.only else []) + (["--cudnn-benchmark"] if args.cudnn_benchmark else []) + (
        ["--cuda-graphs"] if args.cuda_graphs else [])
    table = markdown_table(results, "retinanet bench " + " ".join(flags))
    print(table)
    if args.append_results:
        with open(args.append_results, "a") as f:
            f.write("\n" + table)
    return 0


def cmd_serve(args) -> int:
    backend = args.backend or ("onnxruntime" if args.weights.endswith(".onnx") else "torch")
    if backend == "torch":
        _resolve_weights(args)
    weights = Path(args.weights)
    if not (weights.is_file() if backend == "torch" else weights.exists()):
        raise OutputError(f"{weights}: no such checkpoint or exported model")
    import socket

    from .serve import Predictor, serve

    if backend != "torch" and (args.compile or args.amp != "none"):
        kind = "an ONNX" if backend == "onnxruntime" else "an OpenVINO"
        raise OutputError(f"--compile and --amp apply to a checkpoint; {kind} model runs as it was exported")
    if backend != "torch" and args.max_detections:
        raise OutputError(f"--max-detections applies to a checkpoint; an exported graph holds its cap: export it again "
                          f"with --max-detections {args.max_detections}")
    try:  # before loading the model: a busy port or an unknown host is known at once
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as err:
        raise OutputError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err})") from None
    if backend != "torch":
        predictor = Predictor(weights, backend=backend)  # a load failure is one line (ExportedModelError)
    else:
        from .engine.distributed import resolve_device

        resolved = resolve_device(args.device)
        predictor = Predictor(weights, str(resolved), _resolved_amp(args.amp, resolved), args.compile,
                              max_detections=args.max_detections)
    serve(predictor, args.host, args.port, args.max_bytes, args.max_batch, args.max_pixels)
    return 0


def cmd_export(args) -> int:
    from .export.exporter import export_checkpoint

    if args.format == "openvino":
        if args.no_postprocess or args.simplify:
            raise OutputError("--no-postprocess and --simplify apply to --format onnx; the OpenVINO IR holds the "
                              "whole detector")
        if args.int8 != bool(args.calibration):
            raise OutputError("--int8 needs --calibration CONFIG (the images it is calibrated on), and "
                              "--calibration applies to --int8 only")
        if Path(args.output).exists() and not Path(args.output).is_dir():
            raise OutputError(f"{args.output}: --output of --format openvino is the folder of the IR, and this is "
                              "a file")
    elif args.int8 or args.calibration:
        raise OutputError("--int8 and --calibration quantize an OpenVINO export: add --format openvino")
    try:
        print(export_checkpoint(args.weights, args.output, format=args.format, height=args.height, width=args.width,
                                batch=args.batch, dynamic=args.dynamic, opset=args.opset,
                                postprocess=not args.no_postprocess, simplify=args.simplify,
                                max_detections=args.max_detections, calibration=args.calibration,
                                calibration_count=args.calibration_images, force=args.force))
    except ImportError as err:
        from .export.openvino import MissingOpenVino

        if not isinstance(err, MissingOpenVino):
            raise
        raise OutputError(str(err)) from None  # its one line says how to get the extra
    return 0


def cmd_zoo(args) -> int:
    from .zoo import format_table

    print(format_table())
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_file

    config = convert_file(args.source, args.src, args.dst, num_classes=args.num_classes, trust=args.trust,
                          force=args.force)
    print(f"wrote {args.dst} ({config.num_classes} classes, ResNet-{config.backbone.depth}, from {args.source})")
    return 0


def cmd_demo(args) -> int:
    from .engine.demo import run_demo

    _output_folder(args.output_dir)
    result = run_demo(args.output_dir, args.minutes, args.overrides, args.num_train, args.num_val, args.overwrite)
    if result["status"] == "interrupted":
        print(f"demo interrupted at iteration {result['iterations']}", file=sys.stderr)
        return 128 + int(result["signal"])
    return 0


def cmd_check_data(args) -> int:
    from .config import load_config, sets_model
    from .data.check import check_datasets

    cfg = load_config(args.config, args.overrides)
    # a fine-tuning recipe's model comes from its weights, whose classes become the data's
    classes = cfg.model.num_classes if sets_model(args.config) else None
    ok = check_datasets(cfg.data, classes, decode=args.decode)
    return 0 if ok else 1


def cmd_analyze(args) -> int:
    from .config import load_config
    from .engine.analyze import analyze, format_report

    cfg = load_config(args.config, args.overrides)
    report = analyze(cfg, args.split, _output_folder(args.output_dir), args.max_images or 0, plots=not args.no_plots)
    print(format_report(report))
    print(f"-> {Path(args.output_dir) / 'report.json'}")
    return 0


def _config_file(config: str) -> tuple[str, ...]:
    """The `--config` file among a command's inputs (a shipped config's name is no file here)."""
    return (config,) if Path(config).is_file() else ()


def cmd_anchors(args) -> int:
    from .config import load_config
    from .engine.analyze import anchors_view

    cfg = load_config(args.config, args.overrides)
    try:
        path = anchors_view(cfg, args.output, args.image, args.level, args.location, args.force,
                            _config_file(args.config))
    except ValueError as err:
        raise OutputError(str(err)) from None
    print(f"-> {path}")
    return 0


def cmd_assign(args) -> int:
    from .config import load_config
    from .engine.analyze import assign_view

    cfg = load_config(args.config, args.overrides)
    summary = assign_view(cfg, args.image_id, args.output, args.split, args.force, _config_file(args.config))
    print(f"{summary['boxes']} boxes ({summary['uncovered']} uncovered, drawn red), "
          f"{summary['positive_anchors']} positive and {summary['ignored_anchors']} ignored anchors; "
          f"positives per box {summary['positives_per_box']} -> {args.output}")
    return 0


def cmd_data(args) -> int:
    from .config import DataConfig
    from .data.dataset import DatasetError
    from .data.formats import open_dataset, write_coco, write_yolo

    output = Path(args.output)
    if (output.exists() or output.is_symlink()) and not args.force:
        raise OutputError(f"{output}: already exists; pass --force to replace it")
    src = Path(args.src)
    images = args.images or (str(src) if args.source_format == "yolo" else "")
    annotations = args.labels or "" if args.source_format == "yolo" else str(src)
    cfg = DataConfig(format=args.source_format, train_images=images, train_annotations=annotations,
                     classes=args.classes or "")
    if args.source_format == "coco" and not images:
        cfg.train_images = str(src.parent)
    dataset = open_dataset(cfg, "train")
    if not dataset.records:
        raise DatasetError(f"{dataset.annotation_file}: no images to convert (none listed, or none of those "
                           "listed could be read); nothing was written")
    inputs = [src, dataset.annotation_file, args.classes or ""]
    if args.images or args.source_format != "voc":  # VOC's image folder is only known when given
        inputs.append(dataset.image_dir)
    if args.target_format == "coco":
        write_coco(dataset, output, inputs)
        print(f"wrote {output}: {len(dataset)} images, {dataset.report.num_boxes} boxes, "
              f"{dataset.num_classes} classes (image folder: {dataset.image_dir})")
    else:
        labels, classes = write_yolo(dataset, output, inputs)
        print(f"wrote {len(dataset)} label files into {labels} and the class list {classes}")
    return 0


def cmd_plot(args) -> int:
    from .analysis.plots import plot_runs
    from .outputs import check_output_file, check_writable

    runs = [Path(r) for r in args.runs]
    missing = [str(r) for r in runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        raise OutputError(f"{', '.join(missing)}: no metrics.jsonl (not a training output folder)")
    output = check_output_file(args.output, [r / "metrics.jsonl" for r in runs], args.force)
    check_writable(output.parent)
    print(f"-> {plot_runs(runs, output)}")
    return 0


def cmd_augment(args) -> int:
    from .config import load_config
    from .engine.augment import draw_augmented

    cfg = load_config(args.config, args.overrides)
    written = draw_augmented(cfg, args.output, args.count, args.split, args.force, _config_file(args.config))
    print(f"{len(written)} pictures (trained boxes by class, ignored regions in white) and augment.json "
          f"-> {args.output}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "convert": cmd_convert,
            "demo": cmd_demo, "check-data": cmd_check_data, "analyze": cmd_analyze, "anchors": cmd_anchors,
            "assign": cmd_assign, "plot": cmd_plot, "data": cmd_data, "export": cmd_export,
            "serve": cmd_serve, "bench": cmd_bench, "zoo": cmd_zoo, "augment": cmd_augment}


if __name__ == "__main__":
    sys.exit(main())
