"""The voxels of an NRRD file with its data attached (raw or gzip), handed on in pieces as they are read.

The Slicer panel hands the engine its volume as an uncompressed ``.nrrd``. Read whole by ITK, a CT
becomes a full-resolution image (fresh memory and a copy) that is then resampled whole; handed on slice
by slice (gzip_stream.slices_of), it is resampled onto the network grid as it
is read and never held (segment.stream_network_inputs), as a ``.nii.gz`` is. As in nifti_voxels, ITK reads the
header and owns the geometry: this module only supplies the voxels, and only for the plain case (3
dimensions, data in the same file right after the header, no line or byte skips, raw or gzip encoding,
the type and size ITK reported). Anything else returns False and ITK reads the file as before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence, Tuple, Type

import numpy as np

from MedSegUNetLib.imageio import gzip_stream
from MedSegUNetLib.imageio.gzip_stream import (
    CorruptStream,
    Inflater,
    Piece,
    gzip_inflater,
    inflated_pieces,
    slices_of,
)
from MedSegUNetLib.imageio.read_ahead import ReadAhead

RAW_PIECE = 1 << 22  # bytes read at a time from a raw file
GZIP_MAGIC = b"\x1f\x8b"
# NRRD type names (the format's own list) of the integer types: only integer volumes are streamed
_INTEGER_TYPES = {
    "i1": ("signed char", "int8", "int8_t"),
    "u1": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "i4": ("int", "signed int", "int32", "int32_t"),
    "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
    "i8": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
    "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
}
_NUMPY_TYPE = {name: code for code, names in _INTEGER_TYPES.items() for name in names}


def _voxel_layout(path: Path, size_xyz: Sequence[int], expected: np.dtype) -> Optional[Tuple[np.dtype, int, bool]]:
    """(the voxels' type in the file's byte order, where they start, gzip-compressed) of a plain NRRD whose
    header agrees with what ITK reported; None for anything else."""
    import nrrd  # pynrrd parses the header; it comes with slicerio

    try:
        with open(path, "rb") as file:
            header = nrrd.read_header(file)
            offset = file.tell()
    except (OSError, ValueError, nrrd.NRRDError):  # ValueError covers UnicodeDecodeError
        return None
    skips = [int(header.get(field, 0) or 0) for field in ("line skip", "lineskip", "byte skip", "byteskip")]
    code = _NUMPY_TYPE.get(str(header.get("type", "")))
    sizes = [int(size) for size in np.atleast_1d(header.get("sizes", []))]
    encoding = str(header.get("encoding", "")).lower()
    plain = (
        int(header.get("dimension", 0)) == 3
        and sizes == [int(size) for size in size_xyz]
        and not any(skips)
        and "data file" not in header
        and "datafile" not in header
        and encoding in ("raw", "gzip", "gz")
    )
    if not plain or code is None or np.dtype(code) != expected.newbyteorder("="):
        return None
    endian = header.get("endian")
    if expected.itemsize > 1 and endian not in ("little", "big"):
        return None
    order = "<" if endian == "little" else ">" if endian == "big" else "|"
    return np.dtype(order + code), offset, encoding != "raw"


def _raw_pieces(file: BinaryIO, total: int) -> Iterator[bytes]:
    left = total
    while left > 0 and (piece := file.read(min(RAW_PIECE, left))):
        left -= len(piece)
        yield piece


def stream_voxels(
    path: Path, size_xyz: Sequence[int], expected: np.dtype, consume: Callable[[np.dtype, int, Piece], None]
) -> bool:
    """Hand the voxel bytes of the NRRD at ``path``, in order and as they are read (a thread reads or
    inflates ahead), to ``consume(file_dtype, offset, piece)``, as nifti_voxels' reader does for a ``.nii.gz``.

    False where this reader does not apply (not the plain case; a raw file of another length than its
    header says, which ITK then reads and reports; gzip data followed by more). Raises
    :class:`CorruptStream` for gzip data that is cut short or corrupt, or a file that shrinks while read."""
    layout = _voxel_layout(Path(path), size_xyz, expected)
    if layout is None:
        return False
    file_dtype, offset, compressed = layout
    total = int(np.prod([int(s) for s in size_xyz], dtype=np.int64)) * file_dtype.itemsize
    inflater: Optional[Inflater] = None  # set exactly when compressed
    error: Tuple[Type[Exception], ...] = ()  # the inflater's error class; nothing to catch for raw data
    if compressed:
        inflater, inflate_error = gzip_inflater()
        error = (inflate_error,)
    written = 0
    with open(path, "rb") as file:
        if not compressed and os.fstat(file.fileno()).st_size != offset + total:
            return False
        file.seek(offset)
        if compressed and file.read(2) != GZIP_MAGIC:
            return False  # "gzip" data that is not gzip at all: ITK reads it as it is, so it is left to ITK
        file.seek(offset)
        pieces = inflated_pieces(file, inflater) if inflater is not None else _raw_pieces(file, total)
        with ReadAhead(pieces, gzip_stream.READ_AHEAD) as ahead:
            try:
                for piece in ahead:
                    if written + len(piece) > total:
                        return False  # more data than the header says: left to ITK, as a .nii.gz's would be
                    consume(file_dtype, written, piece)
                    written += len(piece)
            except error:
                raise CorruptStream from None
    if inflater is not None and inflater.eof and inflater.unused_data:
        return False  # another gzip member or trailing bytes: ITK reads through them
    if written == total and (inflater is None or inflater.eof):
        return True
    raise CorruptStream


def read_slices(path: Path, size_xyz: Sequence[int], expected: np.dtype, consume: Callable[[np.ndarray], None]) -> bool:
    """Each (y, x) slice of the NRRD at ``path``, k = 0, 1, ..., handed to ``consume`` as soon as it is
    read (nifti_voxels.read_slices says how); False where this reader does not apply."""
    return slices_of(stream_voxels, path, size_xyz, expected, consume)
