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
    data.num_workers=0 train.max_iter=200 train.warmup_iters=30 train.ema_decay=0 train.amp=none \
    train.base_lr=0.002 model.loss.box_loss=smooth_l1 train.channels_last=true \
    model.input.test_min_size=128 model.input.max_size=128  # the recipe of the README figure
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
# the 500 x 300 px piece with the most objects, at full resolution, enlarged 2x: ground truth in white, tiled detections in red,
# dashed lines where tiles of the 128 px grid begin
from retinanet.data.tiles import tile_windows
w, h, zoom = 500, 300, 2
inside = lambda x, y: int(((gt[:, 0] >= x) & (gt[:, 2] <= x + w) & (gt[:, 1] >= y) & (gt[:, 3] <= y + h)).sum())
x0, y0 = max(((x, y) for x in range(0, 4000 - w, 50) for y in range(0, 3000 - h, 50)), key=lambda p: inside(*p))
piece = Image.open(work / "scene.tif").convert("RGB").crop((x0, y0, x0 + w, y0 + h)).resize((w * zoom, h * zoom))
canvas = ImageDraw.Draw(piece)
starts = sorted({t[0] for t in tile_windows(3000, 4000, 128, 0.2)})
for x in starts:
    if x0 < x < x0 + w:
        for y in range(0, h * zoom, 12):
            canvas.line([((x - x0) * zoom, y), ((x - x0) * zoom, y + 6)], fill=(255, 255, 0), width=1)
pred = json.loads((work / "tiled" / "predictions.json").read_text())
for colour, width, boxes in (((255, 255, 255), 1, gt.tolist()),
                             ((255, 40, 40), 2, [[x, y, x + bw, y + bh] for x, y, bw, bh in (p["bbox"] for p in pred)])):
    for bx0, by0, bx1, by1 in boxes:
        canvas.rectangle([(bx0 - x0) * zoom - 2, (by0 - y0) * zoom - 2, (bx1 - x0) * zoom + 2, (by1 - y0) * zoom + 2],
                         outline=colour, width=width)
piece.save("docs/images/tiled_large_scene.png")
print("wrote docs/images/tiled_large_scene.png")
PY
