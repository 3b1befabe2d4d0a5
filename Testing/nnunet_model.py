"""A small real nnU-Net v2 model and nnU-Net's own predictions, made with nnU-Net's code (run as a script,
in its own process: nnU-Net reads its folders from the environment when it is imported).

    python Testing/nnunet_model.py WORK CT.nrrd

1. WORK/raw/Dataset901_Chest: the CT and a threshold labelling (soft tissue, air) as an nnU-Net raw dataset.
2. nnU-Net's fingerprint extractor and experiment planner; the 3d_fullres configuration then made tiny
   (3 stages of 4-16 features, patch 48x48x16, spacing 5x5x10 mm so that resampling happens), and nnU-Net's
   preprocessing of the case.
3. Two folds: nnUNetTrainer (constructed directly, no trainer lookup) builds its network; fold 0 gets a
   few seeded Adam steps on nnU-Net's preprocessed case (smooth, non-trivial output), fold 1 those weights
   perturbed; the logger gets float64 entries as training leaves them, and the trainer's own
   save_checkpoint writes checkpoint_final.pth.
4. nnUNetPredictor (step 0.5, Gaussian, CPU) on the CT: folds 0+1 without and with mirroring, fold 0 alone;
   and folds 0+1 on a flipped copy and on a part thinner than the patch (which nnU-Net pads); segmentations
   written by nnU-Net's SimpleITK writer.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DATASET = "Dataset901_Chest"
LABELS = {"background": 0, "soft tissue": 1, "air": 2}
SPACING_ZYX = [10.0, 5.0, 5.0]
PATCH_ZYX = [16, 48, 48]
FEATURES = [4, 8, 16]
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
KERNELS = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
MIRROR_AXES = (1, 2)
STEPS = 30  # as a trainer that mirrors in-plane only saves them


def flipped_copy(image: sitk.Image) -> sitk.Image:
    """The same physical image stored with its x and y index axes reversed (LPS-like instead of RAS)."""
    array = sitk.GetArrayFromImage(image)[:, ::-1, ::-1]
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(array))
    flipped.SetSpacing(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    size = np.array(image.GetSize())
    corner = np.array(image.TransformIndexToPhysicalPoint([int(size[0] - 1), int(size[1] - 1), 0]))
    flipped.SetOrigin(tuple(corner))
    flipped.SetDirection(tuple((direction * np.array([-1.0, -1.0, 1.0])).ravel()))
    return flipped


def write_raw_dataset(work: Path, ct: Path) -> Path:
    raw = work / "raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    image = sitk.ReadImage(str(ct))
    array = sitk.GetArrayFromImage(image)
    # Two large regions apart in intensity, with background (fat, bone) between them. Air, lungs included,
    # is one label: as background, outside air would be clipped to the darkest lung value by nnU-Net's CT
    # normalization, and a briefly trained network could not tell the two apart (its labels would be ties).
    soft_tissue, air = (array > -200) & (array < 250), array < -400
    labels = np.where(soft_tissue, 1, np.where(air, 2, 0)).astype(np.uint8)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    sitk.WriteImage(image, str(raw / "imagesTr" / "chest_0000.nii.gz"))
    sitk.WriteImage(label_image, str(raw / "labelsTr" / "chest.nii.gz"))
    sitk.WriteImage(image, str(work / "ct.nii.gz"))
    sitk.WriteImage(flipped_copy(image), str(work / "ct-flipped.nii.gz"))
    # thinner than the patch on every axis of the network grid (24x24x10 voxels against 48x48x16)
    sitk.WriteImage(image[32:72, 48:88, 12:22], str(work / "ct-thin.nii.gz"))  # half lung, half soft tissue
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "name": "Chest",
        "licence": "CC0 (a test model)",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return raw


def make_plans_tiny(plans_file: Path) -> dict:
    plans = json.loads(plans_file.read_text())
    configuration = plans["configurations"]["3d_fullres"]
    configuration.update(spacing=SPACING_ZYX, patch_size=PATCH_ZYX, batch_size=2)
    arch = configuration["architecture"]["arch_kwargs"]
    arch.update(
        n_stages=3,
        features_per_stage=FEATURES,
        kernel_sizes=KERNELS,
        strides=STRIDES,
        n_conv_per_stage=[2, 2, 2],
        n_conv_per_stage_decoder=[2, 2],
    )
    for other in [name for name in plans["configurations"] if name != "3d_fullres"]:
        del plans["configurations"][other]
    plans_file.write_text(json.dumps(plans, indent=2))
    return plans


def fit_briefly(trainer, data: np.ndarray, seg: np.ndarray, seed: int, steps: int = STEPS) -> None:
    """A few Adam steps of cross-entropy on random crops of nnU-Net's preprocessed case: weights that give
    smooth, confident labels (a random network's are noise, which any resampling difference reshuffles)."""
    import torch

    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    network = trainer.network.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    image, target = torch.from_numpy(data[None]), torch.from_numpy(seg[None].astype(np.int64))
    for _ in range(steps):
        start = [int(generator.integers(0, s - p + 1)) for s, p in zip(data.shape[1:], PATCH_ZYX)]
        box = (slice(None), slice(None), *(slice(a, a + p) for a, p in zip(start, PATCH_ZYX)))
        output = network(image[box])[0]  # the full-resolution output of deep supervision
        loss = torch.nn.functional.cross_entropy(output, target[box][:, 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()


def perturb(network, weights: dict, seed: int, scale: float = 0.05) -> None:
    """``weights`` plus seeded noise of ``scale`` times each tensor's spread, loaded into ``network``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    noisy = {}
    for name, tensor in weights.items():
        spread = tensor.float().std().nan_to_num(0.0) if tensor.numel() > 1 else tensor.abs().float()
        noisy[name] = tensor + scale * spread * torch.randn(tensor.shape, generator=generator)
    network.load_state_dict(noisy)


def preprocessed_case(plans: dict, dataset: dict, raw: Path) -> tuple:
    """The training case as nnU-Net's DefaultPreprocessor makes it (normalized, on the plans' spacing)."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    data, seg, _ = DefaultPreprocessor(verbose=False).run_case(
        [str(raw / "imagesTr" / "chest_0000.nii.gz")],
        str(raw / "labelsTr" / "chest.nii.gz"),
        manager,
        manager.get_configuration("3d_fullres"),
        dataset,
    )
    return data.astype(np.float32), np.maximum(seg, 0)


def write_checkpoints(plans: dict, dataset: dict, raw: Path, folds=(0, 1)) -> list:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    data, seg = preprocessed_case(plans, dataset, raw)
    parameters = []
    for fold in folds:
        # as nnU-Net's run_training hands them over
        trainer = nnUNetTrainer({**plans, "continue_training": False}, "3d_fullres", fold, dataset, torch.device("cpu"))
        torch.manual_seed(fold)  # the initial weights too: unseeded, one clean-clone run agreed at only 0.969
        trainer.initialize()
        if not parameters:
            fit_briefly(trainer, data, seg, seed=fold)
        else:
            perturb(trainer.network, parameters[0], seed=fold)
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        trainer.inference_allowed_mirroring_axes = MIRROR_AXES
        for epoch in range(2):  # what training leaves in the logger: numpy float64 means
            trainer.logger.log("mean_fg_dice", np.float64(0.5 + 0.1 * epoch), epoch)
            trainer.logger.log("ema_fg_dice", np.float64(0.4 + 0.1 * epoch), epoch)
        trainer._best_ema = np.float64(0.5)
        trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
        parameters.append({k: v.clone() for k, v in trainer.network.state_dict().items()})
        network = trainer.network
        folder = Path(trainer.output_folder_base)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return [network, parameters, folder]


def predict(work: Path, network, parameters: list, plans: dict, dataset: dict) -> None:
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    network.decoder.deep_supervision = False
    runs = {"folds01": (parameters, False), "folds01-mirror": (parameters, True), "fold0": (parameters[:1], False)}
    io = SimpleITKIO()
    for case in ("ct", "ct-flipped", "ct-thin"):
        data, properties = io.read_images([str(work / f"{case}.nii.gz")])
        for run, (params, mirroring) in runs.items():
            if case != "ct" and run != "folds01":
                continue
            predictor = nnUNetPredictor(
                tile_step_size=0.5,
                use_gaussian=True,
                use_mirroring=mirroring,
                perform_everything_on_device=False,
                device=torch.device("cpu"),
                verbose=False,
                allow_tqdm=False,
            )
            predictor.manual_initialization(
                network, manager, manager.get_configuration("3d_fullres"), params, dataset, "nnUNetTrainer", MIRROR_AXES
            )
            segmentation = predictor.predict_single_npy_array(data, properties, None, None, False)
            io.write_seg(segmentation, str(work / f"nnunet-{case}-{run}.nii.gz"), properties)


def main(work: Path, ct: Path) -> None:
    for name in ("raw", "preprocessed", "results"):
        (work / name).mkdir(parents=True, exist_ok=True)
    os.environ.update(
        nnUNet_raw=str(work / "raw"),
        nnUNet_preprocessed=str(work / "preprocessed"),
        nnUNet_results=str(work / "results"),
    )
    raw = write_raw_dataset(work, ct)
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    torch.set_num_threads(2)
    extract_fingerprints([901], num_processes=1, check_dataset_integrity=True, verbose=False, show_progress_bar=False)
    plan_experiments([901])
    plans = make_plans_tiny(work / "preprocessed" / DATASET / "nnUNetPlans.json")
    preprocess([901], configurations=("3d_fullres",), num_processes=(1,), verbose=False)
    dataset = json.loads((raw / "dataset.json").read_text())
    network, parameters, folder = write_checkpoints(plans, dataset, raw)
    predict(work, network, parameters, plans, dataset)
    print(json.dumps({"model": str(folder)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
