"""Running an exported model with onnxruntime, numpy and Pillow alone (no torch import)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.image_io import ImageReadError, read_rgb
from ..engine.prediction_files import coco_records, collect_images
from ..outputs import check_writable, write_text


class OnnxDetector:
    """An exported RetinaNet (`retinanet export`) behind onnxruntime. `predict(images)` takes
    `(H, W, 3)` uint8 RGB arrays and returns per image `{"boxes" (D, 4) xyxy in original
    pixels, "scores" (D,), "labels" (D,), "class_names"}` as numpy arrays."""

    def __init__(self, path: str | Path, providers: list[str] | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), providers=wanted)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "input" not in meta:
            raise ValueError(f"{path}: not a graph written by `retinanet export` (no input metadata)")
        self.class_names = json.loads(meta["class_names"])
        self.category_ids = json.loads(meta["category_ids"])
        self.input = json.loads(meta["input"])
        outputs = [o.name for o in self.session.get_outputs()]
        if outputs[:4] != ["boxes", "scores", "labels", "num_detections"]:
            raise ValueError(f"{path}: exported without post-processing (--no-postprocess); run it yourself")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the model resizes an image to: short side `test_min_size`, long side at
        most `max_size`, rounded down."""
        scale = min(self.input["test_min_size"] / min(height, width), self.input["max_size"] / max(height, width))
        return int(np.floor(height * scale)), int(np.floor(width * scale))

    def check_size(self, height: int, width: int, name: str = "image") -> None:
        """Raise `ValueError` naming `name` for an image so elongated that resizing leaves a
        side of 0 pixels (the rule of `Preprocessor.check_size`)."""
        if min(self.resized_size(height, width)) < 1:
            raise ValueError(f"{name}: {width}x{height} px is too elongated for an input of at most "
                             f"{self.input['max_size']} px (a side would be 0 px after resizing); crop or tile it")

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Resize as the model does (`resized_size`; Pillow's bilinear, so pixels differ
        slightly from torch's) without padding; an image too elongated raises `ValueError`."""
        self.check_size(*image.shape[:2])
        nh, nw = self.resized_size(*image.shape[:2])
        resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
        return resized, (nh, nw)

    def predict(self, images: list[np.ndarray]) -> list[dict]:
        """Detections per image; a graph of fixed batch size runs the images in chunks of it."""
        if self.input["dynamic"]:
            return self._run(images)
        size = self.input["batch"]
        results = []
        for start in range(0, len(images), size):
            chunk = images[start : start + size]
            results += self._run(chunk + [chunk[-1]] * (size - len(chunk)))[: len(chunk)]
        return results

    def _run(self, images: list[np.ndarray]) -> list[dict]:
        prepared = [self.prepare(im) for im in images]
        d = self.input["size_divisibility"]
        if self.input["dynamic"]:
            height = -(-max(p[1][0] for p in prepared) // d) * d
            width = -(-max(p[1][1] for p in prepared) // d) * d
        else:
            height, width = self.input["height"], self.input["width"]
        batch = np.empty((len(images), 3, height, width), dtype=np.float32)
        batch[:] = np.asarray(self.input["pad_value_rgb"], dtype=np.float32)[None, :, None, None]
        for out, (array, (h, w)) in zip(batch, prepared):
            h, w = min(h, height), min(w, width)
            out[:, :h, :w] = array[:h, :w].transpose(2, 0, 1)
        sizes = np.array([p[1] for p in prepared], dtype=np.int64)
        boxes, scores, labels, counts = self.session.run(None, {"images": batch, "image_sizes": sizes})
        results = []
        for image, (_, (h, w)), b, s, l, n in zip(images, prepared, boxes, scores, labels, counts):
            oh, ow = image.shape[:2]
            b = b[:n] * np.array([ow / w, oh / h, ow / w, oh / h], dtype=np.float32)
            results.append({"boxes": b, "scores": s[:n], "labels": l[:n],
                            "class_names": [self.class_names[i] for i in l[:n].tolist()]})
        return results


def predict_files(detector: OnnxDetector, inputs: list[str | Path], output_dir: str | Path,
                  score_threshold: float | None = None) -> tuple[list[dict], list[str]]:
    """`engine.predict.predict_files` for an exported model, one image at a time and without
    torch: the same inputs (files, folders searched recursively, globs), the same decoding
    (`read_rgb`: damaged files and decompression bombs are one line), the same refusal of
    images too elongated for the input and the same `output_dir/predictions.json`, written
    atomically; no drawings or label files. Bad inputs are reported (one line each on stderr)
    and skipped. Returns the predictions and the error lines."""
    output_dir = check_writable(Path(output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    paths, errors = collect_images(inputs)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    predictions: list[dict] = []
    for path in paths:
        try:
            array = read_rgb(path)
            detector.check_size(*array.shape[:2], name=str(path))
        except (ImageReadError, ValueError) as err:
            errors.append(str(err))
            print(f"error: {err}", file=sys.stderr)
            continue
        det = detector.predict([array])[0]
        keep = np.flatnonzero(det["scores"] >= (score_threshold or 0.0))
        det = {"boxes": det["boxes"][keep], "scores": det["scores"][keep], "labels": det["labels"][keep],
               "class_names": [det["class_names"][i] for i in keep.tolist()]}
        predictions += coco_records(det, path, detector.category_ids)
    write_text(output_dir / "predictions.json", json.dumps(predictions, indent=1))
    return predictions, errors
