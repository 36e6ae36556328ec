"""`retinanet export`: a checkpoint or zoo name written as an ONNX graph or an OpenVINO IR,
with the contract of `export.onnx` (uint8 original images in, resized in the graph as the
model does; boxes in their pixels)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def export_checkpoint(weights: str, output: str | Path, *, format: str = "onnx", height: int | None = None,
                      width: int | None = None, batch: int = 1, dynamic: bool = False, opset: int = 17,
                      postprocess: bool = True, simplify: bool = False, max_detections: int | None = None,
                      calibration: str | None = None, calibration_count: int = 300, force: bool = False) -> str:
    """Export `weights` to `output` (the .onnx file, or the IR's folder for `format="openvino"`,
    quantized to INT8 on `calibration_count` images of the config `calibration` names when
    given). `height` x `width` default to the model's own test size (an image it takes as it
    is); a fixed-shape export takes that size only, a `dynamic` one any size and batch. The
    checkpoint is never written over, an existing output only with `force` (`OutputRefused`).
    Returns the line that says what was written."""
    from ..checkpoint import load_model
    from ..outputs import check_output_file, check_writable
    from ..zoo import resolve_weights

    output = Path(output)
    if format == "openvino":  # the extra, before a zoo name is downloaded
        from .openvino import require

        require("openvino")
        if calibration:
            require("nncf")
    weights = str(resolve_weights(weights))
    if format == "openvino":
        for name in ("model.xml", "model.bin"):
            check_output_file(output / name, [weights], force)  # the checkpoint: even a hard link
        check_writable(output)
    else:
        check_output_file(output, [weights], force)
        check_writable(output.parent)
    overrides = [f"inference.detections_per_image={max_detections}"] if max_detections else []
    # as built: the runtimes fold BatchNorm themselves
    model = load_model(weights, overrides=overrides, optimize=False).eval()
    height, width = height or model.preprocessor.test_min_size, width or model.preprocessor.max_size
    contract = ("input images (B, 3, H, W) uint8 RGB, resized in the graph as the model does; boxes in their pixels"
                + (" (any batch and size)" if dynamic else
                   f" (batch {batch}, {width}x{height} px images only; --dynamic for any size)"))
    if format == "openvino":
        from .openvino import calibration_images, export_openvino

        images = calibration_images(calibration, calibration_count, model.class_names) if calibration else None
        xml = export_openvino(model, output, height, width, batch, dynamic, images)
        precision = f"INT8, calibrated on {len(images)} images" if images else "fp32"
        return f"wrote {xml} and {xml.with_suffix('.bin').name} ({precision}): {contract}"
    from .onnx import export_onnx

    if simplify and importlib.util.find_spec("onnxsim") is None:
        print("onnxsim is not installed: the graph is left as exported (pip install onnxsim)", file=sys.stderr)
    export_onnx(model, output, height, width, batch, dynamic, opset, postprocess, simplify=simplify)
    return f"wrote {output}: {contract}"
