"""Inference benchmark: `medsegunet segment` end to end against the pipeline a MONAI user would write.

    python benchmarks/inference.py [--quick | --size tiny|quick|full|huge] [--repeats N] [--whole-process N]
                                   [--panel] [--json FILE] [--plot PNG]

Both pipelines run the same bundle (the shipped model) on the same CT-like volume (made from the sample
CT, see volumes.py), each run in its own child process, alternating ours/baseline, so that each peak
resident memory is that run's alone and a background load hits both alike. Reported: wall time per
stage, total and peak RSS (medians over the repeats), their ratios, the Dice between the two outputs,
and the network-only time for the windows each pipeline ran (the floor). A third side, *ready*, is
`segment` on the engine the Slicer panel starts ahead of the click (`medsegunet standby`: the model
loaded and its first window run before the clock). With ``--panel`` the files are the Slicer panel's: the
volume as an uncompressed ``.nrrd`` (as the panel writes it for the engine) and ours' result a
``.seg.nrrd`` (what the panel loads); the baseline reads the same ``.nrrd`` and writes its usual NIfTI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "MedSegUNet"), str(REPO), str(Path(__file__).resolve().parent)]

import volumes  # noqa: E402
from children import ENGINE_MALLOC_CHOICES, child_environment, own_peak_rss_mb  # noqa: E402

from MedSegUNetLib.host.childprocess import parse_record  # noqa: E402

STAGES = ("read", "preprocess", "predict", "restore", "write")
# The baseline's windows per batch: its faster setting on both devices (MONAI's default of 1 sends this
# network's small convolutions to PyTorch's slow CPU path, 2.5x slower; segment avoids that path itself).
BASELINE_WINDOWS_PER_BATCH = 2


# --- the workers (each runs in its own process) ----------------------------------------------------


class TimedNetwork:
    """The network, with the wall time of its forward passes summed: the network's share of a pipeline
    measured inside that very run. Unlike the floor (a warm tight loop, run after the pipeline), it holds
    what the network costs there: first-use memory and kernels, caches the blending has evicted."""

    def __init__(self, network):
        self.network, self.seconds = network, 0.0
        self.out_channels = getattr(network, "out_channels", None)  # as the prediction reads it

    # A run keeps its prepared network (segment.prepare_bundle), and the prediction calls these on it.
    def eval(self) -> "TimedNetwork":
        self.network.eval()
        return self

    def to(self, *args, **kwargs) -> "TimedNetwork":
        self.network.to(*args, **kwargs)
        return self

    def __call__(self, *args, **kwargs):
        import torch

        start = time.perf_counter()
        try:
            return self.network(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the kernels' time, not their launch
            self.seconds += time.perf_counter() - start


def run_ours(
    image: Path, bundle: Path, output: Path, device: str = "cpu", precision: str = "auto", ready: bool = False
) -> dict:
    """`medsegunet segment` through its real command line; stages timed from its own progress reports.

    ``ready``: as the standby engine runs its job (standby.py): the bundle loaded and one window run
    in this thread before the clock starts, the job parsed and run by the same functions."""
    # Libraries imported before the clock starts, as the baseline's are (its image library, nibabel,
    # comes with monai.transforms): the clock holds the pipeline's work, and the project's own imports.
    # First what the command line does before MONAI is imported (skipped_imports.py).
    from MedSegUNetLib.commands.skipped_imports import skip_unused_imports

    skip_unused_imports()
    import monai.inferers  # noqa: F401
    import SimpleITK  # noqa: F401
    import torch  # noqa: F401

    from MedSegUNetLib.cli import main, parse_standby_job, run_segment_command
    from MedSegUNetLib.commands.standby import load_and_warm
    from MedSegUNetLib.core import progress as progress_module
    from MedSegUNetLib.prediction import inference

    stamps: List[tuple] = []
    windows = {}
    timed: List[TimedNetwork] = []
    prepare = inference.prepare_network

    def prepare_timed(network, *args, **kwargs):
        """The prepared network, timed; one prepared already (a run keeps its copy) is returned as it is."""
        if not isinstance(network, TimedNetwork):
            network = TimedNetwork(prepare(network, *args, **kwargs))
        if network not in timed:
            network.seconds = 0.0  # a warm-up's windows are not the run's
            timed.append(network)
        return network

    inference.prepare_network = prepare_timed

    class Timing(progress_module.Progress):
        def update(self, stage, done, total, message="", **extra):
            stamps.append((stage, time.perf_counter()))
            if stage == "predict":
                windows["count"] = total

    progress_module.make_progress = lambda kind: Timing()
    arguments = [str(image), "-m", str(bundle), "-o", str(output), "--device", device, "--precision", precision]
    loaded = load_and_warm(bundle, device, precision, None, progress_module.Progress()) if ready else None
    timed.clear()  # the warm-up's network
    start = time.perf_counter()
    if ready:
        run_segment_command(parse_standby_job(arguments, "none"), Timing(), preloaded=loaded)
    elif main(["segment", *arguments, "--progress", "none"]) != 0:
        raise SystemExit("segment failed")
    end = time.perf_counter()
    stages: Dict[str, float] = {}
    previous_stage, previous_time = "read", start
    for stage, stamp in stamps + [("end", end)]:
        if stage != previous_stage:
            stages[previous_stage] = stages.get(previous_stage, 0.0) + stamp - previous_time
            previous_stage, previous_time = stage, stamp
    stages.pop("done", None)
    network_s = sum(network.seconds for network in timed)
    return {
        "total": end - start,
        "stages": stages,
        "windows": windows.get("count", 0),
        "network_in_pipeline": network_s,
    }


def run_baseline(image: Path, bundle_path: Path, output: Path, device: str = "cpu") -> dict:
    """What a MONAI user writes: LoadImaged, Orientationd, Spacingd, ScaleIntensityRanged,
    sliding_window_inference (overlap 0.5, Gaussian, logits blended), AsDiscreted + Invertd, SaveImage."""
    import numpy as np
    import torch
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

    from MedSegUNetLib.model.bundle import load_bundle
    from MedSegUNetLib.prediction.inference import PredictOptions
    from MedSegUNetLib.prediction.stitching import count_windows

    stages = {}
    start = time.perf_counter()
    bundle = load_bundle(bundle_path)
    prep = bundle.meta.preprocessing
    low, high = prep.normalization.clip
    mean, std = prep.normalization.mean, prep.normalization.std

    def scaled(value: float) -> float:
        return (value - mean) / std if mean is not None and std is not None else (value - low) / (high - low)

    data = Compose([LoadImaged("image"), EnsureChannelFirstd("image")])({"image": str(image)})
    t1 = time.perf_counter()
    pre = Compose(
        [
            Orientationd("image", axcodes=prep.orientation),
            Spacingd("image", pixdim=prep.target_spacing, mode="bilinear"),
            # the bundle's clip window, then its mean/std (or 0..1): one linear map, as ScaleIntensityRange does it
            ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=scaled(low), b_max=scaled(high), clip=True),
        ]
    )
    data = pre(data)
    t2 = time.perf_counter()
    # LoadImage arrays are (x, y, z); the bundle's network works on (z, y, x): permute once, and back.
    zyx = data["image"].as_tensor().permute(0, 3, 2, 1)[None].float().to(device)
    settings = PredictOptions()  # the same overlap as `segment`
    network = TimedNetwork(bundle.network.eval().to(device))

    # the network's logits blended, as `segment` blends them, in fp16 on CUDA as `segment` runs it (equal settings)
    with torch.inference_mode(), _autocast(device, torch.float16):
        blended = sliding_window_inference(
            zyx,
            list(prep.patch_size[::-1]),
            BASELINE_WINDOWS_PER_BATCH,
            network,
            overlap=settings.overlap,
            mode="gaussian",
        )
    data["pred"] = blended[0].permute(0, 3, 2, 1).float().cpu()
    t3 = time.perf_counter()
    post = Compose(
        [AsDiscreted("pred", argmax=True), Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)]
    )
    restored = post(data)["pred"]
    t4 = time.perf_counter()
    writer = SaveImage(
        output_dir=str(output.parent), output_postfix="", separate_folder=False, output_dtype=np.uint8, resample=False
    )
    writer(restored, meta_data=restored.meta, filename=str(output)[: -len(".nii.gz")])
    end = time.perf_counter()
    stages = {"read": t1 - start, "preprocess": t2 - t1, "predict": t3 - t2, "restore": t4 - t3, "write": end - t4}
    windows = count_windows(zyx.shape[2:], prep.patch_size[::-1], settings.overlap)
    return {"total": end - start, "stages": stages, "windows": windows, "network_in_pipeline": network.seconds}


def network_floor(
    image: Path, bundle_path: Path, windows: int, engine: bool, device: str = "cpu", precision: str = "auto"
) -> float:
    """Network forward passes only, for ``windows`` windows of the scan itself in batches as the
    pipelines run them (random windows ran about 8% slower than real ones here).

    ``engine``: the network as the engine prepares it for the device and ``precision``; else as loaded
    (the baseline's, fp16 autocast on CUDA).
    Run in the same process right after its pipeline, so that both see the same machine load."""
    import torch

    from MedSegUNetLib.imageio.images import read_image
    from MedSegUNetLib.model.bundle import load_bundle
    from MedSegUNetLib.prediction.inference import PredictOptions, network_precision, prepare_network, windows_per_batch
    from MedSegUNetLib.prediction.preprocessing import prepare_channels
    from MedSegUNetLib.prediction.stitching import fit_window

    bundle = load_bundle(bundle_path)
    batch_size = windows_per_batch(torch.device(device)) if engine else BASELINE_WINDOWS_PER_BATCH
    dtype = (
        network_precision(precision, torch.device(device)) if engine else (torch.float16 if device == "cuda" else None)
    )
    network = (
        prepare_network(bundle.network, torch.device(device), dtype) if engine else bundle.network.eval().to(device)
    )
    volume = torch.from_numpy(prepare_channels([read_image(image).image], bundle.meta.preprocessing).array)
    patch = list(bundle.meta.preprocessing.patch_size[::-1])
    if engine:  # segment shrinks the window where the volume is thinner; MONAI pads the volume instead
        patch = fit_window(patch, volume.shape[1:], bundle.meta.network.size_divisor())
    windows_cut = scan_windows(volume, patch, windows, PredictOptions().overlap)
    batches = [torch.stack(chunk).to(device) for chunk in _chunks(windows_cut, batch_size)]
    with torch.inference_mode(), _autocast(device, dtype):
        network(batches[0])  # warm-up (oneDNN or cuDNN picks its kernels), not counted
        _synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            network(batch)
        _synchronize(device)
    return time.perf_counter() - start


def _autocast(device: str, dtype=None):
    """Autocast to ``dtype`` on CUDA (the baseline: fp16, as the engine's default there); nothing on the
    CPU, where the engine's network copy is itself in its precision."""
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=dtype) if device == "cuda" and dtype is not None else contextlib.nullcontext()


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def scan_windows(volume, patch_zyx, count: int, overlap: float) -> list:
    """The first ``count`` windows MONAI's sliding window cuts from a (C, Z, Y, X) volume (padded
    where thinner than a window), placed by MONAI's own ``dense_patch_slices``."""
    import torch.nn.functional as F
    from monai.data.utils import dense_patch_slices

    from MedSegUNetLib.prediction.stitching import scan_interval

    pad = [max(p - n, 0) for p, n in zip(patch_zyx, volume.shape[1:])]
    volume = F.pad(volume, [x for p in reversed(pad) for x in (0, p)], value=float(volume.min()))
    slices = dense_patch_slices(volume.shape[1:], patch_zyx, scan_interval(volume.shape[1:], patch_zyx, overlap))
    return [volume[(slice(None), *slices[i % len(slices)])] for i in range(count)]


def _chunks(items: list, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), size)]


