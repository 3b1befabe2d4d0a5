"""Bringing images to the network's grid and intensity range, and labels back to the input's grid.

Used by ``segment`` and by training, so a model always sees at inference what it saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.core.geometry import (
    Grid,
    index_maps,
    nearest_values_onto,
    permuted_grid,
    reoriented_grid,
    resample_onto,
    resampled_grid,
)
from MedSegUNetLib.core.writable_image import writable_voxels
from MedSegUNetLib.model.bundle import IMAGE_AXES, Normalization, Preprocessing
from MedSegUNetLib.prediction.slice_resampling import SliceResampler


@dataclass
class NetworkInput:
    """The channels on the network's grid, as one (C, Z, Y, X) float32 array, and that grid."""

    array: np.ndarray
    grid: Grid
    body: Optional[Tuple[slice, slice, slice]] = None  # (z, y, x) box around the body, CT only


# Denser than air: fat is about -100 HU, lung about -850, air -1000. The box keeps a margin of air so
# that the network sees the body's edge as it does on the whole volume.
BODY_HU = -500.0
BODY_MARGIN_MM = 12.0


def network_grid(input_grid: Grid, preprocessing: Preprocessing) -> Grid:
    """The grid an image on ``input_grid`` is resampled onto: its box, reoriented (an exact re-indexing)
    and divided into voxels of the bundle's spacing. Computed without touching a voxel, so that a volume
    too large for the memory can be refused before it is resampled.

    A bundle of :data:`IMAGE_AXES` (an imported nnU-Net model) keeps the image's own axes, permuted by its
    ``transpose``, as nnU-Net's predictor does: the network sees each image as nnU-Net would show it."""
    if preprocessing.orientation == IMAGE_AXES:
        oriented = permuted_grid(input_grid, preprocessing.transpose)
    else:
        oriented = reoriented_grid(input_grid, preprocessing.orientation)
    return resampled_grid(oriented, preprocessing.target_spacing, preprocessing.grid)


def network_resampler(input_grid: Grid, preprocessing: Preprocessing) -> Tuple[SliceResampler, Grid]:
    """The linear resampling of an image on ``input_grid`` onto its network grid, fed slice by slice
    (slice_resampling.py), and that grid. Outside the input (the network grid's box is the input's, so at
    most a rounding at its edges) the image's minimum: air on a CT.

    The reorientation is folded into the resampling (the same physical points are interpolated) rather
    than done first: on a 512x512x300 CT that saves a full-resolution copy and a quarter of a second."""
    grid = network_grid(input_grid, preprocessing)
    maps = index_maps(input_grid, grid)
    if maps is None:  # cannot happen: the network grid's axes are the input's, re-indexed and rescaled
        raise AssertionError(f"the network grid of {input_grid.describe()} does not run along its axes")
    return SliceResampler(input_grid.size, maps), grid


def network_array(image: sitk.Image, preprocessing: Preprocessing) -> Tuple[np.ndarray, Grid]:
    """The image on its network grid as a (z, y, x) float32 array (linear interpolation), and that grid."""
    resampler, grid = network_resampler(Grid.of(image), preprocessing)
    for slice_yx in sitk.GetArrayViewFromImage(image):
        resampler.add(slice_yx)
    return resampler.result(), grid


def to_network_grid(image: sitk.Image, preprocessing: Preprocessing) -> sitk.Image:
    """The image on its network grid as a float32 image: what training learns from and segment predicts on."""
    array, grid = network_array(image, preprocessing)
    on_grid = sitk.GetImageFromArray(array)
    on_grid.SetSpacing(grid.spacing)
    on_grid.SetOrigin(grid.origin)
    on_grid.SetDirection(grid.direction)
    return on_grid


def _minimum(image: sitk.Image) -> float:
    return float(np.min(sitk.GetArrayViewFromImage(image)))


def normalize(array: np.ndarray, normalization: Normalization) -> np.ndarray:
    """Normalize intensities in place (float32) and return the array."""
    _normalize_kind(array, normalization)
    if normalization.rescale_to is not None:
        _rescale(array, *normalization.rescale_to)
    return array


def _normalize_kind(array: np.ndarray, normalization: Normalization) -> None:
    if normalization.kind == "ct":
        assert normalization.clip is not None  # Normalization refuses a ct kind without a clip window
        low, high = normalization.clip
        np.clip(array, low, high, out=array)
        if normalization.mean is not None and normalization.std is not None:
            array -= normalization.mean
            array /= normalization.std
        else:
            array -= low
            array /= high - low
        return
    if normalization.kind == "none":
        return
    if normalization.kind == "rescale":  # nnU-Net's RescaleTo01Normalization
        if array.size:
            array -= array.min()
            array /= max(float(array.max()), 1e-8)
        return
    # z-score, as nnU-Net does for MRI: statistics of this image (of its non-zero voxels if asked)
    values = array[array != 0] if normalization.nonzero else array
    if values.size == 0:
        return
    mean, std = float(values.mean()), float(values.std())
    if normalization.nonzero:
        mask = array != 0
        array[mask] = (array[mask] - mean) / max(std, 1e-8)
    else:
        array -= mean
        array /= max(std, 1e-8)


def _rescale(array: np.ndarray, low: float, high: float) -> None:
    """The array's minimum..maximum to ``low``..``high``, as MONAI's ScaleIntensity (a constant image: times
    ``low``, as MONAI's ``rescale_array`` does)."""
    if not array.size:
        return
    smallest, largest = float(array.min()), float(array.max())
    if smallest == largest:
        array *= low
        return
    array -= smallest
    array *= (high - low) / (largest - smallest)
    array += low


