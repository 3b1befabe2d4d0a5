"""MONAI's own bundle inference as a baseline: a bundle in the layout of the Model Zoo's
wholeBody_ct_segmentation (its SegResNet, 105 output channels, 96³ windows at overlap 0.25, Gaussian, replicate
padding, z-score then -1..1), run by MONAI's components parsed from its ``inference.json`` and by our
``segment`` on the bundle ``import-model`` writes from it.

    python benchmarks/monai_bundle_baseline.py [--size full|quick|tiny] [--spacing 3 [1.5]] [--steps N]
        [--repeats N] [--bf16] [--device cpu|cuda] [--json FILE]
    python benchmarks/monai_bundle_baseline.py --quick    # the smoke check: tiny volume, small network, 5 mm

The benchmark volume (volumes.py; 512x512x300 at 0.8x0.8x1.5 mm in full) is segmented at each spacing: 3 mm
is the bundle's ``highres`` false (``model_lowres.pt``, imported with ``--set displayable_configs#highres=false``
as a user picks it), 1.5 mm its default. The weights: a few seeded Adam steps on four intensity bands of the
volume (smooth, confident labels: an untrained network's argmax is noise that any rounding reshuffles); the
other 101 channels are never the answer but cost what they cost.

Each run is a whole process. MONAI's side loads the weights its ``checkpointloader`` names, then runs the
preprocessing, the network under the inferer and the postprocessing (Activationsd, AsDiscreted, Invertd,
SaveImaged) as its SupervisedEvaluator runs them (on a GPU in fp16 autocast, as its ``amp: true`` asks),
with PyTorch's default threads. Ours is ``medsegunet segment`` with the engine's malloc settings. Runs
alternate MONAI / ours. Reported: medians of wall time and peak resident memory, their ratios, and the mean
Dice between the two outputs. ``--bf16``: ours once more per repeat with ``--precision bf16`` (CPUs with
AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "MedSegUNet"), str(REPO), str(Path(__file__).resolve().parent)]

import volumes  # noqa: E402
from batch import engine, run_child  # noqa: E402
from nnunet_baseline import machine, make_volume, quiet_run  # noqa: E402

CLASSES = 105  # wholeBody_ct_segmentation: background and 104 structures
NETWORK = {"init_filters": 32, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "dropout_prob": 0.2}
QUICK_NETWORK = {**NETWORK, "init_filters": 8}
ROI, QUICK_ROI = [96, 96, 96], [32, 32, 32]
CROP = 64  # training crops (voxels)


def inference_config(network: Dict[str, Any], roi: List[int], spacing: float) -> dict:
    """The bundle's inference.json: wholeBody_ct_segmentation's entries, ``highres`` choosing 1.5 mm and
    model.pt or ``spacing`` and model_lowres.pt."""
    return {
        "displayable_configs": {"highres": True, "sw_overlap": 0.25, "sw_batch_size": 1},
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "output_dtype": "$numpy.uint8",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "pixdim": f"$[1.5, 1.5, 1.5] if @displayable_configs#highres else [{spacing}, {spacing}, {spacing}]",
        "modelname": "$'model.pt' if @displayable_configs#highres else 'model_lowres.pt'",
        "network_def": {
            "_target_": "SegResNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": CLASSES,
            **network,
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureTyped", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": "@pixdim", "mode": "bilinear"},
                {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True},
                {"_target_": "ScaleIntensityd", "keys": "image", "minv": -1.0, "maxv": 1.0},
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": roi,
            "sw_batch_size": "@displayable_configs#sw_batch_size",
            "overlap": "@displayable_configs#sw_overlap",
            "padding_mode": "replicate",
            "mode": "gaussian",
            "device": "$torch.device('cpu')",
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
                    "orig_keys": "image",
                    "nearest_interp": True,
                    "to_tensor": True,
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_dtype": "@output_dtype",
                    "output_postfix": "seg",
                    "separate_folder": False,
                    "resample": False,
                },
            ],
        },
        "checkpointloader": {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/' + @modelname",
            "load_dict": {"model": "@network"},
        },
    }


def metadata() -> dict:
    names = {"0": "background", **{str(index): f"class {index}" for index in range(1, CLASSES)}}
    outputs = {"pred": {"type": "image", "num_channels": CLASSES, "channel_def": names}}
    inputs = {"image": {"type": "image", "modality": "CT", "num_channels": 1}}
    return {
        "name": "wholeBody-like (benchmark)",
        "version": "0.0.1",
        "network_data_format": {"inputs": inputs, "outputs": outputs},
    }


def parser_for(folder: Path, output_dir: Path, highres: bool, device: str = "cpu"):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser.read_meta(str(folder / "configs" / "metadata.json"))
    parser["bundle_root"] = str(folder)
    parser["output_dir"] = str(output_dir)
    parser["device"] = parser["inferer"]["device"] = f"$torch.device('{device}')"
    parser["displayable_configs"]["highres"] = highres
    return parser


# --- the children --------------------------------------------------------------------------------


def make_bundle(folder: Path, image: Path, spacing: float, steps: int, quick: bool) -> None:
    """(A child) the bundle folder, its weights for ``spacing`` after ``steps`` Adam steps on four intensity
    bands of the volume preprocessed as the bundle preprocesses it (each a contiguous range: no label lies
    between two others, where a briefly trained network would hesitate)."""
    import numpy as np
    import torch

    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    config = inference_config(QUICK_NETWORK if quick else NETWORK, QUICK_ROI if quick else ROI, spacing)
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata(), indent=2))
    highres = spacing == 1.5
    parser = parser_for(folder, folder / "eval", highres)
    array = torch.as_tensor(np.asarray(parser.get_parsed_content("preprocessing")({"image": str(image)})["image"]))
    array = array[None].float()  # (1, 1, X, Y, Z)
    edges = torch.as_tensor(np.quantile(array.numpy(), [0.3, 0.6, 0.85]), dtype=array.dtype)
    target = torch.bucketize(array, edges)[:, 0]  # 0 air and lung, 1 fat, 2 soft tissue, 3 bone and contrast
    torch.manual_seed(0)
    generator = np.random.default_rng(0)
    parser["network_def"]["dropout_prob"] = None  # the same weights; dropout only slows a few steps down
    network = parser.get_parsed_content("network_def").train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    crop = [min(CROP, (n // 8) * 8) for n in array.shape[2:]]
    for _ in range(steps):
        start = [int(generator.integers(0, n - c + 1)) for n, c in zip(array.shape[2:], crop)]
        box = tuple(slice(a, a + c) for a, c in zip(start, crop))
        scores = network(array[(slice(None), slice(None), *box)])
        loss = torch.nn.functional.cross_entropy(scores, target[(slice(None), *box)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(network.state_dict(), folder / "models" / parser.get_parsed_content("modelname"))


def predict_with_monai(folder: Path, image: Path, output: Path, highres: bool, device: str = "cpu") -> None:
    """(A child) the bundle's components as its evaluator runs them on ``device``; the labels at ``output``."""
    import torch
    from monai.data import decollate_batch, list_data_collate

    parser = parser_for(folder, output.parent, highres, device)
    network = parser.get_parsed_content("network")
    load_path = parser.get_parsed_content("checkpointloader#load_path")
    network.load_state_dict(torch.load(load_path, map_location=device, weights_only=True))
    network.eval()
    batch = list_data_collate([parser.get_parsed_content("preprocessing")({"image": str(image)})])
    with torch.no_grad(), torch.autocast("cuda", enabled=device == "cuda"):
        batch["pred"] = parser.get_parsed_content("inferer")(batch["image"].to(device), network)
    postprocessing = parser.get_parsed_content("postprocessing")
    for item in decollate_batch(batch):
        postprocessing(item)
    written = output.parent / f"{image.name.split('.')[0]}_seg.nii.gz"
    written.replace(output)


