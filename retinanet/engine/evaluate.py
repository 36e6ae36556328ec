"""COCO evaluation: run the detector over a dataset and score it with pycocotools."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from ..data.dataset import DatasetError, DetectionDataset, coco_api, collate
from ..data.image_io import ImageReadError
from ..data.raster import open_raster
from ..model.config import ConfigError
from ..analysis.threshold_metrics import format_threshold_line, images_from_results, threshold_metrics
from ..outputs import write_text
from . import distributed
from .precision import autocast
from .prediction_files import cap_note, detection_cap, images_at_cap
from .tiling import check_tile_config, predict_tiled
from .tta import build_tta

log = logging.getLogger(__name__)

SUMMARY_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def is_torch_model(model) -> bool:
    """Whether `model` is a PyTorch module (else a backend of the `engine.prediction_files`
    protocol, such as an exported model under its runtime)."""
    return isinstance(model, torch.nn.Module)


def check_categories(model, dataset: DetectionDataset) -> None:
    """Stop when the model's categories are not the dataset's: every dataset category id
    must be one of the model's, under the same name (when the model has names: a checkpoint
    whose config names its classes; a backend whose names are not the labels' numbers, as an
    exported model's metadata has them)."""
    names = dict(zip(model.category_ids, model.class_names))
    if is_torch_model(model):
        named = bool(model.config is not None and model.config.class_names)
    else:
        named = model.class_names != [str(i) for i in range(len(model.class_names))]
    whose = "the model's" if is_torch_model(model) else f"{getattr(model, 'path', 'the model')}'s"
    problems = []
    for cid, name in zip(dataset.category_ids, dataset.class_names):
        if cid not in names:
            problems.append(f"id {cid} ({name}) is not among the model's")
        elif named and names[cid].strip().lower() != name.strip().lower():
            problems.append(f"id {cid} is {name!r} in the data but {names[cid]!r} in the model")
    if problems:
        raise DatasetError(
            f"{dataset.annotation_file}: its categories do not match {whose} "
            f"({len(model.category_ids)} classes, ids {_span(model.category_ids)}): " + "; ".join(problems[:4])
            + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            + ". Evaluate with the dataset the model was trained for, or fine-tune it on this one")


