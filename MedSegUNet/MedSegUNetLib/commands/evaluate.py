"""`medsegunet evaluate PRED REF`: Dice, 95% Hausdorff distance, normalized surface Dice and volumes.

Metrics are MONAI's (``compute_dice``, ``compute_hausdorff_distance``, ``compute_surface_dice``), in mm
with the images' spacing. Conventions, stated once here and in the README:

- ``.seg.nrrd`` files are matched by segment name (case-insensitive); labelmaps by label value; a
  ``.seg.nrrd`` against a labelmap by the segments' label values.
- Only the prediction's labels are scored (a 6-structure model is not penalised for the 60 other
  structures of a whole-body reference); reference-only labels are listed in ``notes``.
- Both masks empty: Dice 1, HD95 0 mm, NSD 1 (agreement that the structure is absent). One empty:
  Dice 0, NSD 0, HD95 infinite (``null`` in JSON, ``inf`` in CSV). Means skip non-finite values and
  report how many they skipped.
- Two files must sample the same voxel lattice (same spacing and direction, origins a whole number of
  voxels apart: Slicer crops a ``.seg.nrrd`` to its extent). Anything else is an error, never a resample.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.commands.lesions import lesion_scores, summarize
from MedSegUNetLib.commands.metrics import score_masks
from MedSegUNetLib.core.atomic import atomic_path, check_writable
from MedSegUNetLib.core.errors import MedSegError, PathLike
from MedSegUNetLib.core.geometry import Grid, image_from_ijk_array
from MedSegUNetLib.imageio.images import SEGMENTATION_ENDING, has_ending, read_labelmap
from MedSegUNetLib.imageio.rtstruct import find_rtstruct, is_rtstruct, read_structure_set
from MedSegUNetLib.imageio.segmentation_nrrd import segment_names

if TYPE_CHECKING:
    from MedSegUNetLib.core.progress import Progress

IMAGE_ENDINGS = (SEGMENTATION_ENDING, ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass
class Masks:
    """Binary masks of one file on its own grid, keyed by segment name or label value."""

    path: Path
    grid: Grid
    masks: Dict[str, np.ndarray]  # key -> (z, y, x) bool
    display: Dict[str, str]  # key -> the name to print
    values: Dict[str, int]  # key -> label value (segments: their labelValue)
    by_name: bool


# --- reading ---------------------------------------------------------------------------------------


def read_masks(path: Path) -> Masks:
    path = Path(path)
    if not path.exists():
        raise MedSegError("not found", path)
    if has_ending(path, (SEGMENTATION_ENDING,)):
        return _segmentation_masks(path)
    if path.is_dir() or is_rtstruct(path):
        return _structure_set_masks(path)
    label = read_labelmap(path)
    array = sitk.GetArrayFromImage(label)
    values = [int(v) for v in np.unique(array) if v != 0]
    return Masks(
        path,
        Grid.of(label),
        {str(v): array == v for v in values},
        {str(v): str(v) for v in values},
        {str(v): v for v in values},
        False,
    )


def _segmentation_masks(path: Path) -> Masks:
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:  # slicerio raises plain exceptions for any unreadable file
        raise MedSegError(f"is not a readable segmentation ({error})", path) from None
    voxels = np.asarray(segmentation["voxels"])
    layers = voxels if voxels.ndim == 4 else voxels[np.newaxis]
    grid_image = image_from_ijk_array(np.zeros(layers.shape[1:], np.uint8), segmentation["ijkToLPS"])
    masks, display, values = {}, {}, {}
    names = segment_names(path)  # UTF-8, where slicerio drops every non-ASCII character
    for segment in segmentation.get("segments", []):
        name = names.get(str(segment.get("id")), str(segment.get("name", segment.get("id"))))
        key = " ".join(name.split()).casefold()
        if key in masks:
            raise MedSegError(f"has two segments named '{name}'", path)
        mask_ijk = layers[int(segment.get("layer", 0))] == int(segment["labelValue"])
        masks[key] = np.ascontiguousarray(mask_ijk.transpose(2, 1, 0))  # ijk -> zyx, as SimpleITK arrays
        display[key], values[key] = name, int(segment["labelValue"])
    return Masks(path, Grid.of(grid_image), masks, display, values, True)


def _structure_set_masks(path: Path) -> Masks:
    """The ROIs of a DICOM RT structure set (a folder with the CT series, or the RTSTRUCT file), by name."""
    structures = read_structure_set(path)
    keys = [" ".join(label.name.split()).casefold() for label in structures.labels]
    return Masks(
        path,
        Grid.of(structures.image),
        {key: structures.masks[label.name] for key, label in zip(keys, structures.labels)},
        {key: label.name for key, label in zip(keys, structures.labels)},
        {key: label.value for key, label in zip(keys, structures.labels)},
        True,
    )


# --- one lattice for both --------------------------------------------------------------------------


def _index_offset(moving: Grid, fixed: Grid, path: Path) -> np.ndarray:
    """Voxel offset (i, j, k) of ``moving``'s origin in ``fixed``'s index space; refuses other lattices."""
    problem = None
    if not np.allclose(moving.spacing, fixed.spacing, rtol=1e-4, atol=1e-6):
        problem = f"spacing {moving.spacing} vs {fixed.spacing}"
    elif not np.allclose(moving.direction, fixed.direction, atol=1e-4):
        problem = "direction differs"
    else:
        steps = np.array(fixed.direction).reshape(3, 3) * np.array(fixed.spacing)
        offset = np.linalg.solve(steps, np.array(moving.origin) - np.array(fixed.origin))
        if np.allclose(offset, np.round(offset), atol=1e-3):
            return np.round(offset).astype(int)
        problem = f"origin is {np.round(offset, 3).tolist()} voxels from the reference's, not whole voxels"
    raise MedSegError(f"is on another grid than its reference ({problem}); resample it first, evaluate does not", path)


def on_common_lattice(prediction: Masks, reference: Masks) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Both sets of masks padded into the union of their boxes (zyx arrays), without resampling."""
    offset = _index_offset(prediction.grid, reference.grid, prediction.path)
    low = np.minimum(offset, 0)
    high = np.maximum(offset + np.array(prediction.grid.size), np.array(reference.grid.size))
    shape_zyx = tuple(int(v) for v in (high - low)[::-1])

    def place(masks: Dict[str, np.ndarray], start_ijk: np.ndarray) -> Dict[str, np.ndarray]:
        placed = {}
        for key, mask in masks.items():
            canvas = np.zeros(shape_zyx, bool)
            z, y, x = (start_ijk - low)[::-1]
            canvas[z : z + mask.shape[0], y : y + mask.shape[1], x : x + mask.shape[2]] = mask
            placed[key] = canvas
        return placed

    return place(prediction.masks, offset), place(reference.masks, np.zeros(3, int))


