"""DICOM RT structure sets: contours rasterized onto the CT grid where exact areas and volumes are known.

Every rectangle's edges lie on voxel boundaries (half-integer indices), so the voxels whose centers lie
inside are known exactly: the area of each slice and the volume are the polygons' own, to the voxel.
The series are written with pydicom (rtstruct_files.py) in straight, flipped and oblique orientations.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import assert_clean_failure, run_cli
from rtstruct_files import SeriesGeometry, rectangle, write_ct_series, write_rtstruct

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.imageio.rtstruct import find_rtstruct, is_rtstruct, read_structure_set

OBLIQUE = (np.cos(0.4), np.sin(0.4), 0.0), (-np.sin(0.4) * np.cos(0.3), np.cos(0.4) * np.cos(0.3), np.sin(0.3))
GEOMETRIES = {
    "axial": SeriesGeometry(),
    "flipped": SeriesGeometry(slice_sign=-1.0, column_direction=(0.0, -1.0, 0.0)),
    "oblique": SeriesGeometry(row_direction=OBLIQUE[0], column_direction=OBLIQUE[1]),
}
SLICES = range(3, 8)  # the tumour's slices, in the order the files were written
OUTER, HOLE, SECOND = ((4.5, 24.5), (3.5, 19.5)), ((9.5, 14.5), (7.5, 12.5)), ((29.5, 34.5), (22.5, 26.5))


def _tumour_polygons(geometry: SeriesGeometry) -> list:
    """Per slice: an outer rectangle, a hole inside it, and a second separate rectangle."""
    return [rectangle(geometry, *box, k) for k in SLICES for box in (OUTER, HOLE, SECOND)]


def _expected_voxels_per_slice() -> int:
    def count(box):
        return int((box[0][1] - box[0][0]) * (box[1][1] - box[1][0]))

    return count(OUTER) - count(HOLE) + count(SECOND)  # 320 - 25 + 20


def _write_case(folder, geometry, rois=None):
    uids = write_ct_series(folder, geometry)
    write_rtstruct(folder / "RS.dcm", uids, rois or {"GTV": _tumour_polygons(geometry), "Empty": []})
    return uids


def _dicom_indices(image: sitk.Image, geometry: SeriesGeometry) -> np.ndarray:
    """For every voxel of the image as SimpleITK read it, its (i, j, k) in the files' own geometry."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    direction = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    physical = np.array(image.GetOrigin()) + np.stack([i, j, k], axis=-1) @ direction.T
    dicom_axes = np.stack(
        [
            geometry.spacing[0] * np.array(geometry.row_direction),
            geometry.spacing[1] * np.array(geometry.column_direction),
            geometry.spacing[2] * geometry.normal(),
        ],
        axis=1,
    )
    return np.linalg.solve(dicom_axes, (physical - np.array(geometry.origin)).reshape(-1, 3).T).T.reshape(
        physical.shape
    )


def _inside(index: np.ndarray, box) -> np.ndarray:
    (i0, i1), (j0, j1) = box
    return (index[..., 0] > i0) & (index[..., 0] < i1) & (index[..., 1] > j0) & (index[..., 1] < j1)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_contours_fill_exactly_their_voxels_with_holes_and_several_polygons(tmp_path, name):
    geometry = GEOMETRIES[name]
    _write_case(tmp_path / "case", geometry)
    structures = read_structure_set(tmp_path / "case")
    mask = structures.masks["GTV"]
    index = _dicom_indices(structures.image, geometry)
    k = np.round(index[..., 2])
    on_slices = np.isin(k, list(SLICES))
    expected = on_slices & ((_inside(index, OUTER) & ~_inside(index, HOLE)) | _inside(index, SECOND))
    assert mask.shape == expected.shape and np.array_equal(mask, expected)
    voxel_mm3 = float(np.prod(geometry.spacing))
    exact_mm3 = len(SLICES) * geometry.spacing[2] * geometry.spacing[0] * geometry.spacing[1] * (320 - 25 + 20)
    assert mask.sum() == len(SLICES) * _expected_voxels_per_slice()
    assert mask.sum() * voxel_mm3 == pytest.approx(exact_mm3)
    assert not structures.masks["Empty"].any() and structures.notes == ["ROI 'Empty' has no closed contour: left empty"]
    assert [label.name for label in structures.labels] == ["GTV", "Empty"]
    # the CT itself: voxel (i, j, k) of the files holds i + 10 j + 100 k
    values = sitk.GetArrayFromImage(structures.image)
    assert np.allclose(values, np.round(index[..., 0]) + 10 * np.round(index[..., 1]) + 100 * k)


def test_a_hole_drawn_first_is_still_a_hole_and_xor_cuts_overlaps(tmp_path):
    geometry = SeriesGeometry()
    polygons = [rectangle(geometry, *HOLE, 4), rectangle(geometry, *OUTER, 4)]
    overlapping = [rectangle(geometry, (0.5, 10.5), (0.5, 4.5), 5), rectangle(geometry, (5.5, 15.5), (0.5, 4.5), 5)]
    _write_case(tmp_path / "case", geometry, {"GTV": polygons + overlapping})
    mask = read_structure_set(tmp_path / "case").masks["GTV"]
    assert mask[4].sum() == 320 - 25 and not mask[4, 8:13, 10:15].any()
    assert mask[5].sum() == 2 * 5 * 4 and not mask[5, 1:5, 6:11].any()  # even-odd: the shared part is out