def body_box(
    array_zyx: np.ndarray, spacing_zyx: Sequence[float], threshold: float = BODY_HU
) -> Tuple[slice, slice, slice]:
    """The (z, y, x) box around every voxel above ``threshold`` (HU), with a margin; all of it when none is.

    Everything outside is air: a trained network predicts background there, so segment need not run it
    (typically a third to a half of a CT's windows)."""
    dense = array_zyx > threshold
    if not dense.any():
        return (slice(None),) * 3
    box: List[slice] = []
    for axis, spacing in enumerate(spacing_zyx):
        present = np.flatnonzero(dense.any(axis=tuple(a for a in range(3) if a != axis)))
        margin = int(np.ceil(BODY_MARGIN_MM / spacing))
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, array_zyx.shape[axis])))
    z, y, x = box
    return z, y, x


def prepare_channels(channels: Sequence[sitk.Image], preprocessing: Preprocessing) -> NetworkInput:
    """All input channels on the first channel's network grid, normalized, stacked as (C, Z, Y, X)."""
    first, grid = network_array(channels[0], preprocessing)
    arrays = [first]
    for channel in channels[1:]:  # onto the first channel's grid, whatever their own (ITK: any geometry)
        on_grid = resample_onto(
            channel, grid, sitk.sitkLinear, default_value=_minimum(channel), pixel_type=sitk.sitkFloat32
        )
        arrays.append(sitk.GetArrayFromImage(on_grid))
    return stack_network_input(arrays, grid, preprocessing)


def stack_network_input(arrays: Sequence[np.ndarray], grid: Grid, preprocessing: Preprocessing) -> NetworkInput:
    """The channels' (z, y, x) float32 arrays on the network ``grid``, normalized in place and stacked.

    For a CT model, ``body`` is the box around the first channel's body (from its HU, before normalization)."""
    body = body_box(arrays[0], grid.spacing[::-1]) if preprocessing.normalization.kind == "ct" else None
    stacked = np.stack([normalize(a.astype(np.float32, copy=False), preprocessing.normalization) for a in arrays])
    return NetworkInput(stacked, grid, body)


RESTORE_SLAB_VOXELS = 1 << 22  # input voxels per slab of restore_scores (16 MB of float32 per class)


def restore_scores(
    scores_czyx: np.ndarray, network_grid: Grid, input_grid: Grid, values: np.ndarray, background_outside: bool = False
) -> sitk.Image:
    """Labels from scores resampled onto the input's grid, as nnU-Net's predictor takes them: each class's
    scores linearly interpolated there, then the best class's value (``values[class]``) per voxel, ties to
    the lower class. Done in slabs of the input's slices, so that memory holds the labels and one slab's
    scores rather than input-sized float arrays (nnU-Net holds every class's at once).

    ``background_outside``: the scores cover only a box of the network grid (the body's), and beyond it
    is background (class 0)."""
    images = [_image_on(class_scores, network_grid) for class_scores in scores_czyx]
    defaults = [float(class_scores.min()) for class_scores in scores_czyx]
    if background_outside:
        defaults[0] = max(float(class_scores.max()) for class_scores in scores_czyx)  # background wins there
    width, height, depth = input_grid.size
    labels = np.zeros((depth, height, width), dtype=values.dtype)
    step = max(1, RESTORE_SLAB_VOXELS // (width * height))
    for z in range(0, depth, step):
        slab = input_grid.sub_grid((0, 0, z), (width, height, min(step, depth - z)))
        labels[z : z + step] = _best_values(images, defaults, slab, values)
    restored = sitk.GetImageFromArray(labels)
    restored.CopyInformation(input_grid.empty_image())
    return restored


def _image_on(array_zyx: np.ndarray, grid: Grid) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image


def _best_values(images: Sequence[sitk.Image], defaults: Sequence[float], grid: Grid, values: np.ndarray) -> np.ndarray:
    """The value of the class whose resampled score is highest at each voxel of ``grid``."""
    best = np.full(grid.size[::-1], -np.inf, dtype=np.float32)
    labels = np.zeros(grid.size[::-1], dtype=values.dtype)
    for index, (image, default) in enumerate(zip(images, defaults)):
        # the image held while its view is used: a view of a temporary reads freed memory
        resampled = resample_onto(image, grid, sitk.sitkLinear, default)
        on_grid = sitk.GetArrayViewFromImage(resampled)
        labels[on_grid > best] = values[index]
        np.maximum(best, on_grid, out=best)
    return labels


def restore_labels(labels_zyx: np.ndarray, network_grid: Grid, input_grid: Grid) -> sitk.Image:
    """Labels predicted on the network's grid, put onto the input's exact grid.

    One nearest-neighbour resampling in physical space undoes both the resampling and the
    reorientation (the network grid keeps the physical position of every voxel). Only the box of the
    input grid that can receive a label is resampled (the rest is background): on a CT the labelled
    organs fill a fraction of a 512x512x300 volume.
    """
    predicted = _image_on(labels_zyx, network_grid)
    restored = input_grid.empty_image(predicted.GetPixelID())
    present = [np.flatnonzero(labels_zyx.any(axis=tuple(a for a in range(3) if a != axis))) for axis in (2, 1, 0)]
    if any(indices.size == 0 for indices in present):
        return restored
    start, stop = input_grid.box_covering(network_grid, [int(i[0]) for i in present], [int(i[-1]) + 1 for i in present])
    if np.any(stop <= start):
        return restored
    part = nearest_values_onto(predicted, input_grid.sub_grid(start, stop - start))
    box = tuple(slice(int(a), int(b)) for a, b in zip(start[::-1], stop[::-1]))  # (z, y, x)
    writable_voxels(restored)[box] = part  # in place: sitk.Paste would copy the whole image
    return restored