def _span(ids: list[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else str(ids[:8])


@torch.inference_mode()
def predict_dataset(model, dataset: DetectionDataset, batch_size: int = 8, num_workers: int = 0,
                    max_images: int = 0, amp: str = "none", tile=None,
                    value_range: list[float] | None = None, tta=None) -> tuple[list[dict], list[str]]:
    """Detections for this process's share of `dataset` in COCO results format
    (`image_id`, `category_id`, `bbox` [x, y, w, h], `score`), and the skipped images.
    `amp` is the run's `train.amp`: evaluation runs in the precision training used. With a
    `tile` config of size > 0, each image is predicted on tiles (`engine.tiling`), read window
    by window as `predict` reads it, so that memory does not grow with the image. `tta`: a
    `TestTimeAugmentation` (`engine.tta.build_tta`) that predicts each image (each tile) in
    several views and merges them; None: each image as it is. A `model`
    that is not a torch module is a backend (`is_torch_model`): it runs as it is, without
    `amp` or tiles (`_predict_backend`)."""
    rank = torch.distributed.get_rank() if distributed.is_distributed() else 0
    world = torch.distributed.get_world_size() if distributed.is_distributed() else 1
    count = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    indices = list(range(rank, count, world))
    if not is_torch_model(model):
        return _predict_backend(model, dataset, indices, batch_size, num_workers)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast(amp, device.type):
            if tile is not None and tile.size > 0:
                return _predict_tiles(model, dataset, indices, tile, batch_size, value_range, tta)
            return _predict_batches(model, dataset, indices, batch_size, num_workers, device, tta)
    finally:
        model.train(was_training)


def drop_unresizable(preprocessor, images: list, targets: list[dict],
                     min_size: int | None = None) -> tuple[list, list[dict], list[str]]:
    """The images (and their targets) the model can resize to `min_size` (default its test
    size), and a line naming each of the others by image id: those so elongated that a side
    would be 0 px (`Preprocessor.check_size`)."""
    kept, dropped = [], []
    for image, target in zip(images, targets):
        try:
            preprocessor.check_size(tuple(image.shape[-2:]), min_size, f"image id {target['image_id']}")
            kept.append((image, target))
        except ValueError as err:
            dropped.append(str(err))
    return [i for i, _ in kept], [t for _, t in kept], dropped


def _predict_batches(model, dataset: DetectionDataset, indices: list[int], batch_size: int, num_workers: int,
                     device: torch.device, tta=None) -> tuple[list[dict], list[str]]:
    """Whole images, decoded by `num_workers` DataLoader processes, in batches."""
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate)
    category_ids = model.category_ids  # the model's own label -> category id mapping
    results, skipped = [], []
    for images, targets, bad in loader:
        images, targets, too_elongated = drop_unresizable(model.preprocessor, images, targets)
        skipped.extend(bad + too_elongated)
        if not images:
            continue
        images = [im.to(device, non_blocking=True) for im in images]
        outputs = model(images) if tta is None else tta(model, images)
        for target, output in zip(targets, outputs):
            results.extend(to_coco_results(output, target["image_id"], category_ids))
    return results, skipped


def _predict_backend(backend, dataset: DetectionDataset, indices: list[int], batch_size: int,
                     num_workers: int) -> tuple[list[dict], list[str]]:
    """Whole images through a backend of the `engine.prediction_files` protocol (an exported
    model under its runtime), decoded by `num_workers` DataLoader processes, in batches that
    the backend splits by image size. An image it refuses (`check_size`) is skipped, named,
    as `drop_unresizable` skips those the torch model cannot resize."""
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate)
    results, skipped = [], []
    for images, targets, bad in loader:
        skipped.extend(bad)
        arrays, kept = [], []
        for image, target in zip(images, targets):
            try:
                backend.check_size(*image.shape[-2:], name=f"image id {target['image_id']}")
            except ValueError as err:
                skipped.append(str(err))
                continue
            arrays.append(image.permute(1, 2, 0).numpy())
            kept.append(target)
        if not arrays:
            continue
        for target, output in zip(kept, backend.predict(arrays)):
            results.extend(to_coco_results(output, target["image_id"], backend.category_ids))
    return results, skipped


def _predict_tiles(model, dataset: DetectionDataset, indices: list[int], tile, batch_size: int,
                   value_range: list[float] | None = None, tta=None) -> tuple[list[dict], list[str]]:
    """On tiles, one image at a time, opened by `open_raster` (a TIFF or an image over 64 MP
    by windows), never decoded whole unless it is small."""
    results, skipped = [], []
    for index in indices:
        record = dataset.records[index]
        try:
            with open_raster(dataset.image_dir / record.file_name, value_range=value_range) as raster:
                output = predict_tiled(model, raster, tile.size, tile.overlap, batch_size, tile.merge,
                                       max_detections=model.postprocessor.detections_per_image, tta=tta)
        except ImageReadError as err:
            log.warning("skipping %s", err)
            skipped.append(str(err))
            continue
        results.extend(to_coco_results(output, record.image_id, model.category_ids))
    return results, skipped


def box_count(record) -> int:
    """The boxes of an `ImageRecord` that can be evaluated or trained on (crowd regions aside)."""
    return len(record.boxes) - sum(record.crowd)


