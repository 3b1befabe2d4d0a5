"""import-model on a MONAI bundle in the Model Zoo's spleen_ct_segmentation layout (Testing/monai_bundle_model.py,
once per session), and our segment against MONAI's own bundle inference on the same CT."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, assert_clean_failure, run_cli

pytestmark = pytest.mark.slow

LABELS = {1: "soft tissue", 2: "low density"}


@pytest.fixture(scope="session")
def monai_work(tmp_path_factory, ct_chest) -> Path:
    """WORK with the bundle (spleen_like/), the CT (ct.nii.gz) and MONAI's labels for it (monai/ct/)."""
    work = tmp_path_factory.mktemp("monai-bundle")
    script = REPO / "Testing" / "monai_bundle_model.py"
    result = subprocess.run(
        [sys.executable, str(script), str(work), str(ct_chest)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work


@pytest.fixture(scope="session")
def imported(monai_work) -> Path:
    output = monai_work / "imported.safetensors"
    result = run_cli("import-model", str(monai_work / "spleen_like"), "-o", str(output), "--progress", "none")
    assert result.returncode == 0, result.stderr
    return output


def test_segment_agrees_with_monai_bundle_inference(monai_work, imported):
    import slicerio

    output = monai_work / "ours.seg.nrrd"
    result = run_cli(
        "segment", str(monai_work / "ct.nii.gz"), "-m", str(imported), "-o", str(output), "--progress", "none"
    )
    assert result.returncode == 0, result.stderr
    segmentation = slicerio.read_segmentation(str(output))
    ours = np.transpose(segmentation["voxels"])  # slicerio's (i, j, k) as SimpleITK's (k, j, i)
    names = {segment["labelValue"]: segment["name"] for segment in segmentation["segments"]}
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(monai_work / "monai" / "ct" / "ct_trans.nii.gz")))
    theirs = np.squeeze(theirs).astype(np.uint8)
    assert ours.shape == theirs.shape
    assert names == LABELS
    assert set(np.unique(theirs)) - {0} == set(LABELS)
    for value in LABELS:
        a, b = ours == value, theirs == value
        assert a.sum() > 1000, f"label {value} covers too little to test anything"
        dice = 2 * float((a & b).sum()) / float(a.sum() + b.sum())
        assert dice >= 0.98, (value, dice)


def test_bundle_carries_what_monai_infers_with(imported):
    from MedSegUNetLib.model.bundle import read_bundle_metadata

    meta = read_bundle_metadata(imported)
    prep = meta.preprocessing
    assert (meta.network.cls, meta.network.args["channels"]) == ("UNet", [8, 16, 32, 64])
    assert prep.orientation == "RAS" and prep.target_spacing == (1.5, 1.5, 2.0) and prep.patch_size == (64, 64, 64)
    normalization = prep.normalization
    assert normalization.kind == "ct" and normalization.clip == (-57.0, 164.0)
    assert (normalization.mean, normalization.std) == (-57.0, 221.0)
    assert meta.blend == "constant" and meta.restore == "scores"  # SlidingWindowInferer's default; Invertd
    assert meta.provenance["source"]["format"] == "monai-bundle"


def test_info_shows_provenance(imported):
    result = run_cli("info", str(imported))
    assert result.returncode == 0, result.stderr
    assert "monai-bundle" in result.stdout and "Chest bands (test)" in result.stdout and "0.1.0" in result.stdout
    assert "licence of the source: CC0 1.0 (a test bundle)" in result.stdout


def test_zip_imports_as_the_folder_does(monai_work, imported, tmp_path):
    from safetensors.numpy import load_file

    from MedSegUNetLib.model.bundle import read_bundle_metadata

    folder = monai_work / "spleen_like"
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as writing:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                writing.write(path, Path("spleen_like") / path.relative_to(folder))
    output = tmp_path / "from-zip.safetensors"
    result = run_cli("import-model", str(archive), "-o", str(output), "--progress", "none")
    assert result.returncode == 0, result.stderr
    ours, reference = load_file(str(output)), load_file(str(imported))
    assert ours.keys() == reference.keys() and all(np.array_equal(ours[k], reference[k]) for k in ours)
    made, expected = read_bundle_metadata(output), read_bundle_metadata(imported)
    assert (made.network, made.preprocessing, made.labels) == (
        expected.network,
        expected.preprocessing,
        expected.labels,
    )


