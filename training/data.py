"""Cases brought to the network's grid once (the engine's own preprocessing), and MONAI augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.core.anatomy import names_a_side
from MedSegUNetLib.core.geometry import Grid, reorient, resample_onto, xyz_to_zyx
from MedSegUNetLib.model.bundle import IMAGE_AXES, Preprocessing
from MedSegUNetLib.prediction.preprocessing import normalize, to_network_grid

from .config import Fingerprint
from .label_table import LabelTable
from .scenes import Case, load_case_arrays

if TYPE_CHECKING:
    from monai.transforms import Compose


@dataclass
class PreparedCase:
    name: str
    image: np.ndarray  # (1, Z, Y, X) float32, normalized
    label: np.ndarray  # (1, Z, Y, X) uint8 class indices, IGNORE where nothing is taught
    spacing_zyx: Tuple[float, float, float]
    annotated: Tuple[int, ...] = ()  # the classes (1-based) this case teaches; () means every class


def load_all(cases: Sequence[Case]) -> Dict[str, Tuple[sitk.Image, sitk.Image]]:
    return {case.name: load_case_arrays(case) for case in cases}


def fingerprint(loaded: Dict[str, Tuple[sitk.Image, sitk.Image]], orientation: str = "RAS") -> Fingerprint:
    result = Fingerprint()
    samples = []
    for image, label in loaded.values():
        oriented = reorient(image, orientation)
        result.spacings.append(tuple(oriented.GetSpacing()))
        result.sizes_mm.append(tuple(np.array(oriented.GetSize()) * np.array(oriented.GetSpacing())))
        voxels = sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(label) > 0]
        if voxels.size:
            sample = np.random.default_rng(0).choice(voxels, size=min(voxels.size, 100000), replace=False)
            samples.append(sample.astype(np.float32))  # integer scans (int16 CT) too: statistics in float
    result.foreground_values = np.concatenate(samples) if samples else None
    return result


def prepare(
    case: Case,
    image: sitk.Image,
    label: sitk.Image,
    table: LabelTable,
    preprocessing: Preprocessing,
    partial: bool = True,
) -> PreparedCase:
    """The case on the network grid. ``partial``: it teaches only the structures it annotates (else every
    structure it lacks is taught as background)."""
    on_grid = to_network_grid(image, preprocessing)
    labels = resample_onto(reorient(label, preprocessing.orientation), Grid.of(on_grid), sitk.sitkNearestNeighbor)
    classes = table.lookup_table(case)[sitk.GetArrayFromImage(labels)]
    array = normalize(sitk.GetArrayFromImage(on_grid).astype(np.float32), preprocessing.normalization)
    annotated = tuple(table.annotated(case)) if partial else tuple(range(1, len(table.labels) + 1))
    spacing = xyz_to_zyx(on_grid.GetSpacing())
    return PreparedCase(case.name, array[None], classes[None].astype(np.uint8), spacing, annotated)


ALL_AXES = (0, 1, 2)


def mirror_axes(names: Sequence[str], preprocessing: Preprocessing) -> Tuple[int, ...]:
    """The (z, y, x) axes of the network grid a training crop may be mirrored along: all three, but never
    left-right when a structure's name says a side. Mirrored left to right, a left kidney lies where the
    right one does and would be taught under the other's name (TotalSegmentator, whose names these are,
    trains without mirroring for that reason). The bundle keeps these axes, so that --tta mirrors only
    along them."""
    if preprocessing.orientation == IMAGE_AXES or not any(names_a_side(name) for name in names):
        return ALL_AXES
    left_right = next(i for i, letter in enumerate(preprocessing.orientation.upper()) if letter in "RL")
    return tuple(axis for axis in ALL_AXES if axis != 2 - left_right)  # the code is x, y, z; the axes z, y, x


def augmentations(flip_axes: Sequence[int] = ALL_AXES) -> Compose:
    """What every training crop goes through after it is cut (training/sampling.py places the crops);
    mirrored only along ``flip_axes`` (:func:`mirror_axes`)."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    return Compose(
        [
            *[RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in flip_axes],
            RandAffined(
                keys,
                prob=0.3,
                rotate_range=[0.26] * 3,
                scale_range=[0.15] * 3,
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            # Wide intensity changes: a scan with or without contrast agent shifts organs by 40-60 HU,
            # about 0.2 in normalized units; with few training cases this is what generalizes.
            RandScaleIntensityd("image", factors=0.25, prob=0.5),
            RandShiftIntensityd("image", offsets=0.3, prob=0.5),
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
            RandGaussianNoised("image", prob=0.15, std=0.05),
            RandGaussianSmoothd("image", prob=0.1, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        ]
    )


def pad_to_patch(array: np.ndarray, patch_zyx: Sequence[int], value: float = 0) -> np.ndarray:
    """A (C, Z, Y, X) array padded with ``value``, centered, to at least the patch (as segment pads a scan
    thinner than its window)."""
    missing = [max(p - s, 0) for s, p in zip(array.shape[1:], patch_zyx)]
    if not any(missing):
        return array
    return np.pad(array, [(0, 0)] + [(m // 2, m - m // 2) for m in missing], constant_values=value)


def split(
    names: List[str], fraction: float, seed: int, folds: int = 0, fold: int = 0
) -> Tuple[List[str], List[str], str]:
    """(train, validation, note): a random fraction, or fold ``fold`` of ``folds`` (the same seeded order).

    With one case, validation is on the training case, and says so."""
    if len(names) < 2:
        return names, names, "one case only: validating on the training case (optimistic)"
    if fraction == 0 and not folds:
        return names, names, "--val-fraction 0: every case trains, validating on the training cases (optimistic)"
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    if folds:
        if not 2 <= folds <= len(names):
            raise ValueError(f"--folds {folds} needs 2..{len(names)} (the number of cases)")
        if not 0 <= fold < folds:
            raise ValueError(f"--fold {fold} is not in 0..{folds - 1}")
        validation = order[fold::folds]
        note = f"fold {fold} of {folds}: {len(names) - len(validation)} training, {len(validation)} validation cases"
    else:
        count = max(1, int(round(fraction * len(names))))
        validation = order[:count]
        note = f"{len(names) - count} training, {count} validation cases"
    return [n for n in names if n not in validation], validation, note
