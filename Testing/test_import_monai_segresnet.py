"""import-model on a MONAI bundle in the Model Zoo's wholeBody_ct_segmentation layout (SegResNet,
Testing/monai_wholebody_model.py, once per session), and our segment against MONAI's own bundle inference on
the same CT at both of the bundle's resolutions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, assert_clean_failure, run_cli

pytestmark = pytest.mark.slow

LABELS = {1: "dense", 2: "low density"}
LOWRES = "displayable_configs#highres=false"


@pytest.fixture(scope="session")
def wholebody_work(tmp_path_factory, ct_chest) -> Path:
    """WORK with the bundle (wholebody_like/), the CT (ct.nii.gz) and MONAI's labels at 1.5 mm
    (monai-highres/ct/) and at 3 mm (monai-lowres/ct/)."""
    work = tmp_path_factory.mktemp("monai-wholebody")
    script = REPO / "Testing" / "monai_wholebody_model.py"
    result = subprocess.run(
        [sys.executable, str(script), str(work), str(ct_chest)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
        cwd=REPO / "Testing",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work


@pytest.fixture(scope="session")
def highres(wholebody_work) -> Path:
    """Imported in process (the command line's import is run by the spleen-layout tests and by --set below)."""
    from MedSegUNetLib.commands.import_model import import_model

    return import_model(wholebody_work / "wholebody_like", wholebody_work / "highres.safetensors")


@pytest.fixture(scope="session")
def lowres(wholebody_work) -> Path:
    output = wholebody_work / "lowres.safetensors"
    result = run_cli(
        "import-model", str(wholebody_work / "wholebody_like"), "-o", str(output), "--progress", "none", "--set", LOWRES
    )
    assert result.returncode == 0, result.stderr
    return output


def agreement(work: Path, bundle: Path, monai_folder: str) -> dict:
    """Dice per label between our segment on the bundle and MONAI's labels; the names checked."""
    import slicerio

    output = work / f"{bundle.stem}.seg.nrrd"
    result = run_cli("segment", str(work / "ct.nii.gz"), "-m", str(bundle), "-o", str(output), "--progress", "none")
    assert result.returncode == 0, result.stderr
    segmentation = slicerio.read_segmentation(str(output))
    ours = np.transpose(segmentation["voxels"])  # slicerio's (i, j, k) as SimpleITK's (k, j, i)
    assert {segment["labelValue"]: segment["name"] for segment in segmentation["segments"]} == LABELS
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(work / monai_folder / "ct" / "ct_trans.nii.gz")))
    theirs = np.squeeze(theirs).astype(np.uint8)
    assert ours.shape == theirs.shape
    dice = {}
    for value in LABELS:
        a, b = ours == value, theirs == value
        assert b.sum() > 1000, f"label {value} covers too little to test anything"
        dice[value] = 2 * float((a & b).sum()) / float(a.sum() + b.sum())
    return dice


def test_segment_agrees_with_monai_bundle_inference(wholebody_work, highres):
    dice = agreement(wholebody_work, highres, "monai-highres")
    assert min(dice.values()) >= 0.98, dice


def test_a_setting_picks_the_resolution_and_weights_and_a_thin_scan_is_padded_as_monai_pads_it(wholebody_work, lowres):
    """At 3 mm the CT is thinner than the 96-voxel window on every axis: MONAI pads it by repeating its edge.
    The low-resolution weights swap the two labels' channels, so reading model.pt instead fails here."""
    from MedSegUNetLib.model.bundle import read_bundle_metadata

    meta = read_bundle_metadata(lowres)
    assert meta.preprocessing.target_spacing == (3.0, 3.0, 3.0) and meta.padding == "replicate"
    assert "displayable_configs#highres=false" in meta.provenance["source"]["settings"]
    dice = agreement(wholebody_work, lowres, "monai-lowres")
    assert min(dice.values()) >= 0.98, dice
    shown = run_cli("info", str(lowres))
    assert shown.returncode == 0, shown.stderr
    assert "SegResNet" in shown.stdout and "zscore then to -1..1" in shown.stdout
    assert "settings displayable_configs#highres=false" in shown.stdout and "padding replicate" in shown.stdout


def test_bundle_carries_what_monai_infers_with(highres):
    from MedSegUNetLib.model.bundle import read_bundle_metadata

    meta = read_bundle_metadata(highres)
    prep = meta.preprocessing
    assert (meta.network.cls, meta.network.args["init_filters"], meta.network.args["blocks_down"]) == (
        "SegResNet",
        8,
        [1, 2, 2, 4],
    )
    assert prep.target_spacing == (1.5, 1.5, 1.5) and prep.patch_size == (96, 96, 96) and prep.grid == "centres"
    normalization = prep.normalization
    assert (normalization.kind, normalization.nonzero, normalization.rescale_to) == ("zscore", True, (-1.0, 1.0))
    assert (meta.blend, meta.overlap, meta.restore, meta.padding) == ("gaussian", 0.25, "labels", "replicate")


def copy_bundle(work: Path, target: Path) -> Path:
    copy = target / "bundle"
    shutil.copytree(work / "wholebody_like", copy)
    return copy


