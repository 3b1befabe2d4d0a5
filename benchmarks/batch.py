"""Cohort benchmark: `medsegunet segment-batch` against one `medsegunet segment` process per case.

    python benchmarks/batch.py [--cases 20] [--size mixed|tiny] [--json FILE] [--model BUNDLE]

The cases are CT-like volumes of mixed sizes (volumes.py), written once by a child process so that this
harness stays small: a child's peak resident memory (``ru_maxrss`` from ``os.wait4``, that child's own)
would otherwise start at the harness's. Each side runs as the user runs it, a whole process with the
engine's malloc settings (children.py): 20 `segment` processes one after the other, then `segment-batch`
with one predictor, then with two CPU predictors (``--devices cpu,cpu``). Reported: wall time, cases per
hour, peak memory of each side (the separate processes': the largest of them, a single `segment` of the
largest case), the ratios, and how many outputs equal the separate runs', voxel for voxel (two CPU
predictors run on half the cores each: their rounding differs, so also the lowest Dice against them).
nnU-Net's ``nnUNetv2_predict`` (one process per folder) is a third baseline when nnunetv2 is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "MedSegUNet"), str(REPO), str(Path(__file__).resolve().parent)]

import volumes  # noqa: E402
from children import child_environment  # noqa: E402

# Mixed sizes, cycled over the cases: from a thick-slice abdomen to a fine 512x512 scan.
MIXED = [
    volumes.VolumeSize((256, 256, 64), (1.5, 1.5, 3.0)),
    volumes.VolumeSize((320, 320, 100), (1.2, 1.2, 2.5)),
    volumes.VolumeSize((384, 384, 120), (1.0, 1.0, 2.0)),
    volumes.VolumeSize((512, 512, 160), (0.8, 0.8, 1.5)),
]
SIZES = {"mixed": MIXED, "tiny": [volumes.SIZES["tiny"]]}


def make_cases(folder: Path, count: int, sizes: Sequence[volumes.VolumeSize]) -> None:
    """(In a child process) ``count`` volumes, ``case00.nii.gz``..., cycling through ``sizes``."""
    source = volumes.source_ct(log=lambda *_: None)
    for index in range(count):
        size = sizes[index % len(sizes)]
        image = volumes.ct_like(size, source, seed=index)
        import SimpleITK as sitk

        sitk.WriteImage(image, str(folder / f"case{index:02d}.nii.gz"), useCompression=True)


def run_child(command: List[str]) -> Tuple[float, float]:
    """(wall seconds, the child's own peak resident memory in MB) of one whole process."""
    with tempfile.TemporaryFile(mode="w+") as stderr:  # a file, not a pipe that a chatty child could fill
        start = time.perf_counter()
        process = subprocess.Popen(command, env=child_environment("ours"), stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            stderr.seek(0)
            raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {stderr.read()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024.0


def engine(*arguments: str) -> List[str]:
    return [sys.executable, "-m", "MedSegUNetLib", *arguments]


def separate_processes(cases: List[Path], model: Path, out: Path) -> dict:
    out.mkdir()
    runs = [
        run_child(engine("segment", str(case), "-m", str(model), "-o", str(out / case.name), "--device", "cpu"))
        for case in cases
    ]
    return {"wall_s": sum(s for s, _ in runs), "peak_rss_mb": max(m for _, m in runs), "runs_s": [s for s, _ in runs]}


def batch(folder: Path, model: Path, out: Path, devices: str) -> dict:
    command = engine("segment-batch", str(folder), "-m", str(model), "-o", str(out), "--format", "nii.gz")
    seconds, peak = run_child([*command, "--devices", devices, "--progress", "none"])
    return {"wall_s": seconds, "peak_rss_mb": peak, "devices": devices}


def nnunet_baseline() -> dict:
    """Skipped, with the reason, unless nnunetv2 is installed (it is not a dependency of this project)."""
    if importlib.util.find_spec("nnunetv2") is None:
        reason = "nnunetv2 is not installed: the nnU-Net per-folder baseline (nnUNetv2_predict) was skipped"
        print(reason)
        return {"skipped": reason}
    reason = "nnunetv2 is installed, but the shipped model is a MedSegUNet bundle, not an nnU-Net results folder"
    print(reason)
    return {"skipped": reason}


def same_outputs(cases: List[Path], first: Path, second: Path) -> int:
    """How many cases' labelmaps are equal voxel for voxel in both folders."""
    return sum(volumes.same_voxels(first / case.name, second / case.name) for case in cases)


def report(cases: List[Path], sides: Dict[str, dict]) -> dict:
    separate = sides["separate"]
    result: dict = {"cases": len(cases), **sides}
    for name in ("batch", "batch_two_predictors"):
        side = sides[name]
        side["cases_per_hour"] = 3600 * len(cases) / side["wall_s"]
        side["throughput_vs_separate"] = separate["wall_s"] / side["wall_s"]
        side["peak_rss_vs_single_segment"] = side["peak_rss_mb"] / separate["peak_rss_mb"]
    separate["cases_per_hour"] = 3600 * len(cases) / separate["wall_s"]
    result["load_average_after"] = os.getloadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--size", choices=sorted(SIZES), default="mixed")
    parser.add_argument("--model", help="bundle to use (default: the shipped model)")
    parser.add_argument("--json", help="write the report as JSON here")
    parser.add_argument("--make-cases", help=argparse.SUPPRESS)  # the child that writes the volumes
    args = parser.parse_args()
    if args.make_cases:
        make_cases(Path(args.make_cases), args.cases, SIZES[args.size])
        return
    model = Path(args.model) if args.model else volumes.default_model()
    with tempfile.TemporaryDirectory(prefix="medsegunet-batch-bench-") as temporary:
        root = Path(temporary)
        (root / "in").mkdir()
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--make-cases",
                str(root / "in"),
                "--cases",
                str(args.cases),
                "--size",
                args.size,
            ],
            check=True,
        )
        cases = sorted((root / "in").glob("*.nii.gz"))
        print(f"{len(cases)} cases, load average before: {os.getloadavg()}", flush=True)
        sides = {"separate": separate_processes(cases, model, root / "separate")}
        print(f"separate: {sides['separate']['wall_s']:.1f} s", flush=True)
        sides["batch"] = batch(root / "in", model, root / "batch", "cpu")
        print(f"batch: {sides['batch']['wall_s']:.1f} s", flush=True)
        sides["batch_two_predictors"] = batch(root / "in", model, root / "batch2", "cpu,cpu")
        print(f"batch, cpu,cpu: {sides['batch_two_predictors']['wall_s']:.1f} s", flush=True)
        sides["nnunet"] = nnunet_baseline()
        result = report(cases, sides)
        result["batch_outputs_equal_separate"] = same_outputs(cases, root / "separate", root / "batch")
        result["two_predictor_outputs_equal_separate"] = same_outputs(cases, root / "separate", root / "batch2")
        result["two_predictor_min_dice_vs_separate"] = min(
            volumes.dice_between(root / "separate" / case.name, root / "batch2" / case.name) for case in cases
        )
        result["sizes"] = [size.describe() for size in SIZES[args.size]]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
