"""The accuracy cost of each deployed runtime, through the command line as a user runs it:
`retinanet export` (ONNX, OpenVINO fp32, OpenVINO INT8 calibrated on the config's data), then
`retinanet eval` of the checkpoint and of each exported model on the config's validation set.
Prints one markdown row per runtime: COCO AP, AP50, the AP change against the checkpoint, and
the agreement of its detections with the checkpoint's (COCO AP with the checkpoint's detections
scored >= 0.3 taken as ground truth).

    python benchmarks/deployed_accuracy.py --weights run/model_final.pt --config run/config.yaml \
        --work /tmp/deployed_accuracy [--calibration-images 300]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from retinanet.cli import main as cli
from retinanet.engine.evaluate import agreement_ap

TRUTH_SCORE = 0.3


def detections(path: Path, image_ids: list[int]) -> list[dict]:
    """detections.json (COCO results) as one dict of arrays per image of `image_ids`."""
    by_image = defaultdict(list)
    for record in json.loads(path.read_text()):
        by_image[record["image_id"]].append(record)
    out = []
    for image_id in image_ids:
        records = by_image[image_id]
        xywh = np.array([r["bbox"] for r in records], dtype=np.float64).reshape(-1, 4)
        out.append({"boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                    "scores": np.array([r["score"] for r in records]),
                    "labels": np.array([r["category_id"] for r in records], dtype=np.int64)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--config", required=True, help="names the validation set, and the calibration data")
    parser.add_argument("--work", required=True, help="folder for the exports and the evaluations")
    parser.add_argument("--calibration-images", type=int, default=300)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    exports = {"onnxruntime": (work / "model.onnx", ["--dynamic"]),
               "openvino fp32": (work / "openvino_fp32", ["--format", "openvino", "--dynamic"]),
               "openvino int8": (work / "openvino_int8", ["--format", "openvino", "--dynamic", "--int8",
                                                          "--calibration", args.config, "--calibration-images",
                                                          str(args.calibration_images)])}
    for path, options in exports.values():
        assert cli(["export", "--weights", args.weights, "--output", str(path), *options, "--force"]) == 0
    runs = {"pytorch (checkpoint)": ["--weights", args.weights]}
    runs.update({name: ["--weights", str(path), "--backend", name.split()[0]] for name, (path, _) in exports.items()})
    metrics = {}
    for name, options in runs.items():
        out = work / name.split()[0].replace("pytorch", "torch") / name.split()[-1].strip("()")
        assert cli(["eval", *options, "--config", args.config, "--output-dir", str(out)]) == 0
        metrics[name] = (json.loads((out / "metrics.json").read_text()), out / "detections.json")
    reference_metrics, reference_path = metrics["pytorch (checkpoint)"]
    image_ids = sorted({r["image_id"] for r in json.loads(reference_path.read_text())})
    reference = detections(reference_path, image_ids)
    print(f"{len(image_ids)} validation images with detections; agreement: checkpoint detections scored >= "
          f"{TRUTH_SCORE} as ground truth")
    print("| runtime | AP | AP50 | AP change | agreement AP |\n|---|---|---|---|---|")
    for name, (m, path) in metrics.items():
        agreement = agreement_ap(reference, detections(path, image_ids), TRUTH_SCORE)
        print(f"| {name} | {m['AP']:.4f} | {m['AP50']:.4f} | {m['AP'] - reference_metrics['AP']:+.4f} | "
              f"{agreement:.4f} |")


if __name__ == "__main__":
    main()