def to_coco_results(output: dict, image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's detections (`boxes` xyxy, `scores`, `labels`: tensors or numpy arrays) as
    COCO results, the box rounded to 0.001 px and the score to 1e-5."""
    boxes = torch.as_tensor(output["boxes"]).float().cpu().reshape(-1, 4)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = torch.as_tensor(output["scores"]).float().cpu().tolist()
    labels = torch.as_tensor(output["labels"]).cpu().tolist()
    return [
        {"image_id": image_id, "category_id": category_ids[label], "bbox": [round(v, 3) for v in box],
         "score": round(score, 5)}
        for box, score, label in zip(xywh, scores, labels)
    ]


COCO_BACKENDS = ("auto", "pycocotools", "faster-coco-eval")


def coco_classes(name: str = "auto") -> tuple[type, type]:
    """`(COCO, COCOeval)` of an `eval.coco_backend`: faster-coco-eval's (the same numbers as
    pycocotools, computed in C++) where `name` is "faster-coco-eval", or "auto" and it is
    installed; pycocotools' otherwise. Asking for faster-coco-eval without it is a `ConfigError`."""
    if name not in COCO_BACKENDS:
        raise ConfigError(f"eval.coco_backend: {name!r} is not one of {', '.join(COCO_BACKENDS)}")
    if name != "pycocotools":
        try:
            from faster_coco_eval import COCO as FasterCOCO
            from faster_coco_eval import COCOeval_faster
        except ImportError:
            if name == "faster-coco-eval":
                raise ConfigError("eval.coco_backend: faster-coco-eval is not installed "
                                  "(pip install faster-coco-eval)") from None
        else:
            return FasterCOCO, functools.partial(COCOeval_faster, print_function=print)
    return COCO, COCOeval


def _as_backend(gt, coco_class: type):
    """`gt` as an instance of the backend's COCO class (the same annotation dict, indexed)."""
    if isinstance(gt, coco_class):
        return gt
    converted = coco_class()
    converted.dataset = gt.dataset
    with contextlib.redirect_stdout(io.StringIO()):
        converted.createIndex()
    return converted


