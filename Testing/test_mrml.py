"""The module's node work (MedSegUNet/MedSegUNetMRML) on Slicer's own MRML code, from the slicer-core wheel.

Each test loads volumes as Slicer does (vtkSlicerVolumesLogic), hands the engine the file the panel would
write, takes the result over into a segmentation node, and checks it with Slicer's own export
(vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode) against the engine's labelmap, compared
in physical space.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import MODULE_DIR, run_cli

from MedSegUNetLib.core.geometry import Grid

# slicer-core ships wheels for Linux x86_64 and Python 3.10+ (what CI runs): there a missing or broken
# slicer-core is a failure. Elsewhere these tests skip and say why.
if not (sys.platform == "linux" and platform.machine() == "x86_64" and sys.version_info >= (3, 10)):
    pytest.skip(
        "slicer-core (Slicer's MRML as a wheel) is tested on Linux x86_64, Python 3.10+", allow_module_level=True
    )

import slicer  # noqa: E402  (after the platform check above)
import vtk  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

sys.path.insert(0, str(MODULE_DIR))  # the module's helper packages, as Slicer puts the module's folder on the path

from MedSegUNetMRML.annotations import save_annotated_scene  # noqa: E402
from MedSegUNetMRML.nodefiles import new_segmentation_node, write_volume  # noqa: E402
from MedSegUNetMRML.segments import (  # noqa: E402
    MODEL_ATTRIBUTE,
    annotated_pairs,
    reference_volume,
    segment_names,
    take_over_result,
)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module", autouse=True)
def converter_rules() -> None:
    """What Slicer's Segmentations module registers at start-up: labelmap <-> closed surface conversions."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def new_scene() -> Any:
    return slicer.vtkMRMLScene()


def load_volume(scene: Any, path: Path, name: str) -> Any:
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    node = logic.AddArchetypeVolume(str(path), name)
    assert node is not None, f"Slicer's volumes logic could not load {path}"
    return node


def matrix(vtk_matrix: Any) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def kji_array(volume_node: Any) -> np.ndarray:
    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()


def ijk_to_ras(volume_node: Any) -> np.ndarray:
    result = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(result)
    return matrix(result)


def exported_labelmap(segmentation_node: Any, volume_node: Any) -> Any:
    """The segments as Slicer exports them onto the volume's grid (label values in segment order)."""
    scene = volume_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(index))
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap, volume_node
    )
    assert ok, "ExportSegmentsToLabelmapNode failed"
    return labelmap


def engine_labels_at(labelmap_node: Any, engine_labels: sitk.Image) -> np.ndarray:
    """The engine's label at the centre of every voxel of ``labelmap_node`` (its IJK to RAS, in the
    volume's own frame), looked up in the engine's LPS image: a comparison in physical space."""
    shape = labelmap_node.GetImageData().GetDimensions()[::-1]
    k, j, i = np.indices(shape).reshape(3, -1)
    ras = ijk_to_ras(labelmap_node) @ np.vstack([i, j, k, np.ones_like(i)])
    lps = (LPS_FROM_RAS @ ras)[:3]
    grid = Grid.of(engine_labels)
    index = np.rint(grid.to_index(lps.T)).astype(int).T  # the project's one physical-to-index conversion
    size = np.array(grid.size)[:, None]
    assert ((index >= 0) & (index < size)).all(), "the volume's grid reaches outside the engine's labelmap"
    values = sitk.GetArrayViewFromImage(engine_labels)
    return values[index[2], index[1], index[0]].reshape(shape)


def segment(volume_node: Any, model: Path, work: Path, output_node: Any = None, surfaces: bool = False) -> Any:
    """Segment as the panel does: the volume written by MRML, the engine's command line, the result taken over."""
    work.mkdir(parents=True, exist_ok=True)
    source = write_volume(volume_node, work / "input.nrrd")
    result = work / "result.seg.nrrd"
    run = run_cli("segment", str(source), "-m", str(model), "-o", str(result), "--device", "cpu", "--progress", "none")
    assert run.returncode == 0, run.stderr
    return take_over_result(result, volume_node, output_node, model, surfaces=surfaces)


