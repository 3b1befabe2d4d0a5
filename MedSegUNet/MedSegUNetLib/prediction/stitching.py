"""Sliding windows over a volume (where they go, how many, how large), and their scores blended with
MONAI's Gaussian weights into one buffer: the whole grid's (:func:`blended_scores`), or one window's depth
when only the argmax is wanted (:func:`blended_labels`, which decides the labels row by row).

The windows are MONAI's (``dense_patch_slices`` at the scan interval of ``sliding_window_inference``,
the volume padded to the window where thinner, as MONAI pads it) and so are the weights
(``compute_importance_map``, Gaussian, sigma 0.125 of the window). Why not MONAI's inferer itself: the
scores here only ever feed an argmax, which a positive per-voxel scale does not change, so the weighted
sums need no division by the summed weights (MONAI's last pass over every class of every voxel, and the
weight map it keeps); each window is added with one fused multiply-add, in place; and every buffer is
made before the first window, so that each window's network call finds the same free memory as the one
before it (MONAI makes its buffers after the first window and keeps each window's scores alive during
the next window's call, so on the CPU the second window had to grow the heap into fresh pages).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> List[int]:
    """The step between windows along each axis, by MONAI's rule (one window where the image is no
    larger than it: MONAI pads it to the window)."""
    return [roi if image <= roi else max(int(roi * (1 - overlap)), 1) for image, roi in zip(image_size, roi_size)]


def count_windows(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding window visits (its padding and scan-interval rules)."""
    total = 1
    for image, roi, step in zip(image_size, roi_size, scan_interval(image_size, roi_size, overlap)):
        total *= math.ceil((max(image, roi) - roi) / step) + 1
    return total


