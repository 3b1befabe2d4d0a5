"""Image geometry: the one place where grids, orientations and coordinate systems are converted.

The convention, used everywhere in MedSegUNet:

* An image travels as a ``SimpleITK.Image``: voxels and their index-to-physical transform together.
  Physical coordinates are LPS millimetres (as in DICOM, NRRD "left-posterior-superior" and ITK).
* ``SimpleITK.GetArrayFromImage`` gives arrays in (k, j, i) = (z, y, x) order; the network works on
  that order. Sizes, spacings and patch sizes that are *stored* (bundle, JSON) are in (i, j, k) = (x, y, z)
  order, like SimpleITK's ``GetSize``/``GetSpacing``; :func:`xyz_to_zyx` is the only flip between them.
* slicerio and NRRD store voxels in (i, j, k) order with a 4x4 ``ijkToLPS`` matrix: convert with
  :func:`ijk_to_lps` and :func:`image_from_ijk_array`.
* RAS (Slicer's world, NIfTI's qform/sform) differs from LPS by negating x and y: :data:`LPS_TO_RAS`.
* An orientation code such as ``"RAS"`` names where each index axis points (i towards Right, ...),
  the convention of nibabel, MONAI and SimpleITK's ``DICOMOrient``.

A segmentation that comes out flipped or shifted is the worst bug this project can have: every
conversion above is tested in ``Testing/test_geometry.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

Triple = Tuple[float, float, float]


def _int_triple(values: Iterable[float]) -> Tuple[int, int, int]:
    i, j, k = values
    return int(i), int(j), int(k)


def _float_triple(values: Iterable[float]) -> Triple:
    x, y, z = values
    return float(x), float(y), float(z)


@dataclass(frozen=True)
class Grid:
    """A 3D voxel grid in physical (LPS) space: enough to compare grids and make empty images."""

    size: Tuple[int, int, int]  # (i, j, k)
    spacing: Triple
    origin: Triple
    direction: Tuple[float, ...]  # 9 values, row-major, columns are the axis directions

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(
            _int_triple(image.GetSize()),
            _float_triple(image.GetSpacing()),
            _float_triple(image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    def matches(self, other: "Grid", tolerance: float = 1e-4) -> bool:
        """Same size, and spacing/origin/direction equal within ``tolerance`` (relative to spacing)."""
        if self.size != other.size:
            return False
        scale = max(max(self.spacing), 1e-6)
        return (
            np.allclose(self.spacing, other.spacing, atol=tolerance * scale)
            and np.allclose(self.origin, other.origin, atol=tolerance * scale)
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )

    def axis_vectors(self) -> np.ndarray:
        """Rows: the physical step of one voxel along i, j and k."""
        return np.array(self.direction, dtype=float).reshape(3, 3).T * np.array(self.spacing)[:, None]

    def corners(self) -> np.ndarray:
        """The 8 corner voxel centers in physical space."""
        steps = self.axis_vectors() * (np.array(self.size) - 1)[:, None]
        offsets = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=float)
        return np.array(self.origin) + offsets @ steps

    def same_voxels(self, other: "Grid", tolerance: float = 1e-3) -> bool:
        """The same voxel centers, possibly stored in another axis order or direction (RAS vs LPS flips)."""
        if sorted(self.size) != sorted(other.size):
            return False
        scale = max(min(self.spacing), 1e-6) * tolerance
        mine, theirs = self.corners(), other.corners()
        corners_match = all(np.min(np.linalg.norm(theirs - corner, axis=1)) <= scale for corner in mine)
        steps_match = all(
            np.min(np.linalg.norm(np.abs(other.axis_vectors()) - np.abs(step), axis=1)) <= scale
            for step in self.axis_vectors()
        )
        return corners_match and steps_match

    def to_physical(self, indices_ijk: np.ndarray) -> np.ndarray:
        """Physical (LPS) points of continuous (i, j, k) indices, one per row."""
        return np.array(self.origin) + np.asarray(indices_ijk, dtype=float) @ self.axis_vectors()

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) indices of physical (LPS) points, one per row."""
        return np.linalg.solve(self.axis_vectors().T, (np.asarray(points, dtype=float) - np.array(self.origin)).T).T

    def holds_lattice(self, ijk_to_lps: np.ndarray, tolerance: float = 1e-3) -> bool:
        """True when the lattice of ``ijk_to_lps`` (a cropped .seg.nrrd's, say) is made of this grid's
        voxels: its axes are this grid's axes (in any order and sign, same spacing) and its first voxel is
        one of this grid's voxels."""
        matrix = np.asarray(ijk_to_lps, dtype=float)
        steps = np.linalg.solve(self.axis_vectors().T, matrix[:3, :3])  # its axes in this grid's index units
        first = self.to_index(matrix[:3, 3][None, :])[0]
        unit_axes = np.allclose(np.abs(steps).sum(axis=0), 1.0, atol=tolerance) and np.allclose(
            np.sort(np.abs(steps), axis=0)[-1], 1.0, atol=tolerance
        )
        on_voxel = np.allclose(first, np.round(first), atol=tolerance)
        inside = bool(np.all(np.round(first) >= 0) and np.all(np.round(first) <= np.array(self.size) - 1))
        return bool(unit_axes and on_voxel and inside)

    def sub_grid(
        self, start_ijk: Union[Sequence[int], np.ndarray], size_ijk: Union[Sequence[int], np.ndarray]
    ) -> "Grid":
        """The part of this grid that starts at voxel ``start_ijk`` (same spacing and direction)."""
        origin = self.to_physical(np.array([start_ijk]))[0]
        return Grid(_int_triple(size_ijk), self.spacing, _float_triple(origin), self.direction)

    def box_covering(
        self, other: "Grid", start_ijk: Sequence[int], stop_ijk: Sequence[int]
    ) -> Tuple[np.ndarray, np.ndarray]:
        """(start, stop) voxel indices of the smallest box of this grid that holds every voxel whose
        nearest voxel of ``other`` lies in ``other``'s box [start, stop): clamped, possibly empty."""
        lo, hi = np.array(start_ijk, dtype=float) - 1.0, np.array(stop_ijk, dtype=float)  # half a voxel and more
        corners = np.array(list(itertools.product(*zip(lo, hi))))
        mine = self.to_index(other.to_physical(corners))
        start = np.clip(np.floor(mine.min(axis=0)), 0, np.array(self.size)).astype(int)
        stop = np.clip(np.ceil(mine.max(axis=0)) + 1, 0, np.array(self.size)).astype(int)
        return start, np.maximum(stop, start)

    def describe(self) -> str:
        spacing = "x".join(f"{s:.3g}" for s in self.spacing)
        return f"{'x'.join(map(str, self.size))} voxels at {spacing} mm, orientation {orientation_code(self.direction)}"

    def empty_image(self, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
        image = sitk.Image(list(self.size), pixel_type)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def xyz_to_zyx(values: Sequence) -> tuple:
    """Stored (x, y, z) order to array (z, y, x) order, and back (the flip is its own inverse)."""
    return tuple(values)[::-1]


def orientation_code(direction: Sequence[float]) -> str:
    """The closest axis-aligned orientation code (e.g. "RAS", "LPS") of a direction matrix."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(list(direction))


def reorient(image: sitk.Image, code: str) -> sitk.Image:
    """Permute and flip the index axes (no interpolation) so that they point as ``code`` says.

    An oblique direction keeps its residual rotation: the voxels are only re-indexed, like
    nnU-Net and MONAI's ``Orientation`` do.
    """
    if orientation_code(image.GetDirection()) == code:
        return image
    return sitk.DICOMOrient(image, code)


def reoriented_grid(grid: Grid, code: str) -> Grid:
    """The grid :func:`reorient` gives an image on ``grid``, computed without touching a voxel.

    ITK decides the axis permutation and flips (on a 2x2x2 probe with the same direction, so oblique
    directions are decided as :func:`reorient` decides them); the rest is the same voxels re-indexed:
    the new origin is the old corner voxel that becomes index 0."""
    if orientation_code(grid.direction) == code:
        return grid
    probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    probe.SetDirection(grid.direction)
    old = np.array(grid.direction, dtype=float).reshape(3, 3)
    new = np.array(sitk.DICOMOrient(probe, code).GetDirection(), dtype=float).reshape(3, 3)
    products = old.T @ new  # [old axis, new axis]: +1 or -1 where the new axis is an old one, 0 elsewhere
    axes = [int(a) for a in np.argmax(np.abs(products), axis=0)]
    signs = [1.0 if products[a, i] > 0 else -1.0 for i, a in enumerate(axes)]
    corner = np.zeros(3)
    for axis, sign in zip(axes, signs):
        corner[axis] = grid.size[axis] - 1 if sign < 0 else 0
    origin = np.array(grid.origin) + old @ (np.array(grid.spacing) * corner)
    return Grid(
        _int_triple(grid.size[a] for a in axes),
        _float_triple(grid.spacing[a] for a in axes),
        _float_triple(origin),
        tuple(float(d) for d in (old[:, axes] * np.array(signs)).ravel()),
    )


def permuted_grid(grid: Grid, transpose_zyx: Sequence[int]) -> Grid:
    """The same voxels with their index axes permuted as nnU-Net's ``transpose_forward`` permutes a (z, y, x)
    array: new array axis ``n`` is old array axis ``transpose_zyx[n]``. No reorientation: a model that
    keeps the image's own axes (nnU-Net) sees them in this order."""
    if sorted(int(a) for a in transpose_zyx) != [0, 1, 2]:
        raise ValueError(f"{list(transpose_zyx)} is not a permutation of the axes 0, 1, 2")
    axes = [2 - int(transpose_zyx[2 - i]) for i in range(3)]  # in (i, j, k) order
    if axes == [0, 1, 2]:
        return grid
    old = np.array(grid.direction, dtype=float).reshape(3, 3)
    return Grid(
        _int_triple(grid.size[a] for a in axes),
        _float_triple(grid.spacing[a] for a in axes),
        grid.origin,
        tuple(float(d) for d in old[:, axes].ravel()),
    )


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """The 4x4 matrix from voxel index (i, j, k) to LPS millimetres."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def grid_from_ijk_to_lps(matrix: np.ndarray) -> Tuple[Triple, Triple, Tuple[float, ...]]:
    """Split an ijkToLPS matrix into (spacing, origin, direction); left-handed grids are allowed."""
    matrix = np.asarray(matrix, dtype=float)
    axes = matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("the voxel-to-physical matrix has a zero-length axis")
    direction = axes / spacing
    return tuple(spacing), tuple(matrix[:3, 3]), tuple(direction.flatten())


def image_from_ijk_array(voxels_ijk: np.ndarray, matrix_ijk_to_lps: np.ndarray) -> sitk.Image:
    """An image from an (i, j, k)-ordered array (NRRD, slicerio) and its ijkToLPS matrix."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(voxels_ijk, (2, 1, 0))))
    spacing, origin, direction = grid_from_ijk_to_lps(matrix_ijk_to_lps)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def ijk_array(image: sitk.Image) -> np.ndarray:
    """The voxels of ``image`` in (i, j, k) order: a transposed copy that outlives ``image``.

    (SimpleITK's array *view* dies with its image: never hand one out of a function.)
    """
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))


