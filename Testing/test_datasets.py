"""MSD / nnU-Net v2 folders and IMAGE:LABEL pairs as training data; folds; seeded determinism; torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from conftest import MODULE_DIR, REPO, assert_clean_failure, run_cli

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.model.bundle import load_bundle
from training.data import split
from training.datasets import read_pair
from training.scene_writer import ScenePair, write_mrb
from training.scenes import read_segments, segments_labelmap

SMALL = ["--spacing", "6", "6", "6", "--patch-size", "32", "32", "16", "--filters", "4"]


@pytest.fixture(scope="module")
def chest_files(tmp_path_factory, ct_chest, chest_segmentation):
    """CTChest4 as NIfTI and its Slicer segmentation as a NIfTI labelmap (values in segment order)."""
    folder = tmp_path_factory.mktemp("files")
    image = sitk.ReadImage(str(ct_chest))
    segments = read_segments(chest_segmentation)
    labelmap = segments_labelmap(chest_segmentation, segments, image)
    sitk.WriteImage(image, str(folder / "chest.nii.gz"))
    sitk.WriteImage(sitk.Cast(labelmap, sitk.sitkUInt8), str(folder / "chest_label.nii.gz"))
    return folder / "chest.nii.gz", folder / "chest_label.nii.gz", [s.name for s in segments]


def msd_folder(root: Path, chest_files, cases=("chest_001", "chest_002")) -> Path:
    image, label, names = chest_files
    folder = root / "Task99_Chest"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    training = []
    for case in cases:
        shutil.copyfile(image, folder / "imagesTr" / f"{case}.nii.gz")
        shutil.copyfile(label, folder / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    labels = {"0": "background", **{str(i): n for i, n in enumerate(names, start=1)}}
    description = {
        "name": "Chest",
        "modality": {"0": "CT"},
        "labels": labels,
        "numTraining": len(cases),
        "training": training,
    }
    (folder / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return folder


def nnunet_folder(root: Path, chest_files) -> Path:
    image, label, names = chest_files
    folder = root / "Dataset099_Chest"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    shutil.copyfile(image, folder / "imagesTr" / "chest_001_0000.nii.gz")
    shutil.copyfile(label, folder / "labelsTr" / "chest_001.nii.gz")
    (folder / "labelsTr" / "._chest_001.nii.gz").write_bytes(b"\0\5\26\7")  # macOS debris, ignored
    labels = {"background": 0, **{n: i for i, n in enumerate(names, start=1)}}
    description = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return folder


def test_msd_and_nnunet_folders_and_a_scene_train_one_label_table(tmp_path, chest_files, ct_chest, chest_segmentation):
    """The same structures from an MSD folder, an nnU-Net folder and a .mrb are one class each."""
    msd, nnunet = msd_folder(tmp_path, chest_files), nnunet_folder(tmp_path, chest_files)
    scene = write_mrb(tmp_path / "s.mrb", "s", [ScenePair("ct", ct_chest, chest_segmentation, "seg")])
    result = run_cli("train", str(msd), str(nnunet), str(scene), "-o", str(tmp_path / "m"), "--dry-run")
    assert result.returncode == 0, result.stderr
    names = chest_files[2]
    for case in ("chest_001#0", "chest_002", "chest_001#2", "s/seg"):
        assert f"case {case}: 128x128x34 voxels" in result.stdout, result.stdout
    assert [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("label ")] == names
    assert "is missing" not in result.stdout
    assert "normalization CT" in result.stdout  # modality CT taken from dataset.json


def test_msd_folder_trains_and_the_model_segments_by_name(tmp_path, chest_files, ct_chest):
    msd = msd_folder(tmp_path, chest_files)
    out = tmp_path / "m"
    result = run_cli("train", str(msd), "-o", str(out), "--max-steps", "3", "--validate-every", "3", *SMALL)
    assert result.returncode == 0, result.stderr[-2000:]
    bundle = load_bundle(out / "model.safetensors")
    assert [label.name for label in bundle.meta.labels] == chest_files[2]
    assert bundle.meta.provenance["training"]["validation"] in (["chest_001"], ["chest_002"])
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").glob("events.out.tfevents.*"))


def test_image_label_pairs(tmp_path, chest_files):
    image, label, names = chest_files
    result = run_cli("train", f"{image}:{label}", "-o", str(tmp_path / "m"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "case chest: 128x128x34 voxels" in result.stdout
    # exactly the file's values: reading them once came from freed memory and found stray labels
    expected = [f"label {v}: label_{v}" for v in range(1, len(names) + 1)]
    assert [line for line in result.stdout.splitlines() if line.startswith("label ")] == expected
    for _ in range(5):
        assert [s.label_value for s in read_pair(f"{image}:{label}").segments] == list(range(1, len(names) + 1))
    fractional = tmp_path / "fractional.nii.gz"
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(label)), sitk.sitkFloat32) * 0.5, str(fractional))
    with pytest.raises(MedSegError, match="fractional values"):
        read_pair(f"{image}:{fractional}")


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda d: d["training"].append({"image": "../../etc/passwd", "label": "./labelsTr/chest_001.nii.gz"}),
            "leaves the dataset folder",
        ),
        (lambda d: d["labels"].update({"3": ["1", "2"]}), "is a region"),
        (lambda d: d.update(modality={"0": "FLAIR", "1": "T1w"}), "only single-channel"),
        (
            lambda d: d["training"].append({"image": "./imagesTr/nope.nii.gz", "label": "./labelsTr/chest_001.nii.gz"}),
            "does not exist",
        ),
        (lambda d: d.pop("labels"), "has no 'labels'"),
    ],
)
def test_hostile_or_broken_dataset_json_is_refused(tmp_path, chest_files, change, message):
    folder = msd_folder(tmp_path, chest_files)
    description = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    change(description)
    (folder / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    result = run_cli("train", str(folder), "-o", str(tmp_path / "m"), "--dry-run")
    assert_clean_failure(result, "dataset.json", message)


def test_labelmap_with_unnamed_values_is_refused(tmp_path, chest_files):
    folder = msd_folder(tmp_path, chest_files, cases=("chest_001",))
    description = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    description["labels"] = {"0": "background", "1": "ribs"}  # the file also holds 2, 3, ...
    (folder / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    result = run_cli("train", str(folder), "-o", str(tmp_path / "m"), "--dry-run")
    assert_clean_failure(result, "chest_001.nii.gz", "does not name")


def test_val_fraction_zero_trains_on_every_case():
    names = ["a", "b", "c"]
    train, validation, note = split(names, 0.0, seed=0)
    assert train == names and validation == names and "optimistic" in note
    train, validation, _ = split(names, 0.2, seed=0)
    assert len(validation) == 1 and sorted(train + validation) == names


def test_folds_partition_the_cases():
    names = [f"case{i}" for i in range(7)]
    validated = []
    for fold in range(3):
        train, validation, note = split(names, 0.2, seed=4, folds=3, fold=fold)
        assert not set(train) & set(validation) and sorted(train + validation) == names
        assert f"fold {fold} of 3" in note
        validated += validation
    assert sorted(validated) == names  # every case validated exactly once
    with pytest.raises(ValueError, match="--fold 3"):
        split(names, 0.2, seed=4, folds=3, fold=3)


def weights(path: Path) -> dict:
    return {k: v.clone() for k, v in load_bundle(path).network.state_dict().items()}


def test_same_seed_same_model_other_seed_other_model(tmp_path, chest_files):
    image, label, _ = chest_files
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / name
        result = run_cli(
            "train",
            f"{image}:{label}",
            "-o",
            str(out),
            "--max-steps",
            "2",
            "--validate-every",
            "2",
            "--seed",
            str(seed),
            "--device",
            "cpu",
            *SMALL,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name] = weights(out / "last.safetensors")
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_torchrun_two_gloo_ranks_one_bundle_different_data(tmp_path, chest_files):
    msd = msd_folder(tmp_path, chest_files, cases=("chest_001", "chest_002", "chest_003", "chest_004"))
    out = tmp_path / "ddp"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), str(REPO)]), OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training",
        "train",
        str(msd),
        "-o",
        str(out),
        "--max-steps",
        "4",
        "--validate-every",
        "4",
        "--val-fraction",
        "0.25",
        "--device",
        "cpu",
        "--progress",
        "json",
        *SMALL,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", errors="replace", env=environment, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / "distributed" / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["batches"] for r in ranks] == [4, 4]
    assert ranks[0]["data_sha1"] != ranks[1]["data_sha1"]
    assert not set(ranks[0]["cases"]) & set(ranks[1]["cases"])  # three training cases: disjoint shares
    bundles = sorted(p.name for p in out.glob("*.safetensors"))
    assert bundles == ["checkpoint.safetensors", "last.safetensors", "model.safetensors"]
    meta = load_bundle(out / "model.safetensors").meta
    assert meta.provenance["training"]["world_size"] == 2
    done = [
        json.loads(line) for line in result.stdout.splitlines() if line.startswith("{") and '"stage": "done"' in line
    ]
    assert len(done) == 1  # only rank 0 reports
