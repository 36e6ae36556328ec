"""Prediction over image files: COCO-style json, and the boxes drawn on the images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..data.image_io import ImageReadError, read_image


def predict_files(model, paths: list[str | Path], output_dir: str | Path, score_threshold: float | None = None,
                  draw: bool = True, batch_size: int = 4) -> tuple[list[dict], list[str]]:
    """Detect in every readable file; bad files are reported (one line each) and skipped.

    Writes `output_dir/predictions.json` (`file_name`, `category_id`, `category_name`,
    `bbox` [x, y, w, h], `score`) and, with `draw`, `output_dir/<stem>.jpg` with boxes.
    Category ids come from `model.category_ids`. Returns the predictions and the error lines.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    category_ids = model.category_ids
    predictions, errors = [], []
    readable: list[tuple[Path, torch.Tensor]] = []
    for path in map(Path, paths):
        try:
            readable.append((path, read_image(path)))
        except ImageReadError as err:
            errors.append(f"error: {err}")
            print(f"error: {err}", file=sys.stderr)
        if len(readable) == batch_size:
            predictions.extend(_run(model, readable, output_dir, score_threshold, draw, category_ids))
            readable = []
    if readable:
        predictions.extend(_run(model, readable, output_dir, score_threshold, draw, category_ids))
    (output_dir / "predictions.json").write_text(json.dumps(predictions, indent=1))
    return predictions, errors


def _run(model, items, output_dir: Path, score_threshold, draw: bool, category_ids: list[int]) -> list[dict]:
    outputs = model.predict([image for _, image in items], score_threshold=score_threshold)
    records = []
    for (path, image), det in zip(items, outputs):
        for box, score, label, name in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                           det["class_names"]):
            x0, y0, x1, y1 = box
            records.append({"file_name": str(path), "category_id": category_ids[label], "category_name": name,
                            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                            "score": round(score, 5)})
        if draw:
            draw_detections(image, det).save(output_dir / f"{path.stem}.jpg", quality=92)
    return records


def draw_detections(image: torch.Tensor, det: dict, max_boxes: int = 100, scale: int = 1) -> Image.Image:
    """The image `(3, H, W)` uint8, enlarged `scale` times, with boxes, class names and scores."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.BILINEAR)
    canvas = ImageDraw.Draw(pil)
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
    for box, score, label, name in list(zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                            det["class_names"]))[:max_boxes]:
        colour = palette[label % len(palette)]
        box = [v * scale for v in box]
        canvas.rectangle(box, outline=colour, width=2)
        canvas.text((box[0] + 2, box[1] + 1), f"{name} {score:.2f}", fill=colour)
    return pil