def worker(args) -> None:
    image, bundle, output = Path(args.image), Path(args.bundle), Path(args.output)
    if args.worker == "baseline":
        result = run_baseline(image, bundle, output, args.device)
    else:
        result = run_ours(image, bundle, output, args.device, args.precision, ready=args.worker == "ready")
    result["peak_rss_mb"] = own_peak_rss_mb()  # before the floor's own allocations
    if not args.no_floor:
        result["network_floor"] = network_floor(
            image, bundle, result["windows"], args.worker != "baseline", args.device, args.precision
        )
    print(json.dumps(result))


# --- the harness --------------------------------------------------------------------------------


def spawn(
    kind: str,
    image: Path,
    bundle: Path,
    output: Path,
    device: str,
    floor: bool = True,
    engine_malloc: str = "ours",
    precision: str = "auto",
) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--image",
        str(image),
        "--bundle",
        str(bundle),
        "--output",
        str(output),
    ]
    command += ["--device", device, "--precision", precision]
    command += [] if floor else ["--no-floor"]
    environment = child_environment("ours" if kind == "ready" else kind, engine_malloc)
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", check=False, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ready_engine_seconds(
    image: Path, bundle: Path, output: Path, engine_malloc: str = "ours", precision: str = "auto"
) -> Dict[str, float]:
    """The real standby engine (``python -m MedSegUNetLib standby``, as the panel starts it ahead): the
    time from its start to its "ready" record (spent before the click), and from the job written to its
    stdin to its exit (what the click waits for)."""
    environment = child_environment("ours", engine_malloc)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "MedSegUNet"), environment.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "MedSegUNetLib",
        "standby",
        "-m",
        str(bundle),
        "--device",
        "cpu",
        "--precision",
        precision,
        "--progress",
        "json",
    ]
    job = [str(image), "-m", str(bundle), "-o", str(output), "--device", "cpu", "--precision", precision]
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        engine = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, env=environment
        )
        is_ready = False
        for line in engine.stdout:
            record = parse_record(line.decode("utf-8", "replace"))
            if record and record["stage"] == "standby" and str(record.get("message", "")).startswith("ready"):
                is_ready = True
                break
        ready = time.perf_counter()
        if is_ready:  # else it has ended: its error is reported below
            engine.stdin.write(json.dumps({"segment": job}).encode() + b"\n")
        engine.stdin.close()
        engine.stdout.read()
        code = engine.wait()
        end = time.perf_counter()
        if code != 0 or not is_ready:
            errors.seek(0)
            raise SystemExit(f"standby engine failed:\n{errors.read().decode('utf-8', 'replace')[-3000:]}")
    return {"start": ready - start, "job": end - ready}


