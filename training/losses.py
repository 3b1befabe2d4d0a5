"""Dice + cross-entropy for partly annotated cases: each case teaches only the structures it annotates.

A structure a case does not annotate is neither taught as background nor penalized: its probability is
merged into the background's before the loss (the marginal loss of Shi et al., "Marginal loss and exclusion
loss for partially supervised multi-organ segmentation", MedIA 2021). Voxels marked ``IGNORE`` (nobody
reviewed them; nnU-Net's ignore label) count in no term. With every structure annotated and nothing
ignored it is MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``; it is our own code because MONAI's
losses have no per-case class masks.

Merging alone leaves an unannotated structure free to spread into the case's background. When fine-tuning,
the starting model (the teacher) labels the case's background as background or one of the structures the
case leaves out, so their output is kept as the model made it (learning without forgetting).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch

if TYPE_CHECKING:
    from .config import TrainConfig

IGNORE = 255  # label value of voxels that are not annotated at all (class indices stay below it)
SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr and smooth_dr
NOTHING = -1e4  # a log-probability whose exp is 0 in float32, finite so that no gradient is nan


def make_loss(config: TrainConfig) -> PartialDiceCELoss:
    """Training's loss: Dice over the whole batch (``config.batch_dice``, nnU-Net's choice for small targets:
    a crop without the structure adds its voxels to the batch's counts instead of a Dice term of its own)
    and over the foreground classes only, as in nnU-Net; cross-entropy over every class."""
    return PartialDiceCELoss(batch=config.batch_dice, include_background=False)


class PartialDiceCELoss(torch.nn.Module):
    """``loss(logits, target, annotated)``: logits (B, C, ...), target (B, 1, ...) class indices or IGNORE,
    annotated (B, C) booleans (None: every class). ``batch``: Dice summed over the batch before the ratio;
    ``include_background``: background has a Dice term too (cross-entropy always covers it)."""

    def __init__(self, batch: bool = False, include_background: bool = True):
        super().__init__()
        self.batch, self.include_background = batch, include_background

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        annotated: Optional[torch.Tensor] = None,
        teacher: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``teacher``: the starting model's logits (B, C_old, ...) on the same input, C_old <= C."""
        classes = logits.shape[1]
        if annotated is None:
            annotated = torch.ones(logits.shape[0], classes, dtype=torch.bool, device=logits.device)
        annotated = annotated.to(logits.device).clone()
        annotated[:, 0] = True  # background always: it holds the unannotated classes
        if teacher is not None:
            target, annotated = with_teacher_labels(target, annotated, teacher)
        log_p = merged_log_probabilities(logits.float(), annotated)
        supervised = (target != IGNORE).to(log_p.dtype)  # (B, 1, ...)
        classes_of = torch.where(target == IGNORE, torch.zeros_like(target), target).long()
        one_hot = torch.zeros_like(log_p).scatter_(1, classes_of, 1.0) * supervised
        cross_entropy = -(log_p * one_hot).sum() / supervised.sum().clamp(min=1.0)
        dice = self._dice(log_p.exp() * supervised, one_hot, annotated)
        return dice + cross_entropy

    def _dice(self, probabilities: torch.Tensor, one_hot: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(2, probabilities.dim()))
        intersection = (probabilities * one_hot).sum(spatial)  # (B, C)
        total = probabilities.sum(spatial) + one_hot.sum(spatial)
        if self.batch:
            intersection, total = intersection.sum(0, keepdim=True), total.sum(0, keepdim=True)
            annotated = annotated.any(0, keepdim=True)
        scores = 1.0 - (2.0 * intersection + SMOOTH) / (total + SMOOTH)
        if not self.include_background:
            scores, annotated = scores[:, 1:], annotated[:, 1:]
        return scores[annotated].mean() if annotated.any() else scores.sum() * 0.0


def with_teacher_labels(
    target: torch.Tensor, annotated: torch.Tensor, teacher: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where the case says background, the teacher's choice among background and the structures the case
    leaves out (and the teacher knows) becomes the label, and those structures count as annotated."""
    known = torch.zeros_like(annotated)
    known[:, : teacher.shape[1]] = True
    group = ~annotated & known
    if not group.any():
        return target, annotated  # nothing left out that the teacher knows
    group[:, 0] = True
    view = group.view(*group.shape, *([1] * (teacher.dim() - 2)))[:, : teacher.shape[1]]
    choice = teacher.masked_fill(~view, float("-inf")).argmax(dim=1, keepdim=True)
    return torch.where(target == 0, choice, target), annotated | known


def merged_log_probabilities(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Log-softmax where channel 0 holds background plus every unannotated class, and unannotated channels
    hold nothing: the model may call an unannotated structure anything but an annotated one."""
    log_p = torch.log_softmax(logits, dim=1)
    view = annotated.view(*annotated.shape, *([1] * (logits.dim() - 2)))  # (B, C, 1, ...)
    group = ~view
    group[:, 0] = True  # background and the unannotated classes
    background = torch.logsumexp(log_p.masked_fill(~group, NOTHING), dim=1, keepdim=True)
    return torch.cat([background, log_p[:, 1:].masked_fill(~view[:, 1:], NOTHING)], dim=1)
