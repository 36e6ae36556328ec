"""Plots of the diagnostics (matplotlib, drawn off-screen). Each function writes PNG files and
returns their paths."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..outputs import OutputRefused, atomic_output


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'retinanet[plots]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write and close `fig`, atomically, in the format `path`'s extension names (png without one)."""
    plt = _pyplot()
    path = Path(path)
    try:
        image_format = path.suffix[1:].lower() or "png"
        if image_format not in fig.canvas.get_supported_filetypes():
            raise OutputRefused(f"{path}: matplotlib cannot write .{image_format} files (give .png, .pdf or .svg)")
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format=image_format, dpi=100)
    finally:
        plt.close(fig)
    return path


def plot_box_statistics(coverage, class_names: list[str], folder: Path) -> list[Path]:
    """Histograms of box width, height, area and aspect ratio per class, after resizing."""
    plt = _pyplot()
    quantities = {
        "width": (coverage.width, "width (px, after resize)"),
        "height": (coverage.height, "height (px, after resize)"),
        "area": ((coverage.width * coverage.height).sqrt(), "sqrt(area) (px, after resize)"),
        "aspect": ((coverage.height / coverage.width).log2(), "log2(height / width)"),
    }
    paths = []
    for key, (values, label) in quantities.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        bins = torch.linspace(float(values.min()), float(values.max()) + 1e-6, 31).tolist()
        for c in sorted(set(coverage.labels.tolist())):
            name = class_names[c] if c < len(class_names) else str(c)
            ax.hist(values[coverage.labels == c].tolist(), bins=bins, histtype="step", linewidth=1.5, label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("boxes")
        ax.set_title(f"Box {key} per class")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"boxes_{key}.png"
        save_figure(fig, path)
        paths.append(path)
    return paths


def plot_coverage(report: dict, path: Path) -> Path:
    """Bars: the share of boxes with no anchor at the fg threshold, per size bucket, for the
    config's anchors and the suggested ones."""
    plt = _pyplot()
    names = [k for k, v in report["by_size"].items() if v["boxes"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(names)), [100 * report["by_size"][k]["uncovered_fraction"] for k in names], color="#d62728")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% of boxes uncovered")
    suggested = report.get("suggested")
    note = (f"; suggested anchors: {100 * suggested['uncovered_fraction']:.1f}% overall" if suggested else "")
    ax.set_title(f"Anchor coverage: {100 * report['uncovered_fraction']:.1f}% of boxes uncovered{note}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_pr_curves(precision, class_names: list[str], path: Path) -> Path:
    """Precision-recall per class at IoU 0.5 and 0.75 from COCOeval's `precision` array
    `(T, R, K, A, M)` (area all, 100 detections)."""
    plt = _pyplot()
    recall = torch.linspace(0, 1, precision.shape[1]).tolist()
    columns = min(4, len(class_names))
    rows = (len(class_names) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    for k, name in enumerate(class_names):
        ax = axes[k // columns][k % columns]
        for t, iou in ((0, "0.50"), (5, "0.75")):
            p = precision[t, :, k, 0, -1]
            ax.plot(recall, [max(v, 0.0) for v in p.tolist()], label=f"IoU {iou}")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=8), ax.set_ylabel("precision", fontsize=8)
        ax.legend(fontsize=7)
    for k in range(len(class_names), rows * columns):
        axes[k // columns][k % columns].axis("off")
    fig.suptitle("Precision-recall per class")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_error_breakdown(breakdown: dict, path: Path) -> Path:
    """Stacked bar of the COCO-analysis error shares: AP at 0.75 and 0.5, and what fixing
    localisation, class confusion, background detections and misses would add."""
    plt = _pyplot()
    parts = [("AP75", "C75", "#2ca02c"), ("AP50 gain", "C50", "#98df8a"), ("localisation", "Loc", "#1f77b4"),
             ("confusion", "Oth", "#ff7f0e"), ("background", "BG", "#9467bd"), ("missed", "FN", "#d62728")]
    levels = [breakdown[key] for _, key, _ in parts]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    start = 0.0
    for (label, key, colour), level in zip(parts, levels):
        width = max(0.0, level - start)
        ax.barh([0], [width], left=[start], color=colour, label=f"{label} {width:.3f}")
        start = max(start, level)
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("precision averaged over recall (all classes, all areas)")
    ax.set_title("Error breakdown (COCO analysis): what each fix would add")
    ax.legend(ncol=3, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.42))
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_confusion_matrix(metrics: dict, path: Path) -> Path:
    """The confusion matrix of `threshold_metrics` as a grid of counts: rows the ground-truth
    class then background, columns the predicted class then background; colours are each
    cell's share of its row, so that rare classes read as well as common ones."""
    plt = _pyplot()
    matrix = metrics["confusion_matrix"]
    counts = torch.tensor(matrix["counts"], dtype=torch.float64)
    labels = matrix["labels"]
    shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(3 + 0.45 * len(labels), 24)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    if len(labels) <= 30:  # beyond, the numbers would not fit their cells
        for row, column in torch.cartesian_prod(torch.arange(len(labels)), torch.arange(len(labels))).tolist():
            colour = "white" if shares[row, column] > 0.5 else "black"
            ax.text(column, row, f"{int(counts[row, column])}", ha="center", va="center", fontsize=9 if len(labels) <= 10 else 7, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(f"Confusion at score >= {metrics['score_threshold']:g}, IoU >= {metrics['iou']:g}", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_runs(run_dirs: list[Path], path: Path) -> Path:
    """Loss, learning rate and AP against iteration from each run's `metrics.jsonl`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for run in run_dirs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "eval" in r]
        name = run.name
        if train:
            its = [r["iteration"] for r in train]
            axes[0].plot(its, [r["loss"] for r in train], label=f"{name} total")
            axes[0].plot(its, [r["loss_cls"] for r in train], "--", label=f"{name} cls", linewidth=0.8)
            axes[0].plot(its, [r["loss_box"] for r in train], ":", label=f"{name} box", linewidth=0.8)
            axes[1].plot(its, [r.get("lr", 0) for r in train], label=name)
        if evals:
            axes[2].plot([r["iteration"] for r in evals], [r["eval"]["AP"] for r in evals], "o-", label=f"{name} AP")
            axes[2].plot([r["iteration"] for r in evals], [r["eval"]["AP50"] for r in evals], "s--",
                         label=f"{name} AP50")
    for ax, title in zip(axes, ("Loss", "Learning rate", "COCO AP")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    save_figure(fig, path)
    return path
