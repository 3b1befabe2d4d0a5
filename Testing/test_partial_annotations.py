"""Partial annotations: a case teaches only the structures it annotates, and unreviewed voxels teach nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_cli

from MedSegUNetLib.core.labels import default_labels
from MedSegUNetLib.imageio.images import write_segmentation
from training.label_table import build_label_table
from training.losses import IGNORE, PartialDiceCELoss, with_teacher_labels
from training.scene_writer import ScenePair, write_mrb
from training.scenes import Case, SegmentInfo, read_segments, segments_labelmap

# --- the loss ------------------------------------------------------------------------------------------


def random_batch(seed: int = 0, classes: int = 4):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 6, 5, 7, generator=generator)
    target = torch.randint(0, classes, (2, 1, 6, 5, 7), generator=generator)
    return logits, target


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("background", [True, False])
def test_with_everything_annotated_it_is_monai_s_dice_ce(batch, background):
    from monai.losses import DiceCELoss

    logits, target = random_batch()
    expected = DiceCELoss(to_onehot_y=True, softmax=True, batch=batch, include_background=background)(logits, target)
    ours = PartialDiceCELoss(batch=batch, include_background=background)
    assert torch.allclose(ours(logits, target), expected, atol=1e-6)
    everything = torch.ones(2, 4, dtype=torch.bool)
    assert torch.allclose(ours(logits, target, everything), expected, atol=1e-6)


def test_an_unannotated_structure_is_not_taught_as_background():
    """Where the case says background, calling it the unannotated class 2 costs nothing more (the old loss
    charged for it); calling it an annotated class still costs."""
    logits, target = random_batch(1, classes=3)
    target[target == 2] = 0  # the case does not annotate class 2: its voxels read as background
    annotated = torch.tensor([[True, True, False]] * 2)
    background = target == 0
    moved = logits.clone()  # the same background + class-2 probability, split 1 : e^3 instead
    split = torch.logaddexp(logits[:, 0:1], logits[:, 2:3]) - torch.log1p(torch.exp(torch.tensor(3.0)))
    moved[:, 0:1][background] = split[background]
    moved[:, 2:3][background] = split[background] + 3.0
    assert torch.allclose(moved.logsumexp(1), logits.logsumexp(1), atol=1e-5)  # softmax mass per voxel unchanged
    partial = PartialDiceCELoss()
    assert torch.allclose(partial(moved, target, annotated), partial(logits, target, annotated), atol=1e-5)
    old = PartialDiceCELoss()  # every class annotated: the behaviour before partial annotations
    assert old(moved, target) > old(logits, target) + 0.05

    towards_one = logits.clone()
    towards_one[:, 1:2][background] += 3.0  # calling background the annotated class 1 is still wrong
    assert partial(towards_one, target, annotated) > partial(logits, target, annotated) + 0.05


def test_ignored_voxels_get_no_gradient_and_change_nothing():
    logits, target = random_batch(2)
    target[:, :, :3] = IGNORE
    logits.requires_grad_(True)
    loss = PartialDiceCELoss()(logits, target)
    loss.backward()
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[:, :, :3]) == 0 and torch.count_nonzero(logits.grad[:, :, 3:]) > 0
    changed = logits.detach().clone()
    changed[:, :, :3] = torch.randn_like(changed[:, :, :3]) * 10
    assert torch.allclose(PartialDiceCELoss()(changed, target), loss.detach(), atol=1e-6)
    assert torch.isfinite(loss)


def test_a_batch_with_nothing_reviewed_has_a_finite_loss_and_gradient():
    logits, target = random_batch(3)
    target[:] = IGNORE
    logits.requires_grad_(True)
    loss = PartialDiceCELoss()(logits, target, torch.tensor([[True, True, False, False]] * 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_the_teacher_labels_the_background_with_the_structures_the_case_leaves_out():
    target = torch.tensor([0, 0, 1, IGNORE, 0]).view(1, 1, 5)
    teacher = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0], [0.0, 9.0, 9.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 9.0]])
    annotated = torch.tensor([[True, True, False, False]])  # class 2 left out; class 3 new: the teacher lacks it
    labels, now = with_teacher_labels(target, annotated, teacher[None])
    # voxel 1: the teacher's class 1 is annotated here, so not a choice; voxel 4: class 2, left out, taken
    assert labels.view(-1).tolist() == [0, 0, 1, IGNORE, 2]
    assert now.tolist() == [[True, True, True, False]]
    everything = torch.ones(1, 4, dtype=torch.bool)
    assert with_teacher_labels(target, everything, teacher[None])[0] is target  # nothing left out: unchanged


# --- which structures a case annotates -------------------------------------------------------------------


def case(name: str, *segments: str) -> Case:
    infos = [SegmentInfo(s, i, 0, (0.5, 0.5, 0.5)) for i, s in enumerate(segments, 1)]
    return Case(name, Path(f"{name}.nrrd"), Path(f"{name}.seg.nrrd"), infos)


def test_each_case_annotates_its_own_segments_and_an_ignore_segment_is_no_structure():
    liver_only, both = case("a", "liver"), case("b", "Spleen", "Unlabeled", "liver")
    table = build_label_table([liver_only, both])
    assert [label.name for label in table.labels] == ["liver", "Spleen"]
    assert table.annotated(liver_only) == [1] and table.annotated(both) == [1, 2]
    np.testing.assert_array_equal(table.lookup_table(both), [0, 2, IGNORE, 1])
    assert table.describe(liver_only) == "case a annotates liver; not annotated (not taught as background): Spleen"
    assert table.describe(both) == "case b annotates liver, Spleen; voxels of 'Unlabeled' are ignored"
    assert table.report() == ["'Spleen' is not annotated in a"]
    # fine-tuning: --labels may name the starting model's structures that no case annotates
    from MedSegUNetLib.core.labels import Label

    start = [Label(1, "liver", (1.0, 0.0, 0.0)), Label(2, "aorta", (0.0, 0.0, 1.0))]
    tuned = build_label_table([case("d", "aorta")], initial=start, only=["liver", "aorta"])
    assert [label.name for label in tuned.labels] == ["liver", "aorta"] and tuned.annotated(case("d", "aorta")) == [2]
    with pytest.raises(ValueError, match="no case has: kidney"):
        build_label_table([case("d", "aorta")], initial=start, only=["kidney"])
    with pytest.raises(ValueError, match="more than one segment marks voxels to ignore"):
        build_label_table([case("c", "ignore", "unlabeled")])


# --- end to end: fine-tuning on a case that annotates a subset ------------------------------------------

SMALL = ["--spacing", "4", "4", "4", "--patch-size", "16", "16", "16", "--filters", "8", "--device", "cpu"]


def synthetic_scenes(folder: Path) -> dict:
    """One image with a bright ball ('lesion') and a dim box ('organ'); scenes that annotate both, only the
    lesion, and the lesion with the box's half marked unreviewed."""
    rng = np.random.default_rng(1)
    array = rng.normal(-100, 30, (40, 48, 48)).astype(np.float32)
    label = np.zeros(array.shape, np.uint8)
    z, y, x = np.ogrid[:40, :48, :48]
    ball = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 36
    array[ball] += 300
    label[ball] = 1
    array[5:12, 30:44, 5:20] += 150
    label[5:12, 30:44, 5:20] = 2
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / "image.nrrd"))
    scenes = {}
    for name, values, names in (
        ("both", label, ["lesion", "organ"]),
        ("lesion", (label == 1).astype(np.uint8), ["lesion"]),
    ):
        segmentation = sitk.GetImageFromArray(values)
        segmentation.CopyInformation(image)
        write_segmentation(folder / f"{name}.seg.nrrd", segmentation, default_labels(names))
        pair = ScenePair("image", folder / "image.nrrd", folder / f"{name}.seg.nrrd", "seg")
        scenes[name] = write_mrb(folder / f"{name}.mrb", name, [pair])
    scenes["image"], scenes["organ"] = folder / "image.nrrd", label == 2
    return scenes


