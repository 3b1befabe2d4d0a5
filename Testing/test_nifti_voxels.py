"""The ISA-L reader of .nii.gz voxels (nifti_voxels.py) must give exactly what ITK reads, or step aside."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from MedSegUNetLib.core.geometry import Grid
from MedSegUNetLib.imageio.images import read_image
from MedSegUNetLib.imageio.nifti_voxels import read_voxels


def _itk(path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def _fast(path):
    """What the ISA-L reader makes of ``path`` given ITK's own header read (None: left to ITK)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    expected = sitk.GetArrayViewFromImage(sitk.Image(1, 1, 1, reader.GetPixelID())).dtype
    voxels = np.zeros(int(np.prod(reader.GetSize())) * expected.itemsize, np.uint8)
    done = read_voxels(path, reader.GetSize(), expected, lambda: voxels)
    return voxels.view(expected).reshape(reader.GetSize()[::-1]) if done else None


def _assert_read_as_itk_reads(path) -> None:
    ours, itk = read_image(path).image, _itk(path)
    assert Grid.of(ours) == Grid.of(itk)
    itk_values = sitk.GetArrayViewFromImage(itk)
    ours_values = sitk.GetArrayViewFromImage(ours)
    if itk_values.dtype.kind == "f":  # read_image hands floats on as float32 (NaN replaced; none here)
        itk_values = itk_values.astype(np.float32)
    assert ours_values.dtype == itk_values.dtype
    np.testing.assert_array_equal(ours_values, itk_values)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "uint16", "int32", "float32", "float64"])
def test_itk_written_files_read_as_itk_reads_them(tmp_path, dtype):
    rng = np.random.default_rng(0)
    values = (
        rng.normal(0, 1000, (13, 17, 19)) if dtype.startswith("f") else rng.integers(0, 120, (13, 17, 19))
    ).astype(dtype)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-100.0, 33.0, 7.5))
    angle = np.deg2rad(15)  # oblique, with a flipped axis: the geometry is ITK's, whatever it is
    image.SetDirection((np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, -1.0))
    path = tmp_path / "volume.nii.gz"
    sitk.WriteImage(image, str(path), useCompression=True)
    fast = _fast(path)
    assert fast is not None and fast.dtype == np.dtype(dtype)  # the ISA-L reader is what ran
    np.testing.assert_array_equal(fast, values)
    _assert_read_as_itk_reads(path)


def test_big_endian_files_and_header_extensions(tmp_path):
    """nibabel writes big-endian files and header extensions (vox_offset beyond 352) on request."""
    values = np.random.default_rng(1).integers(-1000, 1000, (11, 12, 13)).astype(np.int16)
    header = nib.Nifti1Header(endianness=">")
    header.set_data_dtype(">i2")
    affine = np.diag([-0.8, -0.8, 1.5, 1.0])
    big = nib.Nifti1Image(values.transpose(2, 1, 0), affine, header)  # nibabel arrays are (x, y, z)
    big.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment that moves the voxels" * 9))
    big.header.set_slope_inter(1.0, 0.0)
    path = tmp_path / "big.nii.gz"
    nib.save(big, str(path))
    with gzip.open(path) as file:
        head = file.read(348)
    assert head[:4] == (348).to_bytes(4, "big") and np.frombuffer(head[108:112], ">f4")[0] > 352
    fast = _fast(path)
    assert fast is not None and fast.dtype == np.int16 and fast.dtype.isnative
    np.testing.assert_array_equal(fast, values)
    _assert_read_as_itk_reads(path)


def test_what_the_fast_reader_does_not_cover_is_left_to_itk(tmp_path):
    values = np.random.default_rng(2).integers(0, 200, (9, 10, 11)).astype(np.int16)
    scaled = nib.Nifti1Image(values.transpose(2, 1, 0), np.eye(4))
    scaled.header.set_slope_inter(0.5, -10.0)  # ITK applies the scaling and reads float voxels
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    plain = tmp_path / "plain.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(plain), useCompression=True)
    raw = gzip.decompress(plain.read_bytes())
    # Two gzip members (as pigz or bgzip may write): zlib's reader in ITK reads through both.
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    (tmp_path / "trailing.nii.gz").write_bytes(plain.read_bytes() + b"\0" * 8)
    for name in ("scaled", "members", "trailing"):
        assert _fast(tmp_path / f"{name}.nii.gz") is None, name
    for name in ("scaled", "members"):
        _assert_read_as_itk_reads(tmp_path / f"{name}.nii.gz")
    assert sitk.GetArrayFromImage(read_image(tmp_path / "scaled.nii.gz").image)[3, 4, 5] == values[3, 4, 5] * 0.5 - 10
    # An uncompressed file named .nii.gz: ITK reads it as it is (zlib passes non-gzip data through).
    (tmp_path / "uncompressed.nii.gz").write_bytes(raw)
    assert _fast(tmp_path / "uncompressed.nii.gz") is None
    _assert_read_as_itk_reads(tmp_path / "uncompressed.nii.gz")