def worker(args: argparse.Namespace) -> None:
    if args.worker == "volume":
        make_volume(Path(args.image), args.size)
    elif args.worker == "bundle":
        make_bundle(Path(args.bundle), Path(args.image), args.spacing[0], args.steps, args.quick)
    else:
        predict_with_monai(Path(args.bundle), Path(args.image), Path(args.output), args.spacing[0] == 1.5, args.device)


# --- the harness ---------------------------------------------------------------------------------


def child(*arguments: str) -> List[str]:
    return [sys.executable, __file__, *arguments]


def compare(work: Path, ct: Path, spacing: float, steps: int, args: argparse.Namespace, log) -> dict:
    """One spacing: the bundle, its import, then MONAI's inference and ours (and ours in bf16), alternating,
    each a whole process."""
    folder = work / f"bundle-{spacing:g}"
    start = time.perf_counter()
    flags = ["--quick"] * args.quick
    quiet_run(child("--worker", "bundle", "--bundle", str(folder), "--image", str(ct), "--spacing", str(spacing),
                    "--steps", str(steps), *flags))  # fmt: skip
    log(f"{spacing:g} mm: bundle trained in {time.perf_counter() - start:.0f} s")
    imported = work / f"imported-{spacing:g}.safetensors"
    settings = [] if spacing == 1.5 else ["--set", "displayable_configs#highres=false"]
    quiet_run(engine("import-model", str(folder), "-o", str(imported), "--progress", "none", *settings))
    outputs = {side: work / f"{side}-{spacing:g}.nii.gz" for side in ("monai", "ours", "ours_bf16")}

    def segment(side: str, *options: str) -> List[str]:
        return engine("segment", str(ct), "-m", str(imported), "-o", str(outputs[side]), "--device", args.device,
                      "--progress", "none", *options)  # fmt: skip

    commands = {
        "monai": child("--worker", "monai", "--bundle", str(folder), "--image", str(ct), "--device", args.device,
                       "--output", str(outputs["monai"]), "--spacing", str(spacing), *flags),
        "ours": segment("ours"),
    }  # fmt: skip
    if args.bf16:
        commands["ours_bf16"] = segment("ours_bf16", "--precision", "bf16")
    runs: Dict[str, Dict[str, List[float]]] = {side: {"wall_s": [], "peak_rss_mb": []} for side in commands}
    for repeat in range(args.repeats):
        for side, command in commands.items():
            wall_s, peak_mb = run_child(command)
            runs[side]["wall_s"].append(wall_s)
            runs[side]["peak_rss_mb"].append(peak_mb)
            log(f"{spacing:g} mm, run {repeat + 1}: {side} {wall_s:.1f} s, {peak_mb:.0f} MB")
    report: Dict[str, Any] = {
        "spacing_mm": spacing,
        "network": f"SegResNet {config_network(args.quick)}, {CLASSES} classes",
    }
    for side, values in runs.items():
        medians = {key: statistics.median(series) for key, series in values.items()}
        report[side] = {**medians, "runs": values, "output": outputs[side].name}  # in the work folder
        if side != "monai":
            report[side]["speedup_vs_monai"] = report["monai"]["wall_s"] / medians["wall_s"]
            report[side]["peak_rss_ratio_vs_monai"] = medians["peak_rss_mb"] / report["monai"]["peak_rss_mb"]
    return report