def coco_metrics(gt: COCO, results: list[dict], image_ids: list[int] | None = None,
                 class_names: list[str] | None = None, verbose: bool = True, return_precision: bool = False,
                 backend: str = "auto"):
    """COCO box metrics: the 12 summary numbers (fractions in [0, 1]), per-class AP and the
    error breakdown; with `return_precision`, also COCOeval's precision array (for plots).
    `backend`: the `eval.coco_backend` that computes them (`coco_classes`)."""
    coco_class, evaluator_class = coco_classes(backend)
    if not results:
        log.warning("no detections: every metric is 0")
        metrics = {k: 0.0 for k in SUMMARY_KEYS}
        metrics["per_class_AP"] = {name: 0.0 for name in (class_names or [])}
        metrics["error_breakdown"] = None
        return (metrics, None) if return_precision else metrics
    gt = _as_backend(gt, coco_class)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
    evaluator = evaluator_class(gt, dt, "bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(image_ids)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if verbose:
        print(out.getvalue().rstrip())
    metrics = {k: float(v) for k, v in zip(SUMMARY_KEYS, evaluator.stats)}
    precision = evaluator.eval["precision"]  # (iou, recall, class, area, max dets)
    cat_ids = evaluator.params.catIds
    names = class_names or [gt.cats[c].get("name", str(c)) for c in cat_ids]
    per_class = {}
    for k, name in enumerate(names[: len(cat_ids)]):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[name] = float(p.mean()) if p.size else None  # no ground truth of this class
    metrics["per_class_AP"] = per_class
    metrics["error_breakdown"] = error_breakdown(gt, dt, evaluator, evaluator_class)
    return (metrics, precision) if return_precision else metrics


def agreement_ap(reference: list[dict], candidate: list[dict], min_score: float = 0.0) -> float:
    """How far one runtime's detections agree with another's on the same images: the COCO AP
    of `candidate` with `reference`'s detections scored >= `min_score` taken as ground truth
    (1.0 when they are the same boxes and labels; nan when the reference has none). Both are
    lists with one dict per image of `boxes` (N, 4) xyxy, `scores` (N,), `labels` (N,)
    (numpy arrays or tensors), in the same image order."""
    reference = [{k: np.asarray(v)[np.asarray(r["scores"]) >= min_score] for k, v in r.items()} for r in reference]
    labels = {int(label) for image in (*reference, *candidate) for label in np.asarray(image["labels"])}
    same = range(max(labels, default=0) + 1)  # a label is its own category id
    annotations, results = [], []
    for image_id, (truth, got) in enumerate(zip(reference, candidate, strict=True)):
        annotations += [{**record, "id": len(annotations) + k + 1, "area": record["bbox"][2] * record["bbox"][3],
                         "iscrowd": 0} for k, record in enumerate(to_coco_results(truth, image_id, same))]
        results += to_coco_results(got, image_id, same)
    if not annotations:
        return float("nan")
    gt = coco_api({"images": [{"id": i, "width": 1, "height": 1} for i in range(len(reference))],
                   "annotations": annotations, "categories": [{"id": c, "name": str(c)} for c in sorted(labels)]})
    return coco_metrics(gt, results, verbose=False, backend="pycocotools")["AP"]


def error_breakdown(gt: COCO, dt, evaluator: COCOeval, evaluator_class=COCOeval) -> dict:
    """The COCO analysis tool's cumulative precisions (area all, 100 detections): `C75` and
    `C50` (AP at those IoUs), `Loc` (IoU 0.1: localisation errors forgiven), `Oth` (also class
    confusions forgiven: class-agnostic), `BG` (also background detections removed: the
    recall reached), `FN` (everything found: 1). The gaps are what each kind of error costs."""
    def run(iou: float, use_cats: bool) -> COCOeval:
        e = evaluator_class(gt, dt, "bbox")
        e.params.imgIds = evaluator.params.imgIds
        e.params.iouThrs = np.array([iou])
        e.params.useCats = int(use_cats)
        with contextlib.redirect_stdout(io.StringIO()):
            e.evaluate()
            e.accumulate()
        return e

    def mean_precision(e: COCOeval) -> float:
        p = e.eval["precision"][0, :, :, 0, -1]
        p = p[p > -1]
        return float(p.mean()) if p.size else 0.0

    precision = evaluator.eval["precision"]
    c75, c50 = (float(np.mean(v[v > -1])) if (v > -1).any() else 0.0
                for v in (precision[5, :, :, 0, -1], precision[0, :, :, 0, -1]))
    loc = mean_precision(run(0.1, True))
    agnostic = run(0.1, False)
    oth = mean_precision(agnostic)
    recall = float(agnostic.eval["recall"][0, 0, 0, -1])
    bg = (np.floor(max(recall, 0.0) * 100) + 1) / 101 if recall > 0 else 0.0
    levels = {"C75": c75, "C50": c50, "Loc": loc, "Oth": oth, "BG": float(bg), "FN": 1.0}
    levels = {k: round(v, 4) for k, v in levels.items()}
    levels["costs"] = {"localisation": round(levels["Loc"] - levels["C50"], 4),
                       "confusion": round(levels["Oth"] - levels["Loc"], 4),
                       "background": round(levels["BG"] - levels["Oth"], 4),
                       "missed": round(levels["FN"] - levels["BG"], 4)}
    return levels


def load_coco_ground_truth(path: str | Path) -> COCO:
    """pycocotools' COCO for a COCO json file, with the `iscrowd`/`area` fields it needs filled in."""
    return coco_api(json.loads(Path(path).read_text()))


def format_per_class_table(per_class: dict[str, float], columns: int = 3) -> str:
    cells = [f"{name[:20]:<20} {100 * ap:6.2f}" if ap is not None else f"{name[:20]:<20} {'n/a':>6}"
             for name, ap in per_class.items()]
    header = " | ".join([f"{'category':<20} {'AP':>6}"] * min(columns, len(cells)))
    rows = [" | ".join(cells[i : i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join([header, "-" * len(header)] + rows)


def evaluate(model, dataset: DetectionDataset, output_dir: str | Path | None = None, batch_size: int = 8,
             num_workers: int = 0, max_images: int = 0, verbose: bool = True, amp: str = "none",
             tile=None, value_range: list[float] | None = None, score_threshold: float = 0.5,
             iou_threshold: float = 0.5, coco_backend: str = "auto", tta=None) -> dict | None:
    """Evaluate on `dataset` (all processes take part); rank 0 gets the metrics and writes
    `metrics.json` and `detections.json` into `output_dir`. Other ranks get None. Beside COCO's
    metrics, `threshold_metrics` holds precision, recall, F1 and the confusion matrix of the
    detections scored >= `score_threshold`, matched at IoU >= `iou_threshold`. `model` is a
    RetinaNet or a backend of the `engine.prediction_files` protocol (an exported model under
    its runtime: `export.runtimes.open_exported`), which gives the same metrics.json. `tta`:
    an `eval.tta` config (`TTAConfig`); off (the default), images are predicted as they are. A
    dataset without images or without boxes (nothing to evaluate), whose categories are not
    the model's, or a `tile` config that `check_tile_config` refuses (any, for a backend), or
    test-time augmentation with a backend, is an error."""
    if len(dataset) == 0:
        raise DatasetError(f"{dataset.annotation_file}: the evaluation set has no images")
    count = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    if not any(box_count(dataset.records[i]) for i in range(count)):
        raise DatasetError(f"{dataset.annotation_file}: the evaluation set has no boxes in its {count} image(s) "
                           "(crowd regions aside): there is nothing to evaluate")
    check_categories(model, dataset)
    if not is_torch_model(model):
        if tile is not None and tile.size > 0:
            raise ConfigError("data.tile: tiled evaluation runs with a checkpoint only; an exported model takes "
                              "whole images (set data.tile.size=0)")
        if tta is not None and tta.enabled:
            raise ConfigError("eval.tta: test-time augmentation runs with a checkpoint only; an exported model "
                              "runs as it was exported (set eval.tta.flip=false eval.tta.sizes=[])")
        views = None
    else:
        if model.config is not None:
            check_tile_config(tile, model.config)
        views = build_tta(tta, model)
    coco_classes(coco_backend)  # a backend that is not installed stops here, before any prediction
    results, skipped = predict_dataset(model, dataset, batch_size, num_workers, max_images, amp, tile, value_range,
                                       views)
    gathered = distributed.all_gather_objects((results, skipped))
    if distributed.is_distributed() and torch.distributed.get_rank() != 0:
        return None
    results = [r for part, _ in gathered for r in part]
    skipped = [s for _, part in gathered for s in part]
    cap = detection_cap(model)
    note = cap_note(images_at_cap(results, "image_id", cap), cap,
                    getattr(model, "raise_cap", "the override model.inference.detections_per_image=N"))
    if note and verbose:
        print(note, file=sys.stderr)
    image_ids = [dataset.records[i].image_id for i in range(count)]
    gt = dataset.coco_ground_truth()
    metrics, precision = coco_metrics(gt, results, image_ids, dataset.class_names, verbose, return_precision=True,
                                      backend=coco_backend)
    metrics["num_images"] = count - len(skipped)
    metrics["skipped_images"] = skipped
    records = [dataset.records[i] for i in range(count)]
    metrics["threshold_metrics"] = threshold_metrics(images_from_results(records, results, dataset.category_ids),
                                                     dataset.class_names, score_threshold, iou_threshold)
    if verbose:
        print(format_per_class_table(metrics["per_class_AP"]))
        if metrics.get("error_breakdown"):
            costs = metrics["error_breakdown"]["costs"]
            print("AP50 lost to: " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()))
        print(format_threshold_line(metrics["threshold_metrics"]))
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics["plots"] = write_plots(metrics, precision, dataset.class_names, output_dir)
        write_text(output_dir / "detections.json", json.dumps(results))
        write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def write_plots(metrics: dict, precision, class_names: list[str], output_dir: Path) -> list[str]:
    """Per-class precision-recall curves, the error breakdown and the confusion matrix at the
    score threshold as PNGs (needs matplotlib)."""
    try:
        from ..analysis.plots import plot_confusion_matrix, plot_error_breakdown, plot_pr_curves

        paths = []
        if precision is not None and metrics.get("error_breakdown") is not None:
            paths += [plot_pr_curves(precision, class_names, output_dir / "pr_curves.png"),
                      plot_error_breakdown(metrics["error_breakdown"], output_dir / "error_breakdown.png")]
        if metrics.get("threshold_metrics"):
            paths.append(plot_confusion_matrix(metrics["threshold_metrics"], output_dir / "confusion_matrix.png"))
        return [str(p) for p in paths]
    except ImportError as err:
        log.info("no plots: %s", err)
        return []


def eval_config(checkpoint, config: str | Path | None, overrides: list[str]):
    """The config `retinanet eval` runs with: `config` with `overrides`, else the run config
    stored in the checkpoint (a converted one has only its model config) with them."""
    from ..config import Config, apply_overrides, config_from_dict, config_to_dict, load_config

    if config:
        return load_config(config, overrides)
    stored = checkpoint.run_config or {"model": config_to_dict(checkpoint.model_config)}
    return apply_overrides(config_from_dict(Config, stored), overrides)


def evaluate_weights(weights: str, output_dir: Path, config: str | Path | None = None, overrides: list[str] = (),
                     backend: str = "torch", device: str = "auto") -> dict | None:
    """`retinanet eval`: a checkpoint or zoo name (`backend="torch"`, on every process of a
    distributed run) or an exported model under its runtime (`export.runtimes`; `config` then
    names the data, and `model.*` overrides are refused: the graph runs as exported) on the
    config's validation set. Returns the metrics on the main process, None on the others."""
    from ..checkpoint import load_model, read_checkpoint
    from ..config import load_config
    from ..data.formats import open_dataset
    from ..zoo import resolve_weights
    from .precision import resolve_amp

    overrides = list(overrides)
    if backend != "torch":
        from ..export.runtimes import open_exported

        if not config:
            raise ConfigError(f"--backend {backend}: an exported model holds no data settings; pass --config "
                              "with the validation set")
        fixed = [o for o in overrides if o.startswith("model.")]
        if fixed:
            raise ConfigError(f"{fixed[0]}: model.* overrides apply to a checkpoint; an exported model runs as it "
                              "was exported")
        cfg = load_config(config, overrides)
        _require_val(cfg, "")
        detector = open_exported(backend, weights)
        return evaluate(detector, open_dataset(cfg.data, "val", detector.class_names), output_dir,
                        cfg.eval.batch_size, cfg.data.num_workers, cfg.eval.max_images, tile=cfg.data.tile,
                        score_threshold=cfg.eval.score_threshold, iou_threshold=cfg.eval.iou,
                        coco_backend=cfg.eval.coco_backend, tta=cfg.eval.tta)
    weights = str(resolve_weights(weights))
    cfg = eval_config(read_checkpoint(weights), config, overrides)
    _require_val(cfg, " (or pass --config)")
    info = distributed.setup(device)
    try:
        model_overrides = [o[len("model."):] for o in overrides if o.startswith("model.")]
        model = load_model(weights, info.device, model_overrides, compile=cfg.eval.compile)
        return evaluate(model, open_dataset(cfg.data, "val", model.class_names), output_dir,
                        max(1, cfg.eval.batch_size // info.world_size), cfg.data.num_workers, cfg.eval.max_images,
                        verbose=info.is_main, amp=resolve_amp(cfg.train.amp, info.device)[0], tile=cfg.data.tile,
                        value_range=cfg.data.value_range, score_threshold=cfg.eval.score_threshold,
                        iou_threshold=cfg.eval.iou, coco_backend=cfg.eval.coco_backend, tta=cfg.eval.tta)
    finally:
        distributed.cleanup()


def _require_val(cfg, hint: str) -> None:
    from ..data.formats import has_split

    if not has_split(cfg.data, "val"):
        raise ConfigError(f"no validation set: set data.val_images and data.val_annotations{hint}")