# --- metrics ---------------------------------------------------------------------------------------


def evaluate_pair(
    prediction_path: Path,
    reference_path: Path,
    tolerance_mm: float = 2.0,
    case: Optional[str] = None,
    lesions: bool = False,
) -> dict:
    """One case: ``{"case", "prediction", "reference", "labels": [row...], "notes": [...]}``.

    Each row: ``label`` (name or value), ``dice``, ``hd95_mm`` (``inf`` when one mask is empty),
    ``nsd``, ``volume_reference_ml``, ``volume_prediction_ml``, ``volume_difference_ml``, ``note``;
    with ``lesions``, also ``lesions``: the lesion-wise scores of commands/lesions.py.
    """
    prediction, reference = read_masks(prediction_path), read_masks(reference_path)
    notes: List[str] = []
    if prediction.by_name != reference.by_name:
        notes.append("a .seg.nrrd against a labelmap: matched by label value")
        for masks in (prediction, reference):
            if masks.by_name:
                masks.masks = {str(masks.values[k]): v for k, v in masks.masks.items()}
                masks.display = {str(masks.values[k]): name for k, name in masks.display.items()}
    predicted, referenced = on_common_lattice(prediction, reference)
    spacing_zyx = tuple(reversed(reference.grid.spacing))
    empty = np.zeros(
        next(iter(referenced.values()), next(iter(predicted.values()), np.zeros((1, 1, 1), bool))).shape, bool
    )
    rows = []
    for key in predicted:
        row = score_masks(predicted[key], referenced.get(key, empty), spacing_zyx, tolerance_mm)
        if lesions:
            row["lesions"] = lesion_scores(predicted[key], referenced.get(key, empty), spacing_zyx, tolerance_mm)
        if key not in referenced:
            row["note"] = "not in the reference" if predicted[key].any() else "not in the reference; both empty"
        rows.append({"label": prediction.display.get(key, key), **row})
    only_reference = [reference.display[k] for k in referenced if k not in predicted]
    if only_reference:
        notes.append(f"not scored (only in the reference): {', '.join(only_reference)}")
    return {
        "case": case or case_name(Path(prediction_path)),
        "prediction": str(prediction_path),
        "reference": str(reference_path),
        "labels": rows,
        "notes": notes,
    }


