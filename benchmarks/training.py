"""Training benchmark: steps per second of `medsegunet train`'s loop against a plain MONAI loop.

    python benchmarks/training.py [--quick | --size tiny|quick|full] [--repeats N] [--json FILE]

Both train the same network (the shipped model's plan: 96x96x48 patch, 8 filters, batch 2) on the
sample CT with the same augmentation, loss and optimizer, each run in its own child process,
alternating. Ours is ``training.loop.Run`` itself; the baseline is what a MONAI user writes: a
``Dataset`` with the transforms, a ``DataLoader`` with worker processes, and the usual step. Reported:
steps per second (first step and the final validation left out), and the share of the time spent
waiting for the next batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "MedSegUNet"), str(REPO), str(Path(__file__).resolve().parent)]

from children import ENGINE_MALLOC_CHOICES, child_environment, own_peak_rss_mb  # noqa: E402

STRUCTURES = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta")


@dataclass(frozen=True)
class TrainSize:
    steps: int
    patch: tuple  # xyz
    filters: int


SIZES = {
    "full": TrainSize(40, (96, 96, 48), 8),
    "quick": TrainSize(12, (96, 96, 48), 8),
    "tiny": TrainSize(4, (48, 48, 32), 4),  # the CI smoke check
}


def prepared_sample(size: TrainSize, output: Path, device: str = "cpu"):
    """(config, plan, labels, prepared case) for the sample CT, through training's own reading and planning."""
    from training.config import TrainConfig, plan
    from training.data import fingerprint, load_all, prepare
    from training.datasets import read_pair
    from training.label_table import build_label_table
    from training.sampledata import fetch_sources, read_class_maps

    sources = fetch_sources(log=lambda message: print(message, file=sys.stderr))
    reference = sources / "tests" / "reference_files"
    names = read_class_maps(sources / "totalsegmentator" / "map_to_binary.py")["total"]
    wanted = [f"label_{value}" for value, name in names.items() if name in STRUCTURES]
    case = read_pair(f"{reference / 'example_ct.nii.gz'}:{reference / 'example_seg_fast_force_split.nii.gz'}")
    table = build_label_table([case], only=wanted)
    config = TrainConfig(
        output=str(output),
        max_steps=size.steps,
        patch_size=size.patch,
        filters=size.filters,
        batch_size=2,
        lr=0.002,
        seed=0,
        device=device,
        validate_every=10**9,
    )
    loaded = load_all([case])
    the_plan = plan(config, fingerprint(loaded), 1)
    prepared = prepare(case, *loaded[case.name], table, the_plan.preprocessing)
    return config, the_plan, table.labels, prepared


class TimedStream:
    """Wraps a batch iterator: the time spent waiting in ``next``."""

    def __init__(self, stream):
        self.stream, self.waits = iter(stream), []

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.stream)
        self.waits.append(time.perf_counter() - start)
        return batch


def rate(stamps: List[float], waits: List[float]) -> dict:
    """Steps per second and data-wait share over steps 2..N-1 (warm-up and final validation left out)."""
    intervals = [b - a for a, b in zip(stamps[:-1], stamps[1:])][:-1]  # step i+1 ends at stamps[i+1]
    waited = waits[1 : 1 + len(intervals)]  # interval j is step j+2, fed by batch j+1
    seconds = sum(intervals)
    return {
        "steps_per_s": len(intervals) / seconds,
        "data_wait_share": sum(waited) / seconds,
        "timed_steps": len(intervals),
    }


def run_ours(size: TrainSize, work: Path, workers=None, device: str = "cpu") -> dict:
    """``training.loop.Run`` as `medsegunet train` runs it; steps timed from its own progress reports."""
    from MedSegUNetLib.core.progress import Progress
    from training import loop

    config, the_plan, labels, case = prepared_sample(size, work / "run", device)
    config.workers = workers  # None: what `medsegunet train` picks for this machine
    stamps: List[float] = []
    streams: List[TimedStream] = []
    real_stream = loop.batch_stream

    def timed_stream(*args, **kwargs):
        streams.append(TimedStream(real_stream(*args, **kwargs)))
        return streams[-1]

    class Timing(Progress):
        def update(self, stage, done, total, message="", **extra):
            if stage == "train":
                stamps.append(time.perf_counter())

    loop.batch_stream = timed_stream
    loop.Run(config, the_plan, labels, [case], [case], {"data": "benchmark"}, Timing()).run()
    return rate(stamps, streams[0].waits)


