"""Crops as if the scan had been taken in another contrast phase. An iodinated agent brightens some
structures and not others (the liver by up to about 70 HU in a portal-venous phase, the aorta by up to
about 300 in an arterial one; fat, air and bone not at all), which a shift of the whole image cannot
imitate. A model trained on a scan without agent otherwise meets an enhanced liver as a new tissue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from MedSegUNetLib.model.bundle import Normalization

# The most an agent adds to a structure (HU over its plain value) in the phases a scan is taken in:
# typical enhancement in arterial, portal-venous and nephrographic phases, rounded up. TotalSegmentator's
# names; a structure not listed is not brightened (its name says nothing of its blood supply).
ENHANCEMENT_HU = {
    "aorta": 300.0,
    "heart": 300.0,
    "pulmonary_artery": 300.0,
    "brachiocephalic_trunk": 300.0,
    "subclavian_artery_left": 300.0,
    "subclavian_artery_right": 300.0,
    "common_carotid_artery_left": 300.0,
    "common_carotid_artery_right": 300.0,
    "celiac_trunk": 300.0,
    "superior_mesenteric_artery": 300.0,
    "renal_arteries": 300.0,
    "iliac_artery_left": 300.0,
    "iliac_artery_right": 300.0,
    "inferior_vena_cava": 150.0,
    "portal_vein_and_splenic_vein": 180.0,
    "kidney_left": 170.0,
    "kidney_right": 170.0,
    "spleen": 90.0,
    "pancreas": 80.0,
    "liver": 70.0,
    "adrenal_gland_left": 40.0,
    "adrenal_gland_right": 40.0,
}


def enhancement_in_network_units(names: Sequence[str], normalization: Normalization) -> Optional[Tuple[float, ...]]:
    """Each class's largest enhancement (background first, 0) in the network's normalized units; None when
    the images are not CT in HU or no structure is known to enhance."""
    if normalization.kind != "ct" or normalization.clip is None:
        return None
    low, high = normalization.clip
    scale = normalization.std if normalization.mean is not None and normalization.std else high - low
    per_class = (0.0, *(ENHANCEMENT_HU.get(name.lower(), 0.0) / scale for name in names))
    return per_class if any(per_class) else None


@dataclass(frozen=True)
class ContrastPhases:
    """A share of the crops brightened structure by structure: each structure of the crop's label by an
    amount drawn uniformly between none and its largest enhancement."""

    largest: Tuple[float, ...]  # per class, background first: :func:`enhancement_in_network_units`
    probability: float  # the share of crops brightened

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> None:
        """Brighten a (C, Z, Y, X) crop in place by its (1, Z, Y, X) class indices, with ``probability``."""
        if self.probability <= 0 or rng.random() >= self.probability:
            return
        offsets = np.zeros(256, np.float32)  # every label value, IGNORE (255) included: not brightened
        offsets[: len(self.largest)] = rng.uniform(0.0, 1.0, len(self.largest)) * np.asarray(self.largest)
        image += offsets[label.astype(np.uint8)]


def describe(names: Sequence[str], normalization: Normalization, share: float) -> Optional[str]:
    """The line `train` prints of what ``--contrast-phases`` brightens (None when it is off): a share given
    for images it cannot brighten says so rather than doing nothing in silence."""
    if not share:
        return None
    largest = enhancement_in_network_units(names, normalization)
    if largest is None:
        return "--contrast-phases: no crop is brightened (the images are not CT in HU, or no label is known to enhance)"
    brightened = [name for name, amount in zip(names, largest[1:]) if amount]
    return f"contrast phases: {share:.0%} of crops brighten {', '.join(brightened)}"
