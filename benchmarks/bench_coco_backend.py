"""COCO evaluation time of the two backends (`eval.coco_backend`) and of the metrics at a working
threshold, on generated ground truth and detections (no model): N images of 640x480, 7 boxes of
80 classes each, 14 jittered detections per box (30% of them under a random class).

    python benchmarks/bench_coco_backend.py [N]
"""

import copy
import random
import sys
import time

from retinanet.analysis.threshold_metrics import images_from_results, threshold_metrics
from retinanet.data.dataset import ImageRecord, coco_api
from retinanet.engine.evaluate import coco_metrics


def generated(n: int) -> tuple[dict, list[dict]]:
    random.seed(0)
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(1, n + 1)]
    annotations, detections = [], []
    for i in range(1, n + 1):
        for _ in range(7):
            x, y = random.uniform(0, 500), random.uniform(0, 380)
            w, h = random.uniform(10, 120), random.uniform(10, 100)
            c = random.randint(1, 80)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0})
            for _ in range(14):
                detections.append({"image_id": i, "category_id": c if random.random() < 0.7 else random.randint(1, 80),
                                   "bbox": [x + random.gauss(0, 6), y + random.gauss(0, 6), w * random.uniform(0.8, 1.2),
                                            h * random.uniform(0.8, 1.2)], "score": random.random()})
    categories = [{"id": c, "name": str(c)} for c in range(1, 81)]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def main(n: int) -> None:
    gt, detections = generated(n)
    print(f"{n} images, {len(gt['annotations'])} boxes, {len(detections)} detections")
    for backend in ("pycocotools", "faster-coco-eval"):
        start = time.perf_counter()
        metrics = coco_metrics(coco_api(copy.deepcopy(gt)), copy.deepcopy(detections), verbose=False, backend=backend)
        print(f"{backend}: {time.perf_counter() - start:.1f} s (AP {metrics['AP']:.4f}, with the error breakdown)")
    records = [ImageRecord(img["id"], img["file_name"], 640, 480, [], [], []) for img in gt["images"]]
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        record = records[ann["image_id"] - 1]
        record.boxes.append([x, y, x + w, y + h])
        record.labels.append(ann["category_id"] - 1)
        record.crowd.append(False)
    start = time.perf_counter()
    metrics = threshold_metrics(images_from_results(records, detections, list(range(1, 81))), [str(c) for c in range(80)])
    print(f"threshold metrics: {time.perf_counter() - start:.1f} s (F1 {metrics['overall']['f1']:.4f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