@pytest.mark.parametrize("damage", ["cut in the voxels", "cut in the trailer", "a flipped byte", "a short member"])
def test_a_cut_short_or_corrupt_nifti_gz_is_refused_where_itk_would_fill_in_zeros(tmp_path, damage):
    """ITK reads a .nii.gz cut short without complaint, the missing voxels as zeros; the ISA-L reader
    checks the stream to its end (length, CRC-32) and read_image reports the file instead."""
    from MedSegUNetLib.core.errors import MedSegError
    from MedSegUNetLib.imageio.gzip_stream import CorruptStream

    # large enough that zlib in ITK's header read does not reach the damage (it does in a small file)
    values = np.random.default_rng(7).integers(-1000, 1000, (64, 128, 128)).astype(np.int16)
    plain = tmp_path / "plain.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(plain), useCompression=True)
    data = bytearray(plain.read_bytes())
    if damage == "cut in the voxels":
        data = data[: len(data) // 2]
        itk = sitk.GetArrayViewFromImage(_itk(_write(tmp_path / "itk.nii.gz", data)))
        assert itk.shape == values.shape and (itk != values).any(), "ITK fills in silently: what this guards against"
    elif damage == "cut in the trailer":
        data = data[:-4]  # every voxel there, the length check gone
    elif damage == "a flipped byte":
        data[len(data) * 3 // 4] ^= 0xFF
    else:  # one complete gzip member holding fewer voxels than the header says
        data = bytearray(gzip.compress(gzip.decompress(bytes(data))[:-100]))
    bad = _write(tmp_path / "bad.nii.gz", data)
    with pytest.raises(CorruptStream):
        _fast(bad)
    with pytest.raises(MedSegError, match="truncated or corrupt"):
        read_image(bad)


def _write(path, data) -> object:
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "affine",
    [
        [[0.0, 0.0, 2.0, -30.0], [-0.9, 0.0, 0.0, 12.0], [0.0, 1.1, 0.0, 4.0]],  # axes permuted and flipped
        [[0.7, 0.3, 0.0, 5.0], [-0.3, 0.7, 0.0, -5.0], [0.0, 0.0, -1.5, 60.0]],  # oblique, z flipped
    ],
)
def test_any_orientation_nibabel_writes_reads_as_itk_reads_it(tmp_path, affine):
    """Whatever the affine, ITK hands the voxels over in file order and puts the orientation in the
    direction matrix; the ISA-L reader must agree voxel for voxel."""
    values = np.random.default_rng(3).integers(-500, 500, (7, 8, 9)).astype(np.int16)
    image = nib.Nifti1Image(values.transpose(2, 1, 0), np.vstack([affine, [0, 0, 0, 1]]))
    path = tmp_path / "oriented.nii.gz"
    nib.save(image, str(path))
    assert _fast(path) is not None
    _assert_read_as_itk_reads(path)


def test_a_stream_inflating_far_beyond_its_header_is_refused_in_bounded_memory(tmp_path):
    """A crafted .nii.gz whose header claims 1000 voxels but whose gzip stream inflates to 200 MB more
    (a few hundred kB compressed): refused, without ever holding more than a bounded piece of it."""
    import tracemalloc

    from MedSegUNetLib.imageio.gzip_stream import INFLATED_PIECE, READ_AHEAD

    plain = tmp_path / "plain.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 10, 10), np.int16)), str(plain))
    stream = plain.read_bytes() + bytes(200 * 2**20)
    compressor = __import__("zlib").compressobj(1, wbits=31)
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(compressor.compress(stream) + compressor.flush())
    del stream
    assert bomb.stat().st_size < 2**20
    tracemalloc.start()
    try:
        assert _fast(bomb) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert READ_AHEAD + 3 * INFLATED_PIECE + 2**20 < 200 * 2**20
    assert peak < READ_AHEAD + 3 * INFLATED_PIECE + 2**20  # the read-ahead and a few pieces, not the 200 MB


def _save_in_byte_order(values: np.ndarray, byte_order: str, path):
    """``values`` (z, y, x) as a .nii.gz stored little- (``"<"``) or big-endian (``">"``), identity affine."""
    header = nib.Nifti1Header(endianness=byte_order)
    header.set_data_dtype(values.dtype.newbyteorder(byte_order))
    nib.save(nib.Nifti1Image(values.transpose(2, 1, 0), np.eye(4), header), str(path))  # nibabel arrays are (x, y, z)
    return path


def _pieces_of(monkeypatch, compressed: int, inflated: int) -> None:
    """Make the streamed inflate hand out tiny pieces: with odd sizes they end inside voxels."""
    import MedSegUNetLib.imageio.gzip_stream as gzip_stream

    monkeypatch.setattr(gzip_stream, "COMPRESSED_CHUNK", compressed)
    monkeypatch.setattr(gzip_stream, "INFLATED_PIECE", inflated)


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_a_written_file_is_compared_piece_by_piece_even_where_pieces_split_voxels(tmp_path, monkeypatch, byte_order):
    """holds_voxels (the check of every labelmap segment writes) compares each inflated piece with the
    expected voxels as it comes: pieces of 333 bytes end inside 2-byte voxels, and a file in the other
    byte order holds the same values. One voxel changed anywhere, even across a piece boundary, is caught."""
    from MedSegUNetLib.imageio.nifti_voxels import holds_voxels

    values = np.random.default_rng(2).integers(0, 40000, (9, 10, 11)).astype(np.uint16)
    path = _save_in_byte_order(values, byte_order, tmp_path / "labels.nii.gz")
    _pieces_of(monkeypatch, compressed=101, inflated=333)
    from MedSegUNetLib.imageio.nifti_voxels import _stream_voxels

    offsets = []
    assert _stream_voxels(path, values.shape[::-1], values.dtype, lambda dtype, offset, piece: offsets.append(offset))
    assert any(offset % 2 for offset in offsets), "no piece split a voxel: the test would not test that"
    assert holds_voxels(path, values)
    for flat_index in range(values.size):  # every voxel, those split across two pieces among them
        other = values.copy().reshape(-1)
        other[flat_index] ^= 0x0100 if flat_index % 2 else 0x0001  # one byte of the two
        assert not holds_voxels(path, other.reshape(values.shape)), flat_index
    assert not holds_voxels(path, values[:, :, :10].copy()), "another size"
    assert not holds_voxels(path, values.astype(np.int32)), "another type"


def test_checking_a_written_file_holds_no_second_image(tmp_path):
    """The check inflates a 160 MB labelmap without ever holding more than the read-ahead and a few pieces."""
    import tracemalloc

    from MedSegUNetLib.imageio.gzip_stream import INFLATED_PIECE, READ_AHEAD
    from MedSegUNetLib.imageio.nifti_voxels import holds_voxels

    values = np.zeros((640, 512, 512), np.uint8)
    values[100:150, 200:300, 100:400] = 3
    path = tmp_path / "big-labels.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path), useCompression=True)
    tracemalloc.start()
    try:
        assert holds_voxels(path, values)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < READ_AHEAD + 3 * INFLATED_PIECE + 2**20 < values.nbytes  # not a second image


def test_a_cancel_while_inflating_stops_the_read_ahead_and_closes_the_file(tmp_path, monkeypatch):
    """SIGTERM (the panel's Cancel) raises Cancelled wherever the main thread is; raised while the
    image is being filled, it propagates, the read-ahead thread is stopped and joined, and the file is
    closed (no descriptor left behind); the next read of the file works."""
    import os
    import threading

    import MedSegUNetLib.imageio.gzip_stream as gzip_stream
    from MedSegUNetLib.core.errors import Cancelled

    _pieces_of(monkeypatch, compressed=4096, inflated=8192)  # about 40 pieces ...
    monkeypatch.setattr(gzip_stream, "READ_AHEAD", 16384)  # ... and the thread waits two ahead: it is mid-stream
    values = np.random.default_rng(4).integers(-1000, 1000, (40, 64, 64)).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path), useCompression=True)
    threads, descriptors = threading.active_count(), len(os.listdir("/proc/self/fd"))

    class CancelledOnTheThirdPiece(np.ndarray):
        """The image buffer, as if SIGTERM arrived while its third piece was being copied in."""

        pieces = 0

        def __setitem__(self, index, value):
            type(self).pieces += 1
            if type(self).pieces == 3:
                raise Cancelled("stopped by signal SIGTERM")
            super().__setitem__(index, value)

    buffer = np.zeros(values.nbytes, np.uint8).view(CancelledOnTheThirdPiece)
    with pytest.raises(Cancelled):
        read_voxels(path, values.shape[::-1], values.dtype, lambda: buffer)
    assert CancelledOnTheThirdPiece.pieces == 3
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) == descriptors
    np.testing.assert_array_equal(_fast(path), values)


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_slices_are_handed_out_whole_even_where_pieces_split_them(tmp_path, monkeypatch, byte_order):
    """read_slices (segment's resampling while it reads) hands out every (y, x) slice once, in order, in
    the file's byte order: pieces of 333 bytes end inside slices of 220 bytes and inside voxels."""
    from MedSegUNetLib.imageio.nifti_voxels import read_slices

    values = np.random.default_rng(4).integers(-3000, 3000, (9, 10, 11)).astype(np.int16)
    path = _save_in_byte_order(values, byte_order, tmp_path / "ct.nii.gz")
    _pieces_of(monkeypatch, compressed=101, inflated=333)
    slices = []
    assert read_slices(path, values.shape[::-1], np.dtype(np.int16), lambda s: slices.append((s.dtype, s.copy())))
    assert len(slices) == values.shape[0]
    assert all(dtype == np.dtype(byte_order + "i2") for dtype, _ in slices)
    np.testing.assert_array_equal(np.stack([s for _, s in slices]).astype(np.int16), values)
    kept = []  # a consumer may keep the arrays themselves: later pieces must not overwrite them
    assert read_slices(path, values.shape[::-1], np.dtype(np.int16), kept.append)
    np.testing.assert_array_equal(np.stack(kept).astype(np.int16), values)


