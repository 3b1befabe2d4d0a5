"""The training loss: Dice + cross-entropy, set up so that a small structure is not drowned.

Dice is computed over the whole batch (``batch_dice``, nnU-Net's choice for small targets): a crop that
does not hold the structure adds its voxels to the batch's counts instead of a Dice term of its own,
where one false-positive voxel would score 0 and an empty prediction 1. Dice covers the foreground
classes only (background, most of every scan, would dominate the mean, as in nnU-Net); cross-entropy
covers every class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import TrainConfig

if TYPE_CHECKING:
    import torch


def make_loss(config: TrainConfig) -> torch.nn.Module:
    """MONAI's DiceCELoss on logits and (B, 1, Z, Y, X) class indices."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, batch=config.batch_dice, include_background=False)
