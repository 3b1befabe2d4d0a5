"""The embedded default: sample scans from PyPI, the shipped model, `medsegunet demo` end to end.

Downloads the totalsegmentator 2.18.0 sdist once (~38 MB from the package index, the only network access
the project needs) into a cache shared by the tests of this file.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_cli

from MedSegUNetLib.core.geometry import Grid
from MedSegUNetLib.imageio.images import read_image
from MedSegUNetLib.model.bundle import read_bundle_metadata
from MedSegUNetLib.model.shipped import find_model
from training.label_table import build_label_table
from training.scenes import load_case_arrays, read_scene

SHIPPED = find_model("abdomen-ct")
STRUCTURES = ["spleen", "kidney_right", "kidney_left", "liver", "stomach", "aorta"]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return dict(os.environ, MEDSEGUNET_CACHE=str(tmp_path_factory.mktemp("cache")))


def test_shipped_model_is_small_and_names_its_structures():
    assert SHIPPED.stat().st_size < 8 * 2**20
    meta = read_bundle_metadata(SHIPPED)
    assert [label.name for label in meta.labels] == STRUCTURES
    assert all(label.terminology and "SCT^" in label.terminology for label in meta.labels)
    assert "abdomen-ct.mrb" in json.dumps(meta.provenance["training"]["cases"])
    assert "heldout" not in json.dumps(meta.provenance["training"])  # never trained on the evaluation scan


def test_sample_data_writes_scenes_and_plain_files(tmp_path, cache_env):
    out = tmp_path / "samples"
    result = run_cli("sample-data", "--output", str(out), env=cache_env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "produced by TotalSegmentator, not drawn by hand" in result.stdout
    cases = read_scene(out / "abdomen-ct.mrb", tmp_path / "work")
    names = [segment.name for segment in cases[0].segments]
    assert len(names) == 61 and {"liver", "spleen", "kidney_left", "urinary_bladder"} <= set(names)
    heldout = read_scene(out / "heldout-ct.mrb", tmp_path / "work")[0]
    assert {"liver", "spleen", "aorta"} <= {segment.name for segment in heldout.segments}
    dicom = read_image(out / "heldout-ct" / "dicom").image
    reference = sitk.ReadImage(str(out / "heldout-ct" / "reference.nii.gz"))
    assert Grid.of(reference).matches(Grid.of(dicom))  # put on the DICOM's own grid (the package's is flipped)
    assert (out / "abdomen-mr.mrb").exists() and (out / "SOURCE.txt").exists()
    aorta = read_scene(out / "aorta-ct.mrb", tmp_path / "work")[0]  # partial: vessels on a crop, the rest unlabeled
    assert [s.name for s in aorta.segments][:2] == ["aorta", "brachiocephalic_trunk"]
    assert aorta.segments[-1].name == "unlabeled" and len(aorta.segments) == 10
    table = build_label_table([aorta])
    assert "unlabeled" not in [label.name for label in table.labels]
    assert table.describe(aorta).endswith("voxels of 'unlabeled' are ignored")
    image, labels = load_case_arrays(aorta)
    voxels, values = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)
    assert (values == 1).sum() == 72810 and np.median(voxels[values == 1]) > 250  # the aorta, early arterial phase
    assert 0 < (values == 10).mean() < 0.9  # outside TotalSegmentator's crop: not reviewed
    again = run_cli("sample-data", "--output", str(tmp_path / "again"), "--only", "abdomen-mr", env=cache_env)
    assert again.returncode == 0 and "downloading" not in again.stdout  # cached after the first time


def test_demo_segments_evaluates_and_draws(tmp_path, cache_env):
    out = tmp_path / "demo"
    result = run_cli("demo", "--output", str(out), "--device", "cpu", env=cache_env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("heldout-ct-shipped.seg.nrrd", "overlay-shipped.png", "metrics-shipped.json", "metrics-shipped.csv"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "overlay-shipped.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "metrics-shipped.json").read_text(encoding="utf-8"))
    rows = {row["label"]: row for row in report["cases"][0]["labels"]}
    assert list(rows) == STRUCTURES
    assert rows["kidney_left"]["note"].startswith("not in the reference")  # the held-out slab has no kidneys
    # the shipped model scores liver 0.819, spleen 0.337 here (README); a regression falls below these
    assert rows["liver"]["dice"] > 0.75 and rows["spleen"]["dice"] > 0.2, rows
    table = result.stdout
    assert "liver" in table and f"{rows['liver']['dice']:.3f}" in table
    kidney = rows["kidney_left"]["volume_prediction_ml"]  # a false positive shows as a volume, not hidden
    assert (f"false {kidney:.1f} ml" if kidney > 0 else "absent: none") in table