def test_a_truncated_stream_of_slices_is_reported(tmp_path):
    from MedSegUNetLib.imageio.nifti_voxels import read_slices

    values = np.random.default_rng(5).integers(0, 100, (6, 7, 8)).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path), useCompression=True)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(path.read_bytes()[:-30])
    from MedSegUNetLib.imageio.gzip_stream import CorruptStream
    from MedSegUNetLib.imageio.nifti_voxels import holds_voxels

    with pytest.raises(CorruptStream):  # was False (then ITK read it, zeros for what is missing)
        read_slices(cut, values.shape[::-1], np.dtype(np.int16), lambda s: None)
    assert not holds_voxels(cut, values), "a written file cut short fails its check"
    assert not read_slices(path, (8, 7, 5), np.dtype(np.int16), lambda s: None), "another size than the header's"


def test_stream_image_slices_applies_to_integer_nifti_gz_only(tmp_path):
    """imageio.stream_image_slices: a plain integer .nii.gz is streamed with ITK's grid; floats (whose NaN
    need the whole volume), other formats (but NRRD: test_nrrd_voxels.py) and a corrupt stream are left to
    read_image (None); a header
    read_image refuses is refused with the same one-line error."""
    from MedSegUNetLib.core.errors import MedSegError
    from MedSegUNetLib.imageio.images import stream_image_slices

    values = np.random.default_rng(6).integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 0.8, 2.0))
    image.SetOrigin((1.0, -2.0, 3.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    paths = {}
    for name, stored in (("ct.nii.gz", image), ("float.nii.gz", sitk.Cast(image, sitk.sitkFloat32)), ("ct.mha", image)):
        paths[name] = tmp_path / name
        sitk.WriteImage(stored, str(paths[name]), useCompression=True)
    slices, grids = [], []

    def start(grid):
        grids.append(grid)
        return slices.append

    assert stream_image_slices(paths["ct.nii.gz"], start) == Grid.of(read_image(paths["ct.nii.gz"]).image) == grids[0]
    np.testing.assert_array_equal(np.stack(slices), values)
    assert stream_image_slices(paths["float.nii.gz"], start) is None
    assert stream_image_slices(paths["ct.mha"], start) is None
    assert stream_image_slices(tmp_path / "missing.nii.gz", start) is None
    two_members = tmp_path / "two-members.nii.gz"  # a second gzip member after the voxels: not the plain case
    two_members.write_bytes(paths["ct.nii.gz"].read_bytes() + gzip.compress(b"more"))
    assert stream_image_slices(two_members, start) is None
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values[:1]), str(flat), useCompression=True)
    with pytest.raises(MedSegError, match="2D image"):
        stream_image_slices(flat, start)


def test_a_ct_resampled_as_it_inflates_is_never_held_whole(tmp_path, monkeypatch):
    """segment's read of a single .nii.gz (stream_network_inputs): the 78 MB volume goes to the network grid
    slice by slice; what is held at once is the read-ahead, a few pieces and slices, and the coarse grid."""
    from conftest import streamed_onto_a_coarse_grid

    import MedSegUNetLib.imageio.gzip_stream as gzip_stream

    monkeypatch.setattr(gzip_stream, "READ_AHEAD", 4 * 2**20)
    monkeypatch.setattr(gzip_stream, "INFLATED_PIECE", 2**20)
    result, peak, volume_bytes = streamed_onto_a_coarse_grid(tmp_path / "ct.nii.gz", compressed=True)
    # the read-ahead's bytes, the pieces on their way (inflated, queued, being cut), the coarse grid
    assert peak < gzip_stream.READ_AHEAD + 4 * gzip_stream.INFLATED_PIECE + result.nbytes + 2**20 < volume_bytes / 5