def fit_window(patch_zyx: Sequence[int], shape_zyx: Sequence[int], divisor_zyx: Sequence[int]) -> List[int]:
    """The window, shrunk along any axis where the volume is thinner than the patch (to the volume's size
    rounded up to what the network's strides accept).

    A thin slab (e.g. 20 slices) in a deep window would be mostly padding: the instance norms would
    then see statistics the network never saw in training, and the work is wasted on padding."""
    return [min(p, -(-n // d) * d) for p, n, d in zip(patch_zyx, shape_zyx, divisor_zyx)]


PLACEMENTS = ("monai", "nnunet")


def window_slices(
    shape_zyx: Sequence[int], window_zyx: Sequence[int], overlap: float, placement: str = "monai"
) -> List[Tuple[slice, ...]]:
    """Where the windows go in a volume of ``shape_zyx`` (already padded to the window where thinner):
    MONAI's sliding window places them at its scan interval, the last one against the far edge; ``nnunet``
    spreads the same number evenly from edge to edge, as nnU-Net's predictor does (imported models)."""
    if placement == "monai":
        from monai.data.utils import dense_patch_slices

        return dense_patch_slices(list(shape_zyx), list(window_zyx), scan_interval(shape_zyx, window_zyx, overlap))
    starts = []
    for size, window, step in zip(shape_zyx, window_zyx, scan_interval(shape_zyx, window_zyx, overlap)):
        count = math.ceil((size - window) / step) + 1
        spacing = (size - window) / (count - 1) if count > 1 else 0.0
        starts.append([int(round(spacing * index)) for index in range(count)])
    return [
        tuple(slice(start, start + window) for start, window in zip(corner, window_zyx))
        for corner in itertools.product(*starts)
    ]


def window_weights(window_zyx: Sequence[int], blend: str, placement: str, device: torch.device) -> torch.Tensor:
    """Each window voxel's weight in the blend: MONAI's importance map, or for windows placed as nnU-Net
    places them (imported nnU-Net models) nnU-Net's own Gaussian (:func:`nnunet_gaussian`)."""
    if placement == "nnunet" and blend == "gaussian":
        return torch.from_numpy(nnunet_gaussian(window_zyx)).to(device)
    from monai.data.utils import compute_importance_map

    return compute_importance_map(tuple(window_zyx), mode=blend, device=device)


def nnunet_gaussian(window_zyx: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net's predictor's blending weights (its ``compute_gaussian`` as the predictor calls it): a unit
    impulse at voxel size//2 filtered by SciPy's ``gaussian_filter`` (sigma an eighth of the window,
    truncated at 4 sigma), scaled to a maximum of 10, rounded to float16, its zeros raised to its smallest
    positive value. The filtered impulse is the product of the sampled 1-D kernels and is computed here as
    that product: an imported nnU-Net model then imports neither SciPy's filter nor MONAI (about 190 MB
    resident), and the weights are nnU-Net's rather than MONAI's (centred half a voxel apart, floored at
    0.001)."""
    axes = []
    for size in window_zyx:
        sigma = size * sigma_scale
        offsets = np.arange(size) - size // 2
        radius = int(4.0 * sigma + 0.5)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2) if sigma > 0 else (offsets == 0).astype(float)
        axes.append(np.where(np.abs(offsets) <= radius, kernel, 0.0))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    rounded = (weights * (10.0 / weights.max())).astype(np.float16)
    rounded[rounded == 0] = rounded[rounded > 0].min()
    return rounded.astype(np.float32)


def _all_channels(where: Sequence[slice]) -> Tuple[slice, ...]:
    """The index of the (C, Z, Y, X) voxels in the spatial box ``where``, every channel."""
    return (slice(None), *where)


def _padding(shape_zyx: Sequence[int], window_zyx: Sequence[int]) -> List[Tuple[int, int]]:
    """(before, after) per spatial axis: half of what the window lacks on each side, as MONAI pads."""
    return [(max(w - n, 0) // 2, max(w - n, 0) - max(w - n, 0) // 2) for n, w in zip(shape_zyx, window_zyx)]


def blended_scores(
    predict: Callable[[torch.Tensor], torch.Tensor],
    volume: torch.Tensor,
    window_zyx: Sequence[int],
    classes: Optional[int],
    overlap: float,
    batch_size: int,
    window_device: torch.device,
    fill_value: float,
    placement: str = "monai",
    blend: str = "gaussian",
    padding_mode: str = "constant",
) -> torch.Tensor:
    """The Gaussian-weighted sums of ``predict``'s (B, classes, *window) scores over the windows of
    ``volume`` (C, Z, Y, X), as a (classes, Z, Y, X) float32 tensor on ``volume``'s device. Windows go to
    ``predict`` on ``window_device``, ``batch_size`` at a time; where the volume is thinner than the window
    it is padded with ``fill_value`` (``padding_mode`` "constant") or its edge ("replicate"). Not normalized:
    divide by :func:`summed_weights` for MONAI's average.
    ``classes``: what the network declares (its ``out_channels``); None sizes the buffer from the first
    window's scores instead (a network that does not say), made after that window's call then.
    ``blend``: MONAI's importance-map mode, "gaussian" or "constant" (every voxel of a window weighs 1)."""
    volume, padding = _padded(volume, window_zyx, fill_value, padding_mode)
    weight = window_weights(window_zyx, blend, placement, volume.device)
    scores = (
        None
        if classes is None
        else torch.zeros((classes, *volume.shape[1:]), dtype=torch.float32, device=volume.device)
    )
    slices = window_slices(volume.shape[1:], window_zyx, overlap, placement)
    for start in range(0, len(slices), batch_size):
        batch = slices[start : start + batch_size]
        output = _window_scores(predict, volume, batch, window_zyx, window_device)
        if scores is None:
            scores = torch.zeros((output.shape[1], *volume.shape[1:]), dtype=torch.float32, device=volume.device)
        _add_windows(scores, output, batch, weight, 0)
        del output  # before the next window's call: it finds the memory this one freed
    assert scores is not None  # made before the first window or from its scores; there is always a window
    return scores[_all_channels(_unpadded(padding, volume.shape[1:]))]


def blended_labels(
    predict: Callable[[torch.Tensor], torch.Tensor],
    volume: torch.Tensor,
    window_zyx: Sequence[int],
    classes: int,
    overlap: float,
    batch_size: int,
    window_device: torch.device,
    fill_value: float,
    placement: str = "monai",
    blend: str = "gaussian",
    padding_mode: str = "constant",
) -> torch.Tensor:
    """The class of each voxel of ``volume`` (C, Z, Y, X), the argmax of :func:`blended_scores` (the same
    sums in the same order, so the same labels), with the scores held for one window's depth only: the
    windows go row by row along z, and the voxels before a row's first slice, which no later window
    reaches, are decided and their scores dropped. With many classes the whole grid's scores would be
    the largest thing a run holds (105 classes on a 273x273x300 grid: 9.4 GB; here 3 GB)."""
    volume, padding = _padded(volume, window_zyx, fill_value, padding_mode)
    weight = window_weights(window_zyx, blend, placement, volume.device)
    depth, shape = window_zyx[0], volume.shape[1:]
    band = torch.zeros((classes, depth, *shape[1:]), dtype=torch.float32, device=volume.device)
    labels = torch.zeros(shape, dtype=torch.uint8 if classes <= 256 else torch.int32, device=volume.device)
    slices = window_slices(shape, window_zyx, overlap, placement)
    base = 0  # the z of the band's first slice
    for z, windows in itertools.groupby(slices, key=lambda where: where[0].start):
        _move_band(band, labels, base, z)
        base = z
        row = list(windows)
        for start in range(0, len(row), batch_size):
            batch = row[start : start + batch_size]
            output = _window_scores(predict, volume, batch, window_zyx, window_device)
            _add_windows(band, output, batch, weight, base)
            del output
    labels[base : base + depth] = class_indices(band[:, : shape[0] - base])
    return labels[_unpadded(padding, shape)]


def _move_band(band: torch.Tensor, labels: torch.Tensor, base: int, z: int) -> None:
    """Decide the band's slices before ``z`` into ``labels`` and move the rest to the band's start."""
    if z == base:
        return
    if z < base or z - base > band.shape[1]:
        raise AssertionError(f"windows out of z order: a row at {z} after one at {base}")
    labels[base:z] = class_indices(band[:, : z - base])
    kept = band.shape[1] - (z - base)
    for scores in band:  # one class at a time: a copy of a class's band, not of all of them
        scores[:kept] = scores[z - base :].clone()
        scores[kept:] = 0


def class_indices(scores: torch.Tensor) -> torch.Tensor:
    """Argmax over dim 0 of (C, Z, Y, X) scores, as uint8 (int32 beyond 255 classes); ties go to the lower class.

    A running maximum: ``torch.argmax`` over the outer dim is several times slower on the CPU."""
    best = scores[0].clone()
    indices = torch.zeros(
        scores.shape[1:], dtype=torch.uint8 if scores.shape[0] <= 256 else torch.int32, device=scores.device
    )
    for index in range(1, scores.shape[0]):
        higher = scores[index] > best
        indices.masked_fill_(higher, index)
        torch.maximum(best, scores[index], out=best)
    return indices


def _padded(
    volume: torch.Tensor, window_zyx: Sequence[int], fill_value: float, padding_mode: str
) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """The volume padded to the window where thinner (with ``fill_value`` or its edge), and the padding."""
    padding = _padding(volume.shape[1:], window_zyx)
    if any(before or after for before, after in padding):
        flat = [amount for pair in reversed(padding) for amount in pair]  # F.pad wants the last axis first
        fill = fill_value if padding_mode == "constant" else None
        volume = F.pad(volume[None], flat, mode=padding_mode, value=fill)[0]
    return volume, padding


def _unpadded(padding: List[Tuple[int, int]], shape_zyx: Sequence[int]) -> Tuple[slice, ...]:
    return tuple(slice(before, size - after) for (before, after), size in zip(padding, shape_zyx))


def _window_scores(
    predict: Callable[[torch.Tensor], torch.Tensor],
    volume: torch.Tensor,
    batch: Sequence[Tuple[slice, ...]],
    window_zyx: Sequence[int],
    window_device: torch.device,
) -> torch.Tensor:
    """``predict``'s scores for the windows ``batch`` of ``volume``, checked, on the volume's device."""
    windows = torch.stack([volume[_all_channels(where)] for where in batch]).to(window_device)
    output = predict(windows)
    del windows
    if tuple(output.shape[2:]) != tuple(window_zyx) or output.shape[0] != len(batch):
        raise ValueError(
            f"the network gave scores of shape {tuple(output.shape)} for {len(batch)} window(s) of {list(window_zyx)}"
        )
    return output.to(volume.device)


def _add_windows(
    scores: torch.Tensor, output: torch.Tensor, batch: Sequence[Tuple[slice, ...]], weight: torch.Tensor, z0: int
) -> None:
    """Add each window's weighted scores into ``scores``, whose first z slice is the volume's ``z0``."""
    if output.shape[1] != scores.shape[0]:
        raise ValueError(
            f"the network gave scores of shape {tuple(output.shape)} for {len(batch)} window(s), "
            f"{scores.shape[0]} classes declared"
        )
    for index, (z, y, x) in enumerate(batch):
        scores[:, z.start - z0 : z.stop - z0, y, x].addcmul_(output[index], weight)


def summed_weights(
    shape_zyx: Sequence[int],
    window_zyx: Sequence[int],
    overlap: float,
    placement: str = "monai",
    blend: str = "gaussian",
) -> torch.Tensor:
    """The sum of the windows' weights at each voxel of a volume of ``shape_zyx``: what MONAI divides by."""
    nothing = torch.zeros((), dtype=torch.float32).expand(1, *shape_zyx)  # a volume's shape without its memory
    return blended_scores(
        lambda windows: torch.ones((windows.shape[0], 1, *window_zyx)),
        nothing,
        window_zyx,
        1,
        overlap,
        1,
        torch.device("cpu"),
        0.0,
        placement,
        blend,
    )[0]
