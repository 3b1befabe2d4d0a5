"""The NRRD slice reader (imageio/nrrd_voxels.py) must hand out exactly the voxels ITK reads, or step aside."""

from __future__ import annotations

import gzip

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import slicerio_data

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.geometry import Grid
from MedSegUNetLib.imageio.gzip_stream import CorruptStream
from MedSegUNetLib.imageio.images import read_image, stream_image_slices
from MedSegUNetLib.imageio.nrrd_voxels import read_slices


def _slices(path):
    """(grid, stacked slices) as stream_image_slices hands them out; None where it steps aside."""
    slices, grids = [], []

    def start(grid):
        grids.append(grid)
        return lambda s: slices.append(s.astype(s.dtype.newbyteorder("=")))

    grid = stream_image_slices(path, start)
    return None if grid is None else (grid, np.stack(slices))


def _assert_streamed_as_itk_reads(path) -> np.ndarray:
    streamed = _slices(path)
    assert streamed is not None, f"{path.name} was not streamed"
    itk = sitk.ReadImage(str(path))
    assert streamed[0] == Grid.of(read_image(path).image) and streamed[0].matches(Grid.of(itk))
    assert streamed[1].dtype == sitk.GetArrayViewFromImage(itk).dtype
    np.testing.assert_array_equal(streamed[1], sitk.GetArrayViewFromImage(itk))
    return streamed[1]


def _ct(dtype="int16", shape=(9, 10, 11), seed=0) -> sitk.Image:
    info = np.iinfo(dtype)
    values = (
        np.random.default_rng(seed)
        .integers(max(info.min, -3000), min(info.max, 3000), shape, endpoint=True)
        .astype(dtype)
    )
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-100.0, 33.0, 7.5))
    angle = np.deg2rad(20)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, -1.0))
    return image


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64"])
def test_itk_written_nrrd_streams_as_itk_reads_it(tmp_path, dtype, compressed):
    path = tmp_path / "ct.nrrd"
    image = _ct(dtype)
    sitk.WriteImage(image, str(path), useCompression=compressed)
    assert (b"encoding: gzip" if compressed else b"encoding: raw") in path.read_bytes()[:600]
    np.testing.assert_array_equal(_assert_streamed_as_itk_reads(path), sitk.GetArrayViewFromImage(image))


def test_slicers_own_files_and_a_big_endian_one(tmp_path):
    """CTChest4.nrrd (Slicer-saved, gzip); pynrrd writes big-endian data with `endian: big` on request."""
    _assert_streamed_as_itk_reads(slicerio_data("CTChest4.nrrd"))
    values = np.random.default_rng(1).integers(-1000, 1000, (6, 7, 8)).astype(np.int16)  # (k, j, i)
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.8, 0.8, 1.5]),
        "space origin": np.zeros(3),
        "encoding": "raw",
    }
    for encoding in ("raw", "gzip"):
        path = tmp_path / f"big-{encoding}.nrrd"
        nrrd.write(str(path), values.transpose(2, 1, 0).astype(">i2"), dict(header, encoding=encoding))
        assert b"endian: big" in path.read_bytes()[:400]
        np.testing.assert_array_equal(_assert_streamed_as_itk_reads(path), values)


@pytest.mark.parametrize("compressed", [False, True])
def test_slices_are_handed_out_whole_even_where_pieces_split_them(tmp_path, monkeypatch, compressed):
    """Pieces of 333 bytes end inside slices of 220 bytes and inside voxels; a consumer may keep the arrays."""
    import MedSegUNetLib.imageio.gzip_stream as gzip_stream
    import MedSegUNetLib.imageio.nrrd_voxels as nrrd_voxels

    monkeypatch.setattr(nrrd_voxels, "RAW_PIECE", 333)
    monkeypatch.setattr(gzip_stream, "COMPRESSED_CHUNK", 101)
    monkeypatch.setattr(gzip_stream, "INFLATED_PIECE", 333)
    monkeypatch.setattr(gzip_stream, "READ_AHEAD", 1000)
    image = _ct("int16", (9, 10, 11), seed=4)
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(path), useCompression=compressed)
    kept = []
    assert read_slices(path, image.GetSize(), np.dtype(np.int16), kept.append)
    assert len(kept) == 9 and all(s.shape == (10, 11) for s in kept)
    np.testing.assert_array_equal(np.stack(kept), sitk.GetArrayViewFromImage(image))


def _header_and_data(path):
    raw = path.read_bytes()
    end = raw.index(b"\n\n") + 2
    return raw[:end].decode(), raw[end:]


