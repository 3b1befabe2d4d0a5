"""A small MONAI bundle in the layout of the Model Zoo's wholeBody_ct_segmentation bundle, and MONAI's own
bundle inference on a CT at both of its resolutions (run as a script, in its own process):

    python Testing/monai_wholebody_model.py WORK CT.nrrd

1. WORK/ct.nii.gz: the middle of the CT, as Testing/monai_bundle_model.py writes it.
2. WORK/wholebody_like/: configs/inference.json as that bundle writes it: a SegResNet (small channels);
   ``pixdim`` and ``modelname`` as ``$... if @displayable_configs#highres else ...`` expressions; Orientationd RAS,
   Spacingd, NormalizeIntensityd nonzero then ScaleIntensityd -1..1; a Gaussian SlidingWindowInferer with
   ``padding_mode`` replicate and a ``$torch.device`` it must not evaluate; Activationsd softmax, AsDiscreted
   argmax, Invertd nearest; a top-level ``checkpointloader`` whose ``load_path`` is an expression.
   models/model.pt: a state dict after a few seeded Adam steps at 1.5 mm on intensity bands of the CT;
   models/model_lowres.pt: the same weights with the two structures' output channels swapped, so that reading
   the wrong file swaps the labels.
3. WORK/monai-highres/ct/ct_trans.nii.gz and WORK/monai-lowres/...: MONAI's inference, its components parsed
   from inference.json by MONAI's ConfigParser, with ``displayable_configs#highres`` true (1.5 mm, 27 windows)
   and false (3 mm: the CT is thinner than the 96-voxel window on every axis, so the inferer pads it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from monai_bundle_model import fit_on_crops, monai_inference, parser_for, write_ct

LABELS = {"0": "background", "1": "dense", "2": "low density"}
ROI = [96, 96, 96]
STEPS = 12
CROP = [48, 48, 48]
FINAL_LAYER = "conv_final.2.conv"  # SegResNet's last 1x1x1 convolution: one output channel per class

INFERENCE = {
    "displayable_configs": {"highres": True, "sw_overlap": 0.25, "sw_batch_size": 1},
    "imports": ["$import glob", "$import numpy", "$import os"],
    "bundle_root": ".",
    "image_key": "image",
    "output_dir": "$@bundle_root + '/eval'",
    "output_ext": ".nii.gz",
    "output_dtype": "$numpy.float32",
    "output_postfix": "trans",
    "separate_folder": True,
    "dataset_dir": "sampledata",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]",
    "modelname": "$'model.pt' if @displayable_configs#highres else 'model_lowres.pt'",
    "network_def": {
        "_target_": "SegResNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "init_filters": 8,
        "blocks_down": [1, 2, 2, 4],
        "blocks_up": [1, 1, 1],
        "dropout_prob": 0.2,
    },
    "network": "$@network_def.to(@device)",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureTyped", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@pixdim", "mode": "bilinear"},
            {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True},
            {"_target_": "ScaleIntensityd", "keys": "@image_key", "minv": -1.0, "maxv": 1.0},
        ],
    },
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "inferer": {
        "_target_": "SlidingWindowInferer",
        "roi_size": ROI,
        "sw_batch_size": "@displayable_configs#sw_batch_size",
        "overlap": "@displayable_configs#sw_overlap",
        "padding_mode": "replicate",
        "mode": "gaussian",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    },
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "@image_key",
                "nearest_interp": True,
                "to_tensor": True,
            },
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_ext": "@output_ext",
                "output_dtype": "@output_dtype",
                "output_postfix": "@output_postfix",
                "separate_folder": "@separate_folder",
            },
        ],
    },
    "checkpointloader": {
        "_target_": "CheckpointLoader",
        "load_path": "$@bundle_root + '/models/' + @modelname",
        "load_dict": {"model": "@network"},
    },
}

METADATA = {
    "version": "0.2.0",
    "changelog": {"0.2.0": "a test bundle in the wholeBody_ct_segmentation layout"},
    "monai_version": "1.4.0",
    "name": "Whole-body bands (test)",
    "task": "CT segmentation",
    "description": "A tiny SegResNet trained for a few steps on intensity bands of a chest CT.",
    "authors": "MedSegUNet tests",
    "license": "CC0 (metadata entry)",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "modality": "CT", "num_channels": 1, "spatial_shape": ROI}},
        "outputs": {"pred": {"type": "image", "num_channels": 3, "spatial_shape": ROI, "channel_def": LABELS}},
    },
}


def write_bundle(work: Path) -> Path:
    folder = work / "wholebody_like"
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=4))
    (folder / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=4))
    return folder


def train_briefly(folder: Path, ct: Path) -> None:
    """A few Adam steps of cross-entropy on random crops of the preprocessed CT (1.5 mm), the labels bands of
    the network's own input: its brightest 30% (soft tissue, bone) and its darkest 25% (lung, air); without
    dropout, which only slows these few steps (the weights are the same)."""
    import torch

    parser = parser_for(folder, folder / "eval")
    image = parser.get_parsed_content("preprocessing")({"image": str(ct)})["image"]
    array = torch.as_tensor(np.asarray(image), dtype=torch.float32)[None]  # (1, 1, X, Y, Z)
    low, high = np.quantile(array.numpy(), [0.25, 0.7])
    target = torch.where(array > high, 1, torch.where(array < low, 2, 0)).long()[:, 0]
    torch.manual_seed(0)
    generator = np.random.default_rng(0)
    parser["network_def"]["dropout_prob"] = None
    network = parser.get_parsed_content("network_def").train()
    fit_on_crops(network, array, target, STEPS, CROP, generator, learning_rate=1e-2)
    weights = network.state_dict()
    torch.save(weights, folder / "models" / "model.pt")
    swapped = {k: v.clone() for k, v in weights.items()}
    for name in (f"{FINAL_LAYER}.weight", f"{FINAL_LAYER}.bias"):
        swapped[name] = weights[name][[0, 2, 1]].clone()
    torch.save(swapped, folder / "models" / "model_lowres.pt")


def main(work: Path, ct_source: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    ct = write_ct(work, ct_source)
    folder = write_bundle(work)
    train_briefly(folder, ct)
    monai_inference(folder, ct, work / "monai-highres")
    monai_inference(folder, ct, work / "monai-lowres", {"displayable_configs#highres": False})


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
