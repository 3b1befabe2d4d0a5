"""Reading annotated Slicer scenes (.mrb, .mrml) made from Slicer's own CTChest4 pair, and hostile ones."""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import slicerio_data

from MedSegUNetLib.core.geometry import Grid
from training.label_table import build_label_table
from training.scene_writer import ScenePair, write_mrb, write_mrml_scene
from training.scenes import SceneError, ZipLimits, extract_mrb, load_case_arrays, read_scene

ODD_NAME = "CT chest 100% #4 – éè"


def full_labelmap(seg_file: Path) -> np.ndarray:
    """Segment i+1 per voxel, straight from the (uncropped, single-layer) file: the expected answer."""
    segmentation = slicerio.read_segmentation(str(seg_file))
    out = np.zeros(segmentation["voxels"].shape, np.uint16)
    for index, segment in enumerate(segmentation["segments"], start=1):
        out[segmentation["voxels"] == segment["labelValue"]] = index
    return np.transpose(out, (2, 1, 0))


@pytest.fixture
def pair(ct_chest, chest_segmentation) -> ScenePair:
    return ScenePair(ODD_NAME, ct_chest, chest_segmentation, "Segmentation of " + ODD_NAME)


def test_mrb_with_odd_names_and_a_decoy_volume(tmp_path, pair, ct_chest, chest_segmentation):
    mrb = write_mrb(tmp_path / "scene.mrb", "My Scene", [pair], decoy_first=True)
    with zipfile.ZipFile(mrb) as bundle:
        names = bundle.namelist()
    assert "My Scene/My Scene.mrml" in names and any(n.startswith("My Scene/Data/") for n in names)
    (case,) = read_scene(mrb, tmp_path / "work")
    assert case.image_path.name == f"{ODD_NAME}.nrrd"
    assert [s.name for s in case.segments][:2] == ["ribs", "cervical vertebral column"]
    image, label = load_case_arrays(case)
    assert Grid.of(label).matches(Grid.of(sitk.ReadImage(str(ct_chest))))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), full_labelmap(chest_segmentation))
    assert str(mrb) in case.source


@pytest.mark.parametrize("legacy", [False, True])
def test_mrml_folder_with_both_reference_styles(tmp_path, pair, legacy):
    scene = write_mrml_scene(tmp_path / "folder", "scene", [pair], legacy_refs=legacy)
    text = scene.read_text(encoding="utf-8")
    assert ("storageNodeRef=" in text) == legacy
    assert "%20" in text and "%25" in text
    (case,) = read_scene(scene, tmp_path / "work")
    assert case.label_path.name == f"Segmentation of {ODD_NAME}.seg.nrrd"


def test_several_segmented_volumes_give_several_cases(tmp_path, pair, ct_chest, chest_segmentation):
    second = ScenePair("second", ct_chest, chest_segmentation, "seg2")
    cases = read_scene(write_mrb(tmp_path / "two.mrb", "two", [pair, second]), tmp_path / "w")
    assert [c.image_path.name for c in cases] == [f"{ODD_NAME}.nrrd", "second.nrrd"]
    assert len({c.name for c in cases}) == 2


def relabelled_copy(seg_file: Path, target: Path, rename=str.upper, crop=None) -> Path:
    """The same segments with other label values (reversed) and names in another case; optionally cropped."""
    segmentation = slicerio.read_segmentation(str(seg_file))
    voxels = segmentation["voxels"]
    values = [s["labelValue"] for s in segmentation["segments"]]
    new_voxels = np.zeros_like(voxels)
    for segment, new_value in zip(segmentation["segments"], reversed(values)):
        new_voxels[voxels == segment["labelValue"]] = new_value
    for segment, new_value in zip(segmentation["segments"], reversed(values)):
        segment["labelValue"] = new_value
        segment["name"] = rename(segment["name"])
        segment.pop("extent", None)
    matrix = np.array(segmentation["ijkToLPS"], dtype=float)
    if crop is not None:
        (i0, i1), (j0, j1), (k0, k1) = crop
        new_voxels = new_voxels[i0:i1, j0:j1, k0:k1]
        matrix[:3, 3] = (matrix @ np.array([i0, j0, k0, 1.0]))[:3]
    segmentation["voxels"] = np.ascontiguousarray(new_voxels)
    segmentation["ijkToLPS"] = matrix
    slicerio.write_segmentation(str(target), segmentation)
    return target


