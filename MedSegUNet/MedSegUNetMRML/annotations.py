"""Annotated (volume, segmentation) pairs written as a scene that ``training`` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

from MedSegUNetMRML.nodefiles import Node, write_segmentation, write_volume
from MedSegUNetMRML.segments import reference_volume, volume_on_the_grid_of


def write_labelmap_segmentation(segmentation_node: Node, volume_node: Node, path: Path) -> Path:
    """A ``.seg.nrrd`` of labelmaps; a segmentation edited as surfaces is converted (on a copy) first."""
    if segmentation_node.GetSegmentation().IsSourceRepresentationImageData():
        return write_segmentation(segmentation_node, path)
    scene = segmentation_node.GetScene()
    copy = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedSegUNet labelmap copy")
    try:
        copy.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        source = segmentation_node.GetSegmentation()
        for index in range(source.GetNumberOfSegments()):
            copy.GetSegmentation().CopySegmentFromSegmentation(source, source.GetNthSegmentID(index), False)
        if not copy.SetSourceRepresentationToBinaryLabelmap():
            raise RuntimeError(f"could not convert '{segmentation_node.GetName()}' to labelmaps")
        return write_segmentation(copy, path)
    finally:
        scene.RemoveNode(copy)


def _write_labelmap_volume_pair(labelmap_node: Node, folder: Path, index: int) -> Tuple[str, Path, Path]:
    """A labelmap volume node's labels as a segmentation on the volume whose grid it shares (segment names
    from its color table, as Slicer's import names them): (that volume's name, its file, the labels' file)."""
    import slicer

    volume = volume_on_the_grid_of(labelmap_node)
    if volume is None:
        raise ValueError(f"labelmap '{labelmap_node.GetName()}' lies on no volume's grid")
    scene = labelmap_node.GetScene()
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{labelmap_node.GetName()} segments")
    try:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap_node, segmentation_node
        ):
            raise RuntimeError(f"could not import the labelmap '{labelmap_node.GetName()}'")
        labels = write_segmentation(segmentation_node, folder / f"segmentation{index}.seg.nrrd")
    finally:
        scene.RemoveNode(segmentation_node)
    return volume.GetName(), write_volume(volume, folder / f"volume{index}.nrrd"), labels


def save_annotated_scene(segmentation_nodes: Sequence[Node], folder: Path) -> Optional[Path]:
    """The (volume, segmentation) pairs as ``folder/scene/annotations.mrml``; None when there are none.
    A labelmap volume node counts as the segmentation of the volume whose grid it shares."""
    from training.scene_writer import ScenePair, write_mrml_scene

    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index, annotation in enumerate(segmentation_nodes):
        if annotation.IsA("vtkMRMLLabelMapVolumeNode"):
            volume_name, image, labels = _write_labelmap_volume_pair(annotation, folder, index)
            pairs.append(ScenePair(volume_name, image, labels, annotation.GetName()))
            continue
        segmentation_node = annotation
        volume = reference_volume(segmentation_node)
        if volume is None:
            raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no reference volume")
        if segmentation_node.GetTransformNodeID() != volume.GetTransformNodeID():
            raise ValueError(
                f"'{segmentation_node.GetName()}' and '{volume.GetName()}' are under different transforms:"
                " harden them first"
            )
        image = write_volume(volume, folder / f"volume{index}.nrrd")
        labels = write_labelmap_segmentation(segmentation_node, volume, folder / f"segmentation{index}.seg.nrrd")
        pairs.append(ScenePair(volume.GetName(), image, labels, segmentation_node.GetName()))
    return write_mrml_scene(folder / "scene", "annotations", pairs) if pairs else None
