"""What an imported model's bundle fixes for `segment`: its own overlap (unless --overlap is given) and the
whole volume as its tool sees it (no body crop)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import make_small_bundle, run_cli

from MedSegUNetLib.model.bundle import BundleMeta, load_bundle, save_bundle


@pytest.fixture(scope="module")
def padded_ct(ct_chest, tmp_path_factory) -> Path:
    """CTChest4 with 40 voxels of air on each side in-plane: a body box well inside the volume."""
    image = sitk.ReadImage(str(ct_chest))
    padded = sitk.ConstantPad(image, [40, 40, 0], [40, 40, 0], -1000)
    path = tmp_path_factory.mktemp("padded") / "padded.nrrd"
    sitk.WriteImage(padded, str(path))
    return path


def variant(base: Path, folder: Path, name: str, **changes) -> Path:
    bundle = load_bundle(base)
    path = folder / f"{name}.safetensors"
    save_bundle(path, dataclasses.replace(bundle.meta, **changes), bundle.network)
    return path


def windows_predicted(ct: Path, bundle: Path, folder: Path, *options: str) -> int:
    output = folder / f"{bundle.stem}{len(options)}.nii.gz"
    result = run_cli(
        "segment", str(ct), "-m", str(bundle), "-o", str(output), "--device", "cpu", "--progress", "json", *options
    )
    assert result.returncode == 0, result.stderr
    predict = [json.loads(line) for line in result.stdout.splitlines() if '"predict"' in line]
    return int(predict[-1]["total"])


def test_the_bundles_overlap_is_used_unless_overlap_is_given(padded_ct, tmp_path):
    base = make_small_bundle(tmp_path / "base.safetensors", patch=(16, 16, 8))
    own = variant(base, tmp_path, "own", overlap=0.0)
    default = windows_predicted(padded_ct, base, tmp_path)
    assert windows_predicted(padded_ct, own, tmp_path) < default  # no overlap: fewer windows than at 0.5
    assert windows_predicted(padded_ct, own, tmp_path, "--overlap", "0.5") == default


def test_an_imported_model_sees_the_whole_volume_unless_body_crop_is_given(padded_ct, tmp_path):
    base = make_small_bundle(tmp_path / "base.safetensors", patch=(16, 16, 8))
    whole = variant(base, tmp_path, "whole", body_crop=False)
    cropped = windows_predicted(padded_ct, base, tmp_path)
    uncropped = windows_predicted(padded_ct, whole, tmp_path)
    assert uncropped > cropped
    assert windows_predicted(padded_ct, base, tmp_path, "--no-body-crop") == uncropped
    assert windows_predicted(padded_ct, whole, tmp_path, "--body-crop") == cropped  # asked for: imported too


def test_the_options_round_trip_and_are_checked(tmp_path):
    meta = load_bundle(make_small_bundle(tmp_path / "b.safetensors")).meta
    changed = dataclasses.replace(meta, body_crop=False, overlap=0.25)
    again = BundleMeta.from_json(changed.to_json())
    assert (again.body_crop, again.overlap) == (False, 0.25)
    assert (BundleMeta.from_json(meta.to_json()).body_crop, meta.overlap) == (True, None)
    with pytest.raises(ValueError, match="overlap"):
        dataclasses.replace(meta, overlap=1.5).validate()


def test_body_crop_on_a_model_that_restores_scores_leaves_background_beyond_the_box(padded_ct, tmp_path):
    """nnU-Net's way (scores resampled to the input, then the argmax) with --body-crop: the windows cover
    only the body's box, and the labels beyond it are background, on the input's exact grid."""
    base = make_small_bundle(tmp_path / "base.safetensors", patch=(16, 16, 8))
    scores = variant(base, tmp_path, "scores", body_crop=False, restore="scores")
    whole = windows_predicted(padded_ct, scores, tmp_path)
    assert windows_predicted(padded_ct, scores, tmp_path, "--body-crop") < whole
    cropped = sitk.ReadImage(str(tmp_path / "scores1.nii.gz"))
    image = sitk.ReadImage(str(padded_ct))
    assert cropped.GetSize() == image.GetSize()
    assert cropped.GetOrigin() == pytest.approx(image.GetOrigin(), abs=1e-3)  # NIfTI stores float32
    labels = sitk.GetArrayFromImage(cropped)
    assert labels[:, :, :20].max() == 0 and labels[:, :, -20:].max() == 0  # 40 voxels of air each side
    assert labels.max() > 0  # the body is labelled