def test_same_names_with_other_values_train_one_class(tmp_path, pair, ct_chest, chest_segmentation):
    other = relabelled_copy(chest_segmentation, tmp_path / "other.seg.nrrd")
    first = read_scene(write_mrb(tmp_path / "a.mrb", "a", [pair]), tmp_path / "w")
    second = read_scene(write_mrb(tmp_path / "b.mrb", "b", [ScenePair("ct", ct_chest, other, "seg")]), tmp_path / "w")
    table = build_label_table(first + second)
    assert len(table.labels) == len(first[0].segments)
    _, label_a = load_case_arrays(first[0])
    _, label_b = load_case_arrays(second[0])
    classes_a = table.lookup_table(first[0])[sitk.GetArrayFromImage(label_a)]
    classes_b = table.lookup_table(second[0])[sitk.GetArrayFromImage(label_b)]
    np.testing.assert_array_equal(classes_a, classes_b)
    assert table.report() == []


def test_missing_segment_is_reported(tmp_path, chest_segmentation):
    from training.scenes import Case, SegmentInfo

    a = Case(
        "a",
        Path("a.nrrd"),
        chest_segmentation,
        [SegmentInfo("Liver", 1, 0, (1, 0, 0)), SegmentInfo("spleen", 2, 0, (0, 1, 0))],
    )
    b = Case("b", Path("b.nrrd"), chest_segmentation, [SegmentInfo("liver ", 7, 0, (1, 0, 0))])
    table = build_label_table([a, b])
    assert [label.name for label in table.labels] == ["Liver", "spleen"]
    assert table.report() == ["'spleen' is not annotated in b"]
    np.testing.assert_array_equal(table.lookup_table(b), [0, 1])


def test_terminology_matches_differently_named_segments():
    from training.scenes import Case, SegmentInfo

    liver = (
        "Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
    )
    a = Case("a", Path("a"), Path("a"), [SegmentInfo("liver", 1, 0, (1, 0, 0), liver)])
    b = Case(
        "b", Path("b"), Path("b"), [SegmentInfo("Leber", 4, 0, (1, 0, 0), liver.replace("Liver", "liver (custom)"))]
    )
    table = build_label_table([a, b])
    assert len(table.labels) == 1 and table.case_maps["b"] == {1: 1}


def test_fine_tuning_keeps_model_labels_and_appends_new_ones(chest_segmentation):
    from MedSegUNetLib.core.labels import Label
    from training.scenes import Case, SegmentInfo

    initial = [Label(1, "spleen", (0, 1, 0)), Label(2, "liver", (1, 0, 0))]
    case = Case(
        "c",
        Path("c"),
        chest_segmentation,
        [SegmentInfo("LIVER", 3, 0, (1, 0, 0)), SegmentInfo("kidney", 9, 0, (0, 0, 1))],
    )
    table = build_label_table([case], initial=initial)
    assert [(label.value, label.name) for label in table.labels] == [(1, "spleen"), (2, "liver"), (3, "kidney")]
    assert table.case_maps["c"] == {1: 2, 2: 3}


def test_cropped_segmentation_maps_back_to_the_exact_voxels(tmp_path, ct_chest, chest_segmentation):
    """Slicer crops .seg.nrrd to the segments' extent: the labels must land on the same voxels."""
    cropped = relabelled_copy(
        chest_segmentation, tmp_path / "cropped.seg.nrrd", rename=str, crop=((5, 120), (10, 127), (2, 30))
    )
    (case,) = read_scene(write_mrml_scene(tmp_path / "s", "s", [ScenePair("ct", ct_chest, cropped, "seg")]), tmp_path)
    _, label = load_case_arrays(case)
    expected = full_labelmap(chest_segmentation)
    # The relabelled copy lists segments in the same order, so positions are comparable.
    inside = np.zeros_like(expected, dtype=bool)
    inside[2:30, 10:127, 5:120] = True
    got = sitk.GetArrayFromImage(label)
    np.testing.assert_array_equal(got[inside], expected[inside])
    assert not got[~inside].any()


