"""Crops brightened as in another contrast phase (training/contrast_agent.py): known enhancing structures
only, each by its own amount, in the network's units, never outside the structures."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from MedSegUNetLib.model.bundle import Normalization
from training.contrast_agent import ENHANCEMENT_HU, ContrastPhases, enhancement_in_network_units
from training.data import PreparedCase
from training.losses import IGNORE
from training.stream import batches

CT = Normalization("ct", clip=(-1000.0, 1000.0), mean=100.0, std=400.0)


def test_enhancement_is_known_per_structure_and_in_network_units():
    largest = enhancement_in_network_units(["Liver", "tumour", "aorta"], CT)
    assert largest == pytest.approx((0.0, 70 / 400, 0.0, 300 / 400))  # background and unknown names: none
    clip_only = Normalization("ct", clip=(-100.0, 200.0))
    assert enhancement_in_network_units(["liver"], clip_only) == pytest.approx((0.0, 70 / 300))
    assert enhancement_in_network_units(["liver"], Normalization("zscore")) is None  # MRI: not HU
    assert enhancement_in_network_units(["tumour"], CT) is None
    assert ENHANCEMENT_HU["aorta"] > ENHANCEMENT_HU["spleen"] > ENHANCEMENT_HU["liver"] > 0


def test_each_structure_is_brightened_by_one_amount_up_to_its_largest():
    label = np.zeros((1, 8, 8, 8), np.uint8)
    label[0, :4] = 1
    label[0, 4:6] = 2
    label[0, 6:, :4] = IGNORE
    rng = np.random.default_rng(0)
    phases = ContrastPhases((0.0, 0.2, 0.8), probability=1.0)
    seen = {1: [], 2: []}
    for _ in range(50):
        image = np.zeros((1, 8, 8, 8), np.float32)
        phases(image, label, rng)
        assert (image[label == 0] == 0).all() and (image[label == IGNORE] == 0).all()
        for value, top in ((1, 0.2), (2, 0.8)):
            amounts = np.unique(image[label == value])
            assert amounts.size == 1 and 0 <= amounts[0] <= top  # one amount for the whole structure
            seen[value].append(float(amounts[0]))
    assert max(seen[1]) > 0.15 and min(seen[1]) < 0.05  # from none to about the largest
    assert not np.allclose(np.array(seen[1]) / 0.2, np.array(seen[2]) / 0.8)  # drawn apart: not one phase


def test_no_phase_leaves_the_crop_and_the_random_stream_as_they_were():
    rng, twin = np.random.default_rng(1), np.random.default_rng(1)
    image, label = np.zeros((1, 4, 4, 4), np.float32), np.ones((1, 4, 4, 4), np.uint8)
    ContrastPhases((0.0, 1.0), probability=0.0)(image, label, rng)
    assert not image.any() and rng.random() == twin.random()


def test_streamed_crops_are_brightened_and_the_case_is_not():
    label = np.zeros((1, 24, 24, 24), np.uint8)
    label[0, 4:20, 4:20, 4:20] = 1
    image = np.where(label == 1, 1.0, -1.0).astype(np.float32)
    case = PreparedCase("plain", image, label, (3.0, 3.0, 3.0))
    phases = ContrastPhases((0.0, 2.0), probability=1.0)
    stream = batches([case], (16, 16, 16), 2, 1, seed=0, phases=phases)
    contrasts = []
    for batch in itertools.islice(stream, 12):
        crop_image, crop_label = batch["image"][0, 0].numpy(), batch["label"][0, 0].numpy()
        contrasts.append(np.median(crop_image[crop_label == 1]) - np.median(crop_image[crop_label == 0]))
    assert np.ptp(contrasts) > 0.5  # the organ's brightness against its surroundings varies crop to crop
    assert np.array_equal(case.image, np.where(label == 1, 1.0, -1.0))  # the case itself is untouched


def test_train_says_what_it_brightens_and_when_it_cannot(tmp_path):
    from conftest import run_cli
    from test_training import synthetic_scene

    scene = synthetic_scene(tmp_path / "data", seed=2, names=("kidney_left", "tumour"))
    common = ["train", str(scene), "-o", str(tmp_path / "m"), "--dry-run", "--contrast-phases", "0.5"]
    result = run_cli(*common)
    assert result.returncode == 0, result.stderr
    assert "contrast phases: 50% of crops brighten kidney_left\n" in result.stdout
    result = run_cli(*common, "--modality", "mri")
    assert result.returncode == 0, result.stderr
    assert "--contrast-phases: no crop is brightened" in result.stdout


@pytest.mark.parametrize("option, value", [("--contrast-phases", "1.5"), ("--slab-crops", "-0.1")])
def test_a_share_outside_0_to_1_is_refused_before_anything_is_read(tmp_path, option, value):
    from conftest import run_cli

    result = run_cli("train", str(tmp_path / "absent.mrb"), "-o", str(tmp_path / "m"), option, value)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # argparse's usage error
    assert f"argument {option}: must be between 0 and 1, not {float(value)}" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "m").exists()
