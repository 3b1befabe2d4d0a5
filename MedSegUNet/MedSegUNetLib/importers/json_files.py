"""The JSON files of a model source (plans, dataset description, bundle configs), read as data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from MedSegUNetLib.core.errors import MedSegError


def read_json_object(path: Path) -> Dict[str, Any]:
    """The JSON object in ``path``; anything unreadable or not an object is one error naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MedSegError(f"is not readable JSON ({error})", path) from None
    if not isinstance(data, dict):
        raise MedSegError("does not hold a JSON object", path)
    return data
