"""Training from annotated scenes: end to end, learning proven, fine-tuning, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from conftest import MODULE_DIR, REPO, run_cli

from MedSegUNetLib.core.labels import default_labels
from MedSegUNetLib.imageio.images import write_segmentation
from MedSegUNetLib.model.bundle import load_bundle, read_bundle_metadata
from training.scene_writer import ScenePair, write_mrb, write_mrml_scene

SMALL = ["--spacing", "6", "6", "6", "--patch-size", "32", "32", "16", "--filters", "8", "--progress", "json"]


@pytest.fixture
def chest_scenes(tmp_path, ct_chest, chest_segmentation):
    mrb = write_mrb(tmp_path / "a.mrb", "a", [ScenePair("ct", ct_chest, chest_segmentation, "seg")])
    mrml = write_mrml_scene(
        tmp_path / "b", "scene", [ScenePair("ct", ct_chest, chest_segmentation, "seg")], legacy_refs=True
    )
    return mrb, mrml


def records(stdout: str):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_train_from_scenes_then_segment(tmp_path, chest_scenes, ct_chest):
    """The issue's 'done when': train a.mrb b/scene.mrml --max-steps 20, then segment with the bundle."""
    mrb, mrml = chest_scenes
    out = tmp_path / "model"
    result = run_cli(
        "train", str(mrb), str(mrml), "-o", str(out), "--max-steps", "20", "--validate-every", "10", *SMALL
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warning" not in result.stderr, result.stderr[-2000:]  # no library's warnings reach the user
    lines = records(result.stdout)
    assert lines[-1]["stage"] == "done" and lines[-1]["bundle"] == str(out / "model.safetensors")
    assert [r["done"] for r in lines if r["stage"] == "train"][-1] == 20
    assert any(r["stage"] == "validate" and "dice" in r for r in lines)
    for name in (
        "model.safetensors",
        "last.safetensors",
        "log.csv",
        "learning_curve.png",
        "plan.json",
        "checkpoint.safetensors",
    ):
        assert (out / name).exists(), name
    meta = read_bundle_metadata(out / "model.safetensors")
    names = [s["name"] for s in slicerio.read_segmentation(str(REPO_SEG()), skip_voxels=True)["segments"]]
    assert [label.name for label in meta.labels] == names
    assert meta.provenance["training"]["steps"] in (10, 20) and "dice_mean" in meta.provenance["metrics"]
    segmented = tmp_path / "out.seg.nrrd"
    result = run_cli("segment", str(ct_chest), "-m", str(out / "model.safetensors"), "-o", str(segmented))
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
    assert [s["name"] for s in slicerio.read_segmentation(str(segmented), skip_voxels=True)["segments"]] == names


def REPO_SEG():
    from conftest import slicerio_data

    return slicerio_data("Segmentation.seg.nrrd")


def synthetic_scene(folder: Path, seed: int, names=("lesion", "organ")) -> Path:
    """A noisy volume with a bright ball ('lesion') and a dim box ('organ'), as a .mrb scene."""
    rng = np.random.default_rng(seed)
    array = rng.normal(-100, 30, (40, 48, 48)).astype(np.float32)
    label = np.zeros(array.shape, np.uint8)
    z, y, x = np.ogrid[:40, :48, :48]
    centre = rng.integers(14, 26, 3)
    ball = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= 36
    array[ball] += 300
    label[ball] = 1
    label[5:12, 30:44, 5:20] = 2
    array[5:12, 30:44, 5:20] += 150
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / "image.nrrd"))
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(image)
    write_segmentation(folder / "seg.seg.nrrd", label_image, default_labels(list(names)))
    return write_mrb(
        folder / f"case{seed}.mrb",
        f"case{seed}",
        [ScenePair("image", folder / "image.nrrd", folder / "seg.seg.nrrd", "seg")],
    )