def test_overlapping_layers_are_refused_and_disjoint_layers_merged(tmp_path, ct_chest):
    overlapping = slicerio_data("SegmentationOverlapping.seg.nrrd")
    (case,) = read_scene(
        write_mrml_scene(tmp_path / "o", "o", [ScenePair("ct", ct_chest, overlapping, "seg")]), tmp_path
    )
    segmentation = slicerio.read_segmentation(str(overlapping))
    layers = segmentation["voxels"]
    masks = [layers[s["layer"]] == s["labelValue"] for s in segmentation["segments"]]
    overlaps = any((masks[a] & masks[b]).any() for a in range(len(masks)) for b in range(a + 1, len(masks)))
    if overlaps:
        with pytest.raises(SceneError, match="overlap"):
            load_case_arrays(case)
    # Make the layers disjoint: a two-layer file that must merge.
    disjoint = copy.deepcopy(segmentation)
    disjoint["voxels"][1][disjoint["voxels"][0] > 0] = 0
    for segment in disjoint["segments"]:
        segment.pop("extent", None)
    slicerio.write_segmentation(str(tmp_path / "disjoint.seg.nrrd"), disjoint)
    (merged_case,) = read_scene(
        write_mrml_scene(tmp_path / "d", "d", [ScenePair("ct", ct_chest, tmp_path / "disjoint.seg.nrrd", "seg")]),
        tmp_path,
    )
    _, label = load_case_arrays(merged_case)
    values = set(np.unique(sitk.GetArrayFromImage(label)).tolist())
    layer_of = {index: s.layer for index, s in enumerate(merged_case.segments, start=1)}
    assert {layer_of[v] for v in values - {0}} == {0, 1}, "segments of both layers are present"


# --- hostile scenes ------------------------------------------------------------------------------


def zip_with(tmp_path: Path, members: dict, name="evil.mrb") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as bundle:
        for member, content in members.items():
            if isinstance(member, zipfile.ZipInfo):
                bundle.writestr(member, content)
            else:
                bundle.writestr(member, content)
    return path


@pytest.mark.parametrize(
    "member", ["../evil.txt", "/tmp/evil_abs.txt", "scene/../../evil.txt", "C:/evil.txt", "..\\evil.txt"]
)
def test_zip_slip_is_refused_before_anything_is_written(tmp_path, member):
    archive = zip_with(tmp_path, {"scene/scene.mrml": "<MRML></MRML>", member: "pwned"})
    work = tmp_path / "work"
    with pytest.raises(SceneError, match="outside the extraction folder"):
        extract_mrb(archive, work)
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil_abs.txt").exists()
    assert not work.exists() or not any(work.rglob("*"))