def whole_process_seconds(
    kind: str, image: Path, bundle: Path, output: Path, engine_malloc: str = "ours", precision: str = "auto"
) -> float:
    """Wall time of one whole process, interpreter start and imports included: what each click on
    Segment in Slicer waits for (the panel starts the engine afresh). Ours is the real command line
    (``python -m MedSegUNetLib segment``); the baseline is its worker script, imports and all."""
    environment = child_environment(kind, engine_malloc)
    if kind == "ours":
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO / "MedSegUNet"), environment.get("PYTHONPATH")])
        )
        command = [
            sys.executable,
            "-m",
            "MedSegUNetLib",
            "segment",
            str(image),
            "-m",
            str(bundle),
            "-o",
            str(output),
            "--device",
            "cpu",
            "--precision",
            precision,
            "--progress",
            "none",
        ]
    else:
        command = [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--image",
            str(image),
            "--bundle",
            str(bundle),
            "--output",
            str(output),
            "--no-floor",
        ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", check=False, env=environment)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{kind} whole-process run failed:\n{result.stderr[-3000:]}")
    return seconds


def output_name(kind: str, panel: bool) -> str:
    """The file each side writes: with --panel, ours (and ready) write the .seg.nrrd the Slicer panel loads;
    the baseline always writes its NIfTI labelmap (SaveImage)."""
    return "ct.seg.nrrd" if panel and kind != "baseline" else "ct.nii.gz"


