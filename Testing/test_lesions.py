"""Lesion-wise metrics (commands/lesions.py, `evaluate --lesions`) on synthetic labelmaps with known answers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_cli

from MedSegUNetLib.commands.lesions import components, lesion_scores, summarize

SPACING = (1.0, 1.0, 1.0)  # one voxel is 0.001 mL


def _scene():
    """Three reference lesions (216, 64, 8 voxels); the prediction finds the first exactly, the second
    shifted and larger (32 of its 80 voxels on the lesion), misses the third, and adds two false positives."""
    reference = np.zeros((40, 40, 40), bool)
    predicted = np.zeros_like(reference)
    reference[2:8, 2:8, 2:8] = True
    predicted[2:8, 2:8, 2:8] = True
    reference[20:24, 20:24, 20:24] = True
    predicted[20:24, 20:24, 22:27] = True
    reference[32:34, 32:34, 32:34] = True
    predicted[32:34, 2:4, 2:4] = True
    predicted[38, 38, 38] = True
    return predicted, reference


def test_detection_counts_dice_and_volume_error_per_lesion():
    predicted, reference = _scene()
    scores = lesion_scores(predicted, reference, SPACING, tolerance_mm=2.0)
    assert (scores["lesions_reference"], scores["lesions_detected"], scores["lesions_missed"]) == (3, 2, 1)
    assert scores["false_positives"] == 2
    large, shifted, missed = scores["lesions"]  # largest first
    assert large["detected"] and large["dice"] == pytest.approx(1.0) and large["volume_error_ml"] == pytest.approx(0)
    assert large["volume_reference_ml"] == pytest.approx(0.216)
    assert shifted["dice"] == pytest.approx(2 * 32 / (64 + 80))
    assert shifted["volume_error_ml"] == pytest.approx(0.016)
    # its faces lie 2 mm (x = 20 against 22) and 3 mm (x = 23 against 26) from the lesion's, the others closer
    assert 0 < shifted["nsd"] < 1
    assert not missed["detected"] and missed["dice"] == 0 and missed["volume_error_ml"] == pytest.approx(-0.008)
    loose = lesion_scores(predicted, reference, SPACING, tolerance_mm=3.0)["lesions"][1]["nsd"]
    strict = lesion_scores(predicted, reference, SPACING, tolerance_mm=1.0)["lesions"][1]["nsd"]
    assert loose == pytest.approx(1.0) and 0 < strict < shifted["nsd"]


def test_merged_and_split_predictions():
    reference = np.zeros((20, 20, 20), bool)
    reference[2:5, 2:5, 2:5] = True
    reference[2:5, 2:5, 8:11] = True
    merged = np.zeros_like(reference)
    merged[2:5, 2:5, 2:11] = True  # one component over both lesions
    scores = lesion_scores(merged, reference, SPACING, 2.0)
    assert (scores["lesions_detected"], scores["false_positives"]) == (2, 0)
    assert [row["dice"] for row in scores["lesions"]] == pytest.approx([2 * 27 / (27 + 81)] * 2)
    split = np.zeros_like(reference)
    split[2:5, 2:5, 2:3] = True
    split[2:5, 2:5, 4:5] = True  # two components on the first lesion
    scores = lesion_scores(split, reference, SPACING, 2.0)
    assert (scores["lesions_detected"], scores["lesions_missed"], scores["false_positives"]) == (1, 1, 0)
    assert scores["lesions"][0]["dice"] == pytest.approx(2 * 18 / (27 + 18))


def test_lesions_touching_by_a_corner_are_one_lesion():
    mask = np.zeros((6, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True
    mask[4, 4, 1] = True
    assert components(mask)[1] == 2


def test_summary_over_scans():
    predicted, reference = _scene()
    one = lesion_scores(predicted, reference, SPACING, 2.0)
    clean = lesion_scores(reference, reference, SPACING, 2.0)
    summary = summarize([one, clean])
    assert summary["sensitivity"] == pytest.approx(5 / 6) and summary["false_positives_per_scan"] == 1.0
    assert summary["lesion_dice"] == pytest.approx((1 + 64 / 144 + 0 + 3) / 6)
    assert summary["lesion_abs_volume_error_ml"] == pytest.approx((0.016 + 0.008) / 6)
    nothing = summarize([lesion_scores(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), SPACING, 2.0)])
    assert nothing["sensitivity"] is None and nothing["lesion_dice"] is None


def test_evaluate_lesions_on_labelmap_files(tmp_path):
    predicted, reference = _scene()
    for name, mask in (("pred", predicted), ("ref", reference)):
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.SetSpacing(SPACING)
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    result = run_cli(
        "evaluate",
        str(tmp_path / "pred.nii.gz"),
        str(tmp_path / "ref.nii.gz"),
        "--lesions",
        "--json",
        str(tmp_path / "m.json"),
        "--csv",
        str(tmp_path / "m.csv"),
    )
    assert result.returncode == 0, result.stderr
    assert "lesions 1: 2 of 3 detected, 1 missed, 2.00 false positives per scan" in result.stdout
    report = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert report["lesions"][0]["sensitivity"] == pytest.approx(2 / 3)
    assert report["cases"][0]["labels"][0]["lesions"]["false_positives"] == 2
    rows = list(csv.DictReader((tmp_path / "m.csv").open(encoding="utf-8")))
    assert rows[0]["lesions_detected"] == "2" and rows[0]["false_positives"] == "2"
    plain = run_cli("evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"))
    assert plain.returncode == 0 and "lesions" not in plain.stdout


def test_lesion_benchmark_table_and_means():
    """benchmarks/lesions.py's report pieces (its runs train networks: minutes, not a unit test)."""
    import importlib.util
    import sys

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("lesions_benchmark", REPO / "benchmarks" / "lesions.py")
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # its dataclasses look their module up
    spec.loader.exec_module(benchmark)  # by its path: benchmarks/ also holds a training.py

    def fold(name, dice, detected, false_positives, error):
        return {
            "held_out": name,
            "lesion_ml": 6.5,
            "lesion_share": 0.0028,
            "dice": dice,
            "nsd": dice,
            "detected": detected,
            "false_positives": false_positives,
            "volume_error_ml": error,
        }

    folds = {"uniform": [fold("pat_1", 0.2, 1, 3, -2.0), fold("pat_2", 0.0, 0, 1, -6.5)]}
    folds["oversampling"] = [fold("pat_1", 0.6, 1, 0, 1.0), fold("pat_2", 0.4, 1, 2, -1.0)]
    report = {"folds": folds, "mean": {arm: benchmark.means(rows) for arm, rows in folds.items()}}
    assert report["mean"]["uniform"]["abs_volume_error_ml"] == pytest.approx(4.25)
    assert report["mean"]["oversampling"]["detected"] == 1 and report["mean"]["oversampling"]["dice"] == 0.5
    table = benchmark.markdown(report).splitlines()
    assert len(table) == 2 + 4 + 2
    assert table[2] == "| pat_1 | 6.5 (0.28%) | uniform | 0.200 | 0.200 | 1 | 3 | -2.0 |"
    assert table[-1] == "| **mean** | | oversampling | 0.500 | 0.500 | 1.00 | 1.00 | +0.0 |"
