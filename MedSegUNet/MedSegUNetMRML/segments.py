"""Segmentation nodes: their segments, the volume they belong to, and the engine's result taken over."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

from MedSegUNetMRML.nodefiles import Node, new_segmentation_node, read_segmentation, read_segmentation_into

MODEL_ATTRIBUTE = "MedSegUNet.Model"  # the bundle that made a segmentation node's segments


def reference_volume(segmentation_node: Node) -> Optional[Node]:
    return segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())


def segment_names(segmentation_node: Node) -> List[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def volume_on_the_grid_of(labelmap_node: Node, tolerance: float = 1e-4) -> Optional[Node]:
    """The scalar volume (not a labelmap) with exactly the voxel grid and transform of ``labelmap_node``."""
    scene = labelmap_node.GetScene()
    image = labelmap_node.GetImageData()
    if image is None:
        return None
    wanted = _ijk_to_ras(labelmap_node)
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetImageData() is None:
            continue
        same_grid = node.GetImageData().GetDimensions() == image.GetDimensions() and all(
            abs(a - b) <= tolerance * max(1.0, abs(b)) for a, b in zip(_ijk_to_ras(node), wanted)
        )
        if same_grid and node.GetTransformNodeID() == labelmap_node.GetTransformNodeID():
            return node
    return None


def _ijk_to_ras(volume_node: Node) -> List[float]:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return [matrix.GetElement(row, column) for row in range(3) for column in range(4)]


def annotated_pairs(scene: Node) -> List[Tuple[Node, Node]]:
    """(volume, annotation) pairs of ``scene``: segmentations with segments tied to a volume, and labelmap
    volumes holding labels on a volume's exact grid."""
    pairs = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        segmentation_node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        volume = reference_volume(segmentation_node)
        if volume is not None and segmentation_node.GetSegmentation().GetNumberOfSegments() > 0:
            pairs.append((volume, segmentation_node))
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode")):
        labelmap_node = scene.GetNthNodeByClass(index, "vtkMRMLLabelMapVolumeNode")
        volume = volume_on_the_grid_of(labelmap_node)
        if volume is not None and labelmap_node.GetImageData().GetScalarRange()[1] > 0:
            pairs.append((volume, labelmap_node))
    return pairs


def copy_segments(source_node: Node, target_node: Node) -> None:
    """Each source segment replaces the target's segment of the same name, at its place; others are kept."""
    source, target = source_node.GetSegmentation(), target_node.GetSegmentation()
    for index in range(source.GetNumberOfSegments()):
        segment_id = source.GetNthSegmentID(index)
        name = source.GetSegment(segment_id).GetName()
        existing = target.GetSegmentIdBySegmentName(name)
        position = target.GetSegmentIndex(existing) if existing else -1
        if existing:
            target.RemoveSegment(existing)
        if not target.CopySegmentFromSegmentation(source, segment_id, False):
            raise RuntimeError(f"could not copy segment '{name}'")
        if position >= 0:
            target.SetSegmentIndex(target.GetSegmentIdBySegmentName(name), position)
    # Each copy keeps a layer of its own, cropped to its extent. Merging them into shared layers
    # (CollapseBinaryLabelmaps) would take Slicer's main thread half a second at 512x512x300
    # (benchmarks/takeover.py); the Segment Editor edits separate layers as well.


def take_over_result(
    path: Path, volume_node: Node, output_node: Optional[Node], model: Path, surfaces: bool = True
) -> Node:
    """The engine's ``.seg.nrrd`` (names, colors, terminology) into ``output_node``, tied to ``volume_node``
    and under its transform (the file is in the volume's own frame); closed surfaces for 3D on request.
    With no output node, or one removed from the scene while the engine ran, a new node is made."""
    scene = volume_node.GetScene()
    if output_node is None or output_node.GetScene() is None:
        output_node = new_segmentation_node(scene, f"{volume_node.GetName()} segmentation")
    if output_node.GetSegmentation().GetNumberOfSegments() == 0:
        read_segmentation_into(output_node, path)  # nothing to keep: the file's layers as they are, no copy
    else:
        loaded = read_segmentation(scene, path, "MedSegUNet result")
        try:
            copy_segments(loaded, output_node)
        finally:
            scene.RemoveNode(loaded)
    output_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    output_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    if surfaces:
        output_node.CreateClosedSurfaceRepresentation()
    output_node.SetAttribute(MODEL_ATTRIBUTE, str(model))
    return output_node