def test_what_the_reader_does_not_cover_is_left_to_itk(tmp_path):
    """Detached data, skips, other encodings, floats, a size or type other than ITK's, a raw file of
    another length than its header says, a second gzip member: not streamed (None), and read_image still
    reads what ITK reads."""
    image = _ct("int16", (5, 6, 7), seed=2)
    plain = tmp_path / "plain.nrrd"
    sitk.WriteImage(image, str(plain), useCompression=False)
    header, data = _header_and_data(plain)
    values = sitk.GetArrayViewFromImage(image)
    variants = {
        "skip.nrrd": (header.replace("encoding: raw\n", "encoding: raw\nbyte skip: 4\n"), b"skip" + data),
        "lines.nrrd": (header.replace("encoding: raw\n", "encoding: raw\nline skip: 1\n"), b"a line\n" + data),
        "ascii.nrrd": (
            header.replace("encoding: raw", "encoding: ascii"),
            " ".join(map(str, values.reshape(-1))).encode(),
        ),
        "trailing.nrrd": (header, data + b"\0\0"),  # ITK reads the voxels it needs
        "two-members.nrrd": (
            header.replace("encoding: raw", "encoding: gzip"),
            gzip.compress(data[:100]) + gzip.compress(data[100:]),
        ),
        "not-gzip.nrrd": (header.replace("encoding: raw", "encoding: gzip"), data),  # ITK reads it as raw
    }
    for name, (text, payload) in variants.items():
        (tmp_path / name).write_bytes(text.encode() + payload)
    detached = tmp_path / "detached.nhdr"
    (tmp_path / "detached.raw").write_bytes(data)
    detached.write_text(header.rstrip("\n") + "\ndata file: detached.raw\n\n")
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(tmp_path / "float.nrrd"))
    for name in [*variants, "detached.nhdr", "float.nrrd"]:
        path = tmp_path / name
        assert _slices(path) is None, name
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(read_image(path).image).astype(np.int16), values, err_msg=name
        )
    streamed = []
    assert read_slices(plain, image.GetSize(), np.dtype(np.int16), streamed.append)  # the plain file itself is streamed
    assert not read_slices(plain, (7, 6, 4), np.dtype(np.int16), streamed.append), "another size than the header's"
    assert not read_slices(plain, image.GetSize(), np.dtype(np.uint16), streamed.append), (
        "another type than the header's"
    )


def test_cut_short_or_corrupt_data_is_reported_not_zero_filled(tmp_path):
    """gzip data cut short or corrupt: CorruptStream, which segment reports as one line; a raw file cut
    short is left to ITK, which refuses it (read_image's one-line error)."""
    image = _ct("int16", (6, 7, 8), seed=3)
    for compressed in (True, False):
        whole = tmp_path / f"whole-{compressed}.nrrd"
        sitk.WriteImage(image, str(whole), useCompression=compressed)
        cut = tmp_path / f"cut-{compressed}.nrrd"
        cut.write_bytes(whole.read_bytes()[:-30])
        if compressed:
            with pytest.raises(CorruptStream):
                read_slices(cut, image.GetSize(), np.dtype(np.int16), lambda s: None)
            with pytest.raises(MedSegError, match="truncated or corrupt"):
                stream_image_slices(cut, lambda grid: lambda s: None)
            header, data = _header_and_data(whole)
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            corrupt = tmp_path / "corrupt.nrrd"
            corrupt.write_bytes(header.encode() + bytes(flipped))
            with pytest.raises(MedSegError, match="truncated or corrupt"):
                stream_image_slices(corrupt, lambda grid: lambda s: None)
        else:
            assert _slices(cut) is None
            with pytest.raises(MedSegError, match=cut.name):
                read_image(cut)


def test_a_raw_ct_resampled_as_it_is_read_is_never_held_whole(tmp_path, monkeypatch):
    """What the Slicer panel hands the engine: a raw .nrrd goes to the network grid slice by slice; held at
    once are the read-ahead, a few pieces and slices, and the coarse grid, never the 78 MB volume."""
    from conftest import streamed_onto_a_coarse_grid

    import MedSegUNetLib.imageio.gzip_stream as gzip_stream
    import MedSegUNetLib.imageio.nrrd_voxels as nrrd_voxels

    monkeypatch.setattr(gzip_stream, "READ_AHEAD", 4 * 2**20)
    monkeypatch.setattr(nrrd_voxels, "RAW_PIECE", 2**20)
    result, peak, volume_bytes = streamed_onto_a_coarse_grid(tmp_path / "ct.nrrd", compressed=False)
    assert peak < gzip_stream.READ_AHEAD + 4 * nrrd_voxels.RAW_PIECE + result.nbytes + 2**20 < volume_bytes / 5