def rewritten(ct: Path, folder: Path, name: str, direction: np.ndarray) -> Path:
    """CTChest4 with another direction matrix (same voxels): an oblique or flipped scan, as a file."""
    image = sitk.ReadImage(str(ct))
    image.SetDirection(tuple(direction.reshape(-1)))
    path = folder / f"{name}.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def assert_result_matches_the_engine(volume_node: Any, segmentation_node: Any, work: Path) -> None:
    """Slicer's export of the taken-over segments equals the engine's labelmap, voxel for voxel."""
    engine = sitk.ReadImage(str(work / "result.seg.nrrd"))  # the engine's own file: label values on its grid
    exported = exported_labelmap(segmentation_node, volume_node)
    got = kji_array(exported)
    expected = engine_labels_at(exported, engine)
    assert len(np.unique(expected)) > 1, "the engine's labelmap should hold more than background"
    np.testing.assert_array_equal(got, expected)


def rotation(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    return np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])


@pytest.mark.parametrize("kind", ["oblique", "flipped"])
def test_a_segmented_oblique_or_flipped_volume_equals_the_engine_s_labels(tmp_path, ct_chest, small_bundle, kind):
    direction = rotation(25) @ rotation(0) if kind == "oblique" else np.diag([1.0, -1.0, -1.0])
    scene = new_scene()
    volume = load_volume(scene, rewritten(ct_chest, tmp_path, kind, direction), kind)
    node = segment(volume, small_bundle, tmp_path / "work")
    assert reference_volume(node).GetID() == volume.GetID()
    assert_result_matches_the_engine(volume, node, tmp_path / "work")


def test_a_volume_under_a_linear_transform_gets_its_segments_under_the_same_transform(tmp_path, ct_chest, small_bundle):
    scene = new_scene()
    volume = load_volume(scene, ct_chest, "chest")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    moved = vtk.vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            moved.SetElement(row, column, rotation(30)[row, column])
    moved.SetElement(0, 3, 40.0)
    transform.SetMatrixTransformToParent(moved)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    node = segment(volume, small_bundle, tmp_path / "work")
    assert node.GetTransformNodeID() == transform.GetID()
    assert_result_matches_the_engine(volume, node, tmp_path / "work")


def segment_table(node: Any) -> List[Dict[str, Any]]:
    segmentation = node.GetSegmentation()
    table = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_node = segmentation.GetNthSegment(index)
        table.append(
            {
                "name": segment_node.GetName(),
                "color": tuple(round(c, 3) for c in segment_node.GetColor()),
                "terminology": segment_node.GetTerminology(),
            }
        )
    return table


def test_the_result_replaces_same_named_segments_in_place_and_keeps_the_user_s_others(tmp_path, ct_chest, small_bundle):
    scene = new_scene()
    volume = load_volume(scene, ct_chest, "chest")
    output = new_segmentation_node(scene, "mine")
    output.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation = output.GetSegmentation()
    for name, color in (("my notes", (0.1, 0.2, 0.3)), ("spine", (0.9, 0.9, 0.9)), ("tumour", (0.4, 0.5, 0.6))):
        segment_id = segmentation.AddEmptySegment("", name)
        segmentation.GetSegment(segment_id).SetColor(*color)
    node = segment(volume, small_bundle, tmp_path / "work", output_node=output)
    assert node is output
    assert segment_names(node) == ["my notes", "spine", "tumour", "ribs"]  # spine replaced where it was
    table = {row["name"]: row["color"] for row in segment_table(node)}
    assert table["my notes"] == (0.1, 0.2, 0.3) and table["tumour"] == (0.4, 0.5, 0.6)
    from MedSegUNetLib.model.bundle import read_bundle_metadata

    model_colors = {
        label.name: tuple(round(c, 3) for c in label.color) for label in read_bundle_metadata(small_bundle).labels
    }
    assert table["spine"] == model_colors["spine"] and table["ribs"] == model_colors["ribs"]
    assert node.GetAttribute(MODEL_ATTRIBUTE) == str(small_bundle)
    spine = segmentation.GetSegmentIdBySegmentName("spine")
    assert vtk_to_numpy(node.GetBinaryLabelmapInternalRepresentation(spine).GetPointData().GetScalars()).any()