def mean_per_label(cases: List[dict]) -> List[dict]:
    """Mean of each metric per label over cases; non-finite values are skipped and counted."""
    order: List[str] = []
    for case in cases:
        order += [row["label"] for row in case["labels"] if row["label"] not in order]
    means = []
    for label in order:
        rows = [row for case in cases for row in case["labels"] if row["label"] == label]
        entry: Dict[str, Any] = {"label": label, "cases": len(rows), "skipped_non_finite": 0}
        for metric in ("dice", "hd95_mm", "nsd", "volume_difference_ml"):
            values = [row[metric] for row in rows]
            finite = [v for v in values if math.isfinite(v)]
            entry["skipped_non_finite"] = max(entry["skipped_non_finite"], len(values) - len(finite))
            entry[metric] = float(np.mean(finite)) if finite else None
        means.append(entry)
    return means


# --- files and folders -----------------------------------------------------------------------------


def case_name(path: Path) -> str:
    for ending in IMAGE_ENDINGS:
        if path.name.lower().endswith(ending):
            return path.name[: -len(ending)]
    return path.stem


def match_cases(prediction: Path, reference: Path) -> List[Tuple[str, Path, Path]]:
    """(case, prediction file, reference file): two files, or two folders matched by case name. A DICOM
    folder with an RT structure set counts as one file."""

    def is_folder_of_cases(path: Path) -> bool:
        return path.is_dir() and find_rtstruct(path) is None

    if is_folder_of_cases(prediction) != is_folder_of_cases(reference):
        raise MedSegError(
            "give two files (a DICOM folder with an RT structure set counts as one) or two folders", prediction
        )
    if not is_folder_of_cases(prediction):
        return [(case_name(prediction), prediction, reference)]

    def listing(folder: Path) -> Dict[str, Path]:
        found = {}
        for path in sorted(folder.iterdir()):
            if path.is_file() and has_ending(path, IMAGE_ENDINGS):
                if case_name(path) in found:
                    raise MedSegError(f"holds two files for case '{case_name(path)}'", folder)
                found[case_name(path)] = path
        if not found:
            raise MedSegError("holds no segmentation or labelmap files", folder)
        return found

    predicted, referenced = listing(prediction), listing(reference)
    unmatched = sorted(set(predicted) ^ set(referenced))
    if unmatched:
        raise MedSegError(f"cases without a partner in the other folder: {', '.join(unmatched[:10])}", prediction)
    return [(name, predicted[name], referenced[name]) for name in sorted(predicted)]


def evaluate_paths(
    prediction: PathLike,
    reference: PathLike,
    tolerance_mm: float = 2.0,
    progress: Optional[Progress] = None,
    lesions: bool = False,
) -> dict:
    """Every case: ``{"cases": [evaluate_pair(...)...], "mean": mean_per_label(...), "tolerance_mm"}``,
    and with ``lesions`` a ``"lesions"`` summary per label over the cases."""
    pairs = match_cases(Path(prediction), Path(reference))
    cases = []
    for index, (name, predicted, referenced) in enumerate(pairs):
        if progress is not None:
            progress.update("evaluate", index, len(pairs), name)
        cases.append(evaluate_pair(predicted, referenced, tolerance_mm, case=name, lesions=lesions))
    if progress is not None:
        progress.update("evaluate", len(pairs), len(pairs), "evaluated")
    report = {"cases": cases, "mean": mean_per_label(cases), "tolerance_mm": tolerance_mm}
    if lesions:
        report["lesions"] = lesion_summary(cases)
    return report


def lesion_summary(cases: List[dict]) -> List[dict]:
    """Per label, the lesion-wise scores summed and averaged over the cases that score it."""
    labels: Dict[str, List[dict]] = {}
    for case in cases:
        for row in case["labels"]:
            labels.setdefault(row["label"], []).append(row["lesions"])
    return [{"label": label, **summarize(per_case)} for label, per_case in labels.items()]