def resampled_grid(grid: Grid, spacing: Sequence[float], rule: str = "box") -> Grid:
    """The grid with voxels of ``spacing`` over the region of ``grid``.

    ``box``: it covers the same physical box; the outer voxel corners stay where they are (not the first
    voxel centre), so resampling there and back does not shift anything by half a voxel, and the spacing
    stretches a little so that a whole number of voxels fills the box (the engine's and nnU-Net's way).
    ``centres``: MONAI's Spacing: the first voxel centre stays, the spacing is exact, and the voxels reach
    the last centre, rounded to a whole number.
    """
    old_spacing = np.array(grid.spacing, dtype=float)
    new_spacing = np.array(spacing, dtype=float)
    if rule == "centres":
        reach = old_spacing * (np.array(grid.size) - 1)
        new_size = np.maximum(np.round(reach / new_spacing + 1), 1).astype(int)
        return Grid(_int_triple(new_size), _float_triple(new_spacing), grid.origin, grid.direction)
    extent = old_spacing * np.array(grid.size)
    new_size = np.maximum(np.round(extent / new_spacing), 1).astype(int)
    # Stretch the spacing a little so the rounded number of voxels fills the box exactly.
    new_spacing = extent / new_size
    direction = np.array(grid.direction).reshape(3, 3)
    first_corner = np.array(grid.origin) - direction @ (old_spacing / 2)
    new_origin = first_corner + direction @ (new_spacing / 2)
    return Grid(
        _int_triple(new_size),
        _float_triple(new_spacing),
        _float_triple(new_origin),
        tuple(float(d) for d in grid.direction),
    )


