"""DICOM RT structure sets: each ROI's closed planar contours rasterized onto its CT series' grid.

An RTSTRUCT file holds, per ROI, polygons in patient coordinates (LPS mm, as every DICOM position).
Each polygon is brought into the series' index space through ``core.geometry.Grid`` (so oblique and
flipped series need nothing special), matched to the slice whose plane it lies in, and filled on that
slice: a voxel is inside when its center is. Polygons of one ROI on one slice are combined by XOR
(even-odd), the RT convention by which an inner contour cuts a hole. pydicom reads the file
(header only, never pixel data); SimpleITK reads the CT series (``images.read_image``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.core.errors import MedSegError, PathLike
from MedSegUNetLib.core.geometry import Grid
from MedSegUNetLib.core.labels import Label, palette_color

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
# A contour lies in a slice's plane when every point is within this fraction of a slice step of it.
PLANE_TOLERANCE = 0.25
# In-plane points may lie up to half a voxel beyond the image's outer edge (an outline drawn on the edge).
EDGE_TOLERANCE = 0.5


@dataclass
class Roi:
    """One ROI of a structure set: its name, display color (0..1) and polygons (points in LPS mm)."""

    number: int
    name: str
    color: Tuple[float, float, float]
    polygons: List[np.ndarray] = field(default_factory=list)  # each (N, 3)


@dataclass
class StructureSet:
    """A CT series and the ROIs of its RTSTRUCT, rasterized: ``masks[name]`` is (z, y, x) bool on ``image``."""

    path: Path  # the RTSTRUCT file
    image: sitk.Image
    masks: Dict[str, np.ndarray]
    labels: List[Label]  # one per ROI, values 1..n in ROI order, colors from ROIDisplayColor
    notes: List[str]


def _read_header(path: Path) -> Optional[object]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError):
        return None


def is_rtstruct(path: PathLike) -> bool:
    """True for a readable DICOM file whose Modality is RTSTRUCT."""
    path = Path(path)
    if not path.is_file():
        return False
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError):
        return False
    return header.get("Modality") == "RTSTRUCT" or str(header.get("SOPClassUID", "")) == RTSTRUCT_SOP_CLASS


def find_rtstruct(path: PathLike) -> Optional[Path]:
    """The RTSTRUCT file ``path`` is, or the one in folder ``path`` (not its subfolders); None if none."""
    path = Path(path)
    if path.is_file():
        return path if is_rtstruct(path) else None
    if not path.is_dir():
        return None
    found = [p for p in sorted(path.iterdir()) if is_rtstruct(p)]
    if len(found) > 1:
        raise MedSegError(
            f"holds {len(found)} RT structure sets ({found[0].name}, {found[1].name}, ...); keep one", path
        )
    return found[0] if found else None


def referenced_series(dataset: object) -> Optional[str]:
    """The SeriesInstanceUID the structure set was drawn on (Referenced Frame of Reference Sequence)."""
    for frame in getattr(dataset, "ReferencedFrameOfReferenceSequence", []):
        for study in getattr(frame, "RTReferencedStudySequence", []):
            for series in getattr(study, "RTReferencedSeriesSequence", []):
                uid = getattr(series, "SeriesInstanceUID", None)
                if uid:
                    return str(uid)
    return None


def read_rois(path: Path) -> Tuple[object, List[Roi]]:
    """(the dataset, its ROIs in StructureSetROISequence order); only closed planar contours are kept."""
    dataset = _read_header(path)
    if dataset is None:
        raise MedSegError("is not a readable DICOM file", path)
    names = {int(item.ROINumber): str(item.ROIName).strip() for item in getattr(dataset, "StructureSetROISequence", [])}
    if not names:
        raise MedSegError("the RT structure set names no ROI (empty StructureSetROISequence)", path)
    seen: Dict[str, int] = {}
    for number, name in names.items():
        if name.casefold() in seen:
            raise MedSegError(f"the RT structure set has two ROIs named '{name}'", path)
        seen[name.casefold()] = number
    rois = {number: Roi(number, name, palette_color(index)) for index, (number, name) in enumerate(names.items())}
    for item in getattr(dataset, "ROIContourSequence", []):
        roi = rois.get(int(getattr(item, "ReferencedROINumber", -1)))
        if roi is None:
            raise MedSegError(
                f"contours refer to ROI number {item.get('ReferencedROINumber')}, which is not named", path
            )
        color = getattr(item, "ROIDisplayColor", None)
        if color is not None and len(color) == 3:
            roi.color = (float(color[0]) / 255, float(color[1]) / 255, float(color[2]) / 255)
        for contour in getattr(item, "ContourSequence", []):
            if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")).strip() != "CLOSED_PLANAR":
                continue  # points and open lines enclose no volume
            data = np.asarray([float(v) for v in contour.ContourData], dtype=float)
            if data.size < 9 or data.size % 3:
                raise MedSegError(f"ROI '{roi.name}' has a contour of {data.size} numbers, not 3 or more points", path)
            roi.polygons.append(data.reshape(-1, 3))
    return dataset, list(rois.values())


def _slice_of(index: np.ndarray, grid: Grid, roi: str, path: Path) -> int:
    """The slice a contour (continuous ijk indices) lies in; refuses contours between or off the slices."""
    planes = index[:, 2]
    slice_index = int(np.round(planes.mean()))
    if np.ptp(planes) > 2 * PLANE_TOLERANCE:
        raise MedSegError(f"ROI '{roi}': a contour is not parallel to the series' slices", path)
    if not 0 <= slice_index < grid.size[2]:
        raise MedSegError(
            f"ROI '{roi}': a contour lies off the series' grid (slice position {planes.mean():.2f}, "
            f"the series has slices 0..{grid.size[2] - 1})",
            path,
        )
    if np.max(np.abs(planes - slice_index)) > PLANE_TOLERANCE:
        raise MedSegError(
            f"ROI '{roi}': a contour lies between slices {int(np.floor(planes.mean()))} and "
            f"{int(np.floor(planes.mean())) + 1}; it was not drawn on this series",
            path,
        )
    low, high = index[:, :2].min(axis=0), index[:, :2].max(axis=0)
    limit = np.array(grid.size[:2]) - 1 + EDGE_TOLERANCE + 0.5
    if np.any(low < -EDGE_TOLERANCE - 0.5) or np.any(high > limit):
        raise MedSegError(f"ROI '{roi}': a contour on slice {slice_index} reaches outside the image", path)
    return slice_index


def fill_polygon(points_ij: np.ndarray, shape_ji: Tuple[int, int]) -> np.ndarray:
    """(j, i) bool mask of the voxels whose centers lie inside a polygon given in (i, j) index units."""
    from matplotlib.path import Path as PolygonPath

    mask = np.zeros(shape_ji, dtype=bool)
    low = np.clip(np.floor(points_ij.min(axis=0)).astype(int), 0, np.array(shape_ji[::-1]) - 1)
    high = np.clip(np.ceil(points_ij.max(axis=0)).astype(int), 0, np.array(shape_ji[::-1]) - 1)
    i, j = np.meshgrid(np.arange(low[0], high[0] + 1), np.arange(low[1], high[1] + 1))
    centers = np.column_stack([i.ravel(), j.ravel()]).astype(float)
    inside = PolygonPath(points_ij, closed=False).contains_points(centers)
    mask[j.ravel()[inside], i.ravel()[inside]] = True
    return mask


def rasterize(roi: Roi, grid: Grid, path: Path) -> np.ndarray:
    """The ROI as a (z, y, x) bool mask: each polygon filled on its slice, polygons on one slice XORed."""
    mask = np.zeros(grid.size[::-1], dtype=bool)
    for polygon in roi.polygons:
        index = grid.to_index(polygon)
        k = _slice_of(index, grid, roi.name, path)
        mask[k] ^= fill_polygon(index[:, :2], (grid.size[1], grid.size[0]))
    return mask


def check_series(dataset: object, folder: Path, path: Path) -> str:
    """The UID of the series the structure set references, refused unless the folder holds that series."""
    from MedSegUNetLib.imageio.images import dicom_series

    available = dicom_series(folder)
    wanted = referenced_series(dataset)
    if wanted is None:
        if len(available) != 1:
            raise MedSegError(f"names no referenced series and {folder} holds {len(available)} image series", path)
        return available[0]
    if wanted not in available:
        raise MedSegError(
            f"references series {wanted}, which is not in {folder} (it holds: {'; '.join(available[:3]) or 'none'})",
            path,
        )
    return wanted


def read_structure_set(path: PathLike, names: Optional[List[str]] = None) -> StructureSet:
    """A DICOM folder (CT series + RTSTRUCT) or an RTSTRUCT file beside its series, with every ROI (or
    just ``names``) rasterized onto the series' grid."""
    from MedSegUNetLib.imageio.images import read_image

    rtstruct = find_rtstruct(path)
    if rtstruct is None:
        raise MedSegError("holds no DICOM RT structure set", path)
    dataset, rois = read_rois(rtstruct)
    series = check_series(dataset, rtstruct.parent, rtstruct)
    image = read_image(rtstruct.parent, series=series).image
    grid = Grid.of(image)
    chosen = [roi for roi in rois if names is None or roi.name in names]
    notes = [f"ROI '{roi.name}' has no closed contour: left empty" for roi in chosen if not roi.polygons]
    masks = {roi.name: rasterize(roi, grid, rtstruct) for roi in chosen}
    labels = [Label(value, roi.name, roi.color) for value, roi in enumerate(chosen, start=1)]
    return StructureSet(rtstruct, image, masks, labels, notes)


def roi_names(path: PathLike) -> List[Label]:
    """The ROIs of a structure set as labels (values 1..n, ROI order), without reading the CT."""
    rtstruct = find_rtstruct(path)
    if rtstruct is None:
        raise MedSegError("holds no DICOM RT structure set", path)
    _, rois = read_rois(rtstruct)
    return [Label(value, roi.name, roi.color) for value, roi in enumerate(rois, start=1)]
