"""Annotated (volume, segmentation) pairs written as a scene that ``training`` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from MedSegUNetMRML.nodefiles import Node, write_segmentation, write_volume
from MedSegUNetMRML.segments import reference_volume


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


def save_annotated_scene(segmentation_nodes: Sequence[Node], folder: Path) -> Optional[Path]:
    """The (volume, segmentation) pairs as ``folder/scene/annotations.mrml``; None when there are none."""
    from training.scene_writer import ScenePair, write_mrml_scene

    pairs = []
    for index, segmentation_node in enumerate(segmentation_nodes):
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
