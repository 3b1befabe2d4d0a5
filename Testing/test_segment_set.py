"""``segment IN -m A -m B ...``: several bundles run as one, the input read once, the labels merged (the
first model given keeps a voxel two models label), against each model's own single-model run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, assert_clean_failure, make_small_bundle, run_cli

from MedSegUNetLib.core.errors import MedSegError

SHIPPED = REPO / "Resources" / "Models" / "abdomen-ct.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory, small_bundle) -> dict:
    """Two untrained bundles on other network grids (their labels cover much of the scan, so they overlap),
    and the shipped demo model."""
    folder = tmp_path_factory.mktemp("models")
    other = make_small_bundle(folder / "other.safetensors", names=("lungs", "heart"), spacing=(5.0, 5.0, 7.0), seed=3)
    return {"small": small_bundle, "other": other, "shipped": SHIPPED}


@pytest.fixture(scope="module")
def scans(tmp_path_factory, ct_chest) -> dict:
    """The chest CT as an NRRD (streamed as it is read) and as MetaImage (read whole)."""
    folder = tmp_path_factory.mktemp("scans")
    whole = folder / "chest.mha"
    sitk.WriteImage(sitk.ReadImage(str(ct_chest)), str(whole), useCompression=True)
    return {"streamed": ct_chest, "whole": whole}


def segment(scan: Path, bundles: list, output: Path) -> list:
    """Run segment; its JSON progress records."""
    arguments = [item for bundle in bundles for item in ("-m", str(bundle))]
    result = run_cli("segment", str(scan), *arguments, "-o", str(output), "--progress", "json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def segmentation(path: Path) -> tuple:
    """The .seg.nrrd's labelmap on the input grid and its segments' [(value, name, color)]."""
    import slicerio

    read = slicerio.read_segmentation(str(path))
    segments = [(s["labelValue"], s["name"], tuple(round(c, 3) for c in s["color"])) for s in read["segments"]]
    return read["voxels"], sorted(segments)


def reads_of(records: list, scan: Path) -> int:
    """How many times the run reported reading the scan (once per read of the file)."""
    return sum(1 for r in records if r["stage"] == "read" and r["message"].startswith(f"{scan.name}:"))


ORDER = ["small", "other", "shipped"]


@pytest.fixture(scope="module")
def singles(tmp_path_factory, models, scans) -> dict:
    """Each model's own run on the streamed scan: its labelmap, segments and read records. Read whole, the
    scan gives the same labels (test_cli_segment), so both forms of the set are held to these."""
    folder = tmp_path_factory.mktemp("singles")
    result = {}
    for name in ORDER:
        records = segment(scans["streamed"], [models[name]], folder / f"{name}.seg.nrrd")
        result[name] = (*segmentation(folder / f"{name}.seg.nrrd"), reads_of(records, scans["streamed"]))
    return result


@pytest.mark.parametrize("form", ["streamed", "whole"])
def test_several_models_give_their_single_runs_merged_first_model_first(tmp_path, models, scans, singles, form):
    scan = scans[form]
    order = ORDER
    if form == "streamed":
        single_reads = singles["small"][2]
    else:  # a single run of this form: its read records, and the labels of the streamed form
        single_reads = reads_of(segment(scan, [models["small"]], tmp_path / "small.seg.nrrd"), scan)
        np.testing.assert_array_equal(segmentation(tmp_path / "small.seg.nrrd")[0], singles["small"][0])
    records = segment(scan, [models[name] for name in order], tmp_path / "set.seg.nrrd")
    voxels, segments = segmentation(tmp_path / "set.seg.nrrd")

    expected = np.zeros_like(voxels)
    expected_segments, offset = [], 0
    for name in order:
        single, single_segments, _ = singles[name]
        for value, label, color in single_segments:
            expected_segments.append((offset + value, label, color))
        free = (expected == 0) & (single > 0)
        expected[free] = single[free] + offset
        offset += len(single_segments)
    small, other = singles["small"][0], singles["other"][0]
    assert ((small > 0) & (other > 0)).sum() > 1000, "the test needs models whose labels overlap"
    assert ((small > 0) & (other > 0) & (small != other)).any()
    np.testing.assert_array_equal(voxels, expected)
    assert segments == sorted(expected_segments)
    assert len(np.unique(voxels)) > 3

    # read once: as many read records as one single-model run makes, each model's progress named
    assert reads_of(records, scan) == single_reads >= 1
    assert sum("as it is read" in r["message"] for r in records) == (form == "streamed")
    for index, name in enumerate(order, start=1):
        prefix = f"model {index}/3 {Path(models[name]).name}:"
        assert any(r["stage"] == "predict" and r["message"].startswith(prefix) for r in records), prefix
    assert records[-1]["stage"] == "done"


def test_labelmap_output_of_a_model_set(tmp_path, models, scans):
    """A .nii.gz labelmap gets the same merged values as the .seg.nrrd."""
    segment(scans["whole"], [models["small"], models["other"]], tmp_path / "set.seg.nrrd")
    segment(scans["whole"], [models["small"], models["other"]], tmp_path / "set.nii.gz")
    voxels, _ = segmentation(tmp_path / "set.seg.nrrd")
    labelmap = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "set.nii.gz")))
    np.testing.assert_array_equal(np.transpose(voxels, (2, 1, 0)), labelmap)


def test_two_models_naming_one_structure_are_refused_before_reading(tmp_path, models, scans):
    copy = tmp_path / "copy.safetensors"
    shutil.copy(models["small"], copy)
    output = tmp_path / "set.seg.nrrd"
    result = run_cli(
        "segment", str(scans["whole"]), "-m", str(models["small"]), "-m", str(copy), "-o", str(output),
        "--progress", "none",
    )  # fmt: skip
    assert_clean_failure(result, "copy.safetensors", "'ribs'", "small.safetensors")
    assert not output.exists()


def test_a_bad_bundle_among_several_is_one_clear_line(tmp_path, models, scans):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a bundle")
    result = run_cli(
        "segment", str(scans["whole"]), "-m", str(models["small"]), "-m", str(bad), "-o", str(tmp_path / "x.nii.gz"),
        "--progress", "none",
    )  # fmt: skip
    assert_clean_failure(result, "bad.safetensors")


def test_a_model_set_file_segments_as_its_bundles_given_with_m(tmp_path, models, scans):
    """``-m NAME.modelset.json`` is ``-m A -m B``: the same labels; info describes each model; standby,
    which holds one bundle, refuses a set in one line; segment-batch writes what segment writes."""
    from MedSegUNetLib.model.model_set import read_model_set, write_model_set

    folder = tmp_path / "set"
    folder.mkdir()
    inside = shutil.copy(models["other"], folder / "other.safetensors")
    model_set = write_model_set(folder / "chest.modelset.json", "Chest", [models["small"], inside])
    written = json.loads(model_set.read_text())
    assert written["models"] == [str(Path(models["small"]).resolve()), "other.safetensors"]  # beside it: relative
    moved = shutil.copytree(folder, tmp_path / "moved")
    assert read_model_set(moved / "chest.modelset.json").models[1] == moved / "other.safetensors"

    segment(scans["whole"], [models["small"], models["other"]], tmp_path / "given.seg.nrrd")
    segment(scans["whole"], [model_set], tmp_path / "set.seg.nrrd")
    given, set_ = segmentation(tmp_path / "given.seg.nrrd"), segmentation(tmp_path / "set.seg.nrrd")
    assert set_[1] == given[1] and len(set_[1]) == 4  # every model's structures, same values and names
    np.testing.assert_array_equal(set_[0], given[0])

    info = run_cli("info", str(model_set))
    assert info.returncode == 0, info.stderr
    assert info.stdout.startswith("model set Chest: 2 models") and "lungs" in info.stdout and "ribs" in info.stdout
    result = run_cli("standby", "-m", str(model_set), "--progress", "none")
    assert_clean_failure(result, "chest.modelset.json", "model set")

    cases = tmp_path / "cases"
    cases.mkdir()
    for name, form in (("a", "streamed"), ("b", "whole")):  # both of segment's ways of reading
        shutil.copy(scans[form], cases / f"{name}{scans[form].suffix}")
    segment(scans["streamed"], [model_set], tmp_path / "a.seg.nrrd")
    batch = run_cli(
        "segment-batch", str(cases), "-m", str(model_set), "-o", str(tmp_path / "batch"), "--progress", "none"
    )
    assert batch.returncode == 0, batch.stderr
    for name, single in (("a", tmp_path / "a.seg.nrrd"), ("b", tmp_path / "set.seg.nrrd")):
        written, expected = segmentation(tmp_path / "batch" / f"{name}.seg.nrrd"), segmentation(single)
        assert written[1] == expected[1]
        np.testing.assert_array_equal(written[0], expected[0])


def test_a_model_set_of_two_bundles_naming_one_structure_is_refused_when_made(tmp_path, models):
    """The duplicate is refused when the set is written (the panel's *Model set*), not later at Segment."""
    from MedSegUNetLib.model.model_set import write_model_set

    copy = shutil.copy(models["small"], tmp_path / "copy.safetensors")
    path = tmp_path / "twice.modelset.json"
    with pytest.raises(MedSegError, match=r"copy\.safetensors.*'ribs' as small\.safetensors does"):
        write_model_set(path, "Twice", [models["small"], copy])
    assert not path.exists()
    assert write_model_set(path, "Distinct", [models["small"], models["other"]]).exists()


def test_segment_batch_refuses_a_set_whose_models_take_different_channels(tmp_path, models, scans):
    """A case is read once for every model of the set, so they must take the same images."""
    from MedSegUNetLib.core.labels import default_labels
    from MedSegUNetLib.model.bundle import Normalization, Preprocessing, create_bundle, save_bundle
    from MedSegUNetLib.model.model_set import write_model_set

    preprocessing = Preprocessing((6.0, 6.0, 6.0), (32, 32, 16), "RAS", Normalization("ct", (-1000.0, 1000.0)))
    two = create_bundle(default_labels(["tumour"]), preprocessing, ["CT", "PET"], name="two", base_filters=4)
    save_bundle(tmp_path / "two.safetensors", two.meta, two.network)
    mixed = write_model_set(tmp_path / "mixed.modelset.json", "Mixed", [models["small"], tmp_path / "two.safetensors"])
    output = tmp_path / "batch"
    result = run_cli("segment-batch", str(scans["whole"]), "-m", str(mixed), "-o", str(output), "--progress", "none")
    assert_clean_failure(result, "mixed.modelset.json", "different numbers of input channels")
    assert not output.exists()


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "not a readable model set"),
        ('{"models": ["a.safetensors"]}', '"model_set": 1'),
        ('{"model_set": 1, "models": []}', "non-empty list"),
        ('{"model_set": 1, "models": ["missing.safetensors"]}', "missing.safetensors, which does not exist"),
        ('{"model_set": 1, "models": ["other.modelset.json"]}', "another model set"),
        ('{"model_set": 1, "models": ["small.safetensors", "./small.safetensors"]}', "one bundle twice"),
    ],
)
def test_a_bad_model_set_is_one_clear_line_before_any_reading(tmp_path, models, scans, content, fragment):
    shutil.copy(models["small"], tmp_path / "small.safetensors")
    (tmp_path / "other.modelset.json").write_text('{"model_set": 1, "models": ["small.safetensors"]}')
    bad = tmp_path / "bad.modelset.json"
    bad.write_text(content)
    output = tmp_path / "out.seg.nrrd"
    result = run_cli("segment", str(scans["whole"]), "-m", str(bad), "-o", str(output), "--progress", "none")
    assert_clean_failure(result, "bad.modelset.json", fragment)
    assert not output.exists()
