"""Reading other libraries' weight files without letting them run code.

detectron2 `.pkl` and PaddleDetection `.pdparams` files are plain pickles of dicts of numpy
arrays. A pickle can name any callable to run on load, so we unpickle with an allow-list
of the few numpy/collections constructors such files need and refuse everything else.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .common import ConversionError

_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "float32"), ("numpy", "float64"), ("numpy", "int64"), ("numpy", "int32"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: weight files need only numpy arrays")


def load_pickle(path: str | Path, trust: bool = False):
    """Unpickle `path` admitting only numpy arrays and plain containers (all when `trust`)."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            if trust:
                return pickle.load(f, encoding="latin1")  # the user vouched for this file
            return RestrictedUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as err:
            if trust or not str(err).startswith("refused"):
                raise ConversionError(f"{path}: not a weight file (not a readable pickle: {err})") from None
            raise ConversionError(f"{path}: {err}. If you trust this file, pass --trust") from None
        except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError,
                OverflowError, MemoryError) as err:
            raise ConversionError(f"{path}: not a weight file (not a readable pickle: {type(err).__name__}: "
                                  f"{err})") from None


def load_torch_state(path: str | Path, trust: bool = False) -> dict:
    """A `torch.save`d state dict, read with `weights_only=True` (full load only with `trust`)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        if trust or "Weights only load failed" not in str(err):
            raise ConversionError(f"{path}: not a weight file ({str(err).splitlines()[0]})") from None
        raise ConversionError(f"{path}: refused by the weights-only loader ({str(err).splitlines()[0]}). "
                              "If you trust this file, pass --trust") from None
    except RuntimeError:
        # not a torch zip file: maybe a plain pickle (detectron2 .pkl renamed .pth)
        return load_pickle(path, trust)
    except (OSError, EOFError, ValueError) as err:  # a torch zip cut short or damaged
        raise ConversionError(f"{path}: damaged or truncated weight file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'unreadable'})") from None


def to_tensors(state: dict) -> dict[str, torch.Tensor]:
    """numpy arrays / tensors in a weights dict as float or integer tensors."""
    out = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(np.ascontiguousarray(value))
        elif isinstance(value, torch.Tensor):
            out[key] = value
    return out
