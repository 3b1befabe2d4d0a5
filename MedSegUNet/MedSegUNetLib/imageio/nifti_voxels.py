"""The voxels of a gzip-compressed NIfTI-1 file, inflated with ISA-L.

ITK inflates ``.nii.gz`` with zlib; ISA-L is faster (benchmarks/README.md). ITK still reads the header
and owns the geometry (``images`` takes spacing, origin and direction from ITK's header read); this
module only supplies the voxels (the whole array, or slice by slice to be resampled as they come), and
only for the plain case: one gzip member, 3 dimensions, no intensity scaling, the data type ITK
reported. Anything else returns None and ITK reads the file as before, so a file this reader does not
cover is read exactly as it always was. The same inflate checks the labelmaps ``segment`` writes
(``images.py``).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from MedSegUNetLib.imageio import gzip_stream
from MedSegUNetLib.imageio.gzip_stream import CorruptStream, Piece, gzip_inflater, inflated_pieces, slices_of
from MedSegUNetLib.imageio.read_ahead import ReadAhead

HEADER_BYTES = 348  # sizeof_hdr of NIfTI-1
MAX_VOX_OFFSET = 1 << 24  # header extensions beyond this are left to ITK (they would be held in memory here)
# NIfTI-1 datatype codes -> numpy type characters (complex and RGB types are left to ITK)
_DATATYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}


def _voxel_layout(header: bytes) -> Optional[Tuple[np.dtype, Tuple[int, ...], int]]:
    """(file data type with its byte order, dim[1..3], vox_offset) of a plain single-file 3D NIfTI-1
    header without intensity scaling; None for anything else."""
    for order in "<>":
        if struct.unpack(order + "i", header[:4])[0] == HEADER_BYTES:
            break
    else:
        return None
    dims = struct.unpack(order + "8h", header[40:56])
    datatype = struct.unpack(order + "h", header[70:72])[0]
    vox_offset, slope, intercept = struct.unpack(order + "3f", header[108:120])
    plain = header[344:348] == b"n+1\0" and dims[0] == 3 and slope in (0.0, 1.0) and intercept == 0.0
    if (
        not plain
        or datatype not in _DATATYPES
        or not HEADER_BYTES <= vox_offset <= MAX_VOX_OFFSET
        or vox_offset != int(vox_offset)
    ):
        return None
    return np.dtype(order + _DATATYPES[datatype]), tuple(dims[1:4]), int(vox_offset)


class _Differs(Exception):
    """Raised by a consumer to stop the inflate: the stream holds other voxels than expected."""


def _stream_voxels(
    path: Path, size_xyz: Sequence[int], expected: np.dtype, consume: Callable[[np.dtype, int, Piece], None]
) -> bool:
    """Inflate the ``.nii.gz`` at ``path`` and hand its voxel bytes, in order and as they come, to
    ``consume(file_dtype, offset, piece)``: ``file_dtype`` is the voxels' type with the file's byte order.
    The first call comes only once the header is known to be the plain case and to agree with what ITK
    reported (``size_xyz``, ``expected`` type), so a consumer can allocate then.

    False where this reader does not apply (not the plain case, several gzip members, trailing data):
    ITK then reads the file. Raises :class:`CorruptStream` once a plain header has inflated and the voxels
    behind it are cut short or corrupt. The file is never held whole, compressed or not."""
    inflater, error = gzip_inflater()
    head: Optional[bytearray] = bytearray()  # the header as it inflates; None once the voxels have begun
    layout, total, written = None, 0, 0
    output: Piece
    with open(path, "rb") as file, ReadAhead(inflated_pieces(file, inflater), gzip_stream.READ_AHEAD) as pieces:
        try:
            for output in pieces:
                if head is not None:
                    head += output
                    if layout is None and len(head) >= HEADER_BYTES:
                        layout = _voxel_layout(bytes(head[:HEADER_BYTES]))
                        if layout is None or layout[1] != tuple(size_xyz) or layout[0].newbyteorder("=") != expected:
                            return False
                        total = int(np.prod(layout[1], dtype=np.int64)) * layout[0].itemsize
                    if layout is None or len(head) < layout[2]:
                        continue
                    output, head = memoryview(head)[layout[2] :], None
                assert layout is not None  # the header has been read: no voxel comes before it
                if written + len(output) > total:
                    return False
                if output:
                    consume(layout[0], written, output)
                written += len(output)
        except error:
            if layout is None:  # not gzip data at all (ITK also reads an uncompressed file named .nii.gz)
                return False
            raise CorruptStream from None
    if layout is None or (inflater.eof and inflater.unused_data):
        return False  # another gzip member follows (bgzip, pigz) or trailing bytes: ITK reads through them
    if head is None and written == total and inflater.eof:
        return True
    raise CorruptStream  # the stream, or its one gzip member, ends before the voxels its header promises


def read_voxels(path: Path, size_xyz: Sequence[int], expected: np.dtype, allocate: Callable[[], np.ndarray]) -> bool:
    """Inflate the voxels of the ``.nii.gz`` at ``path`` into ``allocate()`` (called once the header is
    known to be the plain case and to agree with ``size_xyz`` and ``expected``; it returns a writable
    flat uint8 array of exactly the voxels' bytes), in the native byte order. Each piece is copied into
    place as it is inflated. False where this reader does not apply; :class:`CorruptStream` for a plain
    file whose voxels are cut short or corrupt (see :func:`_stream_voxels`)."""
    target: List[np.ndarray] = []
    order: List[np.dtype] = []

    def copy(file_dtype: np.dtype, offset: int, piece: Piece) -> None:
        if not target:
            target.append(allocate())
            order.append(file_dtype)
        target[0][offset : offset + len(piece)] = np.frombuffer(piece, np.uint8)

    if not _stream_voxels(path, size_xyz, expected, copy) or not target:
        return False
    if not order[0].isnative:
        target[0].view(order[0]).byteswap(inplace=True)
    return True


def read_slices(path: Path, size_xyz: Sequence[int], expected: np.dtype, consume: Callable[[np.ndarray], None]) -> bool:
    """Inflate the ``.nii.gz`` at ``path`` and hand each of its (y, x) slices, k = 0, 1, ..., to
    ``consume`` as soon as it is whole: a read-only array in the file's byte order, valid only during the
    call. The volume is never held whole (slices that do not straddle two pieces are not even copied).
    False where this reader does not apply, :class:`CorruptStream` for a cut-short or corrupt stream (see
    :func:`_stream_voxels`); ``consume`` may then have seen some slices, which the caller must discard."""
    return slices_of(_stream_voxels, path, size_xyz, expected, consume)


def holds_voxels(path: Path, voxels: np.ndarray) -> bool:
    """True when the ``.nii.gz`` at ``path`` inflates cleanly (one gzip member, its CRC-32 and length
    checked) to a plain NIfTI-1 header of ``voxels``' (z, y, x) shape and type followed by exactly those
    voxels. Each inflated piece is compared as it comes: no second copy of the image is ever held."""
    expected = np.ascontiguousarray(voxels).reshape(-1)

    def compare(file_dtype: np.dtype, offset: int, piece: Piece) -> None:
        size = file_dtype.itemsize  # pieces end anywhere, even inside a voxel: compare bytes
        first, last = offset // size, -(-(offset + len(piece)) // size)
        values = expected[first:last]
        if not file_dtype.isnative:
            values = values.byteswap()  # this piece's voxels only
        start = offset - first * size
        if not np.array_equal(np.frombuffer(piece, np.uint8), values.view(np.uint8)[start : start + len(piece)]):
            raise _Differs

    try:
        return _stream_voxels(path, voxels.shape[::-1], voxels.dtype, compare)
    except (_Differs, CorruptStream):
        return False