def test_zip_entry_outside_its_folder_is_refused(tmp_path):
    archive = tmp_path / "inside" / "bundle.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as writing:
        writing.writestr("b/configs/metadata.json", "{}")
        writing.writestr("b/configs/../../../escaped.json", "{}")
    output = tmp_path / "out.safetensors"
    assert_clean_failure(run_cli("import-model", str(archive), "-o", str(output)), "bundle.zip", "outside")
    assert not (tmp_path / "escaped.json").exists() and not output.exists()


def copy_bundle(monai_work: Path, target: Path) -> Path:
    copy = target / "bundle"
    shutil.copytree(monai_work / "spleen_like", copy)
    return copy


def edit_config(folder: Path, edit) -> None:
    path = folder / "configs" / "inference.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _transform(config: dict, index: int, value: dict) -> None:
    config["preprocessing"]["transforms"][index] = value


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["network_def"].update(_target_="monai.networks.nets.SwinUNETR"), "monai.networks.nets.SwinUNETR"),
        (lambda c: c["network_def"].update(_target_="os.system"), "'os.system'"),
        (lambda c: _transform(c, 5, {"_target_": "HistogramNormalized", "keys": "image"}), "HistogramNormalized"),
        (lambda c: c["network_def"].update(channels="$[8] * 4"), "network_def#channels"),
        (lambda c: c["preprocessing"]["transforms"][3].update(pixdim="%other.json#pixdim"), "pixdim"),
        (lambda c: c["inferer"].update(_target_="SimpleInferer"), "SimpleInferer"),
        (lambda c: c["postprocessing"]["transforms"][2].update(argmax=False, threshold=0.5), "argmax"),
    ],
)
def test_what_cannot_be_imported_faithfully_is_refused(monai_work, tmp_path, edit, message):
    """In process; the command line's one-line form of an import error is tested with the TorchScript case."""
    from MedSegUNetLib.commands.import_model import import_model
    from MedSegUNetLib.core.errors import MedSegError

    copy = copy_bundle(monai_work, tmp_path)
    edit_config(copy, edit)
    output = tmp_path / "out.safetensors"
    with pytest.raises(MedSegError) as refused:
        import_model(copy, output)
    assert message in str(refused.value) and "inference.json" in str(refused.value)
    assert not output.exists()


def test_torchscript_only_is_refused(monai_work, tmp_path):
    copy = copy_bundle(monai_work, tmp_path)
    (copy / "models" / "model.pt").rename(copy / "models" / "model.ts")
    output = tmp_path / "out.safetensors"
    assert_clean_failure(run_cli("import-model", str(copy), "-o", str(output)), "TorchScript", "model.ts")
    assert not output.exists()


class Planted:
    """Unpickling this creates a file: the proof that a checkpoint's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_holding_a_pickled_object_is_refused_and_runs_nothing(monai_work, tmp_path):
    import torch

    copy = copy_bundle(monai_work, tmp_path)
    weights = torch.load(copy / "models" / "model.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({"model": weights, "extra": Planted(marker)}, copy / "models" / "model.pt")
    output = tmp_path / "out.safetensors"
    assert_clean_failure(run_cli("import-model", str(copy), "-o", str(output)), "model.pt", "more than tensors")
    assert not marker.exists() and not output.exists()


def test_yaml_configuration_imports_as_json_does(monai_work, imported, tmp_path):
    import yaml  # a dependency: MONAI bundles may be configured in YAML

    from MedSegUNetLib.model.bundle import read_bundle_metadata

    copy = copy_bundle(monai_work, tmp_path)
    config = json.loads((copy / "configs" / "inference.json").read_text())
    (copy / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    (copy / "configs" / "inference.json").unlink()
    output = tmp_path / "from-yaml.safetensors"
    result = run_cli("import-model", str(copy), "-o", str(output), "--progress", "none")
    assert result.returncode == 0, result.stderr
    made, expected = read_bundle_metadata(output), read_bundle_metadata(imported)
    assert made.network == expected.network and made.preprocessing == expected.preprocessing
    assert made.labels == expected.labels
