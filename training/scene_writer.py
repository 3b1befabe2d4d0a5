"""Writing (volume, segmentation) pairs as Slicer 5.x scenes: a folder with a .mrml, or a .mrb bundle.

Used by `medsegunet sample-data`, by the tests, and by anyone who wants to hand annotated files to
Slicer. The MRML follows what Slicer writes: node elements with ``id``/``name`` and a ``references``
attribute, storage nodes with percent-encoded ``fileName`` relative to the scene, data under ``Data/``.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence
from xml.sax.saxutils import quoteattr

from MedSegUNetLib.core.atomic import atomic_path


@dataclass
class ScenePair:
    volume_name: str
    image_file: Path  # copied into Data/ under the volume's name
    segmentation_file: Path  # a .seg.nrrd
    segmentation_name: str


def _element(tag: str, attributes: dict) -> str:
    return (
        f" <{tag}\n"
        + "".join(f"  {key}={quoteattr(str(value))}\n" for key, value in attributes.items())
        + f" ></{tag}>\n"
    )


def _data_name(name: str, source: Path) -> str:
    ending = "".join(source.suffixes[-2:]) if source.name.endswith((".seg.nrrd", ".nii.gz")) else source.suffix
    return f"{name}{ending}"


def scene_xml(pairs: Sequence[ScenePair], legacy_refs: bool = False, decoy_first: bool = False) -> str:
    """The MRML text; data files are expected at ``Data/<name><ending>``."""
    elements: List[str] = []
    if decoy_first:
        # A volume listed before the real ones, referenced by nothing: readers must follow references.
        elements.append(_element("Volume", {"id": "vtkMRMLScalarVolumeNodeDecoy", "name": "Decoy", "references": ""}))
    for index, pair in enumerate(pairs, start=1):
        volume_id, volume_storage = f"vtkMRMLScalarVolumeNode{index}", f"vtkMRMLVolumeArchetypeStorageNode{index}"
        volume_display = f"vtkMRMLScalarVolumeDisplayNode{index}"
        segmentation_id, segmentation_storage = (
            f"vtkMRMLSegmentationNode{index}",
            f"vtkMRMLSegmentationStorageNode{index}",
        )
        segmentation_display = f"vtkMRMLSegmentationDisplayNode{index}"
        volume_refs = {"references": f"display:{volume_display};storage:{volume_storage};"}
        segmentation_refs = {
            "references": f"display:{segmentation_display};referenceImageGeometryRef:{volume_id};"
            f"storage:{segmentation_storage};"
        }
        if legacy_refs:
            volume_refs = {"storageNodeRef": volume_storage, "displayNodeRef": volume_display}
            segmentation_refs = {
                "storageNodeRef": segmentation_storage,
                "displayNodeRef": segmentation_display,
                "references": f"referenceImageGeometryRef:{volume_id};",
            }
        image_name = urllib.parse.quote(f"Data/{_data_name(pair.volume_name, pair.image_file)}")
        seg_name = urllib.parse.quote(f"Data/{_data_name(pair.segmentation_name, pair.segmentation_file)}")
        elements += [
            _element("Volume", {"id": volume_id, "name": pair.volume_name, "hideFromEditors": "false", **volume_refs}),
            _element("VolumeDisplay", {"id": volume_display, "name": "VolumeDisplay", "window": "400", "level": "40"}),
            _element(
                "VolumeArchetypeStorage",
                {"id": volume_storage, "name": "VolumeArchetypeStorage", "fileName": image_name, "useCompression": "1"},
            ),
            _element("Segmentation", {"id": segmentation_id, "name": pair.segmentation_name, **segmentation_refs}),
            _element("SegmentationDisplay", {"id": segmentation_display, "name": "SegmentationDisplay"}),
            _element(
                "SegmentationStorage", {"id": segmentation_storage, "name": "SegmentationStorage", "fileName": seg_name}
            ),
        ]
    header = '<?xml version="1.0" encoding="UTF-8"?>\n<MRML  version="Slicer5.8.1" userTags="">\n'
    return header + "".join(elements) + "</MRML>\n"


def write_mrml_scene(folder: Path, scene_name: str, pairs: Sequence[ScenePair], **options: bool) -> Path:
    """``folder/scene_name.mrml`` with its data in ``folder/Data``."""
    folder = Path(folder)
    (folder / "Data").mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        shutil.copyfile(pair.image_file, folder / "Data" / _data_name(pair.volume_name, pair.image_file))
        shutil.copyfile(
            pair.segmentation_file, folder / "Data" / _data_name(pair.segmentation_name, pair.segmentation_file)
        )
    scene = folder / f"{scene_name}.mrml"
    with atomic_path(scene) as temporary:
        temporary.write_text(scene_xml(pairs, **options), encoding="utf-8")
    return scene


def write_mrb(path: Path, scene_name: str, pairs: Sequence[ScenePair], **options: bool) -> Path:
    """A .mrb as Slicer saves it: ``scene_name/scene_name.mrml`` and ``scene_name/Data/*`` in a zip."""
    with tempfile.TemporaryDirectory() as work:
        scene = write_mrml_scene(Path(work) / scene_name, scene_name, pairs, **options)
        with atomic_path(Path(path)) as temporary, zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as bundle:
            for file in sorted(scene.parent.rglob("*")):
                if file.is_file():
                    bundle.write(file, file.relative_to(Path(work)).as_posix())
    return Path(path)
