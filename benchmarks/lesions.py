"""Lesion benchmark: leave-one-patient-out over four lung CTs, uniform crops against training's oversampling.

    python benchmarks/lesions.py [--quick] [--steps N] [--json FILE]

The data: pycerr 2.5.1's radiomics phantom (four lung CT crops, one GTV each in a DICOM RT structure set;
CC BY-NC 3.0, Lambin P et al., CancerData 2016, DOI:10.17195/candat.2016.08.1), fetched by
``training/lesion_samples.py``. Each fold trains on three patients with a fixed budget (the same steps,
patch, network and seed) twice: uniform crops (``foreground_fraction`` 0) and the oversampling training
uses by default (0.33), then segments the held-out patient with the engine's own sliding-window
prediction and scores it on the network grid: voxel Dice and surface Dice, and lesion-wise detection,
false positives and volume error (``commands/lesions.py``). Four cases show very little: the table is a
smoke test of the pieces on real lesions, not evidence that one sampling is better.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "MedSegUNet"), str(REPO)]

ARMS = {"uniform": 0.0, "oversampling": 0.33}
TOLERANCE_MM = 2.0


@dataclass(frozen=True)
class Budget:
    steps: int
    patch: Tuple[int, int, int]  # xyz
    spacing: Tuple[float, float, float]  # xyz mm
    filters: int


BUDGETS = {
    "full": Budget(80, (32, 32, 16), (2.0, 2.0, 3.0), 8),
    "quick": Budget(10, (32, 32, 16), (3.0, 3.0, 3.0), 4),
}


def load_cases(sources: Path):
    """(cases, label table, loaded arrays) of the four patients, read from their DICOM folders."""
    from training.data import load_all
    from training.datasets import rtstruct_case
    from training.label_table import build_label_table
    from training.lesion_samples import PATIENTS

    cases = [rtstruct_case(sources / patient) for patient in PATIENTS]
    for case, patient in zip(cases, PATIENTS):
        case.name = patient
    return cases, build_label_table(cases), load_all(cases)


def run_fold(held_out: str, cases, table, loaded, fraction: float, budget: Budget, work: Path) -> dict:
    """Train on the other patients with ``foreground_fraction`` ``fraction``; score the held-out one."""
    import numpy as np

    from MedSegUNetLib.commands.lesions import lesion_scores
    from MedSegUNetLib.commands.metrics import score_masks
    from MedSegUNetLib.core.geometry import xyz_to_zyx
    from MedSegUNetLib.core.progress import Progress
    from MedSegUNetLib.prediction.inference import PredictOptions, predict_labels
    from training.config import TrainConfig, plan
    from training.data import fingerprint, prepare
    from training.loop import Run

    config = TrainConfig(
        output=str(work),
        max_steps=budget.steps,
        spacing=budget.spacing,
        patch_size=budget.patch,
        filters=budget.filters,
        batch_size=2,
        lr=2e-3,
        seed=0,
        device="cpu",
        validate_every=10**9,  # no model selection on the held-out patient: the last weights are scored
        workers=0,
        foreground_fraction=fraction,
    )
    training = [c for c in cases if c.name != held_out]
    the_plan = plan(config, fingerprint({c.name: loaded[c.name] for c in training}), len(training))
    prepared = {c.name: prepare(c, *loaded[c.name], table, the_plan.preprocessing) for c in cases}
    test = prepared[held_out]
    started = time.process_time()
    run = Run(config, the_plan, table.labels, [prepared[c.name] for c in training], [test], {}, Progress())
    run.run()
    patch_zyx = xyz_to_zyx(the_plan.preprocessing.patch_size)
    predicted = predict_labels(run.network, test.image, patch_zyx, PredictOptions(device="cpu"), Progress()) == 1
    reference = test.label[0] == 1
    voxels = score_masks(predicted, reference, test.spacing_zyx, TOLERANCE_MM)
    lesions = lesion_scores(predicted, reference, test.spacing_zyx, TOLERANCE_MM)
    largest = lesions["lesions"][0]
    return {
        "held_out": held_out,
        "lesion_ml": largest["volume_reference_ml"],
        "lesion_share": float(reference.mean()),
        "dice": voxels["dice"],
        "nsd": voxels["nsd"],
        "detected": lesions["lesions_detected"],
        "false_positives": lesions["false_positives"],
        "volume_error_ml": float(np.sum([row["volume_error_ml"] for row in lesions["lesions"]])),
        "cpu_s": time.process_time() - started,
    }


def means(rows: List[dict]) -> dict:
    keys = ("dice", "nsd", "detected", "false_positives", "volume_error_ml")
    result = {key: statistics.mean(row[key] for row in rows) for key in keys}
    result["abs_volume_error_ml"] = statistics.mean(abs(row["volume_error_ml"]) for row in rows)
    return result


def markdown(report: dict) -> str:
    """The per-fold table and the means, as benchmarks/README.md shows them."""
    lines = [
        "| held out | GTV mL (share of voxels) | sampling | Dice | surface Dice (2 mm) | detected | false positives "
        "| volume error mL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        for row in report["folds"][arm]:
            lines.append(
                f"| {row['held_out']} | {row['lesion_ml']:.1f} ({row['lesion_share']:.2%}) | {arm} | {row['dice']:.3f} "
                f"| {row['nsd']:.3f} | {row['detected']} | {row['false_positives']} | {row['volume_error_ml']:+.1f} |"
            )
    for arm in ARMS:
        mean = report["mean"][arm]
        lines.append(
            f"| **mean** | | {arm} | {mean['dice']:.3f} | {mean['nsd']:.3f} | {mean['detected']:.2f} "
            f"| {mean['false_positives']:.2f} | {mean['volume_error_ml']:+.1f} |"
        )
    return "\n".join(lines)


def harness(args: argparse.Namespace) -> dict:
    import torch

    from training.lesion_samples import fetch_lesion_sources

    budget = BUDGETS["quick" if args.quick else "full"]
    if args.steps:
        budget = Budget(args.steps, budget.patch, budget.spacing, budget.filters)
    sources = fetch_lesion_sources(log=lambda message: print(message, file=sys.stderr))
    cases, table, loaded = load_cases(sources)
    folds: Dict[str, List[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="medsegunet-lesion-bench-") as work:
        for case in cases:
            for arm, fraction in ARMS.items():
                row = run_fold(case.name, cases, table, loaded, fraction, budget, Path(work) / f"{case.name}-{arm}")
                folds[arm].append(row)
                print(
                    f"{case.name} {arm:>12}: Dice {row['dice']:.3f}, detected {row['detected']}, "
                    f"FP {row['false_positives']}, {row['cpu_s']:.0f} CPU s",
                    file=sys.stderr,
                )
                if args.json:  # every finished fold kept, should a long run be stopped
                    Path(args.json).write_text(json.dumps({"budget": asdict(budget), "folds": folds}), "utf-8")
    report = {
        "budget": asdict(budget),
        "torch_threads": torch.get_num_threads(),
        "tolerance_mm": TOLERANCE_MM,
        "folds": folds,
        "mean": {arm: means(rows) for arm, rows in folds.items()},
        "cpu_s_total": sum(row["cpu_s"] for rows in folds.values() for row in rows),
    }
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per fold: checks that the pieces run")
    parser.add_argument("--steps", type=int, help="training steps per fold (default: 80, --quick 10)")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    harness(parser.parse_args())


if __name__ == "__main__":
    main()
