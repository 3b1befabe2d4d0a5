"""`medsegunet evaluate`: metrics checked against values computed by hand on small arrays."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import assert_clean_failure, run_cli

from MedSegUNetLib.commands.evaluate import evaluate_pair, evaluate_paths, score_masks
from MedSegUNetLib.core.labels import Label
from MedSegUNetLib.imageio.images import write_segmentation


def labelmap(array_zyx: np.ndarray, spacing_xyz=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    return image


def cube(shift_x: int = 0, value: int = 1, shape=(20, 20, 20)) -> np.ndarray:
    array = np.zeros(shape, np.uint8)
    array[5:15, 5:15, 5 + shift_x : 15 + shift_x] = value
    return array


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def test_cube_shifted_by_one_voxel_along_a_2_5_mm_axis(tmp_path):
    """Two 10x10x10 cubes, one shifted one voxel along x (2.5 mm):
    overlap 10*10*9 = 900 voxels, Dice = 2*900 / (1000 + 1000) = 0.9.
    Surface voxels of a cube: 10^3 - 8^3 = 488. Farther than 2 mm from the other surface: the 100 voxels
    of the leading x face (2.5 mm), and the 4x4 centre of the trailing x face, which sits inside the other
    cube 2.5 mm from its x face and >= 3 mm from its side faces (the rest of that face is 1 or 2 mm from a
    side face). So 116 of 488 at 2.5 mm: > 5%, HD95 = 2.5 mm; NSD at 2 mm = 2*372 / (2*488); at 3 mm
    every surface voxel is within tolerance: NSD 1. Volumes: 1000 voxels of 2.5 mm^3 = 2.5 mL."""
    spacing = (2.5, 1.0, 1.0)
    reference = write(labelmap(cube(), spacing), tmp_path / "ref.nii.gz")
    prediction = write(labelmap(cube(shift_x=1), spacing), tmp_path / "pred.nii.gz")
    row = evaluate_pair(prediction, reference, tolerance_mm=2.0)["labels"][0]
    assert row["label"] == "1"
    assert row["dice"] == pytest.approx(0.9)
    assert row["hd95_mm"] == pytest.approx(2.5)
    assert row["nsd"] == pytest.approx(372 / 488, abs=1e-6)
    assert row["volume_reference_ml"] == pytest.approx(2.5) and row["volume_difference_ml"] == pytest.approx(0.0)
    assert evaluate_pair(prediction, reference, tolerance_mm=3.0)["labels"][0]["nsd"] == pytest.approx(1.0)
    # the same shift along an axis of 1 mm spacing is a 1 mm error
    spacing_y = (1.0, 1.0, 2.5)
    row = evaluate_pair(
        write(labelmap(cube(shift_x=1), spacing_y), tmp_path / "p2.nii.gz"),
        write(labelmap(cube(), spacing_y), tmp_path / "r2.nii.gz"),
    )["labels"][0]
    assert row["hd95_mm"] == pytest.approx(1.0) and row["nsd"] == pytest.approx(1.0)


def test_empty_masks_follow_the_stated_convention():
    empty, full = np.zeros((6, 6, 6), bool), np.zeros((6, 6, 6), bool)
    full[2:4, 2:4, 2:4] = True
    both = score_masks(empty, empty, (1, 1, 1), 2.0)
    assert (both["dice"], both["hd95_mm"], both["nsd"], both["note"]) == (1.0, 0.0, 1.0, "both empty")
    missed = score_masks(empty, full, (1, 1, 1), 2.0)
    assert (
        missed["dice"] == 0.0
        and math.isinf(missed["hd95_mm"])
        and missed["nsd"] == 0.0
        and missed["note"] == "empty prediction"
    )
    assert missed["volume_difference_ml"] == pytest.approx(-8 / 1000)
    invented = score_masks(full, empty, (1, 1, 1), 2.0)
    assert invented["note"] == "empty reference" and invented["dice"] == 0.0


def test_segmentations_are_matched_by_name_not_value(tmp_path):
    two = cube()
    two[2:4, 2:4, 2:4] = 2
    grid = labelmap(two)
    prediction = write_segmentation(
        tmp_path / "p.seg.nrrd", grid, [Label(1, "Liver", (1, 0, 0)), Label(2, "spleen", (0, 1, 0))]
    )
    swapped = np.where(two == 1, 7, np.where(two == 2, 5, 0))
    reference = write_segmentation(
        tmp_path / "r.seg.nrrd",
        labelmap(swapped),
        [Label(5, "Spleen", (0, 1, 0)), Label(7, "liver", (1, 0, 0)), Label(9, "aorta", (1, 1, 0))],
    )
    report = evaluate_pair(prediction, reference)
    assert {row["label"]: row["dice"] for row in report["labels"]} == {"Liver": 1.0, "spleen": 1.0}
    assert any("aorta" in note for note in report["notes"])  # reference-only labels are listed, not scored
    # a labelmap reference: matched by the segments' label values (1 and 2 here), and said so
    labels_ref = write(grid, tmp_path / "r.nii.gz")
    report = evaluate_pair(prediction, labels_ref)
    assert [row["dice"] for row in report["labels"]] == [1.0, 1.0] and "matched by label value" in report["notes"][0]


def test_a_cropped_prediction_on_the_same_lattice_is_placed_not_resampled(tmp_path):
    reference = labelmap(cube(), (1.5, 1.5, 3.0), origin=(10.0, -4.0, 7.0))
    cropped = sitk.RegionOfInterest(
        labelmap(cube(shift_x=1), (1.5, 1.5, 3.0), origin=(10.0, -4.0, 7.0)), [14, 14, 16], [4, 3, 2]
    )
    row = evaluate_pair(write(cropped, tmp_path / "p.nrrd"), write(reference, tmp_path / "r.nrrd"))["labels"][0]
    assert row["dice"] == pytest.approx(0.9) and row["hd95_mm"] == pytest.approx(1.5)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda image: image.SetSpacing((1.0, 1.0, 1.1)), "spacing"),
        (lambda image: image.SetOrigin((0.5, 0.0, 0.0)), "not whole voxels"),
        (lambda image: image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1)), "direction"),
    ],
)
def test_a_prediction_on_another_grid_is_a_clear_error(tmp_path, change, message):
    prediction = labelmap(cube())
    change(prediction)
    result = run_cli(
        "evaluate", str(write(prediction, tmp_path / "p.nii.gz")), str(write(labelmap(cube()), tmp_path / "r.nii.gz"))
    )
    assert_clean_failure(result, "p.nii.gz", "another grid", message)


def test_folders_csv_and_json(tmp_path):
    predictions, references = tmp_path / "pred", tmp_path / "ref"
    predictions.mkdir()
    references.mkdir()
    for name, shift in (("case_a", 0), ("case_b", 1)):
        write(labelmap(cube(shift_x=shift)), predictions / f"{name}.nii.gz")
        write(labelmap(cube()), references / f"{name}.nrrd")  # another file type, the same case name
    result = run_cli(
        "evaluate",
        str(predictions),
        str(references),
        "--csv",
        str(tmp_path / "m.csv"),
        "--json",
        str(tmp_path / "m.json"),
    )
    assert result.returncode == 0, result.stderr
    assert "case_a" in result.stdout and "mean" in result.stdout
    report = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert [c["case"] for c in report["cases"]] == ["case_a", "case_b"]
    assert report["mean"][0]["dice"] == pytest.approx((1.0 + 0.9) / 2)
    rows = list(csv.DictReader((tmp_path / "m.csv").open(encoding="utf-8")))
    assert [r["case"] for r in rows] == ["case_a", "case_b", "mean"] and float(rows[1]["dice"]) == pytest.approx(0.9)
    (predictions / "case_c.nii.gz").write_bytes((predictions / "case_a.nii.gz").read_bytes())
    assert_clean_failure(run_cli("evaluate", str(predictions), str(references)), "case_c")


def test_infinite_distances_are_null_in_json_and_inf_in_csv(tmp_path):
    reference = write(labelmap(cube()), tmp_path / "r.nii.gz")
    other = cube()
    other[other == 1] = 2  # the prediction names label 2, the reference has only 1
    prediction = write(labelmap(other), tmp_path / "p.nii.gz")
    report = evaluate_paths(prediction, reference)
    assert report["cases"][0]["labels"][0]["note"] == "not in the reference"
    result = run_cli(
        "evaluate",
        str(prediction),
        str(reference),
        "--csv",
        str(tmp_path / "m.csv"),
        "--json",
        str(tmp_path / "m.json"),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["cases"][0]["labels"][0]["hd95_mm"] is None
    assert list(csv.DictReader((tmp_path / "m.csv").open(encoding="utf-8")))[0]["hd95_mm"] == "inf"
