"""Crops shaped like the scans people load. A scan thinner than the network's window (an axial slab of a
few centimetres, a limited acquisition) reaches the network padded with air on both sides, centred, as
segment pads it (prediction/stitching.py). A model that only ever saw crops cut from whole abdomens has
never seen that; these crops show it, and teach nothing where the scan has ended."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from MedSegUNetLib.model.bundle import IMAGE_AXES, Preprocessing

from .losses import IGNORE


def slab_axis(preprocessing: Preprocessing) -> int:
    """The (z, y, x) axis of the network grid that runs head to foot: the one scans are thin along. An
    imported model's own image axes say nothing of the body: then the slice axis, z, as most scans are
    axial."""
    if preprocessing.orientation == IMAGE_AXES:
        return 0
    head_foot = next(i for i, letter in enumerate(preprocessing.orientation.upper()) if letter in "SI")
    return 2 - head_foot  # the code is x, y, z; the axes z, y, x


@dataclass(frozen=True)
class SlabCrops:
    """A share of the crops cut to a thinner slab along ``axis``, centred, the rest of the crop air and
    not taught (the label IGNORE), as a thin scan is padded for the network."""

    axis: int  # the (z, y, x) axis: :func:`slab_axis`
    probability: float  # the share of crops cut
    thinnest: int = 8  # voxels the slab keeps at least (2.4 cm on a 3 mm grid)

    def __call__(self, image: np.ndarray, label: np.ndarray, air: float, rng: np.random.Generator) -> None:
        """Cut a (C, Z, Y, X) crop and its (1, Z, Y, X) label in place, with ``probability``."""
        length = image.shape[1 + self.axis]
        if self.probability <= 0 or length <= self.thinnest or rng.random() >= self.probability:
            return
        kept = int(rng.integers(self.thinnest, length))  # thinner than the crop, by at least one voxel
        before = (length - kept) // 2  # as segment pads: half the difference before, the rest after
        for outside in (slice(0, before), slice(before + kept, length)):
            where = (slice(None),) * (1 + self.axis) + (outside,)
            image[where] = air
            label[where] = IGNORE