def whole_process_report(
    kinds: List[str],
    image: Path,
    bundle: Path,
    work: Path,
    repeats: int,
    engine_malloc: str,
    precision: str,
    panel: bool = False,
) -> dict:
    """Each kind as a whole process; "ready" as the standby engine: the job's time, its start apart."""
    seconds: Dict[str, List[float]] = {kind: [] for kind in kinds}
    ready_start: List[float] = []
    for repeat in range(repeats):
        for kind in rotated(kinds, repeat):
            output = work / f"whole-{kind}{repeat}" / output_name(kind, panel)
            output.parent.mkdir()
            if kind == "ready":
                timing = ready_engine_seconds(image, bundle, output, engine_malloc, precision)
                seconds[kind].append(timing["job"])
                ready_start.append(timing["start"])
            else:
                seconds[kind].append(whole_process_seconds(kind, image, bundle, output, engine_malloc, precision))
            print(f"whole process {repeat + 1}/{repeats} {kind:>8}: {seconds[kind][-1]:.1f} s", file=sys.stderr)
    report = {f"{kind}_s": statistics.median(values) for kind, values in seconds.items()}
    report.update({f"{kind}_runs_s": values for kind, values in seconds.items()})
    if ready_start:
        report["ready_start_s"] = statistics.median(ready_start)  # spent before the click
    if "baseline" in seconds:
        report["speedup_vs_monai_baseline"] = report["baseline_s"] / report["ours_s"]
        if "ready" in seconds:
            report["speedup_ready_vs_monai_baseline"] = report["baseline_s"] / report["ready_s"]
    return report


