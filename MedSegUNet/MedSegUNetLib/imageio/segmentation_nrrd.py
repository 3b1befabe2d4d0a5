"""Writing a Slicer segmentation file (``.seg.nrrd``): one labelmap layer, one segment per label.

The header holds what ``slicerio.write_segmentation`` writes for the same segments, field for field
(Testing/test_segmentation_nrrd.py compares the two and reads ours back with slicerio and ITK). Why not slicerio's
writer itself: it hands the voxels to pynrrd, which copies them into one bytes object and deflates
that with zlib; ISA-L, which already inflates our inputs, deflates the voxels where they lie, several
times faster and into a smaller file. The data is one ordinary
gzip stream: Slicer, ITK, pynrrd and slicerio read it as they read their own.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.core.atomic import atomic_path
from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.geometry import ijk_to_lps
from MedSegUNetLib.core.labels import Label
from MedSegUNetLib.imageio.gzip_stream import gzip_deflater

HEADER_LIMIT = 1 << 22  # bytes searched for the end of a .seg.nrrd header (Slicer's are a few KB)
DEFLATED_PIECE = 1 << 22  # voxel bytes handed to the compressor at a time (no copy: a view of the image)
EMPTY_EXTENT = [0, -1, 0, -1, 0, -1]  # how Slicer writes the extent of a segment without a voxel
EXTENT_THREADS = max(1, min(4, os.cpu_count() or 1))


def labelmap_pixel_type(labels: Sequence[Label]) -> int:
    return sitk.sitkUInt8 if max(label.value for label in labels) < 256 else sitk.sitkUInt16


def segment_extents(voxels_kji: np.ndarray, labels: Sequence[Label]) -> Dict[int, List[int]]:
    """Per label value, its (i0, i1, j0, j1, k0, k1) bounding box; absent labels are left out.

    scipy's find_objects, one pass over the voxels, in slabs of k on each core (it releases Python's lock);
    ITK's LabelShapeStatisticsImageFilter gives the same boxes but also measures each label's shape."""
    from scipy.ndimage import find_objects

    if not voxels_kji.size:
        return {}
    highest = max(label.value for label in labels)
    bounds = np.linspace(0, voxels_kji.shape[0], min(EXTENT_THREADS, voxels_kji.shape[0]) + 1).astype(int)
    slabs = [(int(a), voxels_kji[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(len(slabs), thread_name_prefix="medsegunet-extents") as pool:
        found = list(pool.map(lambda slab: (slab[0], find_objects(slab[1], max_label=highest)), slabs))
    extents: Dict[int, List[int]] = {}
    for k0, boxes in found:
        for value, box in enumerate(boxes, start=1):
            if box is None:
                continue
            k, j, i = box
            extent = [i.start, i.stop - 1, j.start, j.stop - 1, k0 + k.start, k0 + k.stop - 1]
            seen = extents.setdefault(value, extent)
            seen[0::2] = np.minimum(seen[0::2], extent[0::2]).tolist()
            seen[1::2] = np.maximum(seen[1::2], extent[1::2]).tolist()
    return extents


def _segment_fields(labels: Sequence[Label], extents: Dict[int, List[int]]) -> List[Tuple[str, str]]:
    """Each segment's fields, in slicerio's order and formatting (an empty segment too, as Slicer keeps it)."""
    fields = []
    for index, label in enumerate(labels):
        extent = extents.get(label.value, EMPTY_EXTENT)
        tags = f"TerminologyEntry:{label.terminology}|" if label.terminology else "|"
        fields += [
            (f"Segment{index}_ID", f"Segment_{label.value}"),
            (f"Segment{index}_Name", label.name),
            (f"Segment{index}_Color", " ".join(str(float(c)) for c in label.color)),
            (f"Segment{index}_LabelValue", str(int(label.value))),
            (f"Segment{index}_Layer", "0"),
            (f"Segment{index}_Extent", " ".join(str(int(e)) for e in extent)),
            (f"Segment{index}_Tags", tags),
        ]
    return fields


def header_text(image: sitk.Image, labels: Sequence[Label], extents: Dict[int, List[int]], path: Path) -> bytes:
    """The NRRD header of ``image`` (uint8 or uint16 labels) as a one-layer segmentation of ``labels``."""
    import nrrd  # pynrrd's formatting of vectors and matrices, as slicerio's files have them

    matrix = ijk_to_lps(image)
    dtype = sitk.GetArrayViewFromImage(image).dtype
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {dtype.name}",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(size) for size in image.GetSize()),
        "space directions: " + nrrd.format_optional_matrix(matrix[:3, :3].T),
        "kinds: domain domain domain",
        *([f"endian: {sys.byteorder}"] if dtype.itemsize > 1 else []),
        "encoding: gzip",
        "space origin: " + nrrd.format_vector(matrix[:3, 3]),
    ]
    custom = [
        ("Segmentation_ContainedRepresentationNames", "Binary labelmap|"),  # the closing "|" older Slicers need
        ("Segmentation_MasterRepresentation", "Binary labelmap"),
        ("Segmentation_ReferenceImageExtentOffset", "0 0 0"),
        *_segment_fields(labels, extents),
    ]
    for key, value in custom:
        if any(c in value for c in "\r\n\0"):
            raise MedSegError(f"cannot write {key} ({value!r}): a line break would end the NRRD header", path)
        lines.append(f"{key}:={value}")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def write_segmentation_nrrd(path: Path, image: sitk.Image, labels: Sequence[Label]) -> Path:
    """``image`` (label values of ``labels``, of :func:`labelmap_pixel_type`: imageio.write_segmentation
    casts) as a ``.seg.nrrd``; on any failure (a full disk: Python reports every failed write) the previous
    file at ``path`` is left as it was."""
    path = Path(path)
    voxels = sitk.GetArrayViewFromImage(image)  # (k, j, i): i runs fastest, as in NRRD; valid while image lives
    header = header_text(image, labels, segment_extents(voxels, labels), path)
    flat = np.ascontiguousarray(voxels).reshape(-1).view(np.uint8)
    deflater = gzip_deflater(1)
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(header)
        for start in range(0, flat.size, DEFLATED_PIECE):
            # an ndarray has the buffer protocol; numpy's stubs declare it (__buffer__) for Python >= 3.12 only
            file.write(deflater.compress(flat[start : start + DEFLATED_PIECE]))  # type: ignore[arg-type]
        file.write(deflater.flush())
    return path


def segment_names(path: Path) -> Dict[str, str]:
    """Segment ID -> name, as written in the ``.seg.nrrd`` header at ``path``, decoded as UTF-8 (as Slicer
    writes and reads them). pynrrd, under slicerio's reader, decodes headers as ASCII and drops every
    other character ("lésion" -> "lsion"): readers take the names from here. Empty for a header that
    cannot be read (the caller's slicerio read reports that)."""
    try:
        with open(path, "rb") as file:
            head = file.read(HEADER_LIMIT)
    except OSError:
        return {}
    end = head.find(b"\n\n")
    lines = head[: end if end >= 0 else len(head)].decode("utf-8", "replace").splitlines()
    fields = dict(line.split(":=", 1) for line in lines if ":=" in line)
    names = {}
    for key, value in fields.items():
        if key.startswith("Segment") and key.endswith("_ID"):
            name = fields.get(key[: -len("_ID")] + "_Name")
            if name is not None:
                names[value.strip()] = name.strip()
    return names