def run_baseline(size: TrainSize, work: Path, device: str = "cpu") -> dict:
    """A plain MONAI loop: Dataset + DataLoader (2 workers), DiceCELoss, AdamW, the same transforms."""
    import torch
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, RandCropByLabelClassesd, SpatialPadd

    from MedSegUNetLib.model.bundle import create_bundle
    from training.data import augmentations
    from training.loop import amp_dtype

    config, the_plan, labels, case = prepared_sample(size, work / "run", device)
    torch.manual_seed(0)
    network = (
        create_bundle(labels, the_plan.preprocessing, ["CT"], base_filters=size.filters).network.train().to(device)
    )
    amp = amp_dtype(torch.device(device), None)  # the mixed precision `medsegunet train` uses there (none on CPU)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    patch_zyx = the_plan.preprocessing.patch_size[::-1]
    items = [{"image": case.image, "label": case.label}] * size.steps
    # as a MONAI user crops: padding, then class-balanced crops (MONAI's own sampler), then our augmentation
    transforms = Compose(
        [
            SpatialPadd(["image", "label"], spatial_size=list(patch_zyx)),
            RandCropByLabelClassesd(
                ["image", "label"],
                label_key="label",
                spatial_size=list(patch_zyx),
                num_classes=len(labels) + 1,
                num_samples=the_plan.batch_size,
                warn=False,
            ),
            augmentations(),
        ]
    )
    loader = DataLoader(
        Dataset(items, transforms), batch_size=1, num_workers=2, shuffle=True, pin_memory=device == "cuda"
    )
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=1e-4)
    stream = TimedStream(loader)
    stamps: List[float] = []
    for _ in range(size.steps):
        batch = next(stream)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_function(network(batch["image"].float().to(device)), batch["label"].long().to(device))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss.item()  # the step is done (on CUDA: synchronized), as ours reports its loss every step
        stamps.append(time.perf_counter())
    return rate(stamps, stream.waits)


def worker(args) -> None:
    size = SIZES[args.size]
    with tempfile.TemporaryDirectory(prefix="medsegunet-train-bench-") as work:
        work = Path(work)
        result = (
            run_ours(size, work, args.workers, args.device)
            if args.worker == "ours"
            else run_baseline(size, work, args.device)
        )
    result["peak_rss_mb"] = own_peak_rss_mb()
    print(json.dumps(result))


def spawn(kind: str, size: str, workers=None, device: str = "cpu", engine_malloc: str = "ours") -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--size", size, "--device", device]
    command += ["--workers", str(workers)] if workers is not None and kind == "ours" else []
    environment = child_environment(kind, engine_malloc)
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", check=False, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def harness(args) -> dict:
    size_name = "quick" if args.quick else args.size
    runs: Dict[str, List[dict]] = {"ours": [], "baseline": []}
    for repeat in range(args.repeats):
        for kind in ("ours", "baseline") if repeat % 2 == 0 else ("baseline", "ours"):
            runs[kind].append(spawn(kind, size_name, args.workers, args.device, args.engine_malloc))
            last = runs[kind][-1]
            print(
                f"run {repeat + 1}/{args.repeats} {kind:>8}: {last['steps_per_s']:.3f} steps/s, "
                f"data wait {last['data_wait_share']:.1%}",
                file=sys.stderr,
            )

    def side(kind: str) -> dict:
        return {
            key: statistics.median(run[key] for run in runs[kind])
            for key in ("steps_per_s", "data_wait_share", "peak_rss_mb")
        }

    size = SIZES[size_name]
    report = {
        "size": size_name,
        "device": args.device,
        "workers_ours": args.workers,
        "patch": size.patch,
        "filters": size.filters,
        "steps": size.steps,
        "repeats": args.repeats,
        "engine_malloc": args.engine_malloc,
        "ours": side("ours"),
        "baseline": side("baseline"),
    }
    report["speedup_vs_monai_baseline"] = report["ours"]["steps_per_s"] / report["baseline"]["steps_per_s"]
    print(f"{'':18}{'ours':>10}{'baseline':>10}")
    print(f"{'steps/s':18}{report['ours']['steps_per_s']:>10.3f}{report['baseline']['steps_per_s']:>10.3f}")
    print(
        f"{'data wait share':18}{report['ours']['data_wait_share']:>10.1%}"
        f"{report['baseline']['data_wait_share']:>10.1%}"
    )
    print(f"{'peak RSS (MB)':18}{report['ours']['peak_rss_mb']:>10.0f}{report['baseline']['peak_rss_mb']:>10.0f}")
    print(f"speedup vs baseline {report['speedup_vs_monai_baseline']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps: a few minutes on 2 cores")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--engine-malloc",
        choices=ENGINE_MALLOC_CHOICES,
        default="ours",
        help="which loops run with the engine's malloc settings on Linux"
        " (childprocess.MALLOC_TUNABLES; default: ours, as the engine is started)",
    )
    parser.add_argument("--json", help="write the report as JSON here")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where both loops train (default: cpu)"
    )
    parser.add_argument(
        "--workers", type=int, help="crop worker processes for ours (default: what `medsegunet train` picks)"
    )
    parser.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else harness(args)


if __name__ == "__main__":
    main()
