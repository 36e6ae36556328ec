"""COCO-format data: reading, validating, sampling and generating. Knows no model."""

from .coco import CocoDetection, DatasetError, collate
from .image_io import ImageReadError, read_image

__all__ = ["CocoDetection", "DatasetError", "collate", "ImageReadError", "read_image"]
