"""``import-model``: another tool's trained model (an nnU-Net v2 trained-model folder, a MONAI bundle, or a
.zip of either; the kind is detected) written as a MedSegUNet bundle. The Slicer panel runs it in a child
process with ``--progress json``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from MedSegUNetLib.core.errors import MedSegError

if TYPE_CHECKING:
    from MedSegUNetLib.core.progress import Progress
    from MedSegUNetLib.importers.monai_bundle import MonaiBundle
    from MedSegUNetLib.importers.nnunet import NnUNetModel


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "import-model",
        help="write a bundle from an nnU-Net v2 trained model or a MONAI bundle (folder or .zip)",
        description="SOURCE: an nnU-Net v2 trained-model folder (TRAINER__PLANS__CONFIGURATION with plans.json, "
        "dataset.json and fold_K/checkpoint_final.pth), a folder above it, a MONAI bundle (configs/inference.json "
        "or .yaml, configs/metadata.json, models/model.pt), or a .zip of one. Checkpoints are read without running "
        "any code they might hold; a MONAI configuration is read as data, never evaluated.",
    )
    parser.add_argument("source", type=Path)
    parser.add_argument("-o", "--output", required=True, type=Path, help="the bundle to write (.safetensors)")
    parser.add_argument(
        "--folds", default=None, help="comma-separated folds, e.g. 0,1,2, or 'all' (default: all present)"
    )
    parser.add_argument("--checkpoint", choices=["final", "best"], default="final")
    parser.add_argument("--name", default=None, help="the model's name (default: the output file's)")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="ID=VALUE",
        help="MONAI bundles: set a configuration entry before reading it, as MONAI's `run --ID VALUE` does "
        "(VALUE as JSON, else text), e.g. --set displayable_configs#highres=false",
    )
    parser.add_argument("--progress", choices=["auto", "json", "bar", "lines", "none"], default="auto")
    parser.set_defaults(handler=run_import_command)


def run_import_command(args: argparse.Namespace, progress: Progress) -> dict:
    folds = None if args.folds in (None, "all") else [f.strip() for f in args.folds.split(",") if f.strip()]
    settings = dict(_setting(text) for text in args.settings)
    output = import_model(args.source, args.output, folds, args.checkpoint, args.name, progress, settings)
    if args.progress != "json":  # stdout carries only JSON lines for the panel
        print(f"wrote {output}")
    return {"output": str(output)}


def _setting(text: str) -> Tuple[str, Any]:
    """``ID=VALUE`` as (ID, VALUE read as JSON, or as text when it is not JSON)."""
    import json

    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise MedSegError(f"--set {text!r} is not ID=VALUE")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _wanted(checkpoint: str) -> Callable[[str], bool]:
    """Which entries of a zip are unpacked: the JSON and YAML files, the chosen nnU-Net checkpoints, a MONAI
    bundle's models/*.pt (and *.ts, to say why they are refused) and licence files."""
    from MedSegUNetLib.importers.nnunet import LICENCE_NAMES

    def wanted(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return (
            base.endswith((".json", ".yaml", ".yml"))
            or base == checkpoint
            or (name.rsplit("/", 2)[-2:-1] == ["models"] and base.endswith((".pt", ".ts")))
            or name.endswith("docs/data_license.txt")
            or base.lower() in LICENCE_NAMES
        )

    return wanted


def import_model(
    source: Path,
    output: Path,
    folds: Optional[Sequence[str]] = None,
    checkpoint: str = "final",
    name: Optional[str] = None,
    progress: Optional[Progress] = None,
    settings: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write the bundle for the nnU-Net model or MONAI bundle at ``source`` (``settings``: MONAI configuration
    entries to set first); the checks that can fail run before the long work."""
    from MedSegUNetLib.core.atomic import check_writable
    from MedSegUNetLib.core.progress import Progress
    from MedSegUNetLib.importers.archive import source_folder
    from MedSegUNetLib.importers.monai_bundle import find_bundle_folder, read_bundle
    from MedSegUNetLib.importers.nnunet import CHECKPOINTS, choose_folds, find_model_folder, read_model

    progress = progress or Progress()
    output = Path(output)
    if not output.name.endswith(".safetensors"):
        raise MedSegError("the bundle must be a .safetensors file", output)
    check_writable(output)
    checkpoint_name = CHECKPOINTS[checkpoint]
    progress.update("read", 0, 1, f"{source}")
    with source_folder(Path(source), _wanted(checkpoint_name)) as root:
        monai_folder = find_bundle_folder(root)
        if monai_folder is not None:
            if folds is not None:
                raise MedSegError("--folds applies to nnU-Net models; this is a MONAI bundle", Path(source))
            bundle = read_bundle(monai_folder, settings)
            progress.update("read", 1, 1, f"MONAI bundle {monai_folder.name}")
            return _write_monai_bundle(bundle, name or output.name.split(".")[0], output, progress)
        if settings:
            raise MedSegError("--set applies to MONAI bundles; this is an nnU-Net model", Path(source))
        model = read_model(find_model_folder(root))
        chosen = choose_folds(model.folder, folds, checkpoint_name)
        progress.update("read", 1, 1, f"{model.folder.name}: folds {', '.join(chosen)}")
        return _write_bundle(model, root, chosen, checkpoint_name, name or output.name.split(".")[0], output, progress)


def _write_bundle(
    model: NnUNetModel, root: Path, folds: List[str], checkpoint: str, name: str, output: Path, progress: Progress
) -> Path:
    from MedSegUNetLib.importers.checkpoint import read_checkpoint
    from MedSegUNetLib.importers.nnunet import bundle_meta, licence_text, mirroring_of, network_weights
    from MedSegUNetLib.model.bundle import save_bundle
    from MedSegUNetLib.model.network import build_network

    weights: List[Dict[str, Any]] = []
    first: Dict[str, Any] = {}
    for index, fold in enumerate(folds):
        path = model.folder / f"fold_{fold}" / checkpoint
        progress.update("convert", index, len(folds), f"fold {fold}: {checkpoint}")
        loaded = read_checkpoint(path)
        weights.append(network_weights(loaded, path))
        first = first or {
            "mirror": mirroring_of(loaded, path),
            "trainer": str(loaded.get("trainer_name", model.trainer)),
        }
    # as nnU-Net's predictor: the trainer name and mirroring axes of the first fold's checkpoint
    meta = bundle_meta(model, folds, checkpoint, first["mirror"], first["trainer"], name, licence_text(model, root))
    network = build_network(meta.network)
    members = list(network.members) if meta.network.members > 1 else [network]
    for fold, member, state in zip(folds, members, weights):
        try:
            member.load_state_dict(state, strict=True)
        except RuntimeError as error:
            detail = " ".join(str(error).split())[:300]
            raise MedSegError(
                f"the weights do not fit the network plans.json describes ({detail})",
                model.folder / f"fold_{fold}" / checkpoint,
            ) from None
    progress.update("convert", len(folds), len(folds), f"{meta.network.cls}, {len(meta.labels)} labels")
    progress.update("write", 0, 1, str(output))
    save_bundle(output, meta, network.eval())
    progress.update("write", 1, 1, str(output))
    return output


def _write_monai_bundle(bundle: MonaiBundle, name: str, output: Path, progress: Progress) -> Path:
    from MedSegUNetLib.importers.monai_bundle import bundle_meta, model_weights, weights_path
    from MedSegUNetLib.model.bundle import save_bundle
    from MedSegUNetLib.model.network import build_network

    meta, inferer = bundle_meta(bundle, name)
    path = weights_path(bundle)
    progress.update("convert", 0, 1, str(path))
    weights = model_weights(bundle, path)
    try:
        network = build_network(meta.network)
    except Exception as error:  # arguments from an untrusted file: MONAI may raise anything
        detail = " ".join(str(error).split())[:300]
        raise MedSegError(f"cannot build 'network_def' {meta.network.cls} ({detail})", bundle.config_path) from None
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise MedSegError(
            f"the weights do not fit the network 'network_def' describes ({detail})",
            path,
        ) from None
    for note in bundle.notes:
        progress.note(note)
    progress.update("convert", 1, 1, f"{meta.network.cls}, {len(meta.labels)} labels")
    progress.update("write", 0, 1, str(output))
    save_bundle(output, meta, network.eval())
    progress.update("write", 1, 1, str(output))
    return output
