"""COCO-format data: reading, validating, sampling and generating. Knows no model.

The names below are imported on first use, so that the torch-free modules here (`image_io`'s
decoding) serve `retinanet predict --backend onnxruntime` without importing torch."""

from importlib import import_module

__all__ = ["CocoDetection", "DatasetError", "collate", "ImageReadError", "read_image"]

_LAZY = {"CocoDetection": ".coco", "DatasetError": ".coco", "collate": ".coco", "ImageReadError": ".image_io",
         "read_image": ".image_io"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'retinanet.data' has no attribute {name!r}")
