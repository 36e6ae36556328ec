"""What every runtime of an exported detector shares (no torch, no runtime imported): the
metadata `retinanet export` writes, the sizes a graph takes, batching by size and the
thresholding of its padded outputs. A runtime (`ort_predict`, `ov_predict`) adds only how
to load the file and run one batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..engine.prediction_files import size_groups

METADATA_KEYS = ("class_names", "category_ids", "input")
OUTPUTS = ["boxes", "scores", "labels", "num_detections"]


class ExportedBackend:
    """An exported RetinaNet behind a runtime, a backend of the shared prediction loop
    (`engine.prediction_files`). `predict(images)` takes `(H, W, 3)` uint8 RGB arrays and
    returns per image `{"boxes" (D, 4) xyxy in the image's pixels, "scores" (D,), "labels"
    (D,), "class_names"}` as numpy arrays. The graph resizes the images itself; images of one
    size run as one batch.

    A subclass loads its file, then calls `read_metadata` with the graph's metadata (the
    strings `export_onnx` writes under `METADATA_KEYS`), its input and output names, and
    implements `_infer(batch)`."""

    path: Path
    class_names: list[str]
    category_ids: list[int]
    input: dict

    def read_metadata(self, meta: dict[str, str], inputs: list[str], outputs: list[str],
                      source: Path | None = None) -> None:
        """Take the class names, category ids and input contract from `meta`; raise
        `ValueError` naming `source` (default: the model's path) for a file that is not a
        whole-detector export of ours."""
        source = source or self.path
        missing = [key for key in METADATA_KEYS if key not in meta]
        if "input" in missing:
            raise ValueError(f"{source}: not a model written by `retinanet export` (no input metadata)")
        if missing:
            raise ValueError(f"{source}: its metadata lacks {', '.join(missing)}; export it again")
        try:
            self.class_names = json.loads(meta["class_names"])
            self.category_ids = json.loads(meta["category_ids"])
            self.input = json.loads(meta["input"])
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: damaged metadata ({err}); export it again") from None
        if inputs != ["images"] or "resize" not in self.input:
            raise ValueError(f"{source}: exported by an earlier version for pre-resized images; export it again "
                             "(`retinanet export`): the graph now takes the original images")
        if outputs[:4] != OUTPUTS:
            raise ValueError(f"{source}: exported without post-processing (--no-postprocess); run it yourself")

    raise_cap = "retinanet export --max-detections N (the exported graph holds its cap), then run the new export"

    @property
    def detections_per_image(self) -> int | None:
        """The graph's cap on detections per image (its `num_detections` reaches it where the
        cap dropped detections); None for a graph exported before the metadata held it."""
        return self.input.get("detections_per_image")

    @property
    def score_threshold(self) -> float:
        """The score threshold the graph was exported with: it gives no detection below it."""
        return self.input["score_threshold"]

    def check_size(self, height: int, width: int, name: str = "image") -> None:
        """Raise `ValueError` naming `name` for an image the graph cannot take whole: of
        another size than a fixed-shape graph's, or so elongated that resizing leaves a side
        of 0 pixels (the rule of `Preprocessor.check_size`)."""
        spec = self.input
        if not spec["dynamic"] and (height, width) != (spec["height"], spec["width"]):
            raise ValueError(f"{name}: {width}x{height} px, but {self.path.name} is a fixed-shape export for "
                             f"{spec['width']}x{spec['height']} px images only (export with --dynamic for any size)")
        if spec["resize"]:
            one = np.float32(1)  # float32 as `preprocess.resize_scale` computes it (`n / x` is `x.reciprocal() * n`)
            scale = min(one / np.float32(min(height, width)) * np.float32(spec["test_min_size"]),
                        one / np.float32(max(height, width)) * np.float32(spec["max_size"]))
            if min(np.floor(height * float(scale)), np.floor(width * float(scale))) < 1:
                raise ValueError(f"{name}: {width}x{height} px is too elongated for an input of at most "
                                 f"{spec['max_size']} px (a side would be 0 px after resizing); crop or tile it")

    def predict(self, images: list[np.ndarray], score_threshold: float | None = None) -> list[dict]:
        """Detections per image (scored above `score_threshold`, which may not be below the
        graph's own, when given); images of one size run together, in chunks of a
        fixed-shape graph's batch size. An image the graph cannot take raises `ValueError`."""
        if score_threshold is not None and score_threshold < self.score_threshold:
            raise ValueError(f"{self.path.name}: exported with score threshold {self.score_threshold:g}; it gives "
                             f"no detections below it (asked for {score_threshold:g})")
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected (H, W, 3) uint8 RGB arrays, got {image.dtype} {image.shape}")
            self.check_size(*image.shape[:2])
        results: list[dict] = [{}] * len(images)
        for group in size_groups(images):
            size = len(group) if self.input["dynamic"] else self.input["batch"]
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                padded = chunk + [chunk[-1]] * (size - len(chunk))  # a fixed batch: filled with repeats
                batch = np.ascontiguousarray(np.stack([images[i].transpose(2, 0, 1) for i in padded]))
                for i, det in zip(chunk, self._split(*self._infer(batch), score_threshold)):
                    results[i] = det
        return results

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The graph's `boxes, scores, labels, num_detections` for a `(B, 3, H, W)` uint8 batch."""
        raise NotImplementedError

    def _split(self, boxes, scores, labels, counts, score_threshold: float | None) -> list[dict]:
        """Per image, the valid detections of the padded outputs (above `score_threshold`)."""
        results = []
        for b, s, l, n in zip(boxes, scores, labels, counts):
            keep = slice(0, int(n)) if score_threshold is None else np.flatnonzero(s[:n] > score_threshold)
            results.append({"boxes": b[keep], "scores": s[keep], "labels": l[keep],
                            "class_names": [self.class_names[i] for i in l[keep].tolist()]})
        return results