def test_names_colors_values_and_terminology_as_slicer_reads_them(tmp_path, ct_chest):
    """The shipped model's segments: names, colors and Slicer terminology strings arrive as the bundle
    declares them, and the labelmap values follow the bundle's label values."""
    from MedSegUNetLib.model.bundle import read_bundle_metadata
    from MedSegUNetLib.model.shipped import find_model

    model = find_model("abdomen-ct")
    labels = read_bundle_metadata(model).labels
    scene = new_scene()
    volume = load_volume(scene, ct_chest, "chest")
    node = segment(volume, model, tmp_path / "work")
    rows = segment_table(node)
    assert [row["name"] for row in rows] == [label.name for label in labels]
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    for row, label in zip(rows, labels):
        assert row["color"] == tuple(round(c, 3) for c in label.color), label.name
        assert row["terminology"] == label.terminology, label.name
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminologies.DeserializeTerminologyEntry(row["terminology"], entry), row["terminology"]
        assert entry.GetCategoryObject().GetCodeMeaning() == "Anatomical Structure", label.name
        structure, side = entry.GetTypeObject(), entry.GetTypeModifierObject()
        assert structure.GetCodingSchemeDesignator() == "SCT" and structure.GetCodeValue().isdigit(), label.name
        words = [structure.GetCodeMeaning()] + ([side.GetCodeMeaning()] if side.GetCodeMeaning() else [])
        assert "_".join(words).casefold() == label.name, label.name  # e.g. Kidney + Right: kidney_right
        assert terminologies.SerializeTerminologyEntry(entry) == label.terminology  # nothing lost in Slicer's parse
    assert_result_matches_the_engine(volume, node, tmp_path / "work")


def test_a_result_without_an_output_node_or_whose_node_was_deleted_gets_a_new_node(tmp_path, ct_chest, small_bundle):
    scene = new_scene()
    volume = load_volume(scene, ct_chest, "chest")
    made = segment(volume, small_bundle, tmp_path / "a")
    assert made.GetScene() is not None and made.GetName() == "chest segmentation"
    deleted = new_segmentation_node(scene, "deleted while the engine ran")
    scene.RemoveNode(deleted)
    again = segment(volume, small_bundle, tmp_path / "b", output_node=deleted)
    assert again.GetScene() is not None and again.GetID() != made.GetID()
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    assert sorted(nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())) == sorted(
        [made.GetID(), again.GetID()]
    )
    assert_result_matches_the_engine(volume, again, tmp_path / "b")


def test_closed_surfaces_are_made_on_request_only(tmp_path, ct_chest, small_bundle):
    scene = new_scene()
    volume = load_volume(scene, ct_chest, "chest")
    plain = segment(volume, small_bundle, tmp_path / "a")
    assert not plain.GetSegmentation().ContainsRepresentation("Closed surface")
    shown = segment(volume, small_bundle, tmp_path / "b", surfaces=True)
    assert shown.GetSegmentation().ContainsRepresentation("Closed surface")


