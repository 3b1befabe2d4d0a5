"""A small MONAI bundle in the layout of the Model Zoo's spleen_ct_segmentation bundle, and MONAI's own
bundle inference on a CT (run as a script, in its own process):

    python Testing/monai_bundle_model.py WORK CT.nrrd

1. WORK/ct.nii.gz: the middle of the CT (the body, 64x64x20 voxels of 3.05x3.05x10 mm), as NIfTI.
2. WORK/spleen_like/: configs/inference.json as the spleen bundle writes it (LoadImaged, EnsureChannelFirstd,
   Orientationd RAS, Spacingd 1.5x1.5x2 mm, ScaleIntensityRanged -57..164 -> 0..1 clipped; that bundle's UNet
   with small channels; SlidingWindowInferer roi 64, overlap 0.5; Activationsd softmax, Invertd, AsDiscreted
   argmax, SaveImaged; the evaluator entries MONAI's runner uses), configs/metadata.json, LICENSE, and
   models/model.pt: a state dict (torch.save) after a few seeded Adam steps on the CT's intensity bands
   (soft tissue, low density), so that the labels are smooth and cover real structures.
3. WORK/monai/ct_seg.nii.gz: MONAI's inference, its components parsed from inference.json by MONAI's own
   ConfigParser (preprocessing, network, inferer, postprocessing; the evaluator itself needs pytorch-ignite).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import SimpleITK as sitk

LABELS = {"0": "background", "1": "soft tissue", "2": "low density"}
ROI = [64, 64, 64]
STEPS = 40
CROP = [48, 48, 48]  # training crops: a step on a whole 64 ROI takes 1.6 s on 2 cores

INFERENCE = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/workspace/data/Task09_Spleen",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "channels": [8, 16, 32, 64],
        "strides": [2, 2, 2],
        "num_res_units": 2,
        "norm": "batch",
    },
    "network": "$@network_def.to(@device)",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": -57,
                "a_max": 164,
                "b_min": 0,
                "b_max": 1,
                "clip": True,
            },
            {"_target_": "EnsureTyped", "keys": "image"},
        ],
    },
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "dataloader": {
        "_target_": "DataLoader",
        "dataset": "@dataset",
        "batch_size": 1,
        "shuffle": False,
        "num_workers": 4,
    },
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": ROI, "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "image",
                "nearest_interp": False,
                "to_tensor": True,
            },
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "resample": False},
        ],
    },
    "handlers": [
        {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/model.pt'",
            "load_dict": {"model": "@network"},
        },
        {"_target_": "StatsHandler", "iteration_log": False},
    ],
    "evaluator": {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
        "val_handlers": "@handlers",
        "amp": True,
    },
    "initialize": ["$monai.utils.set_determinism(seed=123)"],
    "run": ["$@evaluator.run()"],
}

METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
    "version": "0.1.0",
    "changelog": {"0.1.0": "a test bundle in the spleen_ct_segmentation layout"},
    "monai_version": "1.4.0",
    "name": "Chest bands (test)",
    "task": "Decathlon-style CT segmentation",
    "description": "A tiny UNet trained for a few steps on intensity bands of a chest CT.",
    "authors": "MedSegUNet tests",
    "copyright": "Copyright (c) MedSegUNet tests",
    "license": "CC0 (metadata entry)",
    "network_data_format": {
        "inputs": {
            "image": {
                "type": "image",
                "format": "hounsfield",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": ROI,
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": 3,
                "spatial_shape": ROI,
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": LABELS,
            }
        },
    },
}


def write_ct(work: Path, ct: Path) -> Path:
    image = sitk.ReadImage(str(ct))
    middle = image[32:96, 32:96, 7:27]
    path = work / "ct.nii.gz"
    sitk.WriteImage(middle, str(path))
    return path


def write_bundle(work: Path) -> Path:
    folder = work / "spleen_like"
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "docs").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=4))
    (folder / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=4))
    (folder / "LICENSE").write_text("CC0 1.0 (a test bundle)\n")
    (folder / "docs" / "README.md").write_text("A test bundle.\n")
    return folder


def parser_for(folder: Path, output_dir: Path, settings: Optional[Dict[str, Any]] = None):
    """MONAI's ConfigParser on the bundle, run on the CPU, with ``settings`` (id -> value) set as MONAI's
    ``run --ID VALUE`` sets them."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser.read_meta(str(folder / "configs" / "metadata.json"))
    parser["bundle_root"] = str(folder)
    parser["output_dir"] = str(output_dir)
    parser["device"] = "$torch.device('cpu')"
    if "device" in parser["inferer"]:
        parser["inferer"]["device"] = "$torch.device('cpu')"
    for key, value in (settings or {}).items():
        parser[key] = value
    return parser


