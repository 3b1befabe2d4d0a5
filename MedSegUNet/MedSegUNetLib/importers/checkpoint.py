"""Reading a PyTorch checkpoint from an untrusted source: tensors and plain types only, never code."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple, Union


def numpy_scalar_globals() -> List[Union[Callable[..., Any], Tuple[Callable[..., Any], str]]]:
    """The numpy globals a trained nnU-Net 2.x checkpoint names: the float64 scalars in its ``logging`` and
    ``_best_ema`` entries are pickled as numpy's scalar constructor, ``numpy.dtype`` and its float64 dtype
    class. The constructor is listed under both of its module paths (numpy 1.x wrote ``numpy.core``)."""
    import numpy as np

    core = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
    scalar = importlib.import_module(core).scalar
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
        (type(np.dtype(np.float64)), "numpy.dtypes.Float64DType"),
    ]


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """The checkpoint's dictionary, loaded with ``weights_only=True`` plus :func:`numpy_scalar_globals`.

    Anything else (a class, a function: a pickle that would run code) is refused before it is built."""
    import torch

    from MedSegUNetLib.core.errors import MedSegError

    try:
        with torch.serialization.safe_globals(numpy_scalar_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = str(error).split("\n")[0].strip()
        raise MedSegError(
            f"the checkpoint holds more than tensors and plain types, and was not loaded ({refused})", path
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise MedSegError(f"is not a readable PyTorch checkpoint ({type(error).__name__}: {error})", path) from None
    if not isinstance(checkpoint, dict):
        raise MedSegError(f"the checkpoint is a {type(checkpoint).__name__}, not a dictionary", path)
    return checkpoint