def test_annotated_pairs_edited_as_surfaces_come_back_to_training_with_the_same_segments(
    tmp_path, ct_chest, chest_segmentation
):
    """Retrain's export: a segmentation whose source is closed surfaces, with UTF-8 names, is written
    as labelmaps on its volume's grid and read back by training with the same segments."""
    from MedSegUNetMRML.nodefiles import read_segmentation
    from training.scenes import read_scene

    scene = new_scene()
    volume = load_volume(scene, ct_chest, "chest")
    node = read_segmentation(scene, chest_segmentation, "edited")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation = node.GetSegmentation()
    while segmentation.GetNumberOfSegments() > 2:  # ribs and the cervical spine: surfaces convert back in seconds
        segmentation.RemoveSegment(segmentation.GetNthSegmentID(2))
    first = segmentation.GetNthSegmentID(0)
    segmentation.GetSegment(first).SetName("côtes 肋骨")
    names = segment_names(node)
    assert node.CreateClosedSurfaceRepresentation()
    assert node.SetSourceRepresentationToClosedSurface()  # as if edited in 3D
    assert not segmentation.IsSourceRepresentationImageData()
    scene_file = save_annotated_scene([node], tmp_path / "export")
    assert scene_file is not None
    cases = read_scene(scene_file, tmp_path / "read")
    assert len(cases) == 1
    assert [s.name for s in cases[0].segments] == names
    assert segmentation.GetSegment(first).GetName() == "côtes 肋骨"  # the user's node is untouched


def test_an_annotated_pair_under_different_transforms_is_refused(tmp_path, ct_chest, chest_segmentation):
    from MedSegUNetMRML.nodefiles import read_segmentation

    scene = new_scene()
    volume = load_volume(scene, ct_chest, "chest")
    node = read_segmentation(scene, chest_segmentation, "edited")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    node.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    with pytest.raises(ValueError, match="different transforms: harden them first"):
        save_annotated_scene([node], tmp_path / "export")


def coarser_copy(ct: Path, folder: Path) -> Path:
    """CTChest4 on a grid of twice the spacing: another volume whose voxels no chest segment is made of."""
    image = sitk.ReadImage(str(ct))
    spacing = [s * 2 for s in image.GetSpacing()]
    size = [max(1, n // 2) for n in image.GetSize()]
    coarse = sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing, image.GetDirection()
    )
    path = folder / "coarse.nrrd"
    sitk.WriteImage(coarse, str(path))
    return path


def scene_with_segmentation(volumes: List[Path], chest_segmentation: Path, reference: int = -1) -> Any:
    """A scene holding ``volumes`` (in this order) and the chest segmentation, tied to ``volumes[reference]``
    by its reference-geometry role unless ``reference`` is None."""
    from MedSegUNetMRML.nodefiles import read_segmentation

    scene = new_scene()
    nodes = [load_volume(scene, path, path.stem) for path in volumes]
    node = read_segmentation(scene, chest_segmentation, "edited")
    if reference is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(nodes[reference])
    node.AddDefaultStorageNode()
    return scene


def test_training_reads_a_scene_slicer_wrote_with_an_unrelated_volume_first_and_an_awkward_file_name(
    tmp_path, ct_chest, chest_segmentation
):
    from training.scenes import read_scene

    awkward = tmp_path / "CT 50% contrast.nrrd"
    awkward.write_bytes(ct_chest.read_bytes())
    scene = scene_with_segmentation([coarser_copy(ct_chest, tmp_path), awkward], chest_segmentation)
    bundle = tmp_path / "written by MRML.mrb"
    assert scene.WriteToMRB(str(bundle))
    cases = read_scene(bundle, tmp_path / "read")
    assert len(cases) == 1
    assert cases[0].image_path.name == "CT 50% contrast.nrrd", cases[0].image_path
    assert "volume 'CT 50% contrast'" in cases[0].source
    assert [s.name for s in cases[0].segments][:2] == ["ribs", "cervical vertebral column"]


def test_a_segmentation_without_a_reference_volume_finds_the_one_volume_on_its_grid(
    tmp_path, ct_chest, chest_segmentation
):
    from training.scenes import SceneError, read_scene

    coarse = coarser_copy(ct_chest, tmp_path)
    scene = scene_with_segmentation([coarse, ct_chest], chest_segmentation, reference=None)
    bundle = tmp_path / "no-reference.mrb"
    assert scene.WriteToMRB(str(bundle))
    cases = read_scene(bundle, tmp_path / "read")
    assert len(cases) == 1 and "volume 'CTChest4'" in cases[0].source, cases[0].source

    twin = tmp_path / "twin.nrrd"
    twin.write_bytes(ct_chest.read_bytes())
    scene = scene_with_segmentation([ct_chest, twin], chest_segmentation, reference=None)
    assert scene.WriteToMRB(str(tmp_path / "two.mrb"))
    with pytest.raises(SceneError, match=r"several volumes have its grid \('CTChest4', 'twin'\)"):
        read_scene(tmp_path / "two.mrb", tmp_path / "read2")

    scene = scene_with_segmentation([coarse, coarser_copy(ct_chest, tmp_path / "read2")], chest_segmentation, None)
    assert scene.WriteToMRB(str(tmp_path / "none.mrb"))
    with pytest.raises(SceneError, match="none of the scene's 2 volumes has its grid"):
        read_scene(tmp_path / "none.mrb", tmp_path / "read3")


def test_annotated_segments_sharing_a_layer_come_back_to_training_voxel_for_voxel(
    tmp_path, ct_chest, chest_segmentation
):
    """Slicer's own file: segments share labelmap layers. Retrain's export is read back by training with
    the same labels on the volume's grid as training reads from the original file."""
    from MedSegUNetMRML.nodefiles import read_segmentation
    from training.scenes import load_case_arrays, read_segments, segments_labelmap

    scene = new_scene()
    volume = load_volume(scene, ct_chest, "chest")
    node = read_segmentation(scene, chest_segmentation, "shared")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfLayers() < segmentation.GetNumberOfSegments()
    scene_file = save_annotated_scene([node], tmp_path / "export")
    from training.scenes import read_scene

    case = read_scene(scene_file, tmp_path / "read")[0]
    image, labels = load_case_arrays(case)
    original = segments_labelmap(chest_segmentation, read_segments(chest_segmentation), image)
    assert [s.name for s in case.segments] == segment_names(node)
    expected = sitk.GetArrayFromImage(original)
    assert len(np.unique(expected)) > 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)


