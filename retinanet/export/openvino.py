"""OpenVINO export: the ONNX graph of `export_onnx` (same contract: uint8 original images in,
resized in the graph, detections in their pixels out, NMS inside) converted to an OpenVINO IR,
`model.xml` + `model.bin` in a folder, with the ONNX metadata (class names, category ids, input
contract) in the IR's rt_info. Optionally quantized to INT8 with NNCF's post-training
quantization, calibrated on images given as the graph takes them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..model.detector import RetinaNet
from ..outputs import atomic_output
from .onnx import export_onnx

INSTALL = "pip install 'retinanet[openvino]'"
# Nodes outside the network (the in-graph resize, anchor decoding, NMS, top-k) stay in floating
# point: quantizing the resize's arithmetic moves every pixel, the decoding every box.
NETWORK_ONLY = r"^(?!/(backbone|fpn|head)/).*"
# The heads' last convolutions (their outputs are the logits and box deltas), quantized by
# default: kept in fp32 they cost much of INT8's speed for no measurable AP (benchmarks/RESULTS.md,
# "Figures behind choices in the code").
HEAD_OUTPUTS = r"^/head/(cls_score|bbox_pred)(_\d+)?/.*"


class MissingOpenVino(ImportError):
    """The optional `openvino` (or `nncf`) package is not installed; the message says how to get it."""


def require(package: str):
    """Import `package` ("openvino" or "nncf"), or raise `MissingOpenVino` saying how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingOpenVino(f"the OpenVINO export needs the {package!r} package, which is not installed "
                              f"({INSTALL})") from None


def export_openvino(model: RetinaNet, folder: str | Path, height: int, width: int, batch: int = 1,
                    dynamic: bool = False, calibration: Sequence[np.ndarray] | None = None,
                    keep_heads_float: bool = False) -> Path:
    """Write the OpenVINO IR of `export_onnx`'s graph (for uint8 images of `height x width`,
    or any size and batch with `dynamic`) as `folder/model.xml` and `folder/model.bin`, in
    fp32; with `calibration` (`(H, W, 3)` uint8 RGB arrays, the original images), quantized
    to INT8 by NNCF on them, the pre- and post-processing left in floating point and, with
    `keep_heads_float`, the heads' last convolutions too. A fixed-shape export holds a
    dynamic graph whose metadata says its one size and batch (`OpenVinoDetector` refuses
    other sizes and fills a short batch). Intermediate files live in a
    temporary folder inside `folder`; each IR file is renamed into place (`atomic_output`),
    the weights before the `.xml` that names them. Returns the `.xml`."""
    ov = require("openvino")
    if calibration is not None:
        require("nncf")
    from .ov_predict import IR_NAME, RT_INFO
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export.", suffix=".tmp", dir=folder))
    try:
        # the graph itself is always dynamic: OpenVINO's CPU plugin did not finish compiling a
        # fixed-shape one in minutes; a fixed-shape export is its contract, which the runtime enforces
        onnx_path = export_onnx(model, work / "model.onnx", height, width, batch, dynamic=True)
        ir = ov.convert_model(str(onnx_path))
        meta = _onnx_metadata(onnx_path)
        if not dynamic:
            meta["input"] = json.dumps({**json.loads(meta["input"]), "height": height, "width": width, "batch": batch,
                                        "dynamic": False})
        for key, value in meta.items():
            ir.set_rt_info(value, [RT_INFO, key])
        if calibration is not None:
            ir = quantize(ir, calibration, keep_heads_float)
        ov.save_model(ir, str(work / IR_NAME), compress_to_fp16=False)
        xml = folder / IR_NAME
        for name in (xml.with_suffix(".bin").name, IR_NAME):
            with atomic_output(folder / name) as tmp:
                os.replace(work / name, tmp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return xml


def quantize(ir, images: Sequence[np.ndarray], keep_heads_float: bool = False):
    """NNCF post-training quantization of the IR `ir` (weights and activations to INT8),
    its statistics gathered on `images` (`(H, W, 3)` uint8 arrays, one inference each, at
    their own sizes); what `NETWORK_ONLY` and, with `keep_heads_float`, `HEAD_OUTPUTS` name
    stays in floating point. Every layer's weights keep 7 bits (NNCF's overflow fix): CPUs
    without VNNI sum pairs of 8-bit products in 16 bits, which 8-bit weights can overflow, so
    the same file would detect differently on them; 7 bits cost less than that overflow did
    (benchmarks/RESULTS.md, "Figures behind choices in the code")."""
    nncf = require("nncf")
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    if not images:
        raise ValueError("no calibration images")
    patterns = [NETWORK_ONLY] + ([HEAD_OUTPUTS] if keep_heads_float else [])
    dataset = nncf.Dataset(list(images), lambda image: np.ascontiguousarray(image.transpose(2, 0, 1)[None]))
    with quiet_nncf():
        return nncf.quantize(ir, dataset, subset_size=len(images), preset=nncf.QuantizationPreset.MIXED,
                             ignored_scope=nncf.IgnoredScope(patterns=patterns),
                             advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE))


@contextlib.contextmanager
def quiet_nncf():
    """NNCF's warnings only: at its default level it prints a line per node it leaves in
    floating point (hundreds for the detector), burying the progress bars."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def calibration_images(config: str | Path, count: int, class_names: list[str] | None = None) -> list[np.ndarray]:
    """`count` images of the dataset that `config` (a config file or a shipped config's name)
    names, in any `data.format`: its training set, else its validation set; spread evenly
    over it, as `(H, W, 3)` uint8 arrays (unreadable ones skipped, as evaluation skips them).
    A config without data, or data without a readable image, is a `DatasetError`."""
    from ..config import load_config
    from ..data.dataset import DatasetError
    from ..data.formats import has_split, open_dataset

    data = load_config(str(config)).data
    split = next((s for s in ("train", "val") if has_split(data, s)), None)
    if split is None:
        raise DatasetError(f"{config}: names no training or validation set to calibrate on (data.train_annotations, "
                           "data.val_annotations)")
    dataset = open_dataset(data, split, class_names)
    n = len(dataset)
    images = []
    for i in sorted({int(i) for i in np.linspace(0, n - 1, min(count, n))}) if n else []:
        item = dataset[i]
        if isinstance(item, tuple):  # an unreadable image is its ImageReadError
            images.append(item[0].permute(1, 2, 0).numpy())
    if not images:
        raise DatasetError(f"{dataset.annotation_file}: no readable image to calibrate on")
    return images


def _onnx_metadata(path: Path) -> dict[str, str]:
    """The metadata `export_onnx` wrote into the graph at `path`."""
    import onnx

    return {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