def config_network(quick: bool) -> str:
    network = QUICK_NETWORK if quick else NETWORK
    return f"init_filters {network['init_filters']}, blocks_down {network['blocks_down']}"


def harness(args: argparse.Namespace, log=print) -> dict:
    size = "tiny" if args.quick else args.size
    # 5 mm: no input voxel centre of the tiny volume lies halfway between two network voxels, where the
    # nearest-neighbour restore of MONAI's Invertd and ours may each pick a side (6 mm would put half of them there)
    spacings = args.spacing or ([5.0] if args.quick else [3.0])
    steps = args.steps if args.steps is not None else (4 if args.quick else 10)
    with tempfile.TemporaryDirectory(prefix="monai-bench-") as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        ct = work / "ct.nii.gz"
        quiet_run(child("--worker", "volume", "--image", str(ct), "--size", size))
        report: Dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "volume": volumes.SIZES[size].describe(),
            "machine_before": machine(),
            "runs": [compare(work, ct, spacing, steps, args, log) for spacing in spacings],
        }
        for run in report["runs"]:  # read only now: the harness must stay small while children are measured
            for side in ("ours", "ours_bf16"):
                if side in run:
                    theirs = work / run["monai"]["output"]
                    run[side]["dice_vs_monai"] = volumes.dice_between(work / run[side]["output"], theirs)
        report["machine_after"] = machine()
    return report


def print_table(report: dict) -> None:
    print(f"{report['volume']}, {report['date']}, load {report['machine_before']['load_average_1_5_15']}")
    print("spacing | network | MONAI s / MB | ours s / MB | speedup | memory | Dice")
    for run in report["runs"]:
        for side in ("ours", "ours_bf16"):
            if side in run:
                ours = run[side]
                print(
                    f"{run['spacing_mm']:g} mm | {run['network']} | {run['monai']['wall_s']:.1f} / "
                    f"{run['monai']['peak_rss_mb']:.0f} | {side}: {ours['wall_s']:.1f} / {ours['peak_rss_mb']:.0f} | "
                    f"{ours['speedup_vs_monai']:.2f}x | {ours['peak_rss_ratio_vs_monai']:.2f}x | "
                    f"{ours['dice_vs_monai']:.4f}"
                )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(volumes.SIZES), default="full", help="the benchmark volume (full)")
    parser.add_argument("--quick", action="store_true", help="the smoke check: tiny volume, small network, 5 mm")
    parser.add_argument("--spacing", type=float, nargs="+", help="isotropic spacings, mm: 1.5 and/or another (3)")
    parser.add_argument("--steps", type=int, help="training steps before the weights are saved (10; quick 4)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating (1)")
    parser.add_argument(
        "--bf16", action="store_true", help="ours once more with --precision bf16 (CPUs with AVX512-BF16 or AMX)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both predict (cpu)")
    parser.add_argument("--work", help="keep the bundles and outputs in this folder")
    parser.add_argument("--json", help="write the report as JSON here")
    parser.add_argument("--worker", choices=["volume", "bundle", "monai"], help=argparse.SUPPRESS)
    for hidden in ("--image", "--output", "--bundle"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
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
