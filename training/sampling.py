"""Where training crops are taken: uniform crops, and a share forced onto foreground (nnU-Net's oversampling).

A lesion of 0.01% of a scan's voxels is almost never in a uniformly placed patch: the network would
learn that everything is background. As nnU-Net does by default, the last ``B - round(B * (1 - p))``
crops of each batch of ``B`` (``p = foreground_fraction``, 0.33: one of two) are centered on a voxel of a
foreground class, the class drawn uniformly among those the case holds (so a small structure is drawn as
often as a large one); the other crops are placed uniformly. ``foreground_fraction`` 0 gives uniform sampling, 1 only
foreground-centered crops.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

Start = Tuple[int, int, int]


def class_voxels(label: np.ndarray, classes: int) -> Dict[int, np.ndarray]:
    """Flat indices of each foreground class's voxels in a (Z, Y, X) label array (absent classes left out)."""
    flat = label.reshape(-1)
    found = {c: np.flatnonzero(flat == c) for c in range(1, classes)}
    return {c: voxels for c, voxels in found.items() if voxels.size}


def forced_crops(batch_size: int, foreground_fraction: float) -> int:
    """How many crops of a batch are centered on foreground: nnU-Net's ``B - round(B * (1 - p))``."""
    return batch_size - int(round(batch_size * (1.0 - foreground_fraction)))


def uniform_start(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator) -> Start:
    z, y, x = (int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(shape, patch))
    return z, y, x


def foreground_start(
    shape: Sequence[int], patch: Sequence[int], voxels: Dict[int, np.ndarray], rng: np.random.Generator
) -> Start:
    """A crop that holds a voxel of a foreground class (class first, then a voxel of it), kept inside the image."""
    if not voxels:
        return uniform_start(shape, patch, rng)  # a case without foreground: nothing to force
    chosen = list(voxels)[int(rng.integers(len(voxels)))]
    center = np.unravel_index(int(voxels[chosen][int(rng.integers(voxels[chosen].size))]), tuple(shape))
    z, y, x = (int(np.clip(c - p // 2, 0, max(s - p, 0))) for c, p, s in zip(center, patch, shape))
    return z, y, x


def crop_starts(
    shape: Sequence[int],
    patch: Sequence[int],
    voxels: Dict[int, np.ndarray],
    batch_size: int,
    foreground_fraction: float,
    rng: np.random.Generator,
) -> List[Start]:
    """The (z, y, x) corner of each crop of one batch; the last ``forced_crops`` are on foreground."""
    uniform = batch_size - forced_crops(batch_size, foreground_fraction)
    return [
        uniform_start(shape, patch, rng) if index < uniform else foreground_start(shape, patch, voxels, rng)
        for index in range(batch_size)
    ]
