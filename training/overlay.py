"""A PNG of a segmentation over its scan: axial, coronal and sagittal slices, prediction beside reference.

Slices are taken in the scan's canonical RAS orientation and drawn with their physical aspect ratio,
so what the picture shows is what Slicer shows (patient's right on the left of axial/coronal views).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.core.atomic import atomic_path
from MedSegUNetLib.core.geometry import reorient
from MedSegUNetLib.core.labels import Label


def _center_of(mask: np.ndarray, fallback: Sequence[int]) -> Tuple[int, int, int]:
    points = np.argwhere(mask)
    z, y, x = (int(v) for v in np.median(points, axis=0)) if len(points) else fallback
    return z, y, x


def _views(
    volume: np.ndarray, center: Tuple[int, int, int], spacing_xyz: Sequence[float]
) -> List[Tuple[str, np.ndarray, float]]:
    """(title, 2D slice for imshow, aspect) for an array in RAS (z, y, x) order, shown as Slicer shows it:
    radiological convention (patient's right on the left), anterior and superior up, anterior left on
    the sagittal view. In RAS, index x grows towards the patient's right, y towards anterior, z superior."""
    z, y, x = center
    sx, sy, sz = spacing_xyz
    axial = volume[z, ::-1, ::-1]
    coronal = volume[::-1, y, ::-1]
    sagittal = volume[::-1, :, x][:, ::-1]
    return [("axial", axial, sy / sx), ("coronal", coronal, sz / sx), ("sagittal", sagittal, sz / sy)]


def _height_ratios(views: List[Tuple[str, np.ndarray, float]]) -> List[float]:
    """Rows as tall as their physical height (a thin slab gets a short row, not a tall empty one)."""
    return [max(0.2, picture.shape[0] * aspect / picture.shape[1]) for _, picture, aspect in views]


def _color_table(labels: Sequence[Label]) -> Dict[int, Tuple[float, float, float]]:
    return {label.value: label.color for label in labels}


def _rgba(labelmap: np.ndarray, colors: Dict[int, Tuple[float, float, float]], alpha: float = 0.45) -> np.ndarray:
    rgba = np.zeros(labelmap.shape + (4,), dtype=np.float32)
    for value, color in colors.items():
        rgba[labelmap == value] = (*color, alpha)
    return rgba


def write_overlay_png(
    path: Path,
    image: sitk.Image,
    columns: Sequence[Tuple[str, sitk.Image, Sequence[Label]]],
    window: Tuple[float, float] = (-160.0, 240.0),
    focus_label: Optional[int] = None,
    title: str = "",
) -> Path:
    """``columns``: (title, labelmap on ``image``'s grid, its labels), e.g. prediction then reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scan = sitk.GetArrayFromImage(reorient(image, "RAS")).astype(np.float32)
    maps = [sitk.GetArrayFromImage(reorient(labelmap, "RAS")) for _, labelmap, _ in columns]
    # centre on the reference (the last column) where it has anything, else on the first column
    focus = (
        next((m > 0 for m in reversed(maps) if m.any()), maps[0] > 0)
        if focus_label is None
        else maps[-1] == focus_label
    )
    center = _center_of(focus, [s // 2 for s in scan.shape])
    spacing = reorient(image, "RAS").GetSpacing()
    ratios = _height_ratios(_views(scan, center, spacing))
    figure, axes = plt.subplots(
        3,
        len(columns),
        figsize=(4.2 * len(columns), 4.2 * sum(ratios) + 1.2),
        dpi=90,
        squeeze=False,
        gridspec_kw={"height_ratios": ratios},
    )
    for column, ((name, _, labels), labelmap) in enumerate(zip(columns, maps)):
        colors = _color_table(labels)
        for row, ((view, picture, aspect), (_, overlay, _)) in enumerate(
            zip(_views(scan, center, spacing), _views(labelmap, center, spacing))
        ):
            axis = axes[row][column]
            axis.imshow(picture, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
            axis.imshow(_rgba(overlay, colors), aspect=aspect, interpolation="nearest")
            axis.set_title(f"{name}: {view}", fontsize=10)
            axis.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=label.color) for label in columns[0][2]]
    figure.legend(
        handles, [label.name for label in columns[0][2]], loc="lower center", ncol=min(6, len(handles)), fontsize=9
    )
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.04, 1, 0.97))
    with atomic_path(Path(path)) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)
    return Path(path)