def rotated(kinds: List[str], repeat: int) -> List[str]:
    """The order of one round: each kind first in turn, so that a slow minute hits every kind alike."""
    shift = repeat % len(kinds)
    return kinds[shift:] + kinds[:shift]


def harness(args) -> dict:
    volume = volumes.SIZES["quick" if args.quick else args.size]
    bundle = Path(args.model or volumes.default_model())
    if not bundle.exists():
        raise SystemExit(f"no model at {bundle} (build it with Resources/Models/build-abdomen-ct.sh, or pass --model)")
    work = Path(tempfile.mkdtemp(prefix="medsegunet-bench-"))
    # the Slicer panel hands the engine an uncompressed NRRD (MedSegUNet.py, writeVolume)
    image = volumes.write_volume(work / ("ct.nrrd" if args.panel else "ct.nii.gz"), volume, compressed=not args.panel)
    kinds = ["ours"] if args.only == "ours" else ["ours", "ready", "baseline"]
    runs: Dict[str, List[dict]] = {kind: [] for kind in kinds}
    for repeat in range(args.repeats):
        for kind in rotated(kinds, repeat):
            output = work / f"{kind}{repeat}" / output_name(kind, args.panel)
            output.parent.mkdir()
            runs[kind].append(
                spawn(
                    kind, image, bundle, output, args.device, engine_malloc=args.engine_malloc, precision=args.precision
                )
            )
            last = runs[kind][-1]
            print(
                f"run {repeat + 1}/{args.repeats} {kind:>8}: {last['total']:.1f} s, {last['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
            )
    agreement = {}
    if "ready" in runs:  # the same engine code on a warm engine: the same labels, voxel for voxel
        ours_output = output_name("ours", args.panel)
        agreement["ready_equals_ours"] = volumes.same_voxels(
            work / "ours0" / ours_output, work / "ready0" / ours_output
        )
    if "baseline" in runs:
        agreement["benchmark_volume"] = volumes.dice_between(
            work / "ours0" / output_name("ours", args.panel), work / "baseline0" / "ct.nii.gz"
        )
        agreement["model_grid"] = agreement_on_model_grid(work, volume, bundle, args.device, args.precision)
    report = summarize(runs, agreement, volume, bundle, args.device)
    report["engine_malloc"] = args.engine_malloc
    report["precision_ours"] = args.precision
    report["files"] = (
        "panel: uncompressed .nrrd in; ours .seg.nrrd out, baseline .nii.gz out"
        if args.panel
        else "nii.gz in, nii.gz out"
    )
    if args.whole_process:
        if args.device != "cpu":
            raise SystemExit("--whole-process runs on the CPU only")
        report["whole_process"] = whole_process_report(
            kinds, image, bundle, work, args.whole_process, args.engine_malloc, args.precision, args.panel
        )
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    if args.plot and "baseline" in runs:
        plot(report, Path(args.plot))
    shutil.rmtree(work, ignore_errors=True)
    return report


def agreement_on_model_grid(
    work: Path, volume: volumes.VolumeSize, bundle: Path, device: str, precision: str = "auto"
) -> float:
    """Dice between the two pipelines on the same scan already at the model's spacing and orientation.

    On the benchmark volume both resample, each with its own grid convention (MONAI keeps the first
    voxel's centre, `segment` the volume's outer box): a sub-voxel shift that alone moves the Dice of
    small structures. Here neither resamples, so what is left are the pipelines' own differences."""
    from MedSegUNetLib.model.bundle import read_bundle_metadata

    spacing = read_bundle_metadata(bundle).preprocessing.target_spacing
    size = tuple(int(round(n * s / t)) for n, s, t in zip(volume.size, volume.spacing, spacing))
    folder = work / "model-grid"
    folder.mkdir()
    image = volumes.write_volume(folder / "ct.nii.gz", volumes.VolumeSize(size, spacing), orientation="RAS")
    for kind in ("ours", "baseline"):
        (folder / kind).mkdir()
        spawn(kind, image, bundle, folder / kind / "ct.nii.gz", device, floor=False, precision=precision)
    return volumes.dice_between(folder / "ours" / "ct.nii.gz", folder / "baseline" / "ct.nii.gz")


