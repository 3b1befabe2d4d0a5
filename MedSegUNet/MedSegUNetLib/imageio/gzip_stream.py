"""Compressed voxel streams: gzip inflated and deflated with ISA-L where installed, in bounded pieces,
and cut into slices as they come (the readers of .nii.gz and .nrrd voxels share these)."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

# Compressed bytes inflated at a time: small enough that the output stays in the cache until copied.
COMPRESSED_CHUNK = 1 << 20
INFLATED_PIECE = 1 << 23  # at most this much inflated at once: 1 MB of a crafted stream can inflate to 1 GB
READ_AHEAD = 1 << 26  # inflated bytes a thread may hold ahead of the copy (read_ahead.py)


def gzip_inflater():
    """A gzip decompressor and its error class: ISA-L's (faster than zlib's) where installed, else zlib's."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib.decompressobj(wbits=31), zlib.error
    return isal_zlib.decompressobj(wbits=31), isal_zlib.error


def gzip_deflater(level: int = 1):
    """A gzip compressor: ISA-L's where installed (levels 0-3; much faster than zlib's at the same level,
    and smaller on labelmaps), else zlib's."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib.compressobj(level, zlib.DEFLATED, 31)
    return isal_zlib.compressobj(min(level, isal_zlib.ISAL_BEST_COMPRESSION), isal_zlib.DEFLATED, 31)


def inflated_pieces(file, inflater) -> Iterator[bytes]:
    """The inflated stream of ``file`` in pieces of at most INFLATED_PIECE bytes."""
    while chunk := file.read(COMPRESSED_CHUNK):
        while chunk:
            yield inflater.decompress(chunk, INFLATED_PIECE)
            chunk = inflater.unconsumed_tail


class CorruptStream(Exception):
    """A plain header inflated (or was read), but the voxels behind it do not: the stream is cut short (a
    truncated download or copy), or fails zlib's checks (corrupt data, a wrong CRC-32). ITK's reader
    would not say so: it fills what is missing with zeros and reports success."""


VoxelStream = Callable[[Path, Sequence[int], np.dtype, Callable[[np.dtype, int, bytes], None]], bool]


def slices_of(
    stream: VoxelStream, path: Path, size_xyz: Sequence[int], expected: np.dtype, consume: Callable[[np.ndarray], None]
) -> bool:
    """The slices of the voxel bytes ``stream`` (nifti_voxels' or nrrd_voxels' stream reader) hands out in pieces, each handed to ``consume`` as nifti_voxels.read_slices says."""
    shape = (int(size_xyz[1]), int(size_xyz[0]))
    pending = bytearray()  # the start of a slice whose end is in the next piece

    def cut(file_dtype: np.dtype, offset: int, piece: bytes) -> None:
        nonlocal pending
        slice_bytes = shape[0] * shape[1] * file_dtype.itemsize
        piece, start = memoryview(piece), 0
        if pending:
            start = min(slice_bytes - len(pending), len(piece))
            pending.extend(piece[:start])
            if len(pending) == slice_bytes:
                consume(np.frombuffer(pending, file_dtype).reshape(shape))
                pending = bytearray()  # not cleared: an array the consumer kept would still use it
        while len(piece) - start >= slice_bytes:
            consume(np.frombuffer(piece[start : start + slice_bytes], file_dtype).reshape(shape))
            start += slice_bytes
        pending.extend(piece[start:])

    return stream(path, size_xyz, expected, cut) and not pending
