#!/usr/bin/env bash
# The README's large-image picture, from the user's commands: three 1,024x768 TIFFs with a
# DeepForest CSV -> train on 128 px tiles -> predict a 4,000x3,000 image with 200 objects of
# 12-40 px (half of them across tile borders) on tiles, and resized whole; recall and precision
# at IoU 0.5; a full-resolution crop of the tiled drawing for the README.
# Run from the repository root: bash docs/tiled_large_scene.sh [work folder]
set -euo pipefail
WORK=${1:-tiled_large_scene}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$WORK"
"$PY" - "$WORK" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from retinanet.data.synthetic import render_large_scene
from retinanet.data.tiles import tile_windows
work = Path(sys.argv[1])
rng = np.random.default_rng(0)
rows = ["image_path,xmin,ymin,xmax,ymax,label"]
for i in range(3):
    image, boxes = render_large_scene(rng, 1024, 768, 60)
    image.save(work / f"train_{i}.tif")
    rows += [f"train_{i}.tif,{x0:.1f},{y0:.1f},{x1:.1f},{y1:.1f},blob" for x0, y0, x1, y1 in boxes.tolist()]
(work / "train.csv").write_text("\n".join(rows) + "\n")
borders = sorted({x1 for _, _, x1, _ in tile_windows(3000, 4000, 128, 0.2) if x1 < 4000})
image, boxes = render_large_scene(np.random.default_rng(1), 4000, 3000, 200, borders)
image.save(work / "scene.tif")
(work / "scene_boxes.json").write_text(json.dumps(boxes.tolist()))
PY
"$PY" -m retinanet.cli train --config demo --output-dir "$WORK/run" --overwrite data.format=csv \
    data.train_annotations="$WORK/train.csv" model.num_classes=1 data.tile.size=128 data.tile.overlap=0.2 \
    data.num_workers=0 train.max_iter=200 train.warmup_iters=30 train.ema_decay=0 train.amp=none
for mode in tiled whole; do
  flags=(); [ "$mode" = tiled ] && flags=(--tile 128 --overlap 0.2 --merge nmm)
  rm -rf "$WORK/$mode"
  "$PY" -m retinanet.cli predict --weights "$WORK/run/model_final.pt" "$WORK/scene.tif" --output-dir "$WORK/$mode" \
      --score-threshold 0.3 "${flags[@]}"
done
"$PY" - "$WORK" <<'PY'
import json, sys
from pathlib import Path
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou
work = Path(sys.argv[1])
gt = torch.tensor(json.loads((work / "scene_boxes.json").read_text()))
for mode in ("tiled", "whole"):
    pred = json.loads((work / mode / "predictions.json").read_text())
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (p["bbox"] for p in pred)]).reshape(-1, 4)
    iou = box_iou(gt, boxes) if len(boxes) else torch.zeros(len(gt), 1)
    recall = (iou.max(1).values >= 0.5).float().mean().item()
    precision = (iou.max(0).values >= 0.5).float().mean().item() if len(boxes) else 0.0
    twice = int(((iou > 0.5).sum(1) > 1).sum())
    print(f"{mode}: {len(boxes)} detections, recall {recall:.3f}, precision {precision:.3f}, found twice {twice}")
drawn = Image.open(work / "tiled" / "scene.jpg")
crop = drawn.crop((1400, 1000, 2400, 1600))  # 1,000 x 600 px at full resolution
canvas = ImageDraw.Draw(crop)
for x0, y0, x1, y1 in gt.tolist():  # ground truth outlined in white
    canvas.rectangle([x0 - 1400 - 2, y0 - 1000 - 2, x1 - 1400 + 2, y1 - 1000 + 2], outline=(255, 255, 255))
crop.save("docs/images/tiled_large_scene.png")
print("wrote docs/images/tiled_large_scene.png")
PY
