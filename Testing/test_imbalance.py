"""Training on tiny targets: foreground oversampling per class (sampling.py) and the loss (losses.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from training.config import TrainConfig
from training.data import PreparedCase
from training.losses import IGNORE, make_loss
from training.sampling import class_voxels, crop_starts, forced_crops
from training.stream import FOREGROUND_FRACTION, batches

PATCH = (16, 32, 32)


def _tiny_target_case() -> PreparedCase:
    """A 48x96x96 scan whose only foreground is an 18-voxel lesion (0.004% of the voxels) and a larger organ."""
    label = np.zeros((1, 48, 96, 96), np.uint8)
    label[0, 30:32, 70:73, 10:13] = 1  # the lesion
    label[0, 4:20, 8:40, 50:90] = 2  # an organ, 20480 voxels
    image = np.random.default_rng(0).normal(0, 1, label.shape).astype(np.float32)
    return PreparedCase("tiny", image, label, (2.0, 2.0, 2.0))


def _share_of_crops_with(value: int, fraction: float, count: int = 120) -> float:
    crops = [
        (batch["label"][index] == value).any().item()
        for batch in itertools.islice(
            batches([_tiny_target_case()], PATCH, 3, 2, seed=4, foreground_fraction=fraction), count
        )
        for index in range(2)
    ]
    return float(np.mean(crops))


def test_training_crops_hold_a_tiny_lesion_far_more_often_than_chance():
    """With training's default oversampling, half of the crops are forced onto foreground, the class
    drawn uniformly: the lesion is in about a quarter of the crops. Uniform crops hold it about 1 in 20
    (a 16x32x32 patch in a 48x96x96 scan); this test fails when the oversampling is off."""
    assert TrainConfig("out").foreground_fraction == FOREGROUND_FRACTION == 0.33
    oversampled = _share_of_crops_with(1, TrainConfig("out").foreground_fraction)
    uniform = _share_of_crops_with(1, 0.0)
    assert oversampled > 0.18, oversampled
    assert uniform < 0.12, uniform
    assert oversampled > 2.5 * uniform


def test_forced_crops_follow_nnunet_and_pick_classes_uniformly():
    assert [forced_crops(b, 0.33) for b in (1, 2, 3, 4, 8)] == [0, 1, 1, 1, 3]
    assert forced_crops(2, 0.0) == 0 and forced_crops(2, 1.0) == 2
    label = _tiny_target_case().label[0]
    voxels = class_voxels(label, 3)
    assert sorted(voxels) == [1, 2] and voxels[1].size == 18
    rng = np.random.default_rng(1)
    starts = [crop_starts(label.shape, PATCH, voxels, 1, 1.0, rng)[0] for _ in range(400)]
    holds = {
        c: np.mean([(label[tuple(slice(s, s + p) for s, p in zip(start, PATCH))] == c).any() for start in starts])
        for c in (1, 2)
    }
    assert 0.4 < holds[1] < 0.6, holds  # the 18-voxel lesion as often as the 20480-voxel organ
    assert holds[2] > 0.4
    for start in starts:
        assert all(0 <= s <= n - p for s, n, p in zip(start, label.shape, PATCH))


def test_a_case_without_foreground_and_a_scan_smaller_than_the_patch_still_crop():
    empty = PreparedCase("empty", np.zeros((1, 10, 20, 20), np.float32), np.zeros((1, 10, 20, 20), np.uint8), (1, 1, 1))
    batch = next(batches([empty], PATCH, 3, 2, seed=0, foreground_fraction=1.0))
    assert batch["image"].shape == (2, 1, *PATCH)
    assert set(batch["label"].unique().tolist()) == {0, IGNORE}  # its background, and the untaught padding


def _probabilities(mask: torch.Tensor, confidence: float = 8.0) -> torch.Tensor:
    """Logits (B, 2, ...) that predict ``mask`` (B, 1, ...) confidently."""
    foreground = mask.float() * 2 - 1
    return torch.cat([-confidence * foreground, confidence * foreground], dim=1)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_batch_dice_does_not_let_an_empty_crop_drown_the_lesion(batch_dice):
    """Two crops: one holds a 8-voxel lesion, predicted exactly; the other holds none, and the network
    marks one false voxel there. Per-crop Dice scores the second crop 0 (a loss of 1 for half the batch);
    batch Dice counts the one voxel against the lesion's 8."""
    target = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    target[0, 0, 2:4, 2:4, 2:4] = 1
    predicted = target.clone()
    predicted[1, 0, 6, 6, 6] = 1
    loss = make_loss(TrainConfig("out", batch_dice=batch_dice))(_probabilities(predicted), target).item()
    dice_part = loss - torch.nn.functional.cross_entropy(_probabilities(predicted), target[:, 0]).item()
    if batch_dice:
        assert dice_part == pytest.approx(1 - 2 * 8 / (9 + 8), abs=0.01)
    else:
        assert dice_part == pytest.approx(0.5, abs=0.01)  # (0 + 1) / 2: the empty crop alone costs half
