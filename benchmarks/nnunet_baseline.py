"""nnU-Net's own predictor as a baseline: the network nnU-Net's planner makes for a CT, run by
``nnUNetPredictor`` and by our ``segment`` on the bundle ``import-model`` writes from it.

    python benchmarks/nnunet_baseline.py [--size full|quick|tiny] [--spacing 3 [1.5]] [--steps N] [--bf16]
        [--body-crop] [--json FILE]
    python benchmarks/nnunet_baseline.py --quick      # the smoke check's tiny form (Testing/test_benchmarks.py)

For each spacing: the benchmark volume (volumes.py; 512x512x300 at 0.8x0.8x1.5 mm in full) resampled to
that isotropic spacing and thresholded into two labels is an nnU-Net raw dataset; nnU-Net's fingerprint
extractor and ExperimentPlanner plan it (3d_fullres: that spacing, the planner's patch and PlainConvUNet);
nnUNetTrainer, constructed directly, builds the network, takes a few seeded Adam steps on crops of nnU-Net's
preprocessed case (smooth, confident labels: an untrained network's argmax is noise that any rounding
reshuffles) and writes checkpoint_final.pth with its own save_checkpoint. Then, each a whole process of its
own, one after the other: nnUNetPredictor (step 0.5, Gaussian, no mirroring, CPU, perform_everything_on_device
False; SimpleITKIO in and out) on the benchmark volume, and ``medsegunet segment`` (the real command line,
the engine's malloc settings) on the imported bundle. Reported: wall time and peak resident memory of each
(``ru_maxrss`` from ``os.wait4``: the harness holds no image or torch while they run, so the figure is the
child's own), their ratios, and the mean Dice over the labels between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "MedSegUNet"), str(REPO), str(Path(__file__).resolve().parent)]

import volumes  # noqa: E402
from batch import engine, run_child  # noqa: E402

LABELS = {"background": 0, "soft_tissue": 1, "bone": 2}
GOALS = {"speedup": 3.0, "peak_rss_ratio": 0.5, "dice": 0.98}
# Our further arms beside the faithful float32 run: report key -> (words, segment's options)
VARIANTS = {
    "ours_bf16": ("in bf16", ["--precision", "bf16"]),
    "ours_body_crop": ("cropped to the body", ["--body-crop"]),
    "ours_bf16_body_crop": ("in bf16, cropped to the body", ["--precision", "bf16", "--body-crop"]),
}
CROP = 64  # the side of the training crops (voxels), rounded to the network's strides


# --- the children --------------------------------------------------------------------------------


def make_volume(path: Path, size: str) -> None:
    """(A child) the benchmark volume as a .nii.gz."""
    volumes.write_volume(path, volumes.SIZES[size], volumes.source_ct(log=lambda *_: None))


def nnunet_folders(work: Path) -> None:
    """nnU-Net reads its folders from the environment when it is imported."""
    for name in ("raw", "preprocessed", "results"):
        (work / name).mkdir(parents=True, exist_ok=True)
        os.environ[f"nnUNet_{name}"] = str(work / name)


def write_raw_dataset(work: Path, ct: Path, spacing: float, dataset_id: int) -> Path:
    """The CT at ``spacing`` mm (isotropic) and its threshold labels, as an nnU-Net raw dataset."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(ct))
    size = [max(1, round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    coarse = sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [spacing] * 3, image.GetDirection(), -1000
    )
    array = sitk.GetArrayFromImage(coarse)
    labels = np.where((array > -200) & (array < 250), 1, np.where(array >= 250, 2, 0)).astype(np.uint8)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(coarse)
    raw = work / "raw" / f"Dataset{dataset_id:03d}_Bench"
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(exist_ok=True)
    sitk.WriteImage(coarse, str(raw / "imagesTr" / "ct_0000.nii.gz"))
    sitk.WriteImage(label_image, str(raw / "labelsTr" / "ct.nii.gz"))
    dataset = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 1, "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return raw


def fit_briefly(network: Any, data: Any, seg: Any, divisor: List[int], steps: int, seed: int = 0) -> None:
    """``steps`` Adam steps of cross-entropy on random crops (about CROP voxels a side) of the case."""
    import numpy as np
    import torch

    crop = [max(d, (min(CROP, n) // d) * d) for d, n in zip(divisor, data.shape[1:])]
    pad = [(0, 0)] + [(0, max(0, c - n)) for c, n in zip(crop, data.shape[1:])]
    data = np.pad(data, pad, constant_values=float(data.min()))
    seg = np.pad(seg, pad)
    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    image, target = torch.from_numpy(data[None]), torch.from_numpy(seg[None].astype(np.int64))
    network.train()
    for _ in range(steps):
        start = [int(generator.integers(0, n - c + 1)) for n, c in zip(data.shape[1:], crop)]
        box = (slice(None), slice(None), *(slice(a, a + c) for a, c in zip(start, crop)))
        loss = torch.nn.functional.cross_entropy(network(image[box])[0], target[box][:, 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()


def plan_and_train(work: Path, ct: Path, spacing: float, steps: int, dataset_id: int) -> dict:
    """(A child) nnU-Net's plan for the CT at ``spacing`` and a checkpoint its trainer writes; the model folder."""
    nnunet_folders(work)
    raw = write_raw_dataset(work, ct, spacing, dataset_id)
    import numpy as np
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, verbose=False)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=("3d_fullres",), num_processes=(1,), verbose=False)  # the trainer wants it
    plans = json.loads((work / "preprocessed" / raw.name / "nnUNetPlans.json").read_text())
    dataset = json.loads((raw / "dataset.json").read_text())
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    data, seg, _ = DefaultPreprocessor(verbose=False).run_case(
        [str(raw / "imagesTr" / "ct_0000.nii.gz")], str(raw / "labelsTr" / "ct.nii.gz"), manager, configuration, dataset
    )
    trainer = nnUNetTrainer({**plans, "continue_training": False}, "3d_fullres", 0, dataset, torch.device("cpu"))
    torch.manual_seed(0)  # the network's initial weights too: an unseeded start made some runs near-ties
    trainer.initialize()
    strides = configuration.network_arch_init_kwargs["strides"]
    divisor = [int(np.prod([s[axis] for s in strides])) for axis in range(3)]
    fit_briefly(trainer.network, data.astype(np.float32), np.maximum(seg, 0), divisor, steps)
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    folder = Path(trainer.output_folder_base)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return {
        "model": str(folder),
        "network": configuration.network_arch_class_name.rsplit(".", 1)[-1],
        "parameters": sum(p.numel() for p in trainer.network.parameters()),
        "patch_zyx": list(configuration.patch_size),
        "spacing_zyx": list(configuration.spacing),
        "features": list(configuration.network_arch_init_kwargs["features_per_stage"]),
        "training_steps": steps,
    }


def predict_with_nnunet(model: Path, image: Path, output: Path, device: str = "cpu") -> None:
    """(A child) nnUNetPredictor as its users run it on one CT, without mirroring (on the CPU by default)."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((model / "plans.json").read_text())
    dataset = json.loads((model / "dataset.json").read_text())
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    # our own file: the benchmark may unpickle it (the importer never does)
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    network = nnUNetTrainer.build_network_architecture(manager, configuration, 1, len(LABELS), False)
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=False,
        perform_everything_on_device=False,
        device=torch.device(device),
        verbose=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network, manager, configuration, [checkpoint["network_weights"]], dataset, "nnUNetTrainer", None
    )
    io = SimpleITKIO()
    data, properties = io.read_images([str(image)])
    segmentation = predictor.predict_single_npy_array(data, properties, None, None, False)
    io.write_seg(segmentation, str(output), properties)


def worker(args: argparse.Namespace) -> None:
    if args.worker == "volume":
        make_volume(Path(args.image), args.size)
    elif args.worker == "plan":
        described = plan_and_train(Path(args.work), Path(args.image), args.spacing[0], args.steps, args.dataset_id)
        Path(args.output).write_text(json.dumps(described))
    else:
        predict_with_nnunet(Path(args.model), Path(args.image), Path(args.output), args.device)


# --- the harness ---------------------------------------------------------------------------------


def child(*arguments: str) -> List[str]:
    return [sys.executable, __file__, *arguments]


def quiet_run(command: List[str]) -> None:
    """A preparation step (not measured)."""
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-3000:]}")


def compare(
    work: Path,
    ct: Path,
    spacing: float,
    steps: int,
    dataset_id: int,
    log,
    device: str = "cpu",
    variants: Sequence[str] = (),
) -> dict:
    """One spacing: plan, train briefly, import, then nnU-Net's predictor and ours, each a whole process;
    then ours once more for each of ``variants`` (VARIANTS' keys)."""
    described_path = work / f"plan-{spacing:g}.json"
    start = time.perf_counter()
    quiet_run(
        child("--worker", "plan", "--work", str(work), "--image", str(ct), "--spacing", str(spacing),
              "--steps", str(steps), "--dataset-id", str(dataset_id), "--output", str(described_path))
    )  # fmt: skip
    described = json.loads(described_path.read_text())
    log(f"{spacing:g} mm: planned and trained in {time.perf_counter() - start:.0f} s: {described}")
    bundle = work / f"imported-{spacing:g}.safetensors"
    quiet_run(engine("import-model", described["model"], "-o", str(bundle), "--progress", "none"))
    theirs, ours = work / f"nnunet-{spacing:g}.nii.gz", work / f"ours-{spacing:g}.nii.gz"
    nnunet_s, nnunet_mb = run_child(child("--worker", "nnunet", "--model", described["model"], "--image", str(ct),
                                          "--output", str(theirs), "--device", device))  # fmt: skip
    log(f"{spacing:g} mm: nnUNetPredictor {nnunet_s:.1f} s, {nnunet_mb:.0f} MB")
    ours_s, ours_mb = run_child(
        engine("segment", str(ct), "-m", str(bundle), "-o", str(ours), "--device", device, "--progress", "none")
    )
    log(f"{spacing:g} mm: ours {ours_s:.1f} s, {ours_mb:.0f} MB")
    run = {
        **described,
        "nnunet": {"wall_s": nnunet_s, "peak_rss_mb": nnunet_mb, "output": str(theirs)},
        "ours": {"wall_s": ours_s, "peak_rss_mb": ours_mb, "output": str(ours)},
        "speedup_vs_nnunet": nnunet_s / ours_s,
        "peak_rss_ratio_vs_nnunet": ours_mb / nnunet_mb,
    }
    for variant in variants:
        words, options = VARIANTS[variant]
        output = work / f"{variant.replace('_', '-')}-{spacing:g}.nii.gz"
        command = engine("segment", str(ct), "-m", str(bundle), "-o", str(output), "--device", device)
        wall_s, peak_mb = run_child([*command, *options, "--progress", "none"])
        log(f"{spacing:g} mm: ours {words} {wall_s:.1f} s, {peak_mb:.0f} MB")
        run[variant] = {
            "options": options,
            "wall_s": wall_s,
            "peak_rss_mb": peak_mb,
            "output": str(output),
            "speedup_vs_nnunet": nnunet_s / wall_s,
            "peak_rss_ratio_vs_nnunet": peak_mb / nnunet_mb,
        }
    return run


def with_dice(run: dict) -> dict:
    """The Dice between the outputs (read only now: the harness must stay small while children are measured)."""
    run["dice_ours_vs_nnunet"] = volumes.dice_between(Path(run["ours"]["output"]), Path(run["nnunet"]["output"]))
    for variant in VARIANTS:
        if variant in run:
            arm = run[variant]
            arm["dice_vs_nnunet"] = volumes.dice_between(Path(arm["output"]), Path(run["nnunet"]["output"]))
    run["goals_met"] = {
        "speedup >= 3": run["speedup_vs_nnunet"] >= GOALS["speedup"],
        "peak memory <= 0.5x": run["peak_rss_ratio_vs_nnunet"] <= GOALS["peak_rss_ratio"],
        "dice >= 0.98": run["dice_ours_vs_nnunet"] >= GOALS["dice"],
    }
    return run


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in load],
        "python": sys.version.split()[0],
    }


def harness(args: argparse.Namespace, log=print) -> dict:
    size = "tiny" if args.quick else args.size
    spacings = args.spacing or ([6.0] if args.quick else [3.0])
    steps = args.steps if args.steps is not None else (10 if args.quick else 6)
    variants = [v for v, on in [("ours_bf16", args.bf16), ("ours_body_crop", args.body_crop)] if on]
    if args.bf16 and args.body_crop:
        variants.append("ours_bf16_body_crop")
    with tempfile.TemporaryDirectory(prefix="nnunet-bench-") as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        ct = work / "ct.nii.gz"
        quiet_run(child("--worker", "volume", "--image", str(ct), "--size", size))
        report: Dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "volume": volumes.SIZES[size].describe(),
            "machine_before": machine(),
            "device": args.device,
            "runs": [
                compare(work, ct, spacing, steps, 950 + index, log, args.device, variants)
                for index, spacing in enumerate(spacings)
            ],
        }
        report["runs"] = [with_dice(run) for run in report["runs"]]
        report["machine_after"] = machine()
    return report


def print_table(report: dict) -> None:
    print(f"{report['volume']}, {report['date']}, load {report['machine_before']['load_average_1_5_15']}")
    print("spacing | network (params) | nnU-Net s / MB | ours s / MB | speedup | memory | Dice")
    for run in report["runs"]:
        print(
            f"{run['spacing_zyx'][0]:g} mm | {run['network']} ({run['parameters'] / 1e6:.1f} M, patch "
            f"{'x'.join(map(str, run['patch_zyx']))}) | {run['nnunet']['wall_s']:.1f} / "
            f"{run['nnunet']['peak_rss_mb']:.0f} | {run['ours']['wall_s']:.1f} / {run['ours']['peak_rss_mb']:.0f} | "
            f"{run['speedup_vs_nnunet']:.2f}x | {run['peak_rss_ratio_vs_nnunet']:.2f}x | "
            f"{run['dice_ours_vs_nnunet']:.4f}"
        )
        for variant, (words, _) in VARIANTS.items():
            if variant in run:
                arm = run[variant]
                print(
                    f"  ours {words}: {arm['wall_s']:.1f} s / {arm['peak_rss_mb']:.0f} MB | "
                    f"{arm['speedup_vs_nnunet']:.2f}x | {arm['peak_rss_ratio_vs_nnunet']:.2f}x | "
                    f"{arm['dice_vs_nnunet']:.4f}"
                )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(volumes.SIZES), default="full", help="the benchmark volume (full)")
    parser.add_argument("--quick", action="store_true", help="the smoke check: tiny volume, 6 mm plan, 10 steps")
    parser.add_argument("--spacing", type=float, nargs="+", help="isotropic spacings to plan for, mm (3)")
    parser.add_argument("--steps", type=int, help="training steps before the checkpoint is written (6; quick 10)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both predict (cpu)")
    parser.add_argument(
        "--bf16", action="store_true", help="ours once more with --precision bf16 (CPUs with AVX512-BF16 or AMX)"
    )
    parser.add_argument(
        "--body-crop", action="store_true", help="ours once more with --body-crop (and in bf16 too, with --bf16)"
    )
    parser.add_argument("--work", help="keep the models and outputs in this folder")
    parser.add_argument("--json", help="write the report as JSON here")
    parser.add_argument("--worker", choices=["volume", "plan", "nnunet"], help=argparse.SUPPRESS)
    for hidden in ("--image", "--output", "--model"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--dataset-id", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    report = harness(args, log=lambda message: print(message, file=sys.stderr, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    print_table(report)


if __name__ == "__main__":
    main()
