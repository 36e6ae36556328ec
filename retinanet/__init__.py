"""retinanet: a faithful, fast and easy RetinaNet (Lin et al. 2017) in PyTorch.

    import retinanet
    model = retinanet.load_model("model_final.pt")
    result = model.predict(retinanet.read_image("photo.jpg"))

The names below are imported on first use, so that `retinanet predict --backend onnxruntime`
runs without importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"
__all__ = ["RetinaNet", "ModelConfig", "load_model", "save_model", "read_image", "CheckpointError", "Trainer",
           "Callback", "__version__"]

_LAZY = {"RetinaNet": ".model", "ModelConfig": ".model", "load_model": ".checkpoint", "save_model": ".checkpoint",
         "CheckpointError": ".checkpoint", "read_image": ".data.image_io", "Trainer": ".engine.train",
         "Callback": ".engine.callbacks"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'retinanet' has no attribute {name!r}")
