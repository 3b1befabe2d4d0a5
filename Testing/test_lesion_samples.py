"""`sample-data --lesions`: the four lung lesion cases of pycerr 2.5.1 (CC BY-NC 3.0), from PyPI.

Downloads the pycerr wheel once (~26 MB from the package index) into a cache shared by this file's tests.
The real contours are checked against their own polygon areas (shoelace formula, in mm^2): rasterizing
by voxel centers may differ from a polygon's area only along its outline.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_cli

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.imageio.rtstruct import read_rois, read_structure_set
from training.lesion_samples import DATASET, extract_dataset
from training.scenes import load_case_arrays, read_scene


@pytest.fixture(scope="module")
def lesions(tmp_path_factory):
    out = tmp_path_factory.mktemp("lesions")
    env = dict(os.environ, MEDSEGUNET_CACHE=str(tmp_path_factory.mktemp("cache")))
    result = run_cli("sample-data", "--lesions", "--output", str(out), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result.stdout


def _shoelace_mm2(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


@pytest.mark.slow
def test_lesion_cases_are_scenes_with_their_licence(lesions, tmp_path):
    out, stdout = lesions
    assert "CC BY-NC 3.0" in stdout and "DOI:10.17195/candat.2016.08.1" in stdout
    assert "Creative Commons Attribution-NonCommercial 3.0" in (out / "LESIONS_LICENSE.txt").read_text("utf-8")
    volumes = []
    for number in range(1, 5):
        case = read_scene(out / f"lung-gtv-{number}.mrb", tmp_path / "work")[0]
        assert [segment.name for segment in case.segments] == ["GTV-1"]
        image, label = load_case_arrays(case)
        structures = read_structure_set(out / f"lung-gtv-{number}" / "dicom")
        assert np.array_equal(sitk.GetArrayFromImage(label) > 0, structures.masks["GTV-1"])
        fraction = structures.masks["GTV-1"].mean()
        assert 0 < fraction < 0.06  # a lesion in a lung crop: a few percent of the voxels at most
        volumes.append(structures.masks["GTV-1"].sum() * np.prod(image.GetSpacing()) / 1000)
    assert min(volumes) < 10 < max(volumes)  # one small lesion (~6.5 mL), one large (~360 mL)


@pytest.mark.slow
def test_real_contours_rasterize_to_their_polygon_areas(lesions):
    out, _ = lesions
    for number in range(1, 5):
        structures = read_structure_set(out / f"lung-gtv-{number}" / "dicom")
        _, rois = read_rois(structures.path)
        spacing = structures.image.GetSpacing()
        mask = structures.masks["GTV-1"]
        slices_with_contours = {
            int(round(structures.image.TransformPhysicalPointToContinuousIndex([float(v) for v in polygon[0]])[2]))
            for polygon in rois[0].polygons
        }
        assert set(np.flatnonzero(mask.any(axis=(1, 2)))) == slices_with_contours
        polygon_mm2 = sum(_shoelace_mm2(polygon) for polygon in rois[0].polygons)
        assert mask.sum() * spacing[0] * spacing[1] == pytest.approx(polygon_mm2, rel=0.02)


@pytest.mark.slow
def test_train_and_evaluate_read_the_lesion_dicom_folders(lesions, tmp_path):
    out, _ = lesions
    dry = run_cli("train", str(out / "lung-gtv-2" / "dicom"), "-o", str(tmp_path / "model"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "label 1: GTV-1" in dry.stdout and "RT structure set" in dry.stdout
    report = tmp_path / "m.json"
    result = run_cli(
        "evaluate",
        str(out / "lung-gtv-2" / "reference.seg.nrrd"),
        str(out / "lung-gtv-2" / "dicom"),
        "--json",
        str(report),
    )
    assert result.returncode == 0, result.stderr
    row = json.loads(report.read_text(encoding="utf-8"))["cases"][0]["labels"][0]
    assert row["label"] == "GTV-1" and row["dice"] == pytest.approx(1.0)


def test_dataset_extraction_refuses_members_that_leave_the_folder(tmp_path):
    wheel = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{DATASET}/pat_1/CT.dcm", b"x")
        archive.writestr("elsewhere/pat_1/ignored.txt", b"y")
    extract_dataset(wheel, tmp_path / "ok")
    assert sorted(p.name for p in (tmp_path / "ok").rglob("*") if p.is_file()) == ["CT.dcm"]
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr(f"{DATASET}/pat_1/../../../escape.txt", b"z")
    with pytest.raises(MedSegError, match="not a plain file inside the dataset"):
        extract_dataset(wheel, tmp_path / "bad")
    link = zipfile.ZipInfo(f"{DATASET}/pat_2/link.dcm")
    link.external_attr = 0o120777 << 16
    with zipfile.ZipFile(tmp_path / "link.whl", "w") as archive:
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(MedSegError, match="not a plain file inside the dataset"):
        extract_dataset(tmp_path / "link.whl", tmp_path / "link")