def test_rtstruct_found_in_its_folder_and_other_files_are_not(tmp_path):
    _write_case(tmp_path / "case", SeriesGeometry())
    assert find_rtstruct(tmp_path / "case") == tmp_path / "case" / "RS.dcm"
    assert not is_rtstruct(tmp_path / "case" / "CT_0000.dcm")
    (tmp_path / "notes.txt").write_text("not DICOM", encoding="utf-8")
    assert not is_rtstruct(tmp_path / "notes.txt") and find_rtstruct(tmp_path) is None


def test_structure_set_of_another_series_is_refused(tmp_path):
    geometry = SeriesGeometry()
    uids = write_ct_series(tmp_path / "case", geometry)
    other = write_ct_series(tmp_path / "other", geometry, study=uids[0], frame=uids[2])
    write_rtstruct(tmp_path / "case" / "RS.dcm", other, {"GTV": _tumour_polygons(geometry)})
    with pytest.raises(MedSegError, match=f"references series {other[1]}, which is not in"):
        read_structure_set(tmp_path / "case")


@pytest.mark.parametrize(
    "k, i, message",
    [
        (3.5, (4.5, 9.5), "lies between slices 3 and 4"),
        (14.0, (4.5, 9.5), "lies off the series' grid"),
        (-1.0, (4.5, 9.5), "lies off the series' grid"),
        (3.0, (30.5, 45.5), "reaches outside the image"),
    ],
)
def test_contours_off_the_grid_are_refused(tmp_path, k, i, message):
    geometry = SeriesGeometry()
    _write_case(tmp_path / "case", geometry, {"GTV": [rectangle(geometry, i, (3.5, 6.5), k)]})
    with pytest.raises(MedSegError, match=message):
        read_structure_set(tmp_path / "case")


def test_contour_across_slices_is_refused(tmp_path):
    geometry = SeriesGeometry()
    tilted = geometry.physical(np.array([[4.5, 3.5, 2.0], [9.5, 3.5, 2.0], [9.5, 6.5, 4.0], [4.5, 6.5, 4.0]]))
    _write_case(tmp_path / "case", geometry, {"GTV": [tilted]})
    with pytest.raises(MedSegError, match="not parallel to the series' slices"):
        read_structure_set(tmp_path / "case")


def test_evaluate_reads_a_structure_set_as_reference_and_says_one_line_when_it_cannot(tmp_path):
    from MedSegUNetLib.imageio.images import write_segmentation

    geometry = SeriesGeometry()
    _write_case(tmp_path / "case", geometry, {"GTV": _tumour_polygons(geometry)})
    structures = read_structure_set(tmp_path / "case")
    label = sitk.GetImageFromArray(structures.masks["GTV"].astype(np.uint8))
    label.CopyInformation(structures.image)
    prediction = write_segmentation(tmp_path / "prediction.seg.nrrd", label, structures.labels)
    result = run_cli("evaluate", str(prediction), str(tmp_path / "case"), "--json", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["cases"][0]["labels"][0]
    assert row["label"] == "GTV" and row["dice"] == pytest.approx(1.0)
    exact_ml = len(SLICES) * float(np.prod(geometry.spacing)) * _expected_voxels_per_slice() / 1000
    assert row["volume_reference_ml"] == pytest.approx(exact_ml)
    uids = write_ct_series(tmp_path / "other", geometry)
    write_rtstruct(tmp_path / "case" / "RS.dcm", uids, {"GTV": _tumour_polygons(geometry)})
    failed = run_cli("evaluate", str(prediction), str(tmp_path / "case"))
    assert_clean_failure(failed, "RS.dcm", "references series", "which is not in")


def test_train_reads_a_dicom_folder_with_its_structure_set(tmp_path):
    geometry = SeriesGeometry()
    for name in ("pat_a", "pat_b"):
        _write_case(tmp_path / "data" / name, geometry, {"GTV": _tumour_polygons(geometry)})
    result = run_cli("train", str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "case pat_a: 40x32x12 voxels" in result.stdout and "label 1: GTV" in result.stdout
    from training.datasets import rtstruct_cases
    from training.scenes import load_case_arrays

    cases = rtstruct_cases(tmp_path / "data")
    image, label = load_case_arrays(cases[0])
    assert sitk.GetArrayViewFromImage(label).sum() == len(SLICES) * _expected_voxels_per_slice()
    overlapping = {"GTV": [rectangle(geometry, *OUTER, 4)], "Lung": [rectangle(geometry, *HOLE, 4)]}
    _write_case(tmp_path / "overlap", geometry, overlapping)
    failed = run_cli("train", str(tmp_path / "overlap"), "-o", str(tmp_path / "out2"), "--max-steps", "1")
    assert_clean_failure(failed, "RS.dcm", "ROIs 'GTV' and 'Lung' overlap")
