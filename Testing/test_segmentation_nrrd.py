"""The .seg.nrrd writer (segmentation_nrrd.py) must write what slicerio writes for the same segments, readably by
slicerio, pynrrd and ITK, with each segment's exact extent."""

from __future__ import annotations

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from scipy.ndimage import find_objects

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.geometry import Grid, ijk_array, ijk_to_lps
from MedSegUNetLib.core.labels import Label
from MedSegUNetLib.imageio.images import write_segmentation

TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
    "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
)


def _labels(high_value: int = 4):
    return [
        Label(1, "liver", (0.867, 0.51, 0.396), TERMINOLOGY),
        Label(2, "a lesion", (1.0, 0.0, 0.0)),
        Label(3, "never found", (0.0, 0.5, 1.0)),  # an empty segment: Slicer keeps it, with an empty extent
        Label(high_value, "kidney", (0.725, 0.4, 0.325)),
    ]


def _label_image(high_value: int = 4) -> sitk.Image:
    values = np.zeros((11, 13, 17), np.uint16 if high_value > 255 else np.uint8)  # (k, j, i)
    values[2:9, 3:10, 4:12] = 1
    values[5, 6, 7] = 2
    values[10, 0, 16] = high_value  # a corner voxel: in the last slab only
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-100.5, 33.25, 7.5))
    angle = np.deg2rad(25)  # oblique, one axis flipped
    image.SetDirection((np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, -1.0))
    return image


def _slicerio_description(image: sitk.Image, labels) -> dict:
    """What slicerio.write_segmentation is given for these segments (the writer this module replaced)."""
    voxels = sitk.GetArrayFromImage(image)
    boxes = find_objects(voxels, max_label=max(label.value for label in labels))
    segments = []
    for label in labels:
        box = boxes[label.value - 1] if label.value <= len(boxes) else None
        extent = (
            [0, -1, 0, -1, 0, -1]
            if box is None
            else [box[2].start, box[2].stop - 1, box[1].start, box[1].stop - 1, box[0].start, box[0].stop - 1]
        )
        segment = {
            "id": f"Segment_{label.value}",
            "name": label.name,
            "color": [float(c) for c in label.color],
            "labelValue": label.value,
            "layer": 0,
            "extent": extent,
        }
        if label.terminology:
            segment["tags"] = {"TerminologyEntry": label.terminology}
        segments.append(segment)
    return {
        "voxels": ijk_array(image),
        "ijkToLPS": ijk_to_lps(image),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
    }


def _same_field(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.asarray(a).shape == np.asarray(b).shape and np.allclose(
            np.asarray(a, float), np.asarray(b, float), equal_nan=True, rtol=0, atol=0
        )
    return a == b


@pytest.mark.parametrize("high_value", [4, 300])
def test_the_file_is_what_slicerio_writes_for_the_same_segments(tmp_path, high_value):
    image, labels = _label_image(high_value), _labels(high_value)
    ours, theirs = tmp_path / "ours.seg.nrrd", tmp_path / "slicerio.seg.nrrd"
    write_segmentation(ours, image, labels)
    slicerio.write_segmentation(str(theirs), _slicerio_description(image, labels))
    ours_header, their_header = nrrd.read_header(str(ours)), nrrd.read_header(str(theirs))
    assert list(ours_header) == list(their_header)  # the same fields, in the same order
    different = [key for key in ours_header if not _same_field(ours_header[key], their_header[key])]
    assert not different, {key: (ours_header[key], their_header[key]) for key in different}
    assert ours_header["type"] == ("uint16" if high_value > 255 else "uint8")
    assert ours_header["Segment2_Extent"] == "0 -1 0 -1 0 -1" and ours_header["Segment3_Extent"] == "16 16 0 0 10 10"

    read_ours, read_theirs = slicerio.read_segmentation(str(ours)), slicerio.read_segmentation(str(theirs))
    np.testing.assert_array_equal(read_ours["voxels"], read_theirs["voxels"])
    np.testing.assert_array_equal(read_ours["ijkToLPS"], read_theirs["ijkToLPS"])
    assert read_ours["segments"] == read_theirs["segments"]
    assert [s["name"] for s in read_ours["segments"]] == [label.name for label in labels]
    assert read_ours["segments"][0]["terminology"]["type"] == ["SCT", "10200004", "Liver"]

    itk = sitk.ReadImage(str(ours))  # how Slicer itself reads it (ITK's NRRD reader, gzip through zlib)
    assert Grid.of(itk).matches(Grid.of(image), tolerance=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk), sitk.GetArrayFromImage(image))


