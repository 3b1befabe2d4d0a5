"""Crops shaped like thin scans (training/field_of_view.py) and the padding of scans thinner than the
patch: air, untaught, centred as segment pads a scan for its window."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from MedSegUNetLib.model.bundle import IMAGE_AXES, Normalization, Preprocessing
from MedSegUNetLib.prediction.stitching import _padding
from training.data import PreparedCase
from training.field_of_view import SlabCrops, slab_axis
from training.losses import IGNORE
from training.stream import batches

PATCH = (16, 24, 24)


def _prep(orientation: str) -> Preprocessing:
    return Preprocessing((3.0, 3.0, 3.0), (32, 32, 16), orientation, Normalization("ct", clip=(-100.0, 200.0)))


def test_the_slab_axis_is_the_head_to_foot_one_of_the_grid():
    assert slab_axis(_prep("RAS")) == 0 and slab_axis(_prep("LPI")) == 0  # (z, y, x): z runs S-I
    assert slab_axis(_prep("PIR")) == 1 and slab_axis(_prep("SRA")) == 2
    assert slab_axis(_prep(IMAGE_AXES)) == 0  # an imported model's own axes: the slice axis


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_slab_keeps_a_centred_run_of_the_crop_and_makes_the_rest_untaught_air(axis):
    rng = np.random.default_rng(3)
    cut = SlabCrops(axis, probability=1.0, thinnest=4)
    kept_lengths = set()
    for _ in range(40):
        image = rng.normal(0, 1, (1, *PATCH)).astype(np.float32)
        label = rng.integers(0, 3, (1, *PATCH)).astype(np.float32)
        original_image, original_label = image.copy(), label.copy()
        cut(image, label, -5.0, rng)
        other_axes = tuple(a for a in range(4) if a != 1 + axis)
        outside = (image == -5.0).all(axis=other_axes)
        assert ((label == IGNORE).all(axis=other_axes) == outside).all()
        kept = np.flatnonzero(~outside)
        length = PATCH[axis]
        assert 4 <= kept.size < length and np.all(np.diff(kept) == 1)  # one run, thinner than the crop
        (before, after), *_ = _padding([kept.size], [length])  # where segment would put a scan this thin
        assert kept[0] == before and length - 1 - kept[-1] == after
        inside = (slice(None),) * (1 + axis) + (slice(kept[0], kept[-1] + 1),)
        assert np.array_equal(image[inside], original_image[inside]) and np.array_equal(
            label[inside], original_label[inside]
        )
        kept_lengths.add(kept.size)
    assert len(kept_lengths) > 5  # the thickness varies


def test_no_slab_leaves_the_crop_and_the_random_stream_as_they_were():
    """Probability 0 draws nothing: a run with --slab-crops 0 makes the crops it made before."""
    rng, twin = np.random.default_rng(1), np.random.default_rng(1)
    image, label = np.ones((1, *PATCH), np.float32), np.ones((1, *PATCH), np.float32)
    SlabCrops(0, probability=0.0)(image, label, -5.0, rng)
    assert (image == 1).all() and (label == 1).all() and rng.random() == twin.random()


def test_a_share_of_the_streamed_crops_are_slabs_head_to_foot():
    image = np.random.default_rng(0).normal(0, 1, (1, 40, 40, 40)).astype(np.float32)
    image[0, 0, 0, 0] = -6.0  # the case's air: its lowest value
    label = np.zeros((1, 40, 40, 40), np.uint8)
    label[0, 10:30, 10:30, 10:30] = 1
    case = PreparedCase("body", image, label, (3.0, 3.0, 3.0))
    stream = batches([case], PATCH, 2, 2, seed=0, slabs=SlabCrops(0, probability=0.5, thinnest=4))
    crops = [
        (b["image"][i, 0].numpy(), b["label"][i, 0].numpy()) for b in itertools.islice(stream, 30) for i in range(2)
    ]
    cut = [(img, lab) for img, lab in crops if (lab == IGNORE).all(axis=(1, 2)).any()]
    assert 0.25 < len(cut) / len(crops) < 0.75
    for img, lab in cut:
        untaught = (lab == IGNORE).all(axis=(1, 2))
        assert (img[untaught] == -6.0).all()  # the slices beyond the slab: air
        assert not (lab[~untaught] == IGNORE).any()  # along z only


def test_a_case_thinner_than_the_patch_is_padded_with_its_air_and_teaches_nothing_there():
    """As segment pads a thin scan with its lowest value; the padding is neither taught as background
    (it is outside the scan) nor filled with a soft-tissue zero."""
    label = np.zeros((1, 6, 30, 30), np.uint8)
    label[0, :, 8:22, 8:22] = 1
    image = np.where(label == 1, 2.0, -1.5).astype(np.float32)  # a body in air; the air is the lowest value
    case = PreparedCase("slab", image, label, (3.0, 3.0, 3.0))
    for batch in itertools.islice(batches([case], PATCH, 2, 1, seed=0, foreground_fraction=0.0), 8):
        crop_image, crop_label = batch["image"][0, 0].numpy(), batch["label"][0, 0].numpy()
        # invariants that hold through the augmentation (rotation, intensity scale and shift, noise)
        assert 0.45 < (crop_label == IGNORE).mean() < 0.8  # 10 of 16 slices lie outside the scan
        assert (crop_label == 0).any()  # the scan's own background is still taught
        air, body, padding = (np.median(crop_image[crop_label == value]) for value in (0, 1, IGNORE))
        assert abs(padding - air) < 0.2 * abs(body - air)  # a zero would lie 0.43 of the way to the body