def test_a_labelmap_volume_node_is_an_annotation_of_the_volume_on_its_grid(tmp_path, ct_chest, chest_segmentation):
    """Older workflows keep labels in a labelmap volume node: Retrain lists it with the volume whose grid
    it shares, exports it as segments, and training reads the same labels back."""
    from MedSegUNetMRML.nodefiles import read_segmentation
    from training.scenes import load_case_arrays, read_scene

    scene = new_scene()
    volume = load_volume(scene, ct_chest, "chest")
    segmentation_node = read_segmentation(scene, chest_segmentation, "to export")
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    labelmap = exported_labelmap(segmentation_node, volume)
    scene.RemoveNode(segmentation_node)
    expected = kji_array(labelmap)
    assert len(np.unique(expected)) > 2
    assert [(v.GetID(), a.GetID()) for v, a in annotated_pairs(scene)] == [(volume.GetID(), labelmap.GetID())]
    case = read_scene(save_annotated_scene([labelmap], tmp_path / "export"), tmp_path / "read")[0]
    _, labels = load_case_arrays(case)
    assert len(case.segments) == len(np.unique(expected)) - 1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)  # values in segment order


def test_a_labelmap_on_no_volume_s_grid_is_refused(tmp_path, ct_chest):
    scene = new_scene()
    load_volume(scene, ct_chest, "chest")
    labelmap = load_volume(scene, coarser_copy(ct_chest, tmp_path), "coarse labels")
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "coarse labels")
    labelmap_node.SetAndObserveImageData(labelmap.GetImageData())
    assert [a.GetID() for _, a in annotated_pairs(scene)] == []
    with pytest.raises(ValueError, match="lies on no volume's grid"):
        save_annotated_scene([labelmap_node], tmp_path / "export")
