"""Where shipped model bundles live, for the command line, the demo and the Slicer panel alike.

A source checkout keeps them in ``<repo>/Resources/Models``; the Slicer extension installs them beside
the module (``<module>/Resources/Models``); ``$MEDSEGUNET_MODELS`` adds a folder of one's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

from MedSegUNetLib.core.errors import MedSegError

BUNDLE_ENDING = ".safetensors"


def model_folders() -> List[Path]:
    here = Path(__file__).resolve().parents[1]  # .../MedSegUNet/MedSegUNetLib
    candidates = [here.parent / "Resources" / "Models", here.parent.parent / "Resources" / "Models"]
    configured = os.environ.get("MEDSEGUNET_MODELS")
    if configured:
        candidates.insert(0, Path(configured))
    return [folder for folder in candidates if folder.is_dir()]


def shipped_models() -> List[Path]:
    """Every bundle in the model folders, first folder first, each name once."""
    seen, found = set(), []
    for folder in model_folders():
        for path in sorted(folder.glob(f"*{BUNDLE_ENDING}")):
            if path.name not in seen:
                seen.add(path.name)
                found.append(path)
    return found


def find_model(name: str) -> Path:
    """A shipped bundle by file name with or without its ending (``abdomen-ct``)."""
    wanted = name if name.endswith(BUNDLE_ENDING) else name + BUNDLE_ENDING
    for path in shipped_models():
        if path.name == wanted:
            return path
    places = ", ".join(str(f) for f in model_folders()) or "no model folder found"
    raise MedSegError(f"no shipped model named '{name}' (looked in {places})")
