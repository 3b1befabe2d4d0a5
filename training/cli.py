"""`medsegunet train` (also `python -m training train`): from annotated scenes to a model bundle."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import List

from MedSegUNetLib.errors import MedSegError


def add_parsers(commands) -> None:
    from MedSegUNetLib.cli import _add_progress_argument

    parser = commands.add_parser(
        "train",
        help="train or fine-tune a model from Slicer scenes (.mrb/.mrml)",
        description="Train a U-Net from annotated Slicer scenes and write a model bundle (OUTDIR/model.safetensors).",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="SCENE", help=".mrb bundles, .mrml scenes, or folders of .mrb files")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument("--init", type=Path, help="fine-tune this bundle (keeps its labels, adds new ones)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTDIR's last checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="print the cases, their geometry and the label table, then stop")
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
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--validate-every", type=int, default=50)
    parser.add_argument("--modality", choices=["ct", "mri"], default="ct")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    _add_progress_argument(parser)
    parser.set_defaults(handler=run_train_command)


def discover(inputs: List[Path], workdir: Path):
    from .scenes import read_scene

    cases = []
    for path in inputs:
        scenes = sorted(path.glob("*.mrb")) if path.is_dir() else [path]
        if path.is_dir() and not scenes:
            raise MedSegError("folder holds no .mrb scene", path)
        for scene in scenes:
            cases += read_scene(scene, workdir)
    names = [case.name for case in cases]
    for index, case in enumerate(cases):
        if names.count(case.name) > 1:
            case.name = f"{case.name}#{index}"
    return cases


def run_train_command(args: argparse.Namespace, progress) -> dict:
    from MedSegUNetLib.bundle import read_bundle_metadata
    from MedSegUNetLib.geometry import Grid

    from .config import TrainConfig, plan
    from .data import fingerprint, load_all, prepare, split
    from .labels import build_label_table
    from .loop import Run

    config = TrainConfig(
        output=str(args.output), epochs=args.epochs, max_steps=args.max_steps, max_minutes=args.max_minutes,
        spacing=args.spacing, patch_size=args.patch_size, batch_size=args.batch_size, filters=args.filters, lr=args.lr,
        optimizer=args.optimizer, schedule=args.schedule, seed=args.seed, device=args.device, val_fraction=args.val_fraction,
        validate_every=args.validate_every, modality=args.modality, init=str(args.init) if args.init else None, resume=args.resume,
    )
    initial = read_bundle_metadata(args.init) if args.init else None
    with tempfile.TemporaryDirectory(prefix="medsegunet-scenes-") as work:
        cases = discover(args.inputs, Path(work))
        table = build_label_table(cases, initial=initial.labels if initial else None)
        loaded = load_all(cases)
        the_plan = plan(config, fingerprint(loaded), len(cases), fixed=initial.preprocessing if initial else None)
        lines = [f"case {c.name}: {Grid.of(loaded[c.name][0]).describe()}, {len(c.segments)} segments ({c.source})" for c in cases]
        lines += [f"label {l.value}: {l.name}" for l in table.labels] + [f"warning: {w}" for w in table.report()]
        lines += [f"plan: {reason}" for reason in the_plan.reasons]
        if args.dry_run:
            print("\n".join(lines))
            return {"message": "dry run", "cases": len(cases), "labels": [l.name for l in table.labels]}
        for line in lines:
            progress.note(line)
        prepared = {c.name: prepare(c, *loaded[c.name], table, the_plan.preprocessing) for c in cases}
    train_names, val_names, note = split([c.name for c in cases], config.val_fraction, config.seed)
    progress.note(note)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "plan.json").write_text(json.dumps(the_plan.to_dict(), indent=2), encoding="utf-8")
    summary = {"cases": [c.source for c in cases], "validation": val_names, "split": note, "label_warnings": table.report()}
    run = Run(config, the_plan, table.labels, [prepared[n] for n in train_names], [prepared[n] for n in val_names], summary, progress)
    if config.resume:
        run.resume()
    bundle = run.run()
    progress.close()
    if args.progress != "json":
        print(f"wrote {bundle}")
    return {"message": f"wrote {bundle}", "bundle": str(bundle)}
