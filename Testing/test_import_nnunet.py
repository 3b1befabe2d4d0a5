"""import-model on a real nnU-Net v2 model made by nnU-Net's own planner, trainer and checkpoint code
(Testing/nnunet_model.py, once per session), and our segment against nnU-Net's own predictor on the same CT."""

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

LABELS = {1: "soft tissue", 2: "air"}


@pytest.fixture(scope="session")
def nnunet_work(tmp_path_factory, ct_chest) -> Path:
    """WORK with the trained-model folder (results/...), the CTs and nnU-Net's predictions on them."""
    work = tmp_path_factory.mktemp("nnunet")
    script = REPO / "Testing" / "nnunet_model.py"
    result = subprocess.run(
        [sys.executable, str(script), str(work), str(ct_chest)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work


@pytest.fixture(scope="session")
def model_folder(nnunet_work) -> Path:
    return nnunet_work / "results" / "Dataset901_Chest" / "nnUNetTrainer__nnUNetPlans__3d_fullres"


@pytest.fixture(scope="session")
def bundles(nnunet_work, model_folder) -> dict:
    """The model imported with both folds and with fold 0 alone."""
    made = {}
    for name, folds in (("folds01", "all"), ("fold0", "0")):
        output = nnunet_work / f"{name}.safetensors"
        result = run_cli("import-model", str(model_folder), "-o", str(output), "--folds", folds, "--progress", "none")
        assert result.returncode == 0, result.stderr
        made[name] = output
    return made


def labels_of(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice_per_label(first: np.ndarray, second: np.ndarray) -> dict:
    scores = {}
    for value in LABELS:
        a, b = first == value, second == value
        scores[value] = 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)
    return scores


def segment(work: Path, case: str, bundle: Path, name: str, *options: str, ending: str = ".nii.gz") -> Path:
    output = work / f"ours-{case}-{name}{ending}"
    result = run_cli(
        "segment", str(work / f"{case}.nii.gz"), "-m", str(bundle), "-o", str(output), "--progress", "none", *options
    )
    assert result.returncode == 0, result.stderr
    return output


def read_segmentation(path: Path) -> tuple:
    """The labelmap of a .seg.nrrd on its image grid, and its segments' {value: name}."""
    import slicerio

    segmentation = slicerio.read_segmentation(str(path))
    names = {segment["labelValue"]: segment["name"] for segment in segmentation["segments"]}
    return segmentation["voxels"], names


@pytest.mark.parametrize(
    "case, run, bundle, options",
    [
        ("ct", "folds01", "folds01", ()),
        ("ct", "folds01-mirror", "folds01", ("--tta",)),
        ("ct", "fold0", "fold0", ()),
        ("ct-flipped", "folds01", "folds01", ()),
        ("ct-thin", "folds01", "folds01", ()),  # padded to the whole patch with 0, as nnU-Net pads it
    ],
)
def test_segment_agrees_with_nnunet_predictor(nnunet_work, bundles, case, run, bundle, options):
    """Dice >= 0.98 per label against nnUNetPredictor (step 0.5, Gaussian), same label values and names; on the
    thin part, where nnU-Net labels only about 100 voxels air (a voxel there moves Dice by 1%), for the labels
    of 1000 voxels or more, and 99% of all voxels the same."""
    ours_path = segment(nnunet_work, case, bundles[bundle], run, *options)
    ours = labels_of(ours_path)
    theirs = labels_of(nnunet_work / f"nnunet-{case}-{run}.nii.gz")
    assert ours.shape == theirs.shape
    assert {1, 2} <= set(np.unique(theirs))  # the model segments both labels: the comparison means something
    assert set(np.unique(ours)) <= {0, 1, 2}  # the label values of dataset.json (the brief model leaves
    # hardly any background: nnU-Net's output here has a handful of background voxels, ours may have none)
    scores = dice_per_label(ours, theirs)
    large = [value for value in scores if (theirs == value).sum() >= 1000]
    assert large == sorted(scores) or case == "ct-thin", scores
    assert min(scores[value] for value in large) >= 0.98, scores
    assert float((ours == theirs).mean()) >= 0.99


def test_segments_are_named_as_in_dataset_json(nnunet_work, bundles):
    segmentation = segment(nnunet_work, "ct", bundles["folds01"], "named", ending=".seg.nrrd")
    _, names = read_segmentation(segmentation)
    assert names == LABELS


def test_bundle_carries_what_nnunet_predicts_with(bundles, model_folder):
    """The image's own axes, the plans' spacing and patch (x, y, z), the checkpoint's mirroring axes,
    nnU-Net's window placement, CT normalization with the plans' foreground statistics, both folds."""
    from MedSegUNetLib.model.bundle import read_bundle_metadata

    plans = json.loads((model_folder / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    meta = read_bundle_metadata(bundles["folds01"])
    assert meta.preprocessing.orientation == "image" and meta.preprocessing.transpose == (0, 1, 2)
    assert list(meta.preprocessing.target_spacing) == configuration["spacing"][::-1]
    assert list(meta.preprocessing.patch_size) == configuration["patch_size"][::-1]
    assert meta.mirror_axes == (1, 2) and meta.windows == "nnunet" and meta.padding == "zero"
    properties = plans["foreground_intensity_properties_per_channel"]["0"]
    normalization = meta.preprocessing.normalization
    assert normalization.kind == "ct"
    assert normalization.clip == (properties["percentile_00_5"], properties["percentile_99_5"])
    assert (normalization.mean, normalization.std) == (properties["mean"], properties["std"])
    assert meta.network.cls == "PlainConvUNet" and meta.network.members == 2
    assert read_bundle_metadata(bundles["fold0"]).network.members == 1
    assert [label.name for label in meta.labels] == list(LABELS.values())


def test_shared_tensors_are_stored_once(bundles, model_folder):
    """nnU-Net's state dict names the encoder twice (encoder.*, decoder.encoder.*): each tensor is stored once."""
    import torch
    from safetensors import safe_open

    weights = torch.load(model_folder / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    storages = {tensor.untyped_storage().data_ptr() for tensor in weights.values()}
    assert len(storages) < len(weights)  # the checkpoint really shares tensors
    with safe_open(str(bundles["fold0"]), "pt") as stored:
        assert len(list(stored.keys())) == len(storages)


def test_info_shows_provenance(bundles):
    result = run_cli("info", str(bundles["folds01"]))
    assert result.returncode == 0, result.stderr
    for fragment in (
        "nnU-Net v2",
        "trainer nnUNetTrainer",
        "configuration 3d_fullres",
        "plans nnUNetPlans",
        "'0', '1'",
    ):
        assert fragment in result.stdout, (fragment, result.stdout)
    assert "licence of the source: CC0 (a test model)" in result.stdout


def test_zip_imports_as_the_folder_does(nnunet_work, model_folder, bundles, tmp_path):
    """A .zip of the results (as nnU-Net exports them) gives the same weights and description."""
    from safetensors.numpy import load_file

    from MedSegUNetLib.model.bundle import read_bundle_metadata

    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as writing:
        for path in sorted(model_folder.rglob("*")):
            if path.is_file():
                writing.write(path, Path("Dataset901_Chest") / path.relative_to(model_folder.parent))
    output = tmp_path / "from-zip.safetensors"
    result = run_cli("import-model", str(archive), "-o", str(output), "--progress", "json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]  # only JSON lines, for the panel
    assert [record["stage"] for record in records][-1] == "done"
    assert {"read", "convert", "write"} <= {record["stage"] for record in records}
    ours, reference = load_file(str(output)), load_file(str(bundles["folds01"]))
    assert ours.keys() == reference.keys()
    assert all(np.array_equal(ours[name], reference[name]) for name in ours)
    made, expected = read_bundle_metadata(output), read_bundle_metadata(bundles["folds01"])
    assert made.network == expected.network and made.preprocessing == expected.preprocessing


def test_zip_entry_outside_its_folder_is_refused(tmp_path):
    archive = tmp_path / "inside" / "model.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as writing:
        writing.writestr("model/plans.json", "{}")
        writing.writestr("../escaped.json", "{}")
    output = tmp_path / "out.safetensors"
    result = run_cli("import-model", str(archive), "-o", str(output))
    assert_clean_failure(result, "model.zip", "../escaped.json", "outside")
    assert not (tmp_path / "escaped.json").exists() and not output.exists()


def copy_fold0(model_folder: Path, target: Path) -> Path:
    """The model folder with fold 0 only, to alter."""
    copy = target / model_folder.name
    (copy / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(model_folder / name, copy / name)
    shutil.copy(model_folder / "fold_0" / "checkpoint_final.pth", copy / "fold_0" / "checkpoint_final.pth")
    return copy


class Planted:
    """Unpickling this creates a file: the proof that a checkpoint's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_holding_a_pickled_object_is_refused_and_runs_nothing(model_folder, tmp_path):
    import torch

    copy = copy_fold0(model_folder, tmp_path)
    checkpoint_path = copy / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    marker = tmp_path / "code-ran"
    checkpoint["logging"]["planted"] = Planted(marker)
    torch.save(checkpoint, checkpoint_path)
    output = tmp_path / "out.safetensors"
    result = run_cli("import-model", str(copy), "-o", str(output))
    assert_clean_failure(result, "checkpoint_final.pth", "more than tensors and plain types")
    assert not marker.exists() and not output.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (("dataset.json", ["labels", "air"], [1, 2]), "region-based"),
        (
            ("plans.json", ["configurations", "3d_fullres", "normalization_schemes"], ["FancyNormalization"]),
            "FancyNormalization",
        ),
        (
            ("plans.json", ["configurations", "3d_fullres", "architecture", "network_class_name"], "os.system"),
            "os.system",
        ),
        (
            ("plans.json", ["configurations", "3d_fullres", "architecture", "arch_kwargs", "nonlin"], "builtins.eval"),
            "builtins.eval",
        ),
    ],
)
def test_what_cannot_be_imported_faithfully_is_refused(model_folder, tmp_path, change, message):
    (file_name, keys, value), copy = change, copy_fold0(model_folder, tmp_path)
    data = json.loads((copy / file_name).read_text())
    holder = data
    for key in keys[:-1]:
        holder = holder[key]
    holder[keys[-1]] = value
    (copy / file_name).write_text(json.dumps(data))
    output = tmp_path / "out.safetensors"
    assert_clean_failure(run_cli("import-model", str(copy), "-o", str(output)), message)
    assert not output.exists()


def test_the_panels_import_command_runs_as_a_child_with_progress(model_folder, tmp_path):
    """Add model... runs import_command in a ChildProcess and polls it: progress records, then the bundle."""
    import time

    from conftest import MODULE_DIR

    from MedSegUNetLib.host.childprocess import (
        FAILED,
        RUNNING,
        SUCCEEDED,
        ChildProcess,
        engine_environment,
        import_command,
    )
    from MedSegUNetLib.model.bundle import read_bundle_metadata

    def run(source: Path, output: Path) -> tuple:
        process = ChildProcess(import_command(source, output, python=sys.executable), engine_environment(MODULE_DIR))
        records, deadline = [], time.monotonic() + 600
        while process.state == RUNNING:
            assert time.monotonic() < deadline, process.log_text()
            records += process.poll()
            time.sleep(0.05)
        return process, records + process.poll()

    output = tmp_path / "imported.safetensors"
    process, records = run(model_folder, output)
    assert process.state == SUCCEEDED, process.log_text()
    assert {"read", "convert", "write"} <= {record["stage"] for record in records}
    assert process.result is not None and Path(process.result["output"]) == output
    assert read_bundle_metadata(output).provenance["source"]["format"] == "nnU-Net v2"

    empty = tmp_path / "no model here"
    empty.mkdir()
    process, _ = run(empty, tmp_path / "nothing.safetensors")
    assert process.state == FAILED
    assert process.last_error is not None and "no model here" in process.last_error
    assert "holds no nnU-Net trained model" in process.last_error and "\n" not in process.last_error
    assert not (tmp_path / "nothing.safetensors").exists()
