"""Running an exported model with onnxruntime and numpy alone (no torch import)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backend import ExportedBackend


class OnnxDetector(ExportedBackend):
    """An exported RetinaNet (`retinanet export`) behind onnxruntime: the protocol of
    `ExportedBackend` (`class_names`, `category_ids`, `check_size`, `predict`)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        available = ort.get_available_providers()
        wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), providers=wanted)
        self.read_metadata(self.session.get_modelmeta().custom_metadata_map,
                           [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])

    def _infer(self, batch: np.ndarray):
        return self.session.run(None, {"images": batch})