LESION_COLUMNS = ["lesions_reference", "lesions_detected", "lesions_missed", "false_positives"]
COLUMNS = [
    "case",
    "label",
    "dice",
    "hd95_mm",
    "nsd",
    "volume_reference_ml",
    "volume_prediction_ml",
    "volume_difference_ml",
    "note",
]


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def csv_text(report: dict) -> str:
    stream = io.StringIO()
    columns = COLUMNS + (LESION_COLUMNS if "lesions" in report else [])
    writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for case in report["cases"]:
        for row in case["labels"]:
            counts = {k: v for k, v in row.get("lesions", {}).items() if k in LESION_COLUMNS}
            writer.writerow({"case": case["case"], **{k: _format(v) for k, v in row.items()}, **counts})
    for row in report["mean"]:
        writer.writerow(
            {
                "case": "mean",
                **{k: _format(v) for k, v in row.items()},
                "note": f"{row['cases']} cases, {row['skipped_non_finite']} non-finite skipped",
            }
        )
    return stream.getvalue()


def _format(value: object) -> object:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return "" if value is None else value


def write_reports(report: dict, json_path: Optional[Path] = None, csv_path: Optional[Path] = None) -> None:
    for path, text in (
        (json_path, lambda: json.dumps(_json_safe(report), indent=2)),
        (csv_path, lambda: csv_text(report)),
    ):
        if path is not None:
            with atomic_path(Path(path)) as temporary:
                temporary.write_text(text(), encoding="utf-8")


def table(report: dict) -> str:
    lines = [f"{'case':<20} {'label':<22} {'Dice':>6} {'HD95 mm':>8} {'NSD':>6} {'vol diff mL':>12}"]
    for case in report["cases"]:
        for row in case["labels"]:
            hd = "inf" if math.isinf(row["hd95_mm"]) else f"{row['hd95_mm']:.1f}"
            lines.append(
                f"{case['case'][:20]:<20} {row['label'][:22]:<22} {row['dice']:>6.3f} {hd:>8} {row['nsd']:>6.3f} "
                f"{row['volume_difference_ml']:>12.1f}"
            )
        lines += [f"  note: {note}" for note in case["notes"]]
    if len(report["cases"]) > 1:
        for row in report["mean"]:
            hd = "-" if row["hd95_mm"] is None else f"{row['hd95_mm']:.1f}"
            lines.append(
                f"{'mean':<20} {row['label'][:22]:<22} {row['dice']:>6.3f} {hd:>8} {row['nsd']:>6.3f} "
                f"{row['volume_difference_ml']:>12.1f}"
            )
    for row in report.get("lesions", []):
        lines.append(lesion_line(row, report["tolerance_mm"]))
    return "\n".join(lines)


def lesion_line(row: dict, tolerance_mm: float) -> str:
    """One label's lesion-wise summary in words."""

    def number(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3f}"

    return (
        f"lesions {row['label']}: {row['lesions_detected']} of {row['lesions_reference']} detected, "
        f"{row['lesions_missed']} missed, {row['false_positives_per_scan']:.2f} false positives per scan; "
        f"per lesion Dice {number(row['lesion_dice'])}, "
        f"surface Dice ({tolerance_mm:g} mm) {number(row['lesion_nsd'])}, "
        f"|volume error| {number(row['lesion_abs_volume_error_ml'])} mL"
    )


# --- the command -----------------------------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="Dice, HD95, surface Dice and volumes of predictions against references",
        description="Compare PRED with REF (two files, or two folders matched by case name). .seg.nrrd files are "
        "matched by segment name, labelmaps by value. Both masks empty counts as agreement (Dice 1); one empty "
        "gives Dice 0 and an infinite HD95.",
    )
    parser.add_argument("prediction", type=Path, metavar="PRED")
    parser.add_argument("reference", type=Path, metavar="REF")
    parser.add_argument("--csv", type=Path, help="write every row and the means as CSV")
    parser.add_argument("--json", type=Path, help="write the full report as JSON")
    parser.add_argument("--tolerance-mm", type=float, default=2.0, help="normalized surface Dice tolerance (2 mm)")
    parser.add_argument(
        "--lesions",
        action="store_true",
        help="also count lesions (26-connected components matched by overlap): detected, missed, false positives "
        "per scan, and per-lesion Dice, surface Dice and volume error",
    )
    parser.set_defaults(handler=run_evaluate_command, progress="none")


def run_evaluate_command(args: argparse.Namespace, progress: Progress) -> dict:
    for path in (args.csv, args.json):
        if path is not None:
            check_writable(path)
    report = evaluate_paths(args.prediction, args.reference, args.tolerance_mm, lesions=args.lesions)
    write_reports(report, args.json, args.csv)
    print(table(report))
    return {"cases": len(report["cases"])}