def edit_config(folder: Path, edit) -> None:
    path = folder / "configs" / "inference.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(pixdim="$[1.5] * 3"), "a BinOp"),
        (lambda c: c.update(pixdim="$numpy.ones(3).tolist()"), "a call"),
        (lambda c: c.update(pixdim="$__import__('os').system('true')"), "a call"),
        (lambda c: c["network_def"].update(upsample_mode="pixelshuffle"), "pixelshuffle"),
        (lambda c: c["inferer"].update(padding_mode="reflect"), "padding_mode 'reflect'"),
        (lambda c: c["inferer"].update(cval=-1.0), "cval -1.0"),
        (lambda c: c["preprocessing"]["transforms"][6].update(factor=0.5), "factor"),
        (lambda c: c["preprocessing"]["transforms"].append(dict(c["preprocessing"]["transforms"][6])), "second"),
        (lambda c: c["checkpointloader"].update(load_path="$@bundle_root + '/../../escaped.pt'"), "outside"),
        (lambda c: c["checkpointloader"].update(load_path="/etc/passwd"), "outside"),
    ],
)
def test_what_cannot_be_imported_faithfully_or_safely_is_refused(wholebody_work, tmp_path, edit, message):
    """In process (the command line's one-line form of these errors is tested with --set below)."""
    from MedSegUNetLib.commands.import_model import import_model
    from MedSegUNetLib.core.errors import MedSegError

    copy = copy_bundle(wholebody_work, tmp_path)
    edit_config(copy, edit)
    output = tmp_path / "out.safetensors"
    with pytest.raises(MedSegError) as refused:
        import_model(copy, output)
    assert message in str(refused.value) and "inference.json" in str(refused.value)
    assert not output.exists()


def test_a_setting_the_configuration_lacks_is_refused(wholebody_work, tmp_path):
    from MedSegUNetLib.commands.import_model import _setting
    from MedSegUNetLib.core.errors import MedSegError

    output = tmp_path / "out.safetensors"
    result = run_cli(
        "import-model", str(wholebody_work / "wholebody_like"), "-o", str(output), "--set", "displayable#highres=0"
    )
    assert_clean_failure(result, "--set displayable#highres", "no such entry")
    assert not output.exists()
    with pytest.raises(MedSegError, match="not ID=VALUE"):
        _setting("highres")
    assert _setting("a#b=[1.5, 2]") == ("a#b", [1.5, 2]) and _setting("a=text") == ("a", "text")


class Notes:
    """A progress that keeps the notes an import says."""

    def __init__(self):
        self.notes = []

    def update(self, *args, **kwargs) -> None:
        pass

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_a_load_path_that_is_code_falls_back_to_models_model_pt_and_says_so(wholebody_work, highres, tmp_path):
    from safetensors.numpy import load_file

    from MedSegUNetLib.commands.import_model import import_model

    copy = copy_bundle(wholebody_work, tmp_path)
    edit_config(copy, lambda c: c["checkpointloader"].update(load_path="$os.path.join(@bundle_root, 'x.pt')"))
    output, progress = tmp_path / "out.safetensors", Notes()
    import_model(copy, output, progress=progress)
    assert any("models/model.pt is read instead" in note for note in progress.notes), progress.notes
    ours, reference = load_file(str(output)), load_file(str(highres))
    assert all(np.array_equal(ours[k], reference[k]) for k in reference)


def test_well_known_structure_names_get_slicers_terminology_and_colors(wholebody_work, tmp_path):
    """wholeBody_ct_segmentation names its channels as TotalSegmentator does (spleen, kidney_right, ...)."""
    from MedSegUNetLib.core.anatomy import known_label
    from MedSegUNetLib.model.bundle import read_bundle_metadata

    copy = copy_bundle(wholebody_work, tmp_path)
    metadata_path = copy / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["network_data_format"]["outputs"]["pred"]["channel_def"] = {"0": "background", "1": "spleen", "2": "x"}
    metadata_path.write_text(json.dumps(metadata))
    from MedSegUNetLib.commands.import_model import import_model

    output = import_model(copy, tmp_path / "named.safetensors")
    spleen, other = read_bundle_metadata(output).labels
    assert spleen == known_label(1, "spleen") and "Spleen" in spleen.terminology
    assert other.name == "x" and not other.terminology


def test_a_zip_carries_the_weights_its_settings_choose(wholebody_work, lowres, tmp_path):
    import zipfile

    from safetensors.numpy import load_file

    archive = tmp_path / "wholebody.zip"
    with zipfile.ZipFile(archive, "w") as writing:
        for path in sorted((wholebody_work / "wholebody_like").rglob("*")):
            if path.is_file():
                writing.write(path, Path("wholebody_like") / path.relative_to(wholebody_work / "wholebody_like"))
    from MedSegUNetLib.commands.import_model import import_model

    output = import_model(archive, tmp_path / "from-zip.safetensors", settings={"displayable_configs#highres": False})
    ours, reference = load_file(str(output)), load_file(str(lowres))
    assert ours.keys() == reference.keys() and all(np.array_equal(ours[k], reference[k]) for k in ours)


def test_the_weights_file_a_setting_names_must_be_there(wholebody_work, tmp_path):
    from MedSegUNetLib.commands.import_model import import_model
    from MedSegUNetLib.core.errors import MedSegError

    copy = copy_bundle(wholebody_work, tmp_path)
    (copy / "models" / "model_lowres.pt").unlink()
    with pytest.raises(MedSegError, match="has no models/model_lowres.pt"):
        import_model(copy, tmp_path / "out.safetensors", settings={"displayable_configs#highres": False})
    assert not (tmp_path / "out.safetensors").exists()
