"""Opening an exported model under the runtime a user names, as a backend of the shared
prediction and evaluation loops (the protocol of `engine.prediction_files`). Imports no torch."""

from __future__ import annotations

from pathlib import Path

EXPORTED_BACKENDS = ("onnxruntime", "openvino")


class ExportedModelError(ValueError):
    """An exported model that cannot be opened; the message is one line naming the file."""


def open_exported(backend: str, path: str | Path):
    """The exported model at `path` behind `backend` ("onnxruntime": an `.onnx` file;
    "openvino": an OpenVINO IR written by `retinanet export --format openvino`). A missing
    file, a missing runtime package or a file the runtime cannot load is an
    `ExportedModelError`."""
    path = Path(path)
    if not path.exists():
        raise ExportedModelError(f"{path}: no such exported model")
    if backend == "onnxruntime":
        if not path.is_file():
            raise ExportedModelError(f"{path}: not an ONNX file")
        detector_class = _import("onnxruntime", "ort_predict", "OnnxDetector", "pip install onnxruntime")
    elif backend == "openvino":
        detector_class = _import("openvino", "ov_predict", "OpenVinoDetector", "pip install 'retinanet[openvino]'")
    else:
        raise ExportedModelError(f"backend {backend!r}: choose from {', '.join(EXPORTED_BACKENDS)}")
    try:
        return detector_class(path)
    except Exception as err:  # the runtime's own load errors, and ours (not an export of ours)
        message = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if not message.startswith(str(path)):
            message = f"{path}: cannot be loaded as an exported model ({message})"
        raise ExportedModelError(message) from None


def _import(package: str, module: str, name: str, install: str):
    """`retinanet.export.<module>.<name>`, or one line saying how to get `package`."""
    import importlib

    try:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    except ModuleNotFoundError as err:
        if err.name == f"{__package__}.{module}":
            raise ExportedModelError(f"this retinanet has no {package} backend ({module}.py is missing)") from None
        missing = err.name or package
        raise ExportedModelError(f"the {package} backend needs the {missing!r} package, which is not installed "
                                 f"({install})") from None
