"""Nodes to files and files to nodes, through storage nodes of their own (a node's own storage is untouched)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Node = Any  # an MRML node (vtkMRML...Node); VTK's wrapped classes carry no Python types


def _storage(storage: Node, path: Path) -> Node:
    """A storage node made by the scene's CreateNodeByClass, not added to the scene, for ``path``."""
    storage.UnRegister(None)  # CreateNodeByClass hands back a reference the caller owns
    storage.SetFileName(str(path))
    return storage


def write_volume(volume_node: Node, path: Path) -> Path:
    """The volume as an uncompressed NRRD in its own frame (a parent transform is not applied)."""
    storage = _storage(volume_node.GetScene().CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode"), path)
    storage.SetUseCompression(False)  # written once, read once: compression only costs time
    if not storage.WriteData(volume_node):
        raise RuntimeError(f"could not write {volume_node.GetName()} to {path}")
    return path


def write_segmentation(segmentation_node: Node, path: Path) -> Path:
    storage = _storage(segmentation_node.GetScene().CreateNodeByClass("vtkMRMLSegmentationStorageNode"), path)
    if not storage.WriteData(segmentation_node):
        raise RuntimeError(f"could not write {segmentation_node.GetName()} to {path}")
    return path


def read_segmentation(scene: Node, path: Path, name: str) -> Node:
    """A new segmentation node in ``scene`` holding the ``.seg.nrrd`` at ``path`` (what Slicer's
    loadSegmentation does, without the application)."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    try:
        read_segmentation_into(node, path)
    except RuntimeError:
        scene.RemoveNode(node)
        raise
    return node


def read_segmentation_into(segmentation_node: Node, path: Path) -> None:
    """The ``.seg.nrrd`` at ``path`` as the segments of ``segmentation_node`` (its layers as stored)."""
    storage = _storage(segmentation_node.GetScene().CreateNodeByClass("vtkMRMLSegmentationStorageNode"), path)
    if not storage.ReadData(segmentation_node):
        raise RuntimeError(f"could not read the segmentation {path}")


def new_segmentation_node(scene: Node, name: str) -> Node:
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    return node
