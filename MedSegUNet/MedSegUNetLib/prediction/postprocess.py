"""Post-processing of predicted labelmaps.

Largest connected component with SimpleITK rather than MONAI's ``KeepLargestConnectedComponent``:
the labels are already a SimpleITK image on the input grid, and ITK's filter is multi-threaded and
works on each label's bounding box without a one-hot copy of the volume.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import SimpleITK as sitk


def keep_largest_component(label_image: sitk.Image, values: Iterable[int]) -> sitk.Image:
    """For each label value, keep only its largest 26-connected component (others become background)."""
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(label_image)
    present = {int(v) for v in statistics.GetLabels()}
    array = sitk.GetArrayFromImage(label_image)
    for value in values:
        if value not in present:
            continue
        i0, j0, k0, si, sj, sk = statistics.GetBoundingBox(value)
        box = (slice(k0, k0 + sk), slice(j0, j0 + sj), slice(i0, i0 + si))
        mask = array[box] == value
        components = sitk.GetArrayFromImage(
            sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True), 0, True)
        )
        array[box][mask & (components != 1)] = 0
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(label_image)
    return result
