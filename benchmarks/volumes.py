"""The benchmarks' inputs: CT-like volumes of any size made from a real CT, and the model that segments them.

A network only gives comparable outputs on what it was trained for (an untrained one flips its argmax on
the slightest rounding), so the volumes are made from the sample CT of ``medsegunet sample-data``
(TotalSegmentator's example scan) and segmented with the shipped model. The scan is resampled onto the
requested grid (air around it, its top at the scan's top, mirror copies below) with a little noise, as a finer scan has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "Resources" / "Models" / "abdomen-ct.safetensors"


@dataclass(frozen=True)
class VolumeSize:
    """A benchmark volume: voxels and spacing in (x, y, z) order."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]

    def describe(self) -> str:
        return f"{'x'.join(map(str, self.size))} at {'x'.join(f'{s:g}' for s in self.spacing)} mm"


SIZES = {
    "full": VolumeSize((512, 512, 300), (0.8, 0.8, 1.5)),
    "quick": VolumeSize((320, 320, 120), (1.2, 1.2, 2.5)),
    "tiny": VolumeSize((96, 96, 36), (3.0, 3.0, 4.0)),  # the CI smoke check: one window per run
    "huge": VolumeSize((512, 512, 800), (0.8, 0.8, 1.5)),  # the memory goal
}


def source_ct(log=print) -> Path:
    """The sample CT (downloaded once into the sample-data cache)."""
    from training.sampledata import fetch_sources

    sources = fetch_sources(log=log)
    return sources / "tests" / "reference_files" / "example_ct.nii.gz"


def default_model() -> Path:
    return Path(os.environ.get("MEDSEGUNET_BENCH_MODEL", SHIPPED_MODEL))


def _mirrored_below(array: np.ndarray, slices: int) -> np.ndarray:
    """``array`` (z, y, x) continued downwards (lower z) by mirror copies to at least ``slices`` slices."""
    blocks, total, flip = [array], array.shape[0], True
    while total < slices:
        blocks.insert(0, array[::-1] if flip else array)
        total, flip = total + array.shape[0], not flip
    return np.concatenate(blocks) if len(blocks) > 1 else array


def ct_like(volume: VolumeSize, source: Path, seed: int = 0, orientation: str = "LPS"):
    """A SimpleITK int16 image on ``volume``'s grid (axial, stored as ``orientation``).

    The volume's top is the scan's top (the upper abdomen: liver, spleen, kidneys, where the shipped
    model's structures are); below the scan's end, mirror copies of it continue the body."""
    import SimpleITK as sitk

    scan = sitk.DICOMOrient(sitk.ReadImage(str(source), sitk.sitkFloat32), "LPS")
    extent_z = volume.size[2] * volume.spacing[2]
    slices = int(np.ceil(extent_z / scan.GetSpacing()[2])) + 1
    array = _mirrored_below(sitk.GetArrayFromImage(scan), slices)
    tall = sitk.GetImageFromArray(array)
    tall.SetSpacing(scan.GetSpacing())
    tall.SetDirection(scan.GetDirection())
    added = array.shape[0] - scan.GetSize()[2]
    tall.SetOrigin([*scan.GetOrigin()[:2], scan.GetOrigin()[2] - added * scan.GetSpacing()[2]])
    centre = np.array(scan.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in scan.GetSize()]))
    top = scan.TransformIndexToPhysicalPoint([0, 0, scan.GetSize()[2] - 1])[2] + 0.5 * scan.GetSpacing()[2]
    centre[2] = top - 0.5 * extent_z
    origin = centre - 0.5 * (np.array(volume.size) - 1) * np.array(volume.spacing)
    image = sitk.Resample(
        tall,
        list(volume.size),
        sitk.Transform(),
        sitk.sitkLinear,
        origin.tolist(),
        list(volume.spacing),
        [1, 0, 0, 0, 1, 0, 0, 0, 1],
        -1000.0,
        sitk.sitkFloat32,
    )
    array = sitk.GetArrayViewFromImage(image)
    noisy = np.empty(array.shape, dtype=np.int16)
    rng = np.random.default_rng(seed)
    for k in range(array.shape[0]):  # slice by slice: a 512x512x800 volume needs no float64 copy
        noisy[k] = np.clip(array[k] + rng.normal(0, 10, array[k].shape), -1024, 3071)
    result = sitk.GetImageFromArray(noisy)
    result.CopyInformation(image)
    return result if orientation == "LPS" else sitk.DICOMOrient(result, orientation)


def write_volume(
    path: Path, volume: VolumeSize, source: Optional[Path] = None, orientation: str = "LPS", compressed: bool = True
) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(
        ct_like(volume, source or source_ct(), orientation=orientation), str(path), useCompression=compressed
    )
    return path


def dice_between(a: Path, b: Path, labels: Optional[Sequence[int]] = None) -> float:
    """Mean Dice over the labels of two labelmap files on the same grid (both empty counts 1)."""
    import SimpleITK as sitk

    x = sitk.GetArrayFromImage(sitk.ReadImage(str(a)))
    y = sitk.GetArrayFromImage(sitk.ReadImage(str(b)))
    if x.shape != y.shape:
        return float("nan")
    values = labels if labels is not None else sorted((set(np.unique(x)) | set(np.unique(y))) - {0})
    scores = []
    for value in values:
        p, q = x == value, y == value
        total = np.count_nonzero(p) + np.count_nonzero(q)
        scores.append(2 * np.count_nonzero(p & q) / total if total else 1.0)
    return float(np.mean(scores)) if scores else 1.0


def same_voxels(a: Path, b: Path) -> bool:
    """Two labelmap files hold the same labels on the same grid, voxel for voxel."""
    import SimpleITK as sitk

    x, y = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    same_grid = (
        x.GetSize() == y.GetSize()
        and np.allclose(x.GetSpacing(), y.GetSpacing())
        and np.allclose(x.GetOrigin(), y.GetOrigin())
    )
    return bool(same_grid and np.array_equal(sitk.GetArrayViewFromImage(x), sitk.GetArrayViewFromImage(y)))
