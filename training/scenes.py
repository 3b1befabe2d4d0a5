"""Annotated cases from Slicer scenes (.mrb bundles and .mrml files), read as untrusted input.

A scene is XML written by Slicer: each ``Segmentation`` node points to its storage node (the
``.seg.nrrd``) and, through the ``referenceImageGeometryRef`` reference, to the volume it was drawn
on. Both reference styles are read: ``references="role:id;role:id id;"`` (Slicer 4.4 and newer) and the
legacy ``storageNodeRef``/``displayNodeRef`` attributes. File names are percent-decoded and resolved
against the scene's folder, and may not leave it.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import stat
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.geometry import Grid, image_from_ijk_array, resample_onto
from MedSegUNetLib.imageio.segmentation_nrrd import segment_names

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element


class SceneError(MedSegError):
    """A scene, zip or data file that cannot be used (one line, names the file)."""


@dataclass
class SegmentInfo:
    name: str
    label_value: int
    layer: int
    color: Tuple[float, float, float]
    terminology: Optional[str] = None


@dataclass
class Case:
    """One (image, segmentation) pair. ``load_case_arrays`` gives segment ``i`` the value ``i + 1``."""

    name: str
    image_path: Path
    label_path: Path
    segments: List[SegmentInfo] = field(default_factory=list)
    source: str = ""


@dataclass
class ZipLimits:
    max_total_bytes: int = 8 * 2**30
    max_members: int = 10000


# --- .mrb: a zip, extracted with every check done before the first byte is written ----------------


def _safe_member_path(name: str, archive: Path) -> PurePosixPath:
    normalized = name.replace("\\", "/")
    path = PurePosixPath(normalized)
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized) or ".." in path.parts:
        raise SceneError(f"refusing zip member '{name}': it would land outside the extraction folder", archive)
    if not path.parts:  # "", "." or "./": the extraction folder itself
        raise SceneError(f"refusing zip member '{name}': it names no file", archive)
    return path


def _check_members(archive: Path, members: List[zipfile.ZipInfo], limits: ZipLimits) -> None:
    if len(members) > limits.max_members:
        raise SceneError(f"holds {len(members)} members, more than the limit of {limits.max_members}", archive)
    total = sum(member.file_size for member in members)
    if total > limits.max_total_bytes:
        raise SceneError(
            f"would unpack to {total / 2**30:.1f} GiB, more than the limit of {limits.max_total_bytes / 2**30:.1f} GiB",
            archive,
        )
    for member in members:
        _safe_member_path(member.filename, archive)
        mode = member.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise SceneError(f"refusing zip member '{member.filename}': it is a symbolic link", archive)


def _copy_bounded(source: IO[bytes], target: IO[bytes], limit: int, name: str, archive: Path) -> None:
    """Copy at most the declared size: a member that inflates beyond what it claimed is refused."""
    written = 0
    while True:
        chunk = source.read(1 << 20)
        if not chunk:
            return
        written += len(chunk)
        if written > limit:
            raise SceneError(f"zip member '{name}' is larger than it declares", archive)
        target.write(chunk)


def extract_mrb(archive: Path, destination: Path, limits: Optional[ZipLimits] = None) -> Path:
    """Extract a Slicer .mrb into ``destination`` and return its scene (the shallowest .mrml)."""
    if limits is None:
        limits = ZipLimits()
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            _check_members(archive, members, limits)
            destination.mkdir(parents=True, exist_ok=True)
            for member in members:
                relative = _safe_member_path(member.filename, archive)
                target = destination.joinpath(*relative.parts)
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with bundle.open(member) as source, open(target, "wb") as output:
                        _copy_bounded(source, output, member.file_size, member.filename, archive)
                except (IsADirectoryError, NotADirectoryError, FileExistsError):  # "a" and "a/b" both as files
                    raise SceneError(f"zip member '{member.filename}' clashes with another member", archive) from None
    except zipfile.BadZipFile:
        raise SceneError("is not a valid .mrb (zip) file", archive) from None
    except SceneError:
        shutil.rmtree(destination, ignore_errors=True)
        raise
    scenes = sorted(destination.rglob("*.mrml"), key=lambda p: (len(p.relative_to(destination).parts), str(p)))
    if not scenes:
        raise SceneError("holds no .mrml scene", archive)
    return scenes[0]


# --- .mrml: XML, parsed without entities -------------------------------------------------------


def parse_references(element: Element) -> Dict[str, List[str]]:
    """Node references of an MRML element: ``references`` attribute and the legacy attributes."""
    references: Dict[str, List[str]] = {}
    for item in (element.get("references") or "").split(";"):
        if ":" in item:
            role, ids = item.split(":", 1)
            references[role.strip()] = ids.split()
    for legacy, role in (
        ("storageNodeRef", "storage"),
        ("displayNodeRef", "display"),
        ("referenceImageGeometryRef", "referenceImageGeometryRef"),
    ):
        value = element.get(legacy)
        if value and role not in references:
            references[role] = value.split()
    return references


def _parse_xml(path: Path) -> Element:
    import defusedxml.ElementTree as SafeElementTree
    from defusedxml import DefusedXmlException

    try:
        return SafeElementTree.parse(str(path), forbid_dtd=True).getroot()
    except DefusedXmlException as error:
        raise SceneError(f"refusing unsafe XML ({type(error).__name__})", path) from None
    except Exception as error:  # ParseError and friends
        raise SceneError(f"is not a readable MRML scene ({error})", path) from None


def resolve_file_name(scene: Path, file_name: str) -> Path:
    """A storage node's percent-encoded ``fileName``, resolved inside the scene's folder."""
    folder = scene.parent.resolve()
    decoded = urllib.parse.unquote(file_name)
    candidate = (folder / decoded).resolve()
    if candidate != folder and folder not in candidate.parents:
        raise SceneError(f"data file '{decoded}' lies outside the scene's folder", scene)
    if not candidate.is_file():
        raise SceneError(f"data file '{decoded}' is missing", scene)
    return candidate


def _storage_file(scene: Path, nodes: Dict[str, Element], node: Element) -> Path:
    storage_ids = parse_references(node).get("storage", [])
    storage = nodes.get(storage_ids[0]) if storage_ids else None
    file_name = storage.get("fileName") if storage is not None else None
    if not file_name:
        raise SceneError(f"node '{node.get('name')}' has no stored data file", scene)
    return resolve_file_name(scene, file_name)


def _volume_on_the_grid_of(
    scene: Path, nodes: Dict[str, Element], segmentation: Element, volumes: List[Element]
) -> Element:
    """The one volume whose voxels the segmentation's labelmap is made of, for a segmentation that names
    no reference volume (an older or hand-made scene); refused when none or several are."""
    if len(volumes) == 1:
        return volumes[0]
    import slicerio

    from MedSegUNetLib.imageio.images import read_grid

    name = segmentation.get("name")
    label_path = _storage_file(scene, nodes, segmentation)
    try:
        lattice = slicerio.read_segmentation(str(label_path), skip_voxels=True)["ijkToLPS"]
    except Exception as error:
        raise SceneError(f"is not a readable segmentation ({error})", label_path) from None
    matching = [v for v in volumes if read_grid(_storage_file(scene, nodes, v)).holds_lattice(lattice)]
    if len(matching) == 1:
        return matching[0]
    if not matching:
        raise SceneError(
            f"segmentation '{name}' names no reference volume and none of the scene's {len(volumes)} volumes "
            "has its grid",
            scene,
        )
    names = ", ".join(f"'{v.get('name')}'" for v in matching)
    raise SceneError(
        f"segmentation '{name}' names no reference volume and several volumes have its grid ({names}): "
        "set its reference volume in Slicer",
        scene,
    )


def read_mrml(scene: Path, origin: Optional[Path] = None) -> List[Case]:
    """One case per segmentation node that has a stored .seg.nrrd and a reference volume."""
    root = _parse_xml(scene)
    nodes = {node_id: element for element in root if (node_id := element.get("id"))}
    volumes = [e for e in root if e.tag == "Volume"]
    cases: List[Case] = []
    for segmentation in (e for e in root if e.tag == "Segmentation"):
        reference_ids = parse_references(segmentation).get("referenceImageGeometryRef", [])
        volume = nodes.get(reference_ids[0]) if reference_ids else None
        if volume is None:
            volume = _volume_on_the_grid_of(scene, nodes, segmentation, volumes)
        if volume.tag != "Volume":
            raise SceneError(
                f"segmentation '{segmentation.get('name')}' refers to a {volume.tag}, not a scalar volume", scene
            )
        label_path = _storage_file(scene, nodes, segmentation)
        cases.append(
            Case(
                name=f"{scene.stem}/{segmentation.get('name')}",
                image_path=_storage_file(scene, nodes, volume),
                label_path=label_path,
                segments=read_segments(label_path),
                source=f"{origin or scene}: volume '{volume.get('name')}', segmentation '{segmentation.get('name')}'",
            )
        )
    if not cases:
        raise SceneError("holds no segmentation", scene)
    return cases


def read_scene(path: Path, workdir: Path) -> List[Case]:
    """Cases of a .mrb (extracted under ``workdir``) or a .mrml."""
    path = Path(path)
    if not path.exists():
        raise SceneError("scene not found", path)
    if path.suffix.lower() == ".mrb":
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
        return read_mrml(extract_mrb(path, Path(workdir) / f"{path.stem}-{digest}"), origin=path)
    return read_mrml(path)


# --- segmentation files ------------------------------------------------------------------------


def read_segments(path: Path) -> List[SegmentInfo]:
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path), skip_voxels=True)
    except Exception as error:
        raise SceneError(f"is not a readable segmentation ({error})", path) from None
    names = segment_names(path)  # UTF-8, where slicerio drops every non-ASCII character
    segments: List[SegmentInfo] = []
    for segment in segmentation.get("segments", []):
        tags = segment.get("tags") or {}
        terminology = tags.get("TerminologyEntry")
        if not terminology and segment.get("terminology"):
            terminology = slicerio.segmentation.terminology_entry_to_string(segment["terminology"])
        color = [float(c) for c in segment.get("color", (0.5, 0.5, 0.5))]
        name = names.get(str(segment.get("id")), segment["name"])
        if len(color) != 3:
            raise SceneError(f"segment '{name}' has a color of {len(color)} values, not 3 (red, green, blue)", path)
        red, green, blue = color
        segments.append(
            SegmentInfo(name, int(segment["labelValue"]), int(segment.get("layer", 0)), (red, green, blue), terminology)
        )
    return segments


def load_case_arrays(case: Case) -> Tuple[sitk.Image, sitk.Image]:
    """The image (as read_image gives it) and a labelmap on its exact grid where segment ``i`` has value ``i + 1``."""
    from MedSegUNetLib.imageio.images import read_image
    from MedSegUNetLib.imageio.rtstruct import is_rtstruct

    if is_rtstruct(case.label_path):
        return rtstruct_arrays(case)
    image = read_image(case.image_path).image
    if case.label_path.name.lower().endswith(".seg.nrrd"):
        return image, segments_labelmap(case.label_path, case.segments, image)
    return image, values_labelmap(case.label_path, case.segments, image)


def rtstruct_arrays(case: Case) -> Tuple[sitk.Image, sitk.Image]:
    """The CT series and its structure set's ROIs as one labelmap (segment ``i`` is ``i + 1``); ROIs that
    overlap cannot train one label per voxel and are refused."""
    from MedSegUNetLib.imageio.rtstruct import read_structure_set

    structures = read_structure_set(case.label_path, [segment.name for segment in case.segments])
    merged = np.zeros(Grid.of(structures.image).size[::-1], dtype=np.uint16)
    for index, segment in enumerate(case.segments, start=1):
        mask = structures.masks[segment.name]
        clash = merged[mask]
        if clash.any():
            other = case.segments[int(clash[clash > 0][0]) - 1].name
            raise SceneError(
                f"ROIs '{other}' and '{segment.name}' overlap; training needs one label per voxel", case.label_path
            )
        merged[mask] = index
    label = sitk.GetImageFromArray(merged)
    label.CopyInformation(structures.image)
    return structures.image, label


def values_labelmap(path: Path, segments: List[SegmentInfo], reference: sitk.Image) -> sitk.Image:
    """A labelmap file (MSD / nnU-Net / plain pairs) renumbered so that segment ``i`` is ``i + 1``."""
    from MedSegUNetLib.imageio.images import read_labelmap

    label = read_labelmap(path)
    if not Grid.of(label).same_voxels(Grid.of(reference)):
        raise SceneError(
            f"is not on its image's grid ({Grid.of(label).describe()} vs {Grid.of(reference).describe()})", path
        )
    values = sitk.GetArrayFromImage(label)
    table = np.zeros(int(values.max()) + 1, dtype=np.uint16)
    for index, segment in enumerate(segments, start=1):
        if segment.label_value < table.size:
            table[segment.label_value] = index
    unknown = sorted(set(np.unique(values).tolist()) - {0} - {s.label_value for s in segments})
    if unknown:
        raise SceneError(f"holds label values {unknown[:5]} that the dataset does not name", path)
    renumbered = sitk.GetImageFromArray(table[values])
    renumbered.CopyInformation(label)
    return resample_onto(renumbered, Grid.of(reference), sitk.sitkNearestNeighbor, default_value=0)


def segments_labelmap(
    path: Path, segments: List[SegmentInfo], reference: sitk.Image, values: Optional[List[int]] = None
) -> sitk.Image:
    """``segments`` of a .seg.nrrd as one labelmap on ``reference``'s grid: segment ``i`` gets
    ``values[i]`` (default ``i + 1``).

    Slicer crops a .seg.nrrd to its segments' extent; the labelmap is placed back on the image grid in
    physical space. Overlapping segments cannot train one label per voxel and are refused.
    """
    import slicerio

    segmentation = slicerio.read_segmentation(str(path))
    voxels = np.asarray(segmentation["voxels"])
    layers = voxels if voxels.ndim == 4 else voxels[np.newaxis]
    values = values or list(range(1, len(segments) + 1))
    merged = np.zeros(layers.shape[1:], dtype=np.uint16)
    for segment, index in zip(segments, values):
        mask = layers[segment.layer] == segment.label_value
        clash = merged[mask]
        if clash.any():
            other = segments[values.index(int(clash[clash > 0][0]))].name
            raise SceneError(
                f"segments '{other}' and '{segment.name}' overlap; training needs one label per voxel", path
            )
        merged[mask] = index
    label = image_from_ijk_array(merged, segmentation["ijkToLPS"])
    return resample_onto(label, Grid.of(reference), sitk.sitkNearestNeighbor, default_value=0)