def resample_onto(
    image: sitk.Image,
    grid: Grid,
    interpolator: int = sitk.sitkLinear,
    default_value: float = 0.0,
    pixel_type: Optional[int] = None,
) -> sitk.Image:
    """Resample ``image`` onto ``grid`` in physical space (identity transform), as ``pixel_type``
    (default: the image's own; ITK interpolates in double precision either way)."""
    pixel_type = image.GetPixelID() if pixel_type is None else pixel_type
    source = Grid.of(image)
    if source.matches(grid, tolerance=1e-6):
        return image if image.GetPixelID() == pixel_type else sitk.Cast(image, pixel_type)
    axes = index_maps(source, grid) if interpolator == sitk.sitkNearestNeighbor else None
    if axes is not None and image.GetNumberOfComponentsPerPixel() == 1:
        return _nearest_along_axes(image, grid, axes, default_value, pixel_type)
    return sitk.Resample(
        image,
        list(grid.size),
        sitk.Transform(),
        interpolator,
        grid.origin,
        grid.spacing,
        grid.direction,
        default_value,
        pixel_type,
    )


def index_maps(source: Grid, target: Grid) -> Optional[list]:
    """Where each index axis of ``target`` lands in ``source`` when every target axis runs along one
    source axis (the grids differ by a scaling, a shift and a signed permutation of axes, as the network
    grid and the input grid do): per target axis, (source axis, continuous source index of each target
    voxel). None for grids oblique to each other."""
    start = source.to_index(np.array([target.origin]))[0]
    # column b: the source-index step of one target voxel along b
    steps = (source.to_index(np.array(target.origin) + target.axis_vectors()) - start).T
    along = np.argmax(np.abs(steps), axis=0)
    off_axis = np.abs(steps).sum(axis=0) - np.abs(steps[along, range(3)])
    if sorted(along) != [0, 1, 2] or np.any(off_axis > 1e-9 * np.abs(steps[along, range(3)])):
        return None
    return [(int(a), start[a] + steps[a, b] * np.arange(target.size[b])) for b, a in enumerate(along)]


