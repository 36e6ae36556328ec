"""Running an exported model with OpenVINO and numpy alone (no torch import). Importing this
module without the `openvino` package raises `ModuleNotFoundError` naming it
(`export.runtimes` turns that into one line saying how to install it)."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import openvino as ov

from .backend import METADATA_KEYS, OUTPUTS, ExportedBackend

RT_INFO = "retinanet"  # the OpenVINO IR keeps `export_onnx`'s metadata under this rt_info section
IR_NAME = "model.xml"  # its weights: model.bin beside it


@functools.cache
def core() -> ov.Core:
    """The process's one OpenVINO Core. Each Core's CPU plugin installs an alternate signal
    stack on the thread that compiles (for AMX's larger signal frames) and, when destroyed,
    puts back the one it found; with two Cores destroyed out of order, the thread was left on
    an unmapped stack, and the next Ctrl-C or SIGTERM crashed the process."""
    return ov.Core()


def ir_paths(path: str | Path) -> tuple[Path, Path]:
    """The `.xml` and `.bin` of an IR given as its folder (`retinanet export --format
    openvino --output DIR`) or as its `.xml`."""
    path = Path(path)
    xml = path / IR_NAME if path.is_dir() else path
    return xml, xml.with_suffix(".bin")


class OpenVinoDetector(ExportedBackend):
    """An exported RetinaNet (`retinanet export --format openvino`, fp32 or INT8) behind
    OpenVINO's CPU plugin: the protocol of `ExportedBackend` (`class_names`, `category_ids`,
    `check_size`, `predict`). `path`: the IR's folder or its `.xml`. The layers left in
    floating point run in fp32 (OpenVINO would otherwise pick bf16 on CPUs that have it, and
    the detections would no longer be the model's); `precision="bf16"` asks for it."""

    def __init__(self, path: str | Path, device: str = "CPU", precision: str = "f32"):
        self.path = Path(path)
        xml, weights = ir_paths(path)
        for part in (xml, weights):
            if not part.is_file():
                raise ValueError(f"{part}: no such file (an OpenVINO IR is model.xml with model.bin beside it)")
        try:
            model = core().read_model(str(xml), str(weights))
        except RuntimeError as err:  # a .bin shorter than the weights the .xml names is found here
            reason = _first_line(err)
            if "bin file" in reason:
                raise ValueError(f"{weights}: the IR's weights cannot be loaded ({reason})") from None
            raise ValueError(f"{xml}: not an OpenVINO IR that can be read ({reason})") from None
        meta = {key: str(model.get_rt_info([RT_INFO, key]).astype(str)) for key in METADATA_KEYS
                if model.has_rt_info([RT_INFO, key])}
        self.read_metadata(meta, [i.get_any_name() for i in model.inputs], [o.get_any_name() for o in model.outputs],
                           source=xml)
        try:
            self.compiled = core().compile_model(model, device, {"INFERENCE_PRECISION_HINT": precision})
        except RuntimeError as err:
            raise ValueError(f"{weights}: the IR's weights cannot be loaded ({_first_line(err)})") from None
        self.outputs = [self.compiled.output(name) for name in OUTPUTS]
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()  # one infer request: one batch at a time

    def _infer(self, batch: np.ndarray):
        with self.lock:
            result = self.request.infer({"images": batch})
            return [np.array(result[output]) for output in self.outputs]


def _first_line(err: BaseException) -> str:
    """The last non-empty line of OpenVINO's multi-line messages, which holds the reason."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