def test_a_name_beyond_ascii_is_written_as_utf8_as_slicer_reads_it(tmp_path):
    """pynrrd (slicerio's writer) refuses anything but ASCII; Slicer reads the header through ITK as UTF-8."""
    labels = [Label(1, "foie, lésion", (1.0, 0.0, 0.0)), Label(4, "肾", (0.0, 1.0, 0.0))]
    path = write_segmentation(tmp_path / "utf8.seg.nrrd", _label_image(), labels)
    itk = sitk.ImageFileReader()
    itk.SetFileName(str(path))
    itk.ReadImageInformation()
    assert [itk.GetMetaData(f"Segment{i}_Name") for i in range(2)] == ["foie, lésion", "肾"]


def test_names_beyond_ascii_come_back_whole_to_training_and_evaluate(tmp_path):
    """slicerio (through pynrrd) drops non-ASCII characters from names ("lésion" -> "lsion"): the scene
    reader of training and evaluate's segment matching take them from the header as UTF-8."""
    from MedSegUNetLib.commands.evaluate import _segmentation_masks
    from MedSegUNetLib.imageio.segmentation_nrrd import segment_names
    from training.scenes import read_segments

    labels = [Label(1, "foie, lésion", (1.0, 0.0, 0.0)), Label(4, "肾", (0.0, 1.0, 0.0))]
    path = write_segmentation(tmp_path / "utf8.seg.nrrd", _label_image(), labels)
    assert slicerio.read_segmentation(str(path), skip_voxels=True)["segments"][0]["name"] == "foie, lsion"  # why
    assert segment_names(path) == {"Segment_1": "foie, lésion", "Segment_4": "肾"}
    assert [segment.name for segment in read_segments(path)] == ["foie, lésion", "肾"]
    assert sorted(_segmentation_masks(path).display.values()) == ["foie, lésion", "肾"]
    assert segment_names(tmp_path / "missing.seg.nrrd") == {}


def test_a_label_image_of_another_type_is_cast_and_a_larger_one_compresses(tmp_path):
    image = sitk.Cast(_label_image(), sitk.sitkInt32)
    path = write_segmentation(tmp_path / "cast.seg.nrrd", image, _labels())
    assert nrrd.read_header(str(path))["type"] == "uint8"
    np.testing.assert_array_equal(
        slicerio.read_segmentation(str(path))["voxels"], ijk_array(sitk.Cast(image, sitk.sitkUInt8))
    )
    big = sitk.GetImageFromArray(np.repeat(np.arange(5, dtype=np.uint8), 600_000).reshape(30, 400, 250))
    path = write_segmentation(tmp_path / "big.seg.nrrd", big, _labels())  # several pieces of DEFLATED_PIECE
    assert path.stat().st_size < 100_000
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), sitk.GetArrayFromImage(big))


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("slices", [1, 2, 7, 40])
def test_extents_in_slabs_are_those_of_one_pass(monkeypatch, threads, slices):
    import MedSegUNetLib.imageio.segmentation_nrrd as segmentation_nrrd

    monkeypatch.setattr(segmentation_nrrd, "EXTENT_THREADS", threads)
    rng = np.random.default_rng(slices)
    values = np.zeros((slices, 23, 29), np.uint8)
    for value in (1, 2, 5):  # a few blobs each, anywhere (labels 3 and 4 absent)
        for _ in range(3):
            k, j, i = rng.integers(0, slices), rng.integers(0, 20), rng.integers(0, 26)
            values[k : k + rng.integers(1, 4), j : j + 3, i : i + 3] = value
    labels = [Label(v, f"l{v}", (0.5, 0.5, 0.5)) for v in range(1, 6)]
    expected = {
        value: [b[2].start, b[2].stop - 1, b[1].start, b[1].stop - 1, b[0].start, b[0].stop - 1]
        for value, b in enumerate(find_objects(values, max_label=5), start=1)
        if b is not None
    }
    assert segmentation_nrrd.segment_extents(values, labels) == expected
    assert set(expected) == {1, 2, 5}


def test_a_name_that_would_break_the_header_is_refused_and_nothing_is_lost(tmp_path):
    path = tmp_path / "result.seg.nrrd"
    path.write_bytes(b"the user's earlier result")
    labels = [Label(1, "liver\nSegment0_Name:=forged", (1.0, 0.0, 0.0))]
    with pytest.raises(MedSegError, match="line break") as raised:
        write_segmentation(path, _label_image(), labels)
    assert str(path) in str(raised.value)
    assert path.read_bytes() == b"the user's earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