def nearest_values_onto(image: sitk.Image, grid: Grid, default_value: float = 0.0) -> np.ndarray:
    """``image`` resampled onto ``grid`` by nearest neighbour, as a (z, y, x) array of its own type, for
    a caller that puts the values in place itself (restore_labels): no SimpleITK image is made around
    them on axis-aligned grids (one gather per axis), ITK's resampler otherwise."""
    axes = index_maps(Grid.of(image), grid)
    if axes is not None and image.GetNumberOfComponentsPerPixel() == 1:
        return _nearest_values(image, axes, default_value, image.GetPixelID())
    return sitk.GetArrayFromImage(resample_onto(image, grid, sitk.sitkNearestNeighbor, default_value))


def _nearest_along_axes(image: sitk.Image, grid: Grid, axes: list, default_value: float, pixel_type: int) -> sitk.Image:
    """Nearest-neighbour resampling as ITK does it (the voxel whose centre is nearest, halves rounded
    up; outside [-0.5, size - 0.5) the default value), done as one gather per axis.

    ITK's resampler visits every target voxel with the full transform; a gather per axis is several
    times faster. Axis-aligned grids only."""
    result = sitk.GetImageFromArray(_nearest_values(image, axes, default_value, pixel_type))
    result.SetSpacing(grid.spacing)
    result.SetOrigin(grid.origin)
    result.SetDirection(grid.direction)
    return result


def _nearest_values(image: sitk.Image, axes: list, default_value: float, pixel_type: int) -> np.ndarray:
    """The (z, y, x) values of :func:`_nearest_along_axes`, as ``pixel_type``."""
    source = sitk.GetArrayViewFromImage(image)  # (z, y, x): array axis 2 - i
    values = source.transpose([2 - a for a, _ in reversed(axes)])  # array axes in target (z, y, x) order
    outside = []
    for array_axis, (a, continuous) in zip((2, 1, 0), axes):  # the fastest-varying axis first: smallest gathers
        inside = (continuous >= -0.5) & (continuous < image.GetSize()[a] - 0.5)
        indices = np.clip(np.floor(continuous + 0.5), 0, image.GetSize()[a] - 1).astype(np.intp)
        values = np.take(values, indices, axis=array_axis)
        outside.append((array_axis, ~inside))
    values = values.astype(sitk.GetArrayViewFromImage(sitk.Image(1, 1, 1, pixel_type)).dtype, copy=False)
    for array_axis, mask in outside:
        if mask.any():
            values[(slice(None),) * array_axis + (mask,)] = default_value
    return values


def needs_resampling(image: sitk.Image, spacing: Sequence[float], tolerance: float = 0.02) -> bool:
    """False when the image's spacing is within ``tolerance`` (relative) of ``spacing`` on every axis."""
    current = np.array(image.GetSpacing())
    return not np.all(np.abs(current - np.array(spacing)) <= tolerance * np.array(spacing))
