"""Inference benchmark: `medsegunet segment` end to end against the pipeline a MONAI user would write.

    python benchmarks/inference.py [--quick] [--repeats N] [--json FILE]

Both pipelines run the same bundle network and weights on the same generated CT-like volume, each run
in its own child process (so peak resident memory is that run's alone), alternating ours/baseline.
Printed: wall time per stage, total, peak RSS, medians and ratios; the network-only time for the same
number of windows (the floor); and the Dice between the two outputs (they must agree).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "MedSegUNet"), str(REPO)]

SIZES = {
    # name: (size xyz, spacing xyz, bundle spacing, patch xyz)
    "full": ((512, 512, 300), (0.8, 0.8, 1.5), (1.5, 1.5, 1.5), (96, 96, 96)),
    "quick": ((256, 256, 120), (1.2, 1.2, 2.5), (2.5, 2.5, 2.5), (64, 64, 64)),
}


def make_volume(path: Path, size, spacing) -> None:
    """A CT-like phantom: air around an elliptic body of soft tissue with organs and bone."""
    import SimpleITK as sitk

    x, y, z = [np.linspace(-1, 1, n, dtype=np.float32) for n in size]
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij", sparse=True)
    body = np.broadcast_to((xx / 0.85) ** 2 + (yy / 0.65) ** 2 <= 1, (size[2], size[1], size[0]))
    volume = np.where(body, 40.0, -1000.0).astype(np.float32)
    volume[((xx - 0.3) / 0.3) ** 2 + (yy / 0.25) ** 2 + (zz / 0.5) ** 2 <= 1] = 90.0  # "liver"
    volume[((xx + 0.4) / 0.12) ** 2 + ((yy - 0.1) / 0.12) ** 2 + (zz / 0.3) ** 2 <= 1] = 120.0  # "spleen"
    volume[np.broadcast_to((xx / 0.08) ** 2 + ((yy + 0.45) / 0.08) ** 2 <= 1, volume.shape)] = 700.0  # "spine"
    volume += np.random.default_rng(0).normal(0, 15, volume.shape).astype(np.float32)
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-200.0, -180.0, -300.0))
    sitk.WriteImage(image, str(path), useCompression=True)


def make_bundle(path: Path, spacing, patch) -> None:
    from MedSegUNetLib.bundle import Normalization, Preprocessing, create_bundle, save_bundle
    from MedSegUNetLib.labels import default_labels

    preprocessing = Preprocessing(spacing, patch, "RAS", Normalization("ct", (-1000.0, 1000.0)))
    bundle = create_bundle(default_labels(["liver", "spleen", "spine"]), preprocessing, ["CT"], base_filters=16)
    save_bundle(path, bundle.meta, bundle.network)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- the two workers (each runs in its own process) ------------------------------------------------


def run_ours(image: Path, bundle: Path, output: Path) -> dict:
    """`medsegunet segment`, timed per stage from its own progress reports."""
    import monai.inferers  # noqa: F401  imported before the clock starts, as the baseline's are
    import torch  # noqa: F401

    from MedSegUNetLib.cli import main
    from MedSegUNetLib import progress as progress_module

    stamps = []

    class Timing(progress_module.Progress):
        def update(self, stage, done, total, message="", **extra):
            stamps.append((stage, time.perf_counter()))

    progress_module.make_progress = lambda kind: Timing()
    start = time.perf_counter()
    code = main(["segment", str(image), "-m", str(bundle), "-o", str(output), "--device", "cpu", "--progress", "none"])
    end = time.perf_counter()
    assert code == 0
    stages = {}
    boundaries = stamps + [("end", end)]
    previous_stage, previous_time = "read", start
    for stage, stamp in boundaries:
        if stage != previous_stage:
            stages[previous_stage] = stages.get(previous_stage, 0.0) + stamp - previous_time
            previous_stage, previous_time = stage, stamp
    stages[previous_stage] = stages.get(previous_stage, 0.0) + end - previous_time
    stages.pop("end", None)
    stages.pop("done", None)
    return {"total": end - start, "stages": stages}


def run_baseline(image: Path, bundle_path: Path, output: Path) -> dict:
    """What a MONAI user writes: LoadImaged, Orientationd, Spacingd, ScaleIntensityRanged,
    sliding_window_inference (overlap 0.5, Gaussian), Invertd, SaveImage."""
    import torch
    from monai.data import decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImage,
        ScaleIntensityRanged,
        Spacingd,
    )

    from MedSegUNetLib.bundle import load_bundle

    stages = {}
    start = time.perf_counter()
    bundle = load_bundle(bundle_path)
    prep = bundle.meta.preprocessing
    pre = Compose(
        [
            LoadImaged("image"),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes=prep.orientation),
            Spacingd("image", pixdim=prep.target_spacing, mode="bilinear"),
            ScaleIntensityRanged("image", a_min=prep.normalization.clip[0], a_max=prep.normalization.clip[1], b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    data = pre({"image": str(image)})
    t1 = time.perf_counter()
    stages["read+preprocess"] = t1 - start
    network = bundle.network

    def zyx_network(x):
        # LoadImage arrays are (x, y, z); the bundle's network was trained on (z, y, x) arrays.
        return network(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)

    with torch.inference_mode():
        logits = sliding_window_inference(
            data["image"][None].float(), list(prep.patch_size), 2, zyx_network, overlap=0.5, mode="gaussian"
        )
    t2 = time.perf_counter()
    stages["predict"] = t2 - t1
    data["pred"] = logits[0]
    post = Compose(
        [
            AsDiscreted("pred", argmax=True),
            Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True),
        ]
    )
    restored = post(data)["pred"]
    t3 = time.perf_counter()
    stages["restore"] = t3 - t2
    SaveImage(output_dir=str(output.parent), output_postfix="", separate_folder=False, output_dtype=np.uint8, resample=False)(
        restored, meta_data=restored.meta
    )
    end = time.perf_counter()
    stages["write"] = end - t3
    return {"total": end - start, "stages": stages, "output": str(output)}


def run_network_floor(bundle_path: Path, windows: int) -> dict:
    """Network forward passes only, for the same number of windows and batch size: the floor."""
    import torch

    from MedSegUNetLib.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    patch = list(bundle.meta.preprocessing.patch_size[::-1])
    batch = torch.randn(2, 1, *patch)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range((windows + 1) // 2):
            bundle.network(batch)
    return {"total": time.perf_counter() - start}


def worker(args) -> None:
    image, bundle, output = Path(args.image), Path(args.bundle), Path(args.output)
    if args.worker == "ours":
        result = run_ours(image, bundle, output)
    elif args.worker == "baseline":
        result = run_baseline(image, bundle, output)
    else:
        result = run_network_floor(bundle, args.windows)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# --- the harness --------------------------------------------------------------------------------


def spawn(kind: str, image: Path, bundle: Path, output: Path, windows: int = 0) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--image", str(image), "--bundle", str(bundle), "--output", str(output), "--windows", str(windows)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def baseline_output(folder: Path, image: Path) -> Path:
    stem = image.name.split(".")[0]
    return next(folder.glob(f"{stem}*.nii.gz"))


def dice_between(a: Path, b: Path) -> float:
    import SimpleITK as sitk

    x, y = sitk.GetArrayFromImage(sitk.ReadImage(str(a))), sitk.GetArrayFromImage(sitk.ReadImage(str(b)))
    if x.shape != y.shape:
        return float("nan")
    scores = []
    for value in sorted(set(np.unique(x)) | set(np.unique(y)) - {0}):
        p, q = x == value, y == value
        scores.append(2 * np.count_nonzero(p & q) / max(np.count_nonzero(p) + np.count_nonzero(q), 1))
    return float(np.mean(scores)) if scores else 1.0


def harness(args) -> None:
    from MedSegUNetLib.inference import count_windows
    from MedSegUNetLib.geometry import resampled_grid

    size, spacing, bundle_spacing, patch = SIZES["quick" if args.quick else "full"]
    work = Path(tempfile.mkdtemp(prefix="medsegunet-bench-"))
    image, bundle = work / "ct.nii.gz", work / "model.safetensors"
    make_volume(image, size, spacing)
    make_bundle(bundle, bundle_spacing, patch)
    import SimpleITK as sitk

    grid = resampled_grid(sitk.ReadImage(str(image)), bundle_spacing)
    windows = count_windows(grid.size[::-1], patch[::-1], 0.5)
    runs = {"ours": [], "baseline": []}
    for repeat in range(args.repeats):
        for kind in ("ours", "baseline") if repeat % 2 == 0 else ("baseline", "ours"):
            folder = work / f"{kind}{repeat}"
            folder.mkdir()
            output = folder / ("ct.seg.nrrd" if kind == "ours" else "ct.nii.gz")
            runs[kind].append(spawn(kind, image, bundle, output))
            print(f"run {repeat + 1}/{args.repeats} {kind:>8}: {runs[kind][-1]['total']:.1f} s, {runs[kind][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    floor = spawn("floor", image, bundle, work / "floor", windows)
    agreement = dice_between(work / "ours0" / "ct.seg.nrrd", baseline_output(work / "baseline0", image))
    report = summarize(runs, floor, agreement, size, spacing, windows)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")


def summarize(runs, floor, agreement, size, spacing, windows) -> dict:
    def median(kind, key):
        return statistics.median(run[key] for run in runs[kind])

    def stage_medians(kind):
        names = runs[kind][0]["stages"].keys()
        return {name: statistics.median(run["stages"].get(name, 0.0) for run in runs[kind]) for name in names}

    ours_total, base_total = median("ours", "total"), median("baseline", "total")
    return {
        "volume": {"size": size, "spacing": spacing, "windows": windows},
        "cpu_count": os.cpu_count(),
        "ours": {"total_s": ours_total, "peak_rss_mb": median("ours", "peak_rss_mb"), "stages_s": stage_medians("ours")},
        "baseline": {"total_s": base_total, "peak_rss_mb": median("baseline", "peak_rss_mb"), "stages_s": stage_medians("baseline")},
        "network_floor_s": floor["total"],
        "speedup_vs_monai_baseline": base_total / ours_total,
        "peak_rss_ratio_vs_monai_baseline": median("ours", "peak_rss_mb") / median("baseline", "peak_rss_mb"),
        "overhead_share_ours": max(ours_total - floor["total"], 0.0) / ours_total,
        "dice_ours_vs_baseline": agreement,
        "repeats": len(runs["ours"]),
    }


def print_table(report: dict) -> None:
    volume = report["volume"]
    print(f"volume {'x'.join(map(str, volume['size']))} at {volume['spacing']} mm, {volume['windows']} windows, {report['cpu_count']} CPUs")
    print(f"{'':24}{'ours':>10}{'baseline':>10}")
    for key in ("ours", "baseline"):
        for stage, seconds in report[key]["stages_s"].items():
            print(f"  {key:>8} {stage:<14}{seconds:>10.2f} s")
    print(f"{'total (median)':24}{report['ours']['total_s']:>10.2f}{report['baseline']['total_s']:>10.2f}  s")
    print(f"{'peak RSS (median)':24}{report['ours']['peak_rss_mb']:>10.0f}{report['baseline']['peak_rss_mb']:>10.0f}  MB")
    print(f"network only (floor)    {report['network_floor_s']:>10.2f} s")
    print(f"speedup vs baseline     {report['speedup_vs_monai_baseline']:>10.2f} x")
    print(f"peak RSS ratio          {report['peak_rss_ratio_vs_monai_baseline']:>10.2f}")
    print(f"overhead share (ours)   {report['overhead_share_ours']:>10.1%}")
    print(f"Dice ours vs baseline   {report['dice_ours_vs_baseline']:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller volume that finishes in minutes on 2 cores")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the report as JSON here")
    parser.add_argument("--worker", choices=["ours", "baseline", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--windows", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else harness(args)


if __name__ == "__main__":
    main()
