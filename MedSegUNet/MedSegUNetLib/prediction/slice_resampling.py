"""Linear interpolation onto a grid whose axes run along the source's, fed one source slice at a time.

The network grid is the input's box, re-indexed and divided into coarser voxels (preprocessing.py): each
of its axes runs along one axis of the input. Trilinear interpolation is then three 1D interpolations,
and a target plane needs only the two source slices around it. So the input can be resampled while it
is still being read (a ``.nii.gz`` as it inflates, nifti_voxels.read_slices), and its full-resolution copy
is never held (memory the kernel need not supply), and the resampling runs on the core the
single-threaded inflate leaves idle. ITK's resampler needs the whole
image first; this gives its values (to float32 rounding, Testing/test_slice_resampling.py checks it against
``sitk.Resample``) and is the one resampling onto the network grid, for segment and for training alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class AxisWeights:
    """For each target voxel along one axis: the two source voxels around it and the weight of the upper."""

    lower: np.ndarray  # intp
    upper: np.ndarray  # intp
    weight: np.ndarray  # float64, 0..1
    inside: np.ndarray  # bool: within ITK's buffer, [-0.5, size - 0.5) in continuous index

    @classmethod
    def of(cls, continuous: np.ndarray, size: int) -> "AxisWeights":
        """ITK's linear interpolation along one axis: beyond the outer voxel centres (up to half a voxel)
        the outer voxel's value, further out the default value."""
        lower = np.clip(np.floor(continuous), 0, size - 1).astype(np.intp)
        upper = np.minimum(lower + 1, size - 1)
        weight = np.clip(continuous - lower, 0.0, 1.0)
        inside = (continuous >= -0.5) & (continuous < size - 0.5)
        return cls(lower, upper, weight, inside)


def _lerp_along(values: np.ndarray, weights: AxisWeights, axis: int) -> np.ndarray:
    """``values`` interpolated along ``axis`` onto the target positions, in float64 (as ITK computes)."""
    low = np.take(values, weights.lower, axis=axis).astype(np.float64, copy=False)
    step = np.take(values, weights.upper, axis=axis).astype(np.float64)
    step -= low
    step *= weights.weight.reshape([-1 if a == axis else 1 for a in range(values.ndim)])
    step += low
    return step


class SliceResampler:
    """Linear resampling of a source volume that arrives slice by slice (k = 0, 1, ...; each slice a
    (y, x) array) onto a target grid given by ``index_maps`` (geometry.index_maps: per target axis i, j,
    k, the source axis it runs along and the continuous source index of each of its voxels).

    Each slice is interpolated in-plane as it comes (only the slices some target plane needs); a target
    plane is finished as soon as its two source slices are. Target voxels outside the source get
    ``default_value``, or the source's minimum when None (segment's choice: air on a CT)."""

    def __init__(
        self,
        source_size_ijk: Sequence[int],
        index_maps: Sequence[Tuple[int, np.ndarray]],
        default_value: Optional[float] = None,
    ):
        along = {
            source_axis: AxisWeights.of(np.asarray(positions, dtype=np.float64), int(source_size_ijk[source_axis]))
            for source_axis, positions in index_maps
        }
        self._i, self._j, self._k = along[0], along[1], along[2]
        self._source_slices = int(source_size_ijk[2])
        self._slice_shape = (int(source_size_ijk[1]), int(source_size_ijk[0]))
        self._target_axes = [int(source_axis) for source_axis, _ in index_maps]
        self._default = default_value
        self._minimum: Optional[float] = None
        self._next = 0
        # target planes (index along the target axis that runs along source k) finished by each slice
        self._finished_by: Dict[int, List[int]] = {}
        self._last_use: Dict[int, int] = {}  # source slice -> the slice after which no plane needs it
        for plane in np.flatnonzero(self._k.inside):
            low, high = int(self._k.lower[plane]), int(self._k.upper[plane])
            self._finished_by.setdefault(max(low, high), []).append(int(plane))
            for needed in (low, high):
                self._last_use[needed] = max(self._last_use.get(needed, -1), low, high)
        self._in_plane: Dict[int, np.ndarray] = {}
        # (along source k, along source j, along source i): the source's own axis order until the end
        self._planes = np.empty((len(self._k.lower), len(self._j.lower), len(self._i.lower)), dtype=np.float32)

    @property
    def complete(self) -> bool:
        return self._next == self._source_slices

    def add(self, slice_yx: np.ndarray) -> None:
        """The next source slice (any numeric type, either byte order)."""
        k = self._next
        if k >= self._source_slices:
            raise ValueError("more slices than the source has")
        if slice_yx.shape != self._slice_shape:
            raise ValueError(f"a source slice of shape {slice_yx.shape}, expected {self._slice_shape}")
        if self._default is None:
            low = float(slice_yx.min())
            self._minimum = low if self._minimum is None else min(self._minimum, low)
        if k in self._last_use:
            self._in_plane[k] = _lerp_along(_lerp_along(slice_yx, self._j, 0), self._i, 1)
        for plane in self._finished_by.get(k, ()):
            low_slice = self._in_plane[int(self._k.lower[plane])]
            high_slice = self._in_plane[int(self._k.upper[plane])]
            self._planes[plane] = low_slice + (high_slice - low_slice) * self._k.weight[plane]
        for done in [s for s in self._in_plane if self._last_use[s] <= k]:
            del self._in_plane[done]
        self._next += 1

    def result(self) -> np.ndarray:
        """The target as a (z, y, x) float32 array, once every slice has been added."""
        if not self.complete:
            raise ValueError(f"{self._next} of {self._source_slices} source slices were added")
        default = self._minimum if self._default is None else self._default
        for axis, weights in enumerate((self._k, self._j, self._i)):
            if not weights.inside.all():
                self._planes[(slice(None),) * axis + (~weights.inside,)] = default
        # target array axis t holds target axis 2 - t, which runs along source axis a: our axis 2 - a
        order = [2 - self._target_axes[2 - t] for t in range(3)]
        return self._planes if order == [0, 1, 2] else np.ascontiguousarray(self._planes.transpose(order))