@pytest.mark.parametrize("member", [".", "./"])
def test_a_member_naming_the_extraction_folder_itself_is_refused(tmp_path, member):
    """Found by the fuzzer: a file member "." would be opened as the folder (IsADirectoryError)."""
    archive = zip_with(tmp_path, {"scene/scene.mrml": "<MRML></MRML>", member: "x"})
    with pytest.raises(SceneError, match="names no file"):
        extract_mrb(archive, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_members_that_clash_as_file_and_folder_are_one_clear_error(tmp_path):
    archive = zip_with(tmp_path, {"scene/scene.mrml": "<MRML></MRML>", "scene/a": "file", "scene/a/b": "under it"})
    with pytest.raises(SceneError, match="'scene/a/b' clashes with another member"):
        extract_mrb(archive, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_symlink_member_is_refused(tmp_path):
    link = zipfile.ZipInfo("scene/Data/link")
    link.external_attr = 0o120777 << 16
    archive = zip_with(tmp_path, {"scene/scene.mrml": "<MRML></MRML>", link: "/etc/passwd"})
    with pytest.raises(SceneError, match="symbolic link"):
        extract_mrb(archive, tmp_path / "work")


def test_zip_bomb_is_refused_fast(tmp_path):
    archive = tmp_path / "bomb.mrb"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("scene/scene.mrml", "<MRML></MRML>")
        with bundle.open("scene/Data/zeros.raw", "w", force_zip64=True) as member:
            block = bytes(1 << 20)
            for _ in range(300):
                member.write(block)
    assert archive.stat().st_size < 2 * 2**20
    with pytest.raises(SceneError, match="would unpack to"):
        extract_mrb(archive, tmp_path / "work", ZipLimits(max_total_bytes=100 * 2**20))
    assert not (tmp_path / "work").exists()


def test_too_many_members_are_refused_before_extraction(tmp_path):
    archive = zip_with(
        tmp_path, {"scene/scene.mrml": "<MRML></MRML>", **{f"scene/Data/{i}.raw": "x" for i in range(6)}}
    )
    with pytest.raises(SceneError, match="holds 7 members, more than the limit of 5"):
        extract_mrb(archive, tmp_path / "work", ZipLimits(max_members=5))
    assert not (tmp_path / "work").exists()


def test_member_that_lies_about_its_size_is_stopped(tmp_path):
    archive = tmp_path / "liar.mrb"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as bundle:
        bundle.writestr("scene/scene.mrml", "<MRML></MRML>")
        bundle.writestr("scene/Data/x.raw", b"A" * 5000)
    raw = bytearray(archive.read_bytes())
    # Shrink the declared size in the central directory to 10 bytes.
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 24 : central + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    with pytest.raises(SceneError):
        extract_mrb(archive, tmp_path / "work")


@pytest.mark.parametrize(
    "xml,message",
    [
        (
            '<?xml version="1.0"?><!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            '<MRML><Volume id="a" name="&x;"/></MRML>',
            "unsafe XML",
        ),
        (
            '<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            '<MRML><Volume id="a" name="&b;"/></MRML>',
            "unsafe XML",
        ),
        ("<MRML><Volume id='a'", "not a readable MRML"),
        ("<MRML></MRML>", "holds no segmentation"),
    ],
)
def test_hostile_or_empty_xml(tmp_path, xml, message):
    scene = tmp_path / "scene.mrml"
    scene.write_text(xml, encoding="utf-8")
    with pytest.raises(SceneError, match=message) as caught:
        read_scene(scene, tmp_path)
    assert str(scene) in str(caught.value)


def test_file_name_escaping_the_scene_folder_is_refused(tmp_path, pair, chest_segmentation):
    scene = write_mrml_scene(tmp_path / "s", "s", [pair])
    outside = tmp_path / "outside.seg.nrrd"
    outside.write_bytes(chest_segmentation.read_bytes())
    text = scene.read_text(encoding="utf-8").replace(
        'fileName="Data/Segmentation', 'fileName="../outside.seg.nrrd" x="'
    )
    scene.write_text(text, encoding="utf-8")
    with pytest.raises(SceneError, match="outside the scene's folder"):
        read_scene(scene, tmp_path)


def test_missing_data_file_and_missing_reference(tmp_path, pair):
    scene = write_mrml_scene(tmp_path / "s", "s", [pair])
    next((tmp_path / "s" / "Data").glob("*.seg.nrrd")).unlink()
    with pytest.raises(SceneError, match="is missing"):
        read_scene(scene, tmp_path)
    scene2 = write_mrml_scene(tmp_path / "t", "t", [pair, ScenePair("b", pair.image_file, pair.segmentation_file, "b")])
    scene2.write_text(
        scene2.read_text(encoding="utf-8").replace("referenceImageGeometryRef:vtkMRMLScalarVolumeNode1;", ""),
        encoding="utf-8",
    )
    with pytest.raises(SceneError, match="names no reference volume"):
        read_scene(scene2, tmp_path)
