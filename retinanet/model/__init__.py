"""The RetinaNet model. Imports nothing from the rest of the package."""

from .config import ModelConfig
from .checkpoint import CheckpointError
from .detector import RetinaNet

__all__ = ["ModelConfig", "RetinaNet", "CheckpointError"]