def weights_file(parser) -> str:
    """The file the bundle's CheckpointLoader reads (a top-level ``checkpointloader`` or the first handler)."""
    key = "checkpointloader" if "checkpointloader" in parser.config else "handlers#0"
    return parser.get_parsed_content(f"{key}#load_path")


def train_briefly(folder: Path, ct: Path) -> None:
    """A few Adam steps of cross-entropy on random crops of the preprocessed CT; labels: soft tissue
    (-20..120 HU) and low density (below -57 HU: fat, lung and air, clipped to 0), on the network's own grid
    and axes."""
    import torch

    parser = parser_for(folder, folder / "eval")
    image = parser.get_parsed_content("preprocessing")({"image": str(ct)})["image"]
    array = torch.as_tensor(np.asarray(image), dtype=torch.float32)[None]  # (1, 1, X, Y, Z)
    hu = array * (164 + 57) - 57
    target = torch.where((hu > -20) & (hu < 120), 1, torch.where(array <= 0.0, 2, 0)).long()[:, 0]
    torch.manual_seed(0)
    generator = np.random.default_rng(0)
    network = parser.get_parsed_content("network_def").train()
    fit_on_crops(network, array, target, STEPS, CROP, generator, learning_rate=1e-2)
    torch.save(network.state_dict(), folder / "models" / "model.pt")


def fit_on_crops(network, array, target, steps: int, crop, generator, learning_rate: float) -> None:
    """``steps`` Adam steps of cross-entropy, each on a random ``crop`` of the (1, 1, X, Y, Z) ``array``."""
    import torch

    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    for _ in range(steps):
        start = [int(generator.integers(0, max(s - r, 0) + 1)) for s, r in zip(array.shape[2:], crop)]
        box = tuple(slice(a, a + r) for a, r in zip(start, crop))
        loss = torch.nn.functional.cross_entropy(
            network(array[(slice(None), slice(None), *box)]), target[(slice(None), *box)]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def monai_inference(folder: Path, ct: Path, output_dir: Path, settings: Optional[Dict[str, Any]] = None) -> None:
    """MONAI's components of the bundle, parsed from its inference.json, run on the CT as its evaluator
    runs them: the weights its CheckpointLoader names, preprocessing, the network under the inferer,
    postprocessing (which writes the labels)."""
    import torch
    from monai.data import decollate_batch, list_data_collate

    parser = parser_for(folder, output_dir, settings)
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(weights_file(parser), weights_only=True))
    network.eval()
    batch = list_data_collate([parser.get_parsed_content("preprocessing")({"image": str(ct)})])
    with torch.no_grad():
        batch["pred"] = parser.get_parsed_content("inferer")(batch["image"], network)
    postprocessing = parser.get_parsed_content("postprocessing")
    for item in decollate_batch(batch):
        postprocessing(item)


def main(work: Path, ct_source: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    ct = write_ct(work, ct_source)
    folder = write_bundle(work)
    train_briefly(folder, ct)
    monai_inference(folder, ct, work / "monai")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
