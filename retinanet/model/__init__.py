"""The RetinaNet model: tensors in, tensors out. Imports nothing from the rest of the package,
reads no files and knows no process group."""

from .config import ModelConfig
from .detector import RetinaNet

__all__ = ["ModelConfig", "RetinaNet"]
