"""Plain datasets as training cases: MSD / nnU-Net v2 raw folders and IMAGE:LABEL pairs of files.

Medical Segmentation Decathlon (``dataset.json`` with ``labels`` {"0": "background", "1": "spleen"}
and a ``training`` list of image/label paths) and nnU-Net v2 (``labels`` {"background": 0, "spleen": 1},
``channel_names``, ``file_ending``, cases found as ``imagesTr/CASE_0000.nii.gz`` + ``labelsTr/CASE.nii.gz``).
The folder is untrusted: the JSON is size-checked and every path must stay inside the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.labels import palette_color

from .scenes import Case, SegmentInfo

DATASET_JSON = "dataset.json"
MAX_JSON_BYTES = 16 * 2**20


@dataclass
class Dataset:
    cases: List[Case]
    modality: Optional[str]  # "ct" or "mri" when the dataset says so


def is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and (path / DATASET_JSON).is_file()


def _load_description(folder: Path) -> dict:
    path = folder / DATASET_JSON
    if path.stat().st_size > MAX_JSON_BYTES:
        raise MedSegError("is too large for a dataset description", path)
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MedSegError(f"is not valid JSON ({error})", path) from None
    if not isinstance(description, dict) or "labels" not in description:
        raise MedSegError("has no 'labels'; not an MSD / nnU-Net dataset description", path)
    return description


def _labels(description: dict, path: Path) -> Dict[int, str]:
    """Label value -> name, from either convention; background left out."""
    raw = description["labels"]
    if not isinstance(raw, dict):
        raise MedSegError("'labels' must be an object", path)
    table: Dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, str) and str(key).strip().lstrip("-").isdigit():  # MSD: "1": "spleen"
            number, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: "spleen": 1
            number, name = value, str(key)
        elif isinstance(value, list):
            raise MedSegError(f"label '{key}' is a region (nnU-Net region-based training); not supported", path)
        else:
            raise MedSegError(f"label entry {key!r}: {value!r} is neither MSD nor nnU-Net style", path)
        if number != 0:
            table[number] = name
    if not table:
        raise MedSegError("declares no foreground label", path)
    return table


def _modality(description: dict, path: Path) -> Optional[str]:
    channels = description.get("channel_names") or description.get("modality") or {}
    if not isinstance(channels, dict):
        raise MedSegError("'channel_names'/'modality' must be an object", path)
    if len(channels) > 1:
        raise MedSegError(
            f"has {len(channels)} input channels ({', '.join(map(str, channels.values()))}); "
            "only single-channel datasets are supported",
            path,
        )
    name = str(next(iter(channels.values()), "")).strip().upper()
    return "ct" if name == "CT" else ("mri" if name else None)


def _inside(folder: Path, relative: str, path: Path) -> Path:
    candidate = (folder / relative).resolve()
    if not candidate.is_relative_to(folder.resolve()):
        raise MedSegError(f"path {relative!r} leaves the dataset folder", path)
    if not candidate.is_file():
        raise MedSegError(f"lists {relative!r}, which does not exist", path)
    return candidate


def _msd_pairs(folder: Path, description: dict, path: Path) -> List[Tuple[str, Path, Path]]:
    pairs = []
    for entry in description["training"]:
        if not isinstance(entry, dict) or not {"image", "label"} <= set(entry):
            raise MedSegError("'training' entries need 'image' and 'label'", path)
        image, label = _inside(folder, entry["image"], path), _inside(folder, entry["label"], path)
        pairs.append((_case_name(label.name), image, label))
    return pairs


def _nnunet_pairs(folder: Path, description: dict, path: Path) -> List[Tuple[str, Path, Path]]:
    ending = description.get("file_ending", ".nii.gz")
    labels_folder = folder / "labelsTr"
    if not labels_folder.is_dir():
        raise MedSegError("has no labelsTr folder", folder)
    pairs = []
    for label in sorted(labels_folder.glob(f"*{ending}")):
        if label.name.startswith("._"):
            continue  # macOS resource forks, common in downloaded archives
        name = label.name[: -len(ending)]
        image = folder / "imagesTr" / f"{name}_0000{ending}"
        if not image.is_file():
            raise MedSegError(f"case {name}: no image imagesTr/{image.name}", folder)
        pairs.append((name, image, label))
    return pairs


def _case_name(file_name: str) -> str:
    for ending in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if file_name.endswith(ending):
            return file_name[: -len(ending)]
    return file_name


def read_dataset_folder(folder: Path) -> Dataset:
    folder = Path(folder)
    description = _load_description(folder)
    path = folder / DATASET_JSON
    names = _labels(description, path)
    modality = _modality(description, path)
    has_list = isinstance(description.get("training"), list) and description["training"]
    pairs = _msd_pairs(folder, description, path) if has_list else _nnunet_pairs(folder, description, path)
    if not pairs:
        raise MedSegError("holds no training cases", folder)
    segments = [SegmentInfo(name, value, 0, palette_color(value - 1)) for value, name in sorted(names.items())]
    cases = [Case(name, image, label, list(segments), f"{folder.name}/{name}") for name, image, label in pairs]
    return Dataset(cases, modality)


def read_pair(text: str) -> Case:
    """``IMAGE:LABEL`` (a labelmap file); its labels are named ``label_<value>``."""
    import numpy as np
    import SimpleITK as sitk

    from MedSegUNetLib.imageio.images import read_labelmap

    image_text, _, label_text = text.rpartition(":")
    image, label = Path(image_text), Path(label_text)
    for path in (image, label):
        if not path.is_file():
            raise MedSegError("not found (expected IMAGE:LABEL)", path)
    # GetArrayFromImage (a copy): a view of a temporary image reads freed memory
    values = np.unique(sitk.GetArrayFromImage(read_labelmap(label)))
    segments = [SegmentInfo(f"label_{int(v)}", int(v), 0, palette_color(int(v) - 1)) for v in values if v != 0]
    return Case(_case_name(image.name), image, label, segments, f"{image.name}:{label.name}")


def rtstruct_case(path: Path) -> Case:
    """A DICOM folder (CT series + RTSTRUCT) or an RTSTRUCT file beside its series: each ROI a segment by name."""
    from MedSegUNetLib.imageio.rtstruct import find_rtstruct, roi_names

    rtstruct = find_rtstruct(path)
    if rtstruct is None:
        raise MedSegError("holds no DICOM RT structure set", path)
    segments = [SegmentInfo(label.name, label.value, 0, label.color) for label in roi_names(rtstruct)]
    folder = rtstruct.parent
    return Case(folder.name, folder, rtstruct, segments, f"{folder.name}/{rtstruct.name} (RT structure set)")


def rtstruct_cases(folder: Path) -> List[Case]:
    """The folder itself when it holds an RTSTRUCT, else each subfolder that does (one level)."""
    from MedSegUNetLib.imageio.rtstruct import find_rtstruct

    if find_rtstruct(folder) is not None:
        return [rtstruct_case(folder)]
    return [rtstruct_case(sub) for sub in sorted(folder.iterdir()) if sub.is_dir() and find_rtstruct(sub) is not None]


def looks_like_pair(text: str) -> bool:
    image, separator, label = text.rpartition(":")
    return bool(separator and image and label) and not Path(text).exists() and Path(label).suffix != ""
