"""`retinanet analyze`: dataset statistics, anchor coverage and suggested anchors.

Joins the data (boxes from the annotation file; no image is decoded) with the model's own
anchor generator, matcher and resizing rule (`retinanet.analysis`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..analysis.anchor_search import AnchorCandidate, search_anchors
from ..analysis.coverage import ImageBoxes, anchor_coverage, network_input_size, summarize
from ..config import Config
from ..data.dataset import DetectionDataset
from ..data.formats import has_split, open_dataset
from ..data.tiles import as_training_items
from ..model.build import build_matcher, build_preprocessor
from ..outputs import check_output_file, check_writable, save_image, write_text

log = logging.getLogger(__name__)

TARGET_UNCOVERED = 0.05  # the share of uncovered boxes above which the trainer warns


def image_boxes(dataset: DetectionDataset, max_images: int = 0, seed: int = 0) -> list[ImageBoxes]:
    """Ground truth of the dataset (or of a fixed random sample of `max_images` images)."""
    indices = list(range(len(dataset)))
    if 0 < max_images < len(indices):
        indices = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:max_images].tolist()
    out = []
    for i in indices:
        r = dataset.records[i]
        out.append(ImageBoxes(r.height, r.width, torch.tensor(r.boxes, dtype=torch.float32).reshape(-1, 4),
                              torch.tensor(r.labels, dtype=torch.long), torch.tensor(r.crowd, dtype=torch.bool)))
    return out


def resized_boxes(images: list[ImageBoxes], cfg: Config) -> torch.Tensor:
    """Every non-crowd box in network-input pixels `(N, 4)` (training sizes, round robin)."""
    pre = build_preprocessor(cfg.model.input)
    sizes = cfg.model.input.train_min_sizes
    out = []
    for i, image in enumerate(images):
        _, _, sy, sx = network_input_size(image.height, image.width, sizes[i % len(sizes)], pre)
        out.append(image.boxes[~image.crowd] * torch.tensor([sx, sy, sx, sy]))
    return torch.cat(out) if out else torch.zeros(0, 4)


def coverage_report(cfg: Config, images: list[ImageBoxes], class_names: list[str]) -> tuple[dict, object]:
    m = cfg.model
    coverage = anchor_coverage(images, m.anchors, m.matcher, m.input)
    return summarize(coverage, m.matcher, m.anchors, class_names), coverage


def suggest_anchors(cfg: Config, images: list[ImageBoxes], class_names: list[str]) -> dict:
    """The smallest anchor set that covers the boxes, checked with the full matcher; when no
    anchor set can reach the target at this input size (objects too small for the stride),
    the smallest input up-scaling that can."""
    m = cfg.model
    boxes = resized_boxes(images, cfg)
    chosen, trade_off = search_anchors(boxes, m.anchors.strides, m.matcher.fg_iou_threshold, m.anchors.offset)
    for scale in (1.5, 2.0, 3.0):
        if chosen.uncovered_fraction <= TARGET_UNCOVERED:
            break
        scaled, scaled_trade_off = search_anchors(boxes * scale, m.anchors.strides, m.matcher.fg_iou_threshold,
                                                  m.anchors.offset, input_scale=scale)
        if scaled.uncovered_fraction < chosen.uncovered_fraction:
            chosen, trade_off = scaled, scaled_trade_off
    trial = _with_anchors(cfg, chosen)
    checked = summarize(anchor_coverage(images, trial.model.anchors, trial.model.matcher, trial.model.input),
                        trial.model.matcher, trial.model.anchors, class_names)
    return {
        "anchors": {"sizes": chosen.sizes, "aspect_ratios": chosen.aspect_ratios},
        "input_scale": chosen.input_scale,
        "config_overrides": config_lines(chosen, cfg),
        "anchors_per_location": chosen.per_location,
        "uncovered_fraction": checked["uncovered_fraction"],
        "zero_positive_fraction": checked["zero_positive_fraction"],
        "mean_positives": checked["mean_positives"],
        "trade_off": [{"anchors_per_location": c.per_location, "uncovered_fraction": round(c.uncovered_fraction, 4),
                       "sizes": c.sizes, "aspect_ratios": c.aspect_ratios} for c in trade_off],
    }


def _with_anchors(cfg: Config, candidate: AnchorCandidate) -> Config:
    from ..config import apply_overrides

    return apply_overrides(cfg, config_lines(candidate, cfg))


def config_lines(candidate: AnchorCandidate, cfg: Config) -> list[str]:
    """`key=value` lines that apply a candidate (also valid as command-line overrides)."""
    lines = [f"model.anchors.sizes={json.dumps(candidate.sizes)}",
             f"model.anchors.aspect_ratios={json.dumps(candidate.aspect_ratios)}"]
    if candidate.input_scale != 1.0:
        i = cfg.model.input
        lines += [f"model.input.train_min_sizes={json.dumps([round(s * candidate.input_scale) for s in i.train_min_sizes])}",
                  f"model.input.test_min_size={round(i.test_min_size * candidate.input_scale)}",
                  f"model.input.max_size={round(i.max_size * candidate.input_scale)}"]
    return lines


def analyze(cfg: Config, split: str = "train", output_dir: str | Path = "analysis", max_images: int = 0,
            plots: bool = True) -> dict:
    """Write `report.json` (and plots) into `output_dir` and return the report. An output
    folder that cannot be written is refused before any work (`OutputNotWritten`)."""
    check_writable(output_dir)
    dataset = _open(cfg, split)
    images = image_boxes(dataset, max_images)
    report, coverage = coverage_report(cfg, images, dataset.class_names)
    report["split"], report["images"] = split, len(images)
    report["image_sizes"] = _size_stats(images)
    report["boxes_per_image"] = round(len(coverage) / max(1, len(images)), 3)
    report["config"] = {"anchors": {"sizes": cfg.model.anchors.sizes, "aspect_ratios": cfg.model.anchors.aspect_ratios,
                                    "strides": cfg.model.anchors.strides},
                        "fg_iou_threshold": cfg.model.matcher.fg_iou_threshold,
                        "train_min_sizes": cfg.model.input.train_min_sizes, "max_size": cfg.model.input.max_size}
    if len(coverage):
        report["suggested"] = suggest_anchors(cfg, images, dataset.class_names)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if plots and len(coverage):
        from ..analysis.plots import plot_box_statistics, plot_coverage

        report["plots"] = [str(p) for p in plot_box_statistics(coverage, dataset.class_names, output_dir)
                           + [plot_coverage(report, output_dir / "coverage_by_size.png")]]
    write_text(output_dir / "report.json", json.dumps(report, indent=2))
    return report


def _open(cfg: Config, split: str, tiled: bool = True) -> DetectionDataset:
    from ..data.dataset import DatasetError

    if not has_split(cfg.data, split):
        raise DatasetError(f"no {split} set configured: set data.{split}_annotations (and data.{split}_images)")
    # with data.tile.size the network sees tiles, not images: analyse what it is trained on
    dataset = open_dataset(cfg.data, split)
    return as_training_items(dataset, cfg.data.tile, cfg.data.value_range) if tiled else dataset


def _size_stats(images: list[ImageBoxes]) -> dict:
    if not images:
        return {}
    heights = torch.tensor([i.height for i in images], dtype=torch.float32)
    widths = torch.tensor([i.width for i in images], dtype=torch.float32)
    return {"height": {"min": int(heights.min()), "median": float(heights.median()), "max": int(heights.max())},
            "width": {"min": int(widths.min()), "median": float(widths.median()), "max": int(widths.max())}}


def format_report(report: dict) -> str:
    """The short console table."""
    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}%"

    lines = [f"{report['boxes']} boxes in {report['images']} images ({report['split']} split), "
             f"{report['boxes_per_image']} per image, sizes after the config's resize",
             f"uncovered (no anchor at IoU >= {report['config']['fg_iou_threshold']}): "
             f"{pct(report['uncovered_fraction'])}; none even at the bg threshold: {pct(report['below_bg_fraction'])}; "
             f"zero positives: {pct(report['zero_positive_fraction'])}; mean positives per box "
             f"{report['mean_positives']}", "",
             f"{'bucket':<22} {'boxes':>7} {'uncovered':>10} {'zero pos':>9} {'mean pos':>9}"]
    for name, s in list(report["by_size"].items()) + [(f"class {k}", v) for k, v in report["by_class"].items()]:
        if s["boxes"]:
            lines.append(f"{name[:22]:<22} {s['boxes']:>7} {pct(s['uncovered_fraction']):>10} "
                         f"{pct(s['zero_positive_fraction']):>9} {s['mean_positives']:>9}")
    suggested = report.get("suggested")
    if suggested:
        lines += ["", f"suggested anchors ({suggested['anchors_per_location']} per location): uncovered "
                      f"{pct(suggested['uncovered_fraction'])}, zero positives {pct(suggested['zero_positive_fraction'])}"
                  + (f", with the input scaled x{suggested['input_scale']} (compute x{suggested['input_scale'] ** 2:.1f})"
                     if suggested["input_scale"] != 1.0 else ""),
                  "paste into the config, or pass on the command line:"]
        lines += [f"  {line}" for line in suggested["config_overrides"]]
        lines.append("trade-off (anchors per location: best uncovered): " + ", ".join(
            f"{t['anchors_per_location']}: {pct(t['uncovered_fraction']).strip()}" for t in suggested["trade_off"]))
    return "\n".join(lines)


def coverage_warning(cfg: Config, dataset: DetectionDataset, sample: int = 500) -> str | None:
    """One line when more than `TARGET_UNCOVERED` of (a sample of) the training boxes have no
    anchor at IoU >= the fg threshold, naming the size range; None otherwise."""
    images = image_boxes(dataset, sample, seed=cfg.train.seed)
    coverage = anchor_coverage(images, cfg.model.anchors, cfg.model.matcher, cfg.model.input)
    if not len(coverage):
        return None
    uncovered = coverage.best_iou < cfg.model.matcher.fg_iou_threshold
    share = float(uncovered.float().mean())
    if share <= TARGET_UNCOVERED:
        return None
    sides = (coverage.width * coverage.height).sqrt()[uncovered]
    low, high = float(torch.quantile(sides, 0.1)), float(torch.quantile(sides, 0.9))
    return (f"{100 * share:.0f}% of the training boxes (sample of {len(images)} images) have no anchor at IoU >= "
            f"{cfg.model.matcher.fg_iou_threshold}, mostly {low:.0f}-{high:.0f} px after resizing: the model will "
            f"hardly learn them. Run `retinanet analyze --config ...` for suggested anchors")


def network_input_image(path: str | Path | None, cfg: Config, canvas: int = 0):
    """An image (or a grey canvas of `canvas` px) resized and padded as the network sees it:
    `(PIL image, scale_y, scale_x, feature sizes)`."""
    from PIL import Image

    from ..analysis.coverage import feature_sizes
    from ..data.image_io import read_image

    pre = build_preprocessor(cfg.model.input)
    if path is None:
        size = canvas or cfg.model.input.test_min_size
        original = Image.new("RGB", (size, size), (90, 90, 90))
    else:
        original = Image.fromarray(read_image(path).permute(1, 2, 0).numpy())
    (h, w), padded, sy, sx = network_input_size(original.height, original.width, cfg.model.input.train_min_sizes[0],
                                                pre)
    image = Image.new("RGB", (padded[1], padded[0]), (0, 0, 0))
    image.paste(original.resize((w, h), Image.BILINEAR), (0, 0))
    return image, sy, sx, feature_sizes(padded, cfg.model.anchors.strides)


def anchors_view(cfg: Config, output: str | Path, image: str | None = None, level: int = 0,
                 location: tuple[float, float] | None = None, force: bool = False,
                 inputs: tuple[str | Path, ...] = ()) -> Path:
    """Draw the anchors of one location and the grid of `level` over `image` (or a blank
    canvas) into `output`, atomically. Refused (`OutputRefused`) onto `image` or one of
    `inputs` (even with `force`), or over an existing file without `force`."""
    from ..analysis.views import draw_anchor_grid

    check_output_file(output, [image, *inputs], force)
    check_writable(Path(output).parent)
    if not 0 <= level < len(cfg.model.anchors.strides):
        raise ValueError(f"--level {level}: the config has levels 0-{len(cfg.model.anchors.strides) - 1} "
                         f"(P3-P{len(cfg.model.anchors.strides) + 2})")
    canvas, sy, sx, sizes = network_input_image(image, cfg)
    if location is not None:  # given in original-image pixels
        location = (location[0] * sx, location[1] * sy)
    picture = draw_anchor_grid(canvas, cfg.model.anchors, sizes, level, location)
    return save_image(picture, output)


def assign_view(cfg: Config, image_id, output: str | Path, split: str = "train", force: bool = False,
                inputs: tuple[str | Path, ...] = ()) -> dict:
    """Draw one image of the dataset with the anchors the matcher assigns into `output`,
    atomically. Refused (`OutputRefused`) onto the image, the annotation file or one of
    `inputs`, or into the dataset's image folder (even with `force`), or over an existing file
    without `force`; an output folder that cannot be written, before any work."""
    from ..analysis.views import draw_assignment
    from ..data.dataset import DatasetError

    check_writable(Path(output).parent)
    dataset = _open(cfg, split, tiled=False)  # an image of the dataset, by its id
    record = next((r for r in dataset.records if str(r.image_id) == str(image_id)), None)
    if record is None:
        raise DatasetError(f"{dataset.annotation_file}: no image with id {image_id}")
    image = dataset.image_dir / record.file_name
    check_output_file(output, [image, dataset.annotation_file, *inputs], force, input_folders=[dataset.image_dir])
    picture, sy, sx, sizes = network_input_image(image, cfg)
    boxes = torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4) * torch.tensor([sx, sy, sx, sy])
    m = cfg.model.matcher
    picture, summary = draw_assignment(picture, boxes, cfg.model.anchors, build_matcher(m), sizes,
                                       torch.tensor(record.crowd, dtype=torch.bool), m.fg_iou_threshold)
    save_image(picture, output)
    return summary