def test_learning_is_proven_on_a_synthetic_case(tmp_path):
    scene = synthetic_scene(tmp_path / "data", seed=1)
    out = tmp_path / "model"
    result = run_cli(
        "train",
        str(scene),
        "-o",
        str(out),
        "--max-steps",
        "120",
        "--validate-every",
        "60",
        "--spacing",
        "2",
        "2",
        "2",
        "--patch-size",
        "32",
        "32",
        "32",
        "--filters",
        "8",
        "--lr",
        "3e-3",
        "--progress",
        "json",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = records(result.stdout)
    losses = [r["loss"] for r in lines if r["stage"] == "train"]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    metrics = read_bundle_metadata(out / "model.safetensors").provenance["metrics"]
    # Chance (a random mask of the right size) gives a Dice of about the structure's volume share:
    # ~0.01 for the ball, ~0.02 for the box. Learning must beat it by far (seen: 0.99 and 0.59).
    assert metrics["dice_lesion"] > 0.8 and metrics["dice_organ"] > 0.35, metrics


def test_fine_tune_keeps_labels_and_adds_new_ones(tmp_path, chest_scenes):
    from MedSegUNetLib.core.labels import Label
    from MedSegUNetLib.model.bundle import Normalization, Preprocessing, create_bundle, save_bundle

    start = create_bundle(
        [Label(1, "left lung", (0.1, 0.2, 0.3)), Label(2, "Liver", (0.5, 0.1, 0.1))],
        Preprocessing((6.0, 6.0, 6.0), (32, 32, 16), "RAS", Normalization("ct", (-1000.0, 1000.0))),
        base_filters=8,
    )
    init = save_bundle(tmp_path / "start.safetensors", start.meta, start.network)
    out = tmp_path / "tuned"
    result = run_cli(
        "train", str(chest_scenes[0]), "-o", str(out), "--init", str(init), "--max-steps", "4", "--progress", "json"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    tuned = load_bundle(out / "model.safetensors")
    names = [label.name for label in tuned.meta.labels]
    assert names[:2] == ["left lung", "Liver"] and [label.value for label in tuned.meta.labels][:2] == [1, 2]
    assert "ribs" in names and len(names) == 8
    assert tuned.meta.preprocessing == start.meta.preprocessing


def test_dry_run_lists_cases_and_labels(tmp_path, chest_scenes):
    result = run_cli("train", *map(str, chest_scenes), "-o", str(tmp_path / "m"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "case a/seg: 128x128x34 voxels" in result.stdout and "label 1: ribs" in result.stdout
    assert "plan: spacing 3.05x3.05x10 mm (median of the cases)" in result.stdout
    assert not (tmp_path / "m").exists()


def checkpoint_step(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert "model.output_block.conv.conv.weight" in handle.keys()
        return json.loads(handle.metadata()["state"])["run"]["step"]


def test_killed_training_resumes_and_finishes(tmp_path):
    """SIGKILL three times, each at a random moment (a step, a validation, a checkpoint being written):
    the checkpoint is whole every time, and --resume continues from it and finishes."""
    scene = synthetic_scene(tmp_path / "data", seed=2)
    out = tmp_path / "model"
    arguments = [
        sys.executable,
        "-m",
        "training",
        "train",
        str(scene),
        "-o",
        str(out),
        "--max-steps",
        "40",
        "--validate-every",
        "5",
        "--spacing",
        "4",
        "4",
        "4",
        "--patch-size",
        "16",
        "16",
        "16",
        "--filters",
        "4",
        "--progress",
        "json",
    ]
    environment = dict(os.environ, PYTHONPATH=f"{MODULE_DIR}{os.pathsep}{REPO}")
    checkpoint = out / "checkpoint.safetensors"
    seed = random.SystemRandom().randrange(2**32)
    moments = random.Random(seed)
    seen_steps = [0]
    for _ in range(3):
        process = subprocess.Popen(
            arguments + (["--resume"] if seen_steps[-1] else []),
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=environment,
        )
        for line in process.stdout:
            record = json.loads(line)
            # A train record is reported after its step's validation and checkpoint: one is newer now.
            if record["stage"] == "train" and record["done"] > seen_steps[-1] + 5:
                break
        time.sleep(moments.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
        assert process.returncode == -signal.SIGKILL, f"killed before it finished (seed {seed})"
        seen_steps.append(checkpoint_step(checkpoint))  # whatever moment it died, the checkpoint is whole
    assert seen_steps == sorted(set(seen_steps)) and seen_steps[1] >= 5, (seen_steps, seed)
    result = subprocess.run(
        arguments + ["--resume"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=environment,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = records(result.stdout)
    assert any(r.get("note") and f"resumed at step {seen_steps[-1]}" in r["message"] for r in lines), seed
    trained = [r["done"] for r in lines if r["stage"] == "train"]
    if seen_steps[-1] < 40:  # killed before its last step: the resumed run takes the steps left
        assert trained[0] == seen_steps[-1] + 1 and trained[-1] == 40, (trained, seed)
    else:  # killed after the last step's checkpoint, while writing the bundle: nothing is left to train
        assert all(step == 40 for step in trained), (trained, seed)
    assert not list(out.glob(".*medseg-tmp-*")), "temporaries of the killed runs were removed"
    assert load_bundle(out / "model.safetensors").meta.provenance["training"]["steps"] in range(5, 41)


def _crop_cases():
    from training.data import PreparedCase

    rng = np.random.default_rng(3)
    cases = []
    for name in ("a", "b"):
        label = np.zeros((1, 24, 40, 40), np.uint8)
        label[0, 8:16, 10:30, 12:28] = 1
        label[0, 4:8, 30:36, 5:11] = 2
        image = (rng.normal(0, 1, label.shape) + label).astype(np.float32)
        cases.append(PreparedCase(name, image, label, (3.0, 3.0, 3.0)))
    return cases


def _first_batches(workers: int, seed: int, count: int = 5, start_method=None):
    from training.stream import batch_stream

    stream = batch_stream(_crop_cases(), (16, 24, 24), 3, 2, seed, workers, start_method=start_method)
    return [next(stream) for _ in range(count)]


def test_crop_workers_give_the_same_batches_run_after_run():
    """The batches come from worker processes, in an order fixed by the seed and the worker count; one
    worker makes exactly the batches the training process itself would."""
    in_process, one_worker = _first_batches(0, seed=5), _first_batches(1, seed=5)
    two_workers, two_again, other_seed = _first_batches(2, seed=5), _first_batches(2, seed=5), _first_batches(2, seed=6)
    for batch in in_process + two_workers:
        assert batch["image"].shape == (2, 1, 16, 24, 24) and batch["image"].dtype.is_floating_point
        assert batch["label"].shape == (2, 1, 16, 24, 24) and set(batch["label"].unique().tolist()) <= {0, 1, 2}

    def same(first, second):
        return all(
            torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]) and a["case"] == b["case"]
            for a, b in zip(first, second)
        )

    assert same(in_process, one_worker)
    # As macOS and Windows start workers: the dataset travels pickled, the worker imports afresh.
    assert same(two_workers, _first_batches(2, seed=5, start_method="spawn"))
    assert same(two_workers, two_again)
    assert not same(two_workers, other_seed)
    assert not torch.equal(two_workers[0]["image"], two_workers[1]["image"])  # the two workers make different crops


def test_default_crop_workers_per_device():
    from training.stream import default_workers

    assert default_workers(torch.device("cuda"), cpus=16) == 8
    assert default_workers(torch.device("cuda"), cpus=4) == 3
    assert default_workers(torch.device("cuda"), cpus=1) == 1
    assert default_workers(torch.device("cpu"), cpus=2) == 1
    assert default_workers(torch.device("cpu"), cpus=1) == 0


def test_crops_are_never_mirrored_left_right_when_a_structure_names_a_side():
    """kidney_left mirrored left to right lies where kidney_right does: a table with sided names keeps the
    left-right axis unmirrored (the x axis of an RAS grid, the z axis of a PIR one) and the others mirrored."""
    from MedSegUNetLib.model.bundle import IMAGE_AXES, Normalization, Preprocessing
    from training.data import ALL_AXES, augmentations, mirror_axes

    def prep(orientation: str) -> Preprocessing:
        return Preprocessing((3.0, 3.0, 3.0), (32, 32, 16), orientation, Normalization("ct", clip=(-100.0, 200.0)))

    assert mirror_axes(["liver", "spleen"], prep("RAS")) == ALL_AXES
    assert mirror_axes(["liver", "kidney_left"], prep("RAS")) == (0, 1)
    assert mirror_axes(["Right lung"], prep("LPS")) == (0, 1)
    assert mirror_axes(["kidney_right"], prep("PIR")) == (1, 2)
    assert mirror_axes(["kidney_right"], prep(IMAGE_AXES)) == ALL_AXES  # an imported model's own axes: unknown sides
    assert mirror_axes(["bright", "wright"], prep("RAS")) == ALL_AXES  # a side is a word, not letters in one

    label = np.zeros((1, 8, 12, 16), dtype=np.uint8)
    label[:, :, :, :5] = 1  # a block on the low-x side
    image = label.astype(np.float32)

    def low_x_side_kept(flip_axes) -> list:
        augment = augmentations(flip_axes)
        augment.set_random_state(seed=0)
        kept = []
        for _ in range(24):
            out = np.asarray(augment({"image": image.copy(), "label": label.copy()})["label"])
            kept.append(out[..., :8].sum() > out[..., 8:].sum())
        return kept

    assert all(low_x_side_kept((0, 1)))
    assert not all(low_x_side_kept(ALL_AXES))  # the check can fail: mirrored along x, the block changes side


def test_a_model_of_sided_structures_keeps_its_mirror_axes_for_tta(tmp_path):
    """Trained on kidney_left and kidney_right, the bundle records the axes its crops were mirrored along
    (not left-right), and --tta mirrors along those only; a model without sides records none (all axes)."""
    from MedSegUNetLib.prediction.inference import mirror_axes as tta_flips

    scene = synthetic_scene(tmp_path / "data", seed=2, names=("kidney_left", "kidney_right"))
    out = tmp_path / "model"
    common = ["--max-steps", "2", "--spacing", "4", "4", "4", "--patch-size", "16", "16", "16", "--filters", "4"]
    result = run_cli(
        "train",
        str(scene),
        "-o",
        str(out),
        *common,
        "--slab-crops",
        "0.5",
        "--contrast-phases",
        "0.5",
        "--progress",
        "none",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    meta = read_bundle_metadata(out / "model.safetensors")
    assert meta.preprocessing.orientation == "RAS" and meta.mirror_axes == (0, 1)  # z and y; x is left-right
    training = meta.provenance["training"]  # the bundle says how its crops were shaped
    assert (training["slab_crops"], training["contrast_phases"]) == (0.5, 0.5)
    assert all(4 not in flip for flip in tta_flips(allowed=meta.mirror_axes))  # (B, C, Z, Y, X): x is dim 4
    segmented = tmp_path / "tta.nii.gz"
    result = run_cli("segment", str(tmp_path / "data" / "image.nrrd"), "-m", str(out / "model.safetensors"),
                     "-o", str(segmented), "--tta", "--progress", "none")  # fmt: skip
    assert result.returncode == 0, result.stderr

    plain = synthetic_scene(tmp_path / "plain", seed=2)
    result = run_cli("train", str(plain), "-o", str(tmp_path / "plain-model"), *common, "--progress", "none")
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_bundle_metadata(tmp_path / "plain-model" / "model.safetensors").mirror_axes is None
