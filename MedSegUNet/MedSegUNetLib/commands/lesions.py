"""Lesion-wise scores: lesions are counted, not only voxels.

Each mask is split into connected components (26-connectivity: voxels touching by a face, edge or
corner belong together); a component is one lesion. A reference lesion is *detected* when at least one
predicted component overlaps it by a voxel or more, and *missed* otherwise; a predicted component that
overlaps no reference lesion is a *false positive*. Each reference lesion is scored against the union
of the predicted components that overlap it (Dice, surface Dice at the stated tolerance, volume error =
predicted minus reference mL): a component that merges two lesions counts, whole, against each.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from MedSegUNetLib.commands.metrics import score_masks


def components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """(component index per voxel, 0 outside; their number), 26-connected."""
    from scipy import ndimage

    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return labelled, int(count)


def lesion_scores(
    predicted: np.ndarray, reference: np.ndarray, spacing_zyx: Sequence[float], tolerance_mm: float
) -> Dict[str, Any]:
    """Detection counts and one row per reference lesion (largest first) for one structure of one case."""
    reference_ids, reference_count = components(reference)
    predicted_ids, predicted_count = components(predicted)
    overlap = reference_ids > 0
    overlap &= predicted_ids > 0
    pairs = set(zip(reference_ids[overlap].tolist(), predicted_ids[overlap].tolist()))
    rows: List[Dict[str, Any]] = []
    for lesion in range(1, reference_count + 1):
        touching = sorted(p for r, p in pairs if r == lesion)
        scores = score_masks(np.isin(predicted_ids, touching), reference_ids == lesion, spacing_zyx, tolerance_mm)
        rows.append(
            {
                "detected": bool(touching),
                "volume_reference_ml": scores["volume_reference_ml"],
                "volume_error_ml": scores["volume_difference_ml"],
                "dice": scores["dice"],
                "nsd": scores["nsd"],
            }
        )
    rows.sort(key=lambda row: -row["volume_reference_ml"])
    detected = sum(row["detected"] for row in rows)
    matched_predictions = {p for _, p in pairs}
    return {
        "lesions_reference": reference_count,
        "lesions_detected": detected,
        "lesions_missed": reference_count - detected,
        "false_positives": predicted_count - len(matched_predictions),
        "lesions": rows,
    }


def _mean(values: List[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def summarize(per_case: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Over cases: totals, sensitivity (detected / reference lesions), false positives per scan, and the
    mean per-lesion Dice, surface Dice and absolute volume error over every reference lesion."""
    lesions = [row for case in per_case for row in case["lesions"]]
    total = sum(case["lesions_reference"] for case in per_case)
    detected = sum(case["lesions_detected"] for case in per_case)
    return {
        "scans": len(per_case),
        "lesions_reference": total,
        "lesions_detected": detected,
        "lesions_missed": total - detected,
        "sensitivity": detected / total if total else None,
        "false_positives_per_scan": sum(case["false_positives"] for case in per_case) / max(len(per_case), 1),
        "lesion_dice": _mean([row["dice"] for row in lesions]),
        "lesion_nsd": _mean([row["nsd"] for row in lesions]),
        "lesion_abs_volume_error_ml": _mean([abs(row["volume_error_ml"]) for row in lesions]),
    }
