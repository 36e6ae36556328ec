"""retinanet: a faithful, fast and easy RetinaNet (Lin et al. 2017) in PyTorch.

    import retinanet
    model = retinanet.load_model("model_final.pt")
    result = model.predict(retinanet.read_image("photo.jpg"))
"""

from .checkpoint import CheckpointError, load_model, save_model
from .data.image_io import read_image
from .model import ModelConfig, RetinaNet

__version__ = "0.1.0"
__all__ = ["RetinaNet", "ModelConfig", "load_model", "save_model", "read_image", "CheckpointError", "__version__"]