def summarize(runs, agreement, volume, bundle, device: str = "cpu") -> dict:
    def side(kind: str) -> dict:
        totals = [run["total"] for run in runs[kind]]
        total = statistics.median(totals)
        floor = statistics.median(run["network_floor"] for run in runs[kind])
        return {
            "total_s": total,
            "totals_s": totals,
            "stages_s": {
                name: statistics.median(run["stages"].get(name, 0.0) for run in runs[kind]) for name in STAGES
            },
            "peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in runs[kind]),
            "windows": runs[kind][0]["windows"],
            "network_floor_s": floor,
            "floor_share": floor / total,
            "overhead_share": max(total - floor, 0.0) / total,
            # the same share against the network's time inside each run itself (median of the runs' shares)
            "network_in_pipeline_s": statistics.median(run["network_in_pipeline"] for run in runs[kind]),
            "overhead_share_in_run": statistics.median(
                1 - run["network_in_pipeline"] / run["total"] for run in runs[kind]
            ),
        }

    report = {
        "volume": {"size": volume.size, "spacing": volume.spacing},
        "model": bundle.name,
        "machine": machine(device),
        "repeats": len(runs["ours"]),
        "ours": side("ours"),
    }
    if "ready" in runs:
        report["ready"] = side("ready")
        report["ready_labels_equal_ours"] = agreement["ready_equals_ours"]
    if "baseline" in runs:
        report["baseline"] = side("baseline")
        report["speedup_vs_monai_baseline"] = report["baseline"]["total_s"] / report["ours"]["total_s"]
        report["peak_rss_ratio_vs_monai_baseline"] = report["ours"]["peak_rss_mb"] / report["baseline"]["peak_rss_mb"]
        report["dice_ours_vs_baseline"] = agreement["benchmark_volume"]
        report["dice_ours_vs_baseline_on_model_grid"] = agreement["model_grid"]
        if "ready" in runs:
            report["speedup_ready_vs_monai_baseline"] = report["baseline"]["total_s"] / report["ready"]["total_s"]
    return report


