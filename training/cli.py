"""`medsegunet train` (also `python -m training train`): from annotated scenes to a model bundle."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

from MedSegUNetLib.cli import add_progress_argument
from MedSegUNetLib.core.errors import MedSegError

if TYPE_CHECKING:  # imported where used, so that `--help` stays light
    from MedSegUNetLib.core.progress import Progress

    from .config import TrainConfig
    from .distributed import World
    from .scenes import Case


def add_train_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "train",
        help="train or fine-tune a model from Slicer scenes (.mrb/.mrml)",
        description="Train a U-Net from annotated Slicer scenes and write a model bundle (OUTDIR/model.safetensors).",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="DATA",
        help=".mrb bundles, .mrml scenes, folders of .mrb files, MSD / nnU-Net v2 folders (dataset.json), "
        "DICOM folders with an RT structure set (or folders of them), or IMAGE:LABEL pairs",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument("--init", type=Path, help="fine-tune this bundle (keeps its labels, adds new ones)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTDIR's last checkpoint")
    parser.add_argument(
        "--labels",
        type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
        metavar="NAME,...",
        help="train only these segments (by name); the others count as background",
    )
    parser.add_argument(
        "--missing-segments",
        choices=["not-annotated", "background"],
        default="not-annotated",
        help="a structure a case has no segment for: not annotated there, so not taught as background (default), "
        "or background (every case annotates every structure). A segment named 'ignore' or 'unlabeled' marks "
        "voxels that teach nothing",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cases, their geometry, what each annotates and the label table, then stop",
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"))
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--schedule", choices=["poly", "cosine"], default="poly")
    parser.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.2,
        help="cases held out for validation (0.2); 0: every case trains and validation is on them (optimistic)",
    )
    parser.add_argument("--validate-every", type=int, default=50)
    parser.add_argument(
        "--modality", choices=["ct", "mri"], help="intensity normalization (default: the dataset's, else ct)"
    )
    parser.add_argument("--folds", type=int, default=0, help="k-fold cross-validation: split the cases into K folds")
    parser.add_argument("--fold", type=int, default=0, help="with --folds: the fold to validate on (0..K-1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision (default: on for CUDA, bf16 where supported; never on CPU)",
    )
    parser.add_argument(
        "--workers",
        type=_non_negative,
        metavar="N",
        help="processes that make the augmented crops ahead of the steps (default: all cores but one "
        "on a GPU, up to 8; one on a CPU with 2+ cores; 0: in the training process)",
    )
    parser.add_argument(
        "--foreground-fraction",
        type=_fraction,
        default=0.33,
        metavar="P",
        help="share of each batch's crops centered on a foreground voxel, the class drawn uniformly among the "
        "case's (nnU-Net's 0.33; 0: uniform crops)",
    )
    parser.add_argument(
        "--slab-crops",
        type=_fraction,
        default=0.0,
        metavar="P",
        help="share of crops cut to a thin slab head to foot, padded with air as segment pads a scan thinner "
        "than its window (default 0: none)",
    )
    parser.add_argument(
        "--contrast-phases",
        type=_fraction,
        default=0.0,
        metavar="P",
        help="CT: share of crops whose known enhancing structures (liver, spleen, kidneys, vessels...) are "
        "brightened each by a random amount up to what a contrast agent adds (default 0: none)",
    )
    parser.add_argument(
        "--batch-dice",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Dice over the whole batch rather than per crop (default on: small structures)",
    )
    add_progress_argument(parser)
    parser.set_defaults(handler=run_train_command)


def discover(inputs: List[str], workdir: Path) -> Tuple[List[Case], Optional[str]]:
    """(cases, modality a dataset declared) from scenes, folders of scenes, MSD/nnU-Net folders, pairs."""
    from MedSegUNetLib.imageio.rtstruct import is_rtstruct

    from .datasets import (
        is_dataset_folder,
        looks_like_pair,
        read_dataset_folder,
        read_pair,
        rtstruct_case,
        rtstruct_cases,
    )
    from .scenes import read_scene

    cases: List[Case] = []
    modalities: Set[str] = set()
    for text in inputs:
        path = Path(text)
        if looks_like_pair(text):
            cases.append(read_pair(text))
        elif is_dataset_folder(path):
            dataset = read_dataset_folder(path)
            cases += dataset.cases
            if dataset.modality is not None:
                modalities.add(dataset.modality)
        elif path.is_dir():
            scenes = sorted(path.glob("*.mrb"))
            found = [] if scenes else rtstruct_cases(path)
            if not scenes and not found:
                raise MedSegError("folder holds no .mrb scene, no dataset.json and no DICOM RT structure set", path)
            for scene in scenes:
                cases += read_scene(scene, workdir)
            cases += found
        elif is_rtstruct(path):
            cases.append(rtstruct_case(path))
        else:
            cases += read_scene(path, workdir)
    names = [case.name for case in cases]
    for index, case in enumerate(cases):
        if names.count(case.name) > 1:
            case.name = f"{case.name}#{index}"
    if len(modalities) > 1:
        raise MedSegError(f"the datasets mix modalities ({', '.join(sorted(modalities))}); pass --modality")
    return cases, next(iter(modalities), None)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {value}")
    return value


def config_from(args: argparse.Namespace) -> TrainConfig:
    from .config import TrainConfig

    return TrainConfig(
        output=str(args.output),
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        spacing=args.spacing,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        filters=args.filters,
        lr=args.lr,
        optimizer=args.optimizer,
        schedule=args.schedule,
        seed=args.seed,
        device=args.device,
        val_fraction=args.val_fraction,
        validate_every=args.validate_every,
        modality=args.modality or "ct",
        init=str(args.init) if args.init else None,
        resume=args.resume,
        amp=args.amp,
        workers=args.workers,
        foreground_fraction=args.foreground_fraction,
        batch_dice=args.batch_dice,
        slab_crops=args.slab_crops,
        contrast_phases=args.contrast_phases,
    )


def run_train_command(args: argparse.Namespace, progress: Progress) -> dict:
    from MedSegUNetLib.core.progress import Progress
    from MedSegUNetLib.prediction.inference import select_device

    from .distributed import init_world

    world = init_world(select_device(args.device).type)
    try:
        return train(args, progress if world.is_main else Progress(), world)
    finally:
        world.close()


def train(args: argparse.Namespace, progress: Progress, world: World) -> dict:
    from MedSegUNetLib.core.geometry import Grid
    from MedSegUNetLib.model.bundle import read_bundle_metadata

    from . import contrast_agent
    from .config import plan
    from .data import fingerprint, load_all, prepare, split
    from .label_table import build_label_table
    from .loop import Run

    config = config_from(args)
    initial = read_bundle_metadata(args.init) if args.init else None
    with tempfile.TemporaryDirectory(prefix="medsegunet-scenes-") as work:
        cases, declared = discover(args.inputs, Path(work))
        config.modality = args.modality or declared or "ct"
        try:
            table = build_label_table(cases, initial=initial.labels if initial else None, only=args.labels)
            train_names, val_names, note = split(
                [c.name for c in cases], config.val_fraction, config.seed, args.folds, args.fold
            )
        except ValueError as error:
            raise MedSegError(str(error)) from None
        loaded = load_all(cases)
        the_plan = plan(config, fingerprint(loaded), len(cases), fixed=initial.preprocessing if initial else None)
        lines = [
            f"case {c.name}: {Grid.of(loaded[c.name][0]).describe()}, {len(c.segments)} segments ({c.source})"
            for c in cases
        ]
        partial = args.missing_segments == "not-annotated"
        lines += [table.describe(c) if partial else f"case {c.name} annotates every structure" for c in cases]
        lines += [f"label {label.value}: {label.name}" for label in table.labels]
        lines += [f"warning: {w}" for w in table.report()] if partial else []
        lines += [f"plan: {reason}" for reason in the_plan.reasons] + [f"split: {note}"]
        phases = contrast_agent.describe(
            [label.name for label in table.labels], the_plan.preprocessing.normalization, config.contrast_phases
        )
        lines += [phases] if phases else []
        if args.dry_run:
            if world.is_main:
                print("\n".join(lines))
            return {"message": "dry run", "cases": len(cases), "labels": [label.name for label in table.labels]}
        for line in lines:
            progress.note(line)
        prepared = {c.name: prepare(c, *loaded[c.name], table, the_plan.preprocessing, partial) for c in cases}
    args.output.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        (args.output / "plan.json").write_text(json.dumps(the_plan.to_dict(), indent=2), encoding="utf-8")
    summary: Dict[str, Any] = {
        "cases": [c.source for c in cases],
        "validation": val_names,
        "split": note,
        "label_warnings": table.report(),
        "slab_crops": config.slab_crops,
        "contrast_phases": config.contrast_phases,
    }
    if world.distributed:
        summary["world_size"] = world.size
    run = Run(
        config,
        the_plan,
        table.labels,
        [prepared[n] for n in train_names],
        [prepared[n] for n in val_names],
        summary,
        progress,
        world,
    )
    if config.resume:
        run.resume()
    bundle = run.run()
    world.barrier()  # every rank ends after rank 0 has written the bundle
    progress.close()
    if args.progress != "json" and world.is_main:
        print(f"wrote {bundle}")
    return {"message": f"wrote {bundle}", "bundle": str(bundle)}
