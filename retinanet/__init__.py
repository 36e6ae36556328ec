"""retinanet: a faithful, fast and easy RetinaNet (Lin et al. 2017) in PyTorch."""

from .model import ModelConfig, RetinaNet

__version__ = "0.1.0"
__all__ = ["RetinaNet", "ModelConfig", "__version__"]