def machine(device: str = "cpu") -> dict:
    import platform

    import torch

    cpu = next(
        (line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    facts = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def _lines(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read().splitlines()
    except OSError:
        return []


def print_table(report: dict) -> None:
    volume, sides = report["volume"], [k for k in ("ours", "ready", "baseline") if k in report]
    print(
        f"volume {'x'.join(map(str, volume['size']))} at {volume['spacing']} mm, model {report['model']}, "
        f"{report['machine']['cpus']} CPUs ({report['machine']['cpu']}), "
        f"{report['machine'].get('gpu', 'no GPU')} used: "
        f"{report['machine']['device']}, medians of {report['repeats']} runs, "
        f"segment --precision {report.get('precision_ours', 'auto')}, "
        f"files: {report.get('files', 'nii.gz in, nii.gz out')}"
    )
    print(f"{'':22}" + "".join(f"{k:>12}" for k in sides))
    for stage in STAGES:
        print(f"  {stage:<20}" + "".join(f"{report[k]['stages_s'][stage]:>12.2f}" for k in sides))
    rows = [
        ("total (s)", "total_s", "{:>12.2f}"),
        ("peak RSS (MB)", "peak_rss_mb", "{:>12.0f}"),
        ("windows", "windows", "{:>12d}"),
        ("network floor (s)", "network_floor_s", "{:>12.2f}"),
        ("floor / total", "floor_share", "{:>12.1%}"),
        ("overhead share", "overhead_share", "{:>12.1%}"),
        ("network in the run (s)", "network_in_pipeline_s", "{:>12.2f}"),
        ("overhead in the run", "overhead_share_in_run", "{:>12.1%}"),
    ]
    for title, key, form in rows:
        print(f"{title:<22}" + "".join(form.format(report[k][key]) for k in sides))
    if "baseline" in report:
        print(f"speedup vs baseline   {report['speedup_vs_monai_baseline']:>12.2f} x")
        print(f"peak RSS ratio        {report['peak_rss_ratio_vs_monai_baseline']:>12.2f}")
        print(
            f"Dice ours vs baseline {report['dice_ours_vs_baseline']:>12.4f}"
            "  (each resampling with its own grid convention)"
        )
        print(
            f"  on the model's grid {report['dice_ours_vs_baseline_on_model_grid']:>12.4f}"
            "  (no resampling: the pipelines' own differences)"
        )
    if "ready" in report:
        print(
            f"ready: labels equal ours: {report['ready_labels_equal_ours']}"
            "  (ready = segment on the engine started ahead: model loaded, first window run)"
        )
        if "baseline" in report:
            print(f"speedup ready vs baseline {report['speedup_ready_vs_monai_baseline']:>8.2f} x")
    whole = report.get("whole_process")
    if whole:
        sides_s = "".join(f"{whole[f'{k}_s']:>12.2f}" for k in sides)
        print(f"whole process (s)     {sides_s}  (interpreter start and imports included)")
        if "speedup_vs_monai_baseline" in whole:
            print(f"  speedup             {whole['speedup_vs_monai_baseline']:>12.2f} x")
        if "ready_s" in whole:
            print(
                "  ready: the job on a started standby engine; its start, before the click: "
                f"{whole['ready_start_s']:.2f} s"
            )


def plot(report: dict, path: Path) -> None:
    """Stacked time per stage, ours vs baseline, with the network floor marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 2.8), dpi=100)
    colors = dict(zip(STAGES, ("#9ecae1", "#6baed6", "#fd8d3c", "#74c476", "#bcbddc")))
    kinds = [kind for kind in ("baseline", "ours", "ready") if kind in report]
    for row, kind in enumerate(kinds):
        left = 0.0
        for stage in STAGES:
            seconds = report[kind]["stages_s"][stage]
            axis.barh(row, seconds, left=left, color=colors[stage], label=stage if row == 0 else None)
            left += seconds
        axis.plot(
            [report[kind]["network_floor_s"]] * 2,
            [row - 0.4, row + 0.4],
            color="black",
            linewidth=2,
            label="network floor" if row == 0 else None,
        )
        axis.text(left, row, f" {left:.1f} s, {report[kind]['peak_rss_mb'] / 1024:.2f} GB", va="center")
    names = {"baseline": "MONAI baseline", "ours": "medsegunet segment", "ready": "segment, engine ready"}
    axis.set_yticks(range(len(kinds)), [names[kind] for kind in kinds])
    axis.set_xlabel("wall time (s), median")
    axis.set_xlim(0, max(report[k]["total_s"] for k in kinds) * 1.35)
    volume = report["volume"]
    where = report["machine"].get("gpu") or f"{report['machine']['cpus']} CPU cores"
    files = (
        " (the Slicer panel's files: .nrrd in, .seg.nrrd out)\n"
        if report.get("files", "").startswith("panel")
        else ", "
    )
    axis.set_title(
        f"{'x'.join(map(str, volume['size']))} CT{files}{where}: "
        f"{report['speedup_vs_monai_baseline']:.2f}x faster, {report['peak_rss_ratio_vs_monai_baseline']:.2f}x memory",
        fontsize=10,
    )
    axis.legend(ncol=6, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 'quick' size: a few minutes on 2 cores")
    parser.add_argument(
        "--size", choices=sorted(volumes.SIZES), default="full", help="volume size (default: full, 512x512x300)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["ours"], help="run only `segment` (e.g. the 512x512x800 memory check)")
    parser.add_argument("--model", help="bundle to use (default: the shipped model)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where both pipelines predict (default: cpu)"
    )
    parser.add_argument(
        "--engine-malloc",
        choices=ENGINE_MALLOC_CHOICES,
        default="ours",
        help="which pipelines run with the engine's malloc settings on Linux (huge pages, fixed mmap and trim"
        " thresholds: childprocess.MALLOC_TUNABLES; default: ours, as the engine is started)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="segment's --precision (default auto: float32 on the CPU, fp16 on CUDA, as the baseline)",
    )
    parser.add_argument(
        "--whole-process",
        type=int,
        default=0,
        metavar="N",
        help="also time N whole processes of each, interpreter start and imports included (CPU)",
    )
    parser.add_argument(
        "--panel",
        action="store_true",
        help="the Slicer panel's files: the volume as uncompressed .nrrd, ours' result as .seg.nrrd"
        " (the baseline writes .nii.gz)",
    )
    parser.add_argument("--json", help="write the report as JSON here")
    parser.add_argument("--plot", help="write the time-per-stage plot (PNG) here")
    parser.add_argument("--worker", choices=["ours", "ready", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--no-floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else harness(args)


if __name__ == "__main__":
    main()
