"""A model set: several bundles that segment as one (TotalSegmentator's task is five nnU-Net models).

A ``NAME.modelset.json`` file names its bundles, as paths relative to the file's folder or absolute:

    {"model_set": 1, "name": "Abdomen and vessels", "models": ["organs.safetensors", "vessels.safetensors"]}

Wherever a bundle is asked for (``segment -m``, the panel's model list), a set stands for its bundles in
that order: ``segment -m SET`` is ``segment -m A -m B`` (segment_set.py merges their labels, the first
model winning a voxel two models label). Reading a set reads no weights; each bundle is checked as a
bundle is, when it is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

from MedSegUNetLib.core.atomic import atomic_path
from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.model.bundle import BundleMeta, read_bundle_metadata

SUFFIX = ".modelset.json"
FORMAT_VERSION = 1
MAX_MODELS = 20  # TotalSegmentator's largest task has five; a set is read before any bundle is
MAX_BYTES = 64 * 1024


@dataclass
class ModelSet:
    name: str
    models: List[Path]  # resolved, in the set's order


def is_model_set(path: Path) -> bool:
    return Path(path).name.lower().endswith(SUFFIX)


def read_model_set(path: Path) -> ModelSet:
    """The set at ``path``; a clear error naming the file for anything but a list of existing bundles."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise MedSegError(f"is larger than a model set can be ({MAX_BYTES // 1024} KB)", path)
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedSegError("does not exist", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MedSegError(f"is not a readable model set ({error})", path) from None
    if not isinstance(data, dict) or data.get("model_set") != FORMAT_VERSION:
        raise MedSegError(f'is not a model set: it lacks "model_set": {FORMAT_VERSION}', path)
    names = data.get("models")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise MedSegError('"models" must be a non-empty list of bundle paths', path)
    if len(names) > MAX_MODELS:
        raise MedSegError(f"names {len(names)} models, more than {MAX_MODELS}", path)
    models = [_member(path, name) for name in names]
    if len({model.resolve() for model in models}) != len(models):
        raise MedSegError("names one bundle twice", path)
    name = data.get("name")
    return ModelSet(name if isinstance(name, str) and name.strip() else _stem(path), models)


def _member(set_path: Path, name: str) -> Path:
    member = Path(name) if Path(name).is_absolute() else set_path.parent / name
    if is_model_set(member):
        raise MedSegError(f"names another model set ({name}): a set holds bundles only", set_path)
    if not member.is_file():
        raise MedSegError(f"names {name}, which does not exist", set_path)
    return member


def _stem(path: Path) -> str:
    return path.name[: -len(SUFFIX)]


def write_model_set(path: Path, name: str, models: Sequence[Path]) -> Path:
    """Write a set of ``models`` (bundles; a set among them is flattened into its bundles) at ``path``, in
    one rename; bundles that name one structure are refused here rather than at Segment. Members in the
    set's folder are named relative to it, so that the folder can be moved as a whole."""
    path = Path(path)
    if not is_model_set(path):
        raise MedSegError(f"a model set's name must end in {SUFFIX}", path)
    if not models or len(models) > MAX_MODELS:
        raise MedSegError(f"a model set holds 1 to {MAX_MODELS} bundles, not {len(models)}", path)
    folder = path.parent.resolve()
    members = [_member(path, str(Path(model).resolve())) for model in expand_models(models)]
    check_distinct_structures([read_bundle_metadata(member) for member in members], members)
    resolved = [member.resolve() for member in members]
    names = [str(m.relative_to(folder)) if m.parent == folder else str(m) for m in resolved]
    with atomic_path(path) as temporary:
        document = {"model_set": FORMAT_VERSION, "name": name, "models": names}
        temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


def expand_models(paths: Sequence[Path]) -> List[Path]:
    """Bundles and sets, each set replaced by its bundles in its order; one bundle named twice is refused."""
    expanded: List[Path] = []
    for path in paths:
        expanded += read_model_set(path).models if is_model_set(path) else [Path(path)]
    seen = set()
    for model in expanded:
        if model.resolve() in seen:
            raise MedSegError("is given twice (directly or through a model set)", model)
        seen.add(model.resolve())
    return expanded


def check_distinct_structures(metas: Sequence[BundleMeta], paths: Sequence[Path]) -> None:
    """Refuse a structure that two models name (ignoring case), naming both: a merged output holds each
    structure once, from one model."""
    owners: Dict[str, Path] = {}
    for path, meta in zip(paths, metas):
        for label in meta.labels:
            key = label.name.strip().casefold()
            if key in owners:
                raise MedSegError(
                    f"names '{label.name}' as {Path(owners[key]).name} does: two models of one run must not "
                    "segment the same structure",
                    path,
                )
            owners[key] = path
