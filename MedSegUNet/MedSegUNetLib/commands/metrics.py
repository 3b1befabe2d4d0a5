"""Scores of one binary mask against another on one grid: Dice, HD95, surface Dice, volumes (MONAI's metrics)."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    import torch


def _crop_to_both(predicted: np.ndarray, reference: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Surface distances only depend on the masks: crop to their joint box (plus a border) for speed."""
    points = np.argwhere(predicted | reference)
    low = np.maximum(points.min(axis=0) - 2, 0)
    high = points.max(axis=0) + 3
    box = tuple(slice(a, b) for a, b in zip(low, high))
    return np.pad(predicted[box], 2), np.pad(reference[box], 2)


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    import torch

    tensor = torch.as_tensor(mask[None, None])
    return torch.cat([~tensor, tensor], dim=1).float()


def score_masks(
    predicted: np.ndarray, reference: np.ndarray, spacing_zyx: Sequence[float], tolerance_mm: float
) -> dict:
    """Dice, HD95 (mm), NSD at ``tolerance_mm`` and volumes (mL) of two boolean masks on one grid."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    volumes = {
        "volume_reference_ml": float(reference.sum()) * voxel_ml,
        "volume_prediction_ml": float(predicted.sum()) * voxel_ml,
    }
    volumes["volume_difference_ml"] = volumes["volume_prediction_ml"] - volumes["volume_reference_ml"]
    if not predicted.any() and not reference.any():
        return {"dice": 1.0, "hd95_mm": 0.0, "nsd": 1.0, **volumes, "note": "both empty"}
    if not predicted.any() or not reference.any():
        note = "empty prediction" if not predicted.any() else "empty reference"
        return {"dice": 0.0, "hd95_mm": math.inf, "nsd": 0.0, **volumes, "note": note}
    predicted, reference = _crop_to_both(predicted, reference)
    y_pred, y = _one_hot(predicted), _one_hot(reference)
    spacing = [float(s) for s in spacing_zyx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecation notice, not the user's concern
        dice = float(compute_dice(y_pred, y, include_background=False)[0, 0])
        hd95 = float(
            compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95, spacing=spacing)[0, 0]
        )
        nsd = float(
            compute_surface_dice(y_pred, y, class_thresholds=[tolerance_mm], include_background=False, spacing=spacing)[
                0, 0
            ]
        )
    return {"dice": dice, "hd95_mm": hd95, "nsd": nsd, **volumes, "note": ""}
