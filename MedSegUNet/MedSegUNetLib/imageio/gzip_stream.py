"""Compressed voxel streams: gzip inflated and deflated with ISA-L where installed, in bounded pieces,
and cut into slices as they come (the readers of .nii.gz and .nrrd voxels share these)."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator, Protocol, Sequence, Tuple, Type, Union

import numpy as np

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

# Compressed bytes inflated at a time: small enough that the output stays in the cache until copied.
COMPRESSED_CHUNK = 1 << 20
INFLATED_PIECE = 1 << 23  # at most this much inflated at once: 1 MB of a crafted stream can inflate to 1 GB
READ_AHEAD = 1 << 26  # inflated bytes a thread may hold ahead of the copy (read_ahead.py)

Piece = Union[bytes, memoryview]  # voxel bytes as read or inflated, or a view of them


class Inflater(Protocol):
    """A gzip decompressor as :func:`gzip_inflater` makes it (zlib's and ISA-L's have these in common)."""

    @property
    def unconsumed_tail(self) -> bytes: ...

    @property
    def unused_data(self) -> bytes: ...

    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes, /, max_length: int = ...) -> bytes: ...


class Deflater(Protocol):
    """A gzip compressor as :func:`gzip_deflater` makes it (zlib's or ISA-L's)."""

    def compress(self, data: ReadableBuffer, /) -> bytes: ...

    def flush(self, mode: int = ..., /) -> bytes: ...


def gzip_inflater() -> Tuple[Inflater, Type[Exception]]:
    """A gzip decompressor and its error class: ISA-L's (faster than zlib's) where installed, else zlib's."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib.decompressobj(wbits=31), zlib.error
    # isal's stub declares ``error`` as an Exception instance; it is the exception class (zlib.error's kin)
    return isal_zlib.decompressobj(wbits=31), isal_zlib.error  # type: ignore[return-value]


def gzip_deflater(level: int = 1) -> Deflater:
    """A gzip compressor: ISA-L's where installed (levels 0-3; much faster than zlib's at the same level,
    and smaller on labelmaps), else zlib's."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib.compressobj(level, zlib.DEFLATED, 31)
    return isal_zlib.compressobj(min(level, isal_zlib.ISAL_BEST_COMPRESSION), isal_zlib.DEFLATED, 31)


def inflated_pieces(file: BinaryIO, inflater: Inflater) -> Iterator[bytes]:
    """The inflated stream of ``file`` in pieces of at most INFLATED_PIECE bytes."""
    while chunk := file.read(COMPRESSED_CHUNK):
        while chunk:
            yield inflater.decompress(chunk, INFLATED_PIECE)
            chunk = inflater.unconsumed_tail


class CorruptStream(Exception):
    """A plain header inflated (or was read), but the voxels behind it do not: the stream is cut short (a
    truncated download or copy), or fails zlib's checks (corrupt data, a wrong CRC-32). ITK's reader
    would not say so: it fills what is missing with zeros and reports success."""


VoxelStream = Callable[[Path, Sequence[int], np.dtype, Callable[[np.dtype, int, Piece], None]], bool]


def slices_of(
    stream: VoxelStream, path: Path, size_xyz: Sequence[int], expected: np.dtype, consume: Callable[[np.ndarray], None]
) -> bool:
    """The slices of the voxel bytes ``stream`` (nifti_voxels' or nrrd_voxels' stream reader) hands out in
    pieces, each handed to ``consume`` as nifti_voxels.read_slices says."""
    shape = (int(size_xyz[1]), int(size_xyz[0]))
    pending = bytearray()  # the start of a slice whose end is in the next piece

    def cut(file_dtype: np.dtype, offset: int, piece: Piece) -> None:
        nonlocal pending
        slice_bytes = shape[0] * shape[1] * file_dtype.itemsize
        view, start = memoryview(piece), 0
        if pending:
            start = min(slice_bytes - len(pending), len(view))
            pending.extend(view[:start])
            if len(pending) == slice_bytes:
                consume(np.frombuffer(pending, file_dtype).reshape(shape))
                pending = bytearray()  # not cleared: an array the consumer kept would still use it
        while len(view) - start >= slice_bytes:
            consume(np.frombuffer(view[start : start + slice_bytes], file_dtype).reshape(shape))
            start += slice_bytes
        pending.extend(view[start:])

    return stream(path, size_xyz, expected, cut) and not pending