def organ_dice(bundle: Path, scenes: dict, work: Path) -> float:
    """Dice of the model's 'organ' against the reference box, on the image's grid."""
    output = work / f"{bundle.parent.name}.seg.nrrd"
    result = run_cli("segment", str(scenes["image"]), "-m", str(bundle), "-o", str(output), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    segments = read_segments(output)
    labelmap = segments_labelmap(output, segments, sitk.ReadImage(str(scenes["image"])))
    position = [s.name for s in segments].index("organ") + 1
    predicted, reference = sitk.GetArrayFromImage(labelmap) == position, scenes["organ"]
    return float(2 * (predicted & reference).sum() / (predicted.sum() + reference.sum()))


@pytest.mark.slow
def test_fine_tuning_on_a_case_that_annotates_a_subset_keeps_the_other_structure(tmp_path):
    """The old behaviour (a missing segment taught as background) makes the model forget the organ;
    partial annotations keep it (seen: organ Dice 0.78 at the start, 0.74 kept, 0.00 forgotten)."""
    scenes = synthetic_scenes(tmp_path / "data")
    start = tmp_path / "start"
    common = ["--lr", "3e-3", "--progress", "none", *SMALL]
    result = run_cli("train", str(scenes["both"]), "-o", str(start), "--max-steps", "120", *common, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    before = organ_dice(start / "model.safetensors", scenes, tmp_path)
    assert before > 0.5, before  # the starting model has learned the organ

    tuned = {}
    for mode in ("not-annotated", "background"):
        out = tmp_path / mode
        result = run_cli(
            "train",
            str(scenes["lesion"]),
            "-o",
            str(out),
            "--init",
            str(start / "model.safetensors"),
            "--max-steps",
            "60",
            "--missing-segments",
            mode,
            *common,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        tuned[mode] = organ_dice(out / "model.safetensors", scenes, tmp_path)
    assert tuned["not-annotated"] > before - 0.1, (before, tuned)
    assert tuned["background"] < before / 2, (before, tuned)  # what training did before: the organ unlearned
