"""The engine's program, ``python -m MedSegUNetLib`` (Slicer's panel runs it with PythonSlicer): segment,
standby, info, create-bundle, devices, evaluate. The ``medsegunet`` program adds training's commands on top
(training/program.py) through :func:`build_parser`'s ``extra`` and :func:`main`'s ``build``.

Expected failures print one line, ``medsegunet: error: FILE: problem``, and exit 1; a usage error
exits 2; SIGINT/SIGTERM end the run cleanly with exit 130 and no output file. The engine's commands
(segment, standby, devices) end their process as soon as their output is flushed (:func:`exit_now`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Callable, NoReturn, Optional, Sequence

from MedSegUNetLib import __version__
from MedSegUNetLib.core.errors import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_OK,
    OUT_OF_MEMORY,
    Cancelled,
    MedSegError,
    describe_os_error,
)

if TYPE_CHECKING:
    from MedSegUNetLib.commands.segment import SegmentOptions
    from MedSegUNetLib.commands.standby import LoadedModel
    from MedSegUNetLib.core.progress import Progress

PROGRAM = "medsegunet"
DEVICES = ["auto", "cpu", "cuda", "mps"]
PRECISIONS = ["auto", "fp32", "bf16"]  # inference.PRECISIONS, spelled out so that --help need not import torch
BATCH_FORMATS = ["seg.nrrd", "nii.gz", "nrrd", "nii", "mha"]  # the output endings images.write_segmentation takes


def _raise_cancelled(signum: int, frame: Optional[FrameType]) -> None:
    raise Cancelled(f"stopped by signal {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    """SIGTERM (the panel's Cancel) and SIGINT (Ctrl-C) unwind the stack, so temporaries are removed."""
    signal.signal(signal.SIGTERM, _raise_cancelled)
    signal.signal(signal.SIGINT, _raise_cancelled)


# --- segment ---------------------------------------------------------------------------------------


def add_segment_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "segment",
        help="segment a volume with a model bundle",
        description="Segment a CT/MRI volume (.nrrd, .nii, .nii.gz, .mha, .mhd or a DICOM folder) with a model "
        "bundle and write a .seg.nrrd (Slicer segmentation) or a labelmap on the input's exact grid.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="one image per model input channel")
    parser.add_argument(
        "-m",
        "--model",
        required=True,
        type=Path,
        action="append",
        help="model bundle (.safetensors) or model set (.modelset.json: several bundles); several -m run as one: the "
        "input read once, the labels merged (the first model given keeps a voxel two models label)",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="OUTPUT.seg.nrrd, .nrrd, .nii.gz or .nii")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--series", help="DICOM series instance UID, when the folder holds several")
    add_prediction_arguments(parser)
    add_progress_argument(parser)
    parser.set_defaults(handler=run_segment_command, exit_at_once=True)


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``segment`` and ``segment-batch`` share: how to predict and what to do with the labels."""
    parser.add_argument(
        "--overlap",
        type=float,
        default=None,
        help="sliding-window overlap in [0, 0.95] (default: an imported model's own, else 0.5)",
    )
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False, help="mirroring TTA (8x time)")
    parser.add_argument(
        "--largest-component",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep only the largest connected component of each label",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="windows predicted at once (default: 1 on the CPU, 2 on a GPU)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: fp16 on a CUDA GPU, float32 elsewhere; fp32: no reduced precision; bf16: on a GPU, or on a CPU "
        "with AVX512-BF16/AMX (there only slightly faster, and labels can differ slightly from float32)",
    )
    parser.add_argument(
        "--body-crop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CT models: run the network only on the box around the body, air is background (default: on for "
        "the engine's own models, off for imported ones, which their tools run on the whole volume)",
    )


def segment_options(args: argparse.Namespace) -> SegmentOptions:
    """The parsed prediction arguments (:func:`add_prediction_arguments`), checked."""
    from MedSegUNetLib.commands.segment import SegmentOptions
    from MedSegUNetLib.prediction.inference import PredictOptions

    overlap = PredictOptions.overlap if args.overlap is None else args.overlap
    if not 0.0 <= overlap <= 0.95:
        raise MedSegError(f"--overlap must be between 0 and 0.95, not {overlap}")
    _check_batch_size(args.batch_size)
    device = getattr(args, "device", "auto")
    return SegmentOptions(
        predict=PredictOptions(overlap, args.tta, args.batch_size, device, args.precision),
        largest_component=args.largest_component,
        series=getattr(args, "series", None),
        crop_to_body=args.body_crop,
        overlap_given=args.overlap is not None,
    )


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        default="auto",
        choices=["auto", "json", "bar", "lines", "none"],
        help="json: one JSON object per line on stdout (for the Slicer panel); bar: a terminal bar; lines: plain "
        "lines for a log (auto: bar in a terminal, else lines)",
    )


def run_segment_command(args: argparse.Namespace, progress: Progress, preloaded: Optional[LoadedModel] = None) -> dict:
    """``segment``; ``preloaded`` (a standby.LoadedModel) serves the job when it holds the job's model."""
    from MedSegUNetLib.commands.segment import run_segment
    from MedSegUNetLib.model.model_set import expand_models

    options = segment_options(args)
    models = expand_models(args.model)
    if len(models) > 1:
        from MedSegUNetLib.commands.segment_set import run_segment_set

        output = run_segment_set(args.inputs, models, args.output, options, progress)
    else:
        model = models[0]
        bundle = preloaded.bundle if preloaded is not None and preloaded.serves(model) else None
        output = run_segment(args.inputs, model, args.output, options, progress, preloaded=bundle)
    progress.close()
    if args.progress != "json":
        print(f"wrote {output}")
    return {"message": f"wrote {output}", "output": str(output)}


# --- segment-batch: a cohort ------------------------------------------------------------------------


def add_segment_batch_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "segment-batch",
        help="segment a cohort with the model loaded once (resumable, in shards across machines)",
        description="Segment every case of the inputs (image files, folders of them, folder trees of DICOM series: "
        "one case per series; channels as CASE_0000, CASE_0001, ...) into DIR/CASE.FORMAT. Outputs that exist are "
        "skipped; a failed case does not stop the others (exit 1 if any failed); DIR/summary.csv has a row per case.",
    )
    parser.add_argument("inputs", nargs="*", type=Path, metavar="INPUT", help="image files, folders, DICOM trees")
    parser.add_argument(
        "-m", "--model", required=True, type=Path, help="model bundle (.safetensors) or model set (.modelset.json)"
    )
    parser.add_argument("--output-dir", "-o", required=True, type=Path, help="folder of the outputs and summary.csv")
    parser.add_argument("--format", default="seg.nrrd", choices=BATCH_FORMATS, help="output format (seg.nrrd)")
    parser.add_argument("--list", type=Path, help="a text file of inputs, one per line (# comments)")
    parser.add_argument(
        "--shard", help="I/N: only the cases of shard I (0 to N-1) of N, by a hash of the case id (for job arrays)"
    )
    parser.add_argument(
        "--devices", default="auto", help="comma-separated, one predictor each: e.g. cuda:0,cuda:1 or cpu,cpu (auto)"
    )
    add_prediction_arguments(parser)
    add_progress_argument(parser)
    parser.set_defaults(handler=run_segment_batch_command, exit_at_once=True)


def run_segment_batch_command(args: argparse.Namespace, progress: Progress) -> dict:
    """``segment-batch``: exit 1, with one line, when any case failed (the summary has their errors)."""
    from MedSegUNetLib.commands.batch_cases import parse_shard
    from MedSegUNetLib.commands.segment_batch import BatchOptions, run_segment_batch
    from MedSegUNetLib.core.progress import make_progress
    from MedSegUNetLib.imageio.console import python_streams_apart

    options = BatchOptions(
        segment=segment_options(args),
        output_format=args.format,
        devices=tuple(device for device in args.devices.split(",") if device.strip()),
        shard=parse_shard(args.shard) if args.shard is not None else None,
    )
    with python_streams_apart():
        result = run_segment_batch(
            args.inputs, args.list, args.model, args.output_dir, options, make_progress(args.progress)
        )
    progress.close()
    failed = result.summary.count("failed")
    if failed:
        raise MedSegError(f"{failed} of {result.cases} case(s) failed (their errors: {result.summary.path})")
    if args.progress != "json":
        print(result.describe())
    return {"message": result.describe(), "summary": str(result.summary.path)}


def _refuse_model_set(model: Path, command: str) -> None:
    from MedSegUNetLib.model.model_set import is_model_set

    if is_model_set(model):
        raise MedSegError(f"is a model set; {command} runs one bundle (segment and segment-batch run a set)", model)


# --- standby: the engine started before the click ----------------------------------------------------


def add_standby_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "standby",
        help="load a model and wait for one segment job on stdin (the Slicer panel starts it ahead of a click)",
        description="Import the libraries, load the model and run one window through it, then read one line "
        '{"segment": [ARG, ...]} from stdin and run it as `segment ARG...` would. End of input or --idle-minutes '
        "without a job: exit 0, nothing written.",
    )
    parser.add_argument("-m", "--model", required=True, type=Path, help="model bundle (.safetensors) to load ahead")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--batch-size", type=int, default=None, help="windows per batch to warm up for")
    parser.add_argument("--idle-minutes", type=float, default=10.0, help="exit when no job came in this long (10)")
    add_progress_argument(parser)
    parser.set_defaults(handler=run_standby_command, exit_at_once=True)


def _check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is not None and batch_size < 1:
        raise MedSegError("--batch-size must be at least 1")


def run_standby_command(args: argparse.Namespace, progress: Progress) -> dict:
    from MedSegUNetLib.commands.standby import load_and_warm, wait_for_job

    _refuse_model_set(args.model, "standby")
    _check_batch_size(args.batch_size)
    if not args.idle_minutes > 0:  # NaN too
        raise MedSegError("--idle-minutes must be positive")
    loaded = load_and_warm(args.model, args.device, args.precision, args.batch_size, progress)
    arguments = wait_for_job(sys.stdin.fileno(), args.idle_minutes * 60)
    if arguments is None:
        return {"message": "no job came: nothing done"}
    job = parse_standby_job(arguments, args.progress)
    return run_segment_command(job, progress, preloaded=loaded)


def parse_standby_job(arguments: Sequence[str], progress_kind: str) -> argparse.Namespace:
    """The job's arguments as ``segment`` takes them; argparse's complaint as one MedSegError line."""
    import contextlib
    import io

    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            job = build_parser().parse_args(["segment", *arguments])
    except SystemExit:
        lines = [line for line in complaint.getvalue().splitlines() if line.strip()]
        complaint_line = lines[-1].split(": error: ", 1)[-1] if lines else "bad arguments"
        raise MedSegError(f"standby job: {complaint_line}") from None
    if job.progress not in ("auto", progress_kind):
        raise MedSegError(
            f"standby job: --progress {job.progress} differs from the standby's --progress {progress_kind}"
        )
    job.progress = progress_kind  # the standby's reporter reports the job
    return job


# --- info and create-bundle ------------------------------------------------------------------------


def add_info_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("info", help="describe a model bundle or set (labels, spacing, provenance)")
    parser.add_argument("bundle", type=Path, help="a bundle (.safetensors) or a model set (.modelset.json)")
    parser.add_argument("--json", action="store_true", help="print the metadata as JSON (a set: one per bundle)")
    parser.set_defaults(handler=run_info_command, progress="none")


def run_info_command(args: argparse.Namespace, progress: Progress) -> dict:
    from MedSegUNetLib.model.bundle import describe, read_bundle_metadata
    from MedSegUNetLib.model.model_set import is_model_set, read_model_set

    if not is_model_set(args.bundle):
        meta = read_bundle_metadata(args.bundle)
        print(json.dumps(json.loads(meta.to_json()), indent=2) if args.json else describe(meta))
        return {}
    model_set = read_model_set(args.bundle)
    metas = [read_bundle_metadata(model) for model in model_set.models]
    if args.json:
        print(json.dumps([json.loads(meta.to_json()) for meta in metas], indent=2))
        return {}
    print(f"model set {model_set.name}: {len(metas)} models, run as one (where two label a voxel, the first keeps it)")
    for index, (model, meta) in enumerate(zip(model_set.models, metas), start=1):
        print(f"\n[{index}] {model}\n{describe(meta)}")
    return {}


def add_create_bundle_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "create-bundle",
        help="write a bundle around a freshly initialised network",
        description="A starting point for training, and a model for testing the pipeline (its output is noise).",
    )
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--labels", required=True, help="comma-separated segment names, e.g. liver,spleen")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5], metavar=("X", "Y", "Z"))
    parser.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 96], metavar=("X", "Y", "Z"))
    parser.add_argument("--modality", choices=["ct", "mri"], default="ct")
    parser.add_argument("--filters", type=int, default=16, help="filters of the first level (16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=run_create_bundle_command, progress="none")


def run_create_bundle_command(args: argparse.Namespace, progress: Progress) -> dict:
    from MedSegUNetLib.core.atomic import check_writable
    from MedSegUNetLib.core.labels import default_labels
    from MedSegUNetLib.model.bundle import Normalization, Preprocessing, create_bundle, save_bundle

    names = [name.strip() for name in args.labels.split(",") if name.strip()]
    if not names:
        raise MedSegError("--labels needs at least one name")
    normalization = Normalization("ct", (-1000.0, 1000.0)) if args.modality == "ct" else Normalization("zscore", None)
    preprocessing = Preprocessing(tuple(args.spacing), tuple(args.patch_size), "RAS", normalization)
    try:
        bundle = create_bundle(
            default_labels(names),
            preprocessing,
            channels=["CT" if args.modality == "ct" else "MR"],
            name=args.output.name.split(".")[0],
            seed=args.seed,
            base_filters=args.filters,
        )
    except ValueError as error:
        raise MedSegError(str(error)) from None
    check_writable(args.output)
    save_bundle(args.output, bundle.meta, bundle.network)
    print(f"wrote {args.output}")
    return {"output": str(args.output)}


def add_devices_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("devices", help="list the compute devices torch can use here (JSON)")
    parser.set_defaults(handler=run_devices_command, progress="none", exit_at_once=True)


def run_devices_command(args: argparse.Namespace, progress: Progress) -> dict:
    """One JSON line the Slicer panel reads to fill its device list."""
    import torch

    cuda = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    print(json.dumps({"torch": torch.__version__, "cuda": cuda, "mps": mps}), flush=True)
    return {}


# adds commands to what ArgumentParser.add_subparsers returns
AddParsers = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def build_parser(extra: Sequence[AddParsers] = ()) -> argparse.ArgumentParser:
    """The engine's commands, then those that each of ``extra`` adds."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="MedSegUNet: U-Net segmentation for 3D Slicer and the command line"
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_segment_parser(commands)
    add_segment_batch_parser(commands)
    add_standby_parser(commands)
    add_info_parser(commands)
    add_create_bundle_parser(commands)
    add_devices_parser(commands)
    from MedSegUNetLib.commands.evaluate import add_parser as add_evaluate_parser

    add_evaluate_parser(commands)
    from MedSegUNetLib.commands.import_model import add_parser as add_import_parser

    add_import_parser(commands)
    for add_parsers in extra:
        add_parsers(commands)
    return parser


def report_error(message: str, progress_kind: str) -> None:
    if progress_kind == "json":
        print(json.dumps({"stage": "error", "done": 0, "total": 0, "message": message}), flush=True)
    print(f"{PROGRAM}: error: {message}", file=sys.stderr, flush=True)


def tolerate_ascii_console() -> None:
    """Under a C/POSIX locale stdout is ASCII: escape a segment named "Leber (ü)" instead of crashing."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def entry() -> None:
    """The program (``medsegunet``, ``python -m MedSegUNetLib``)."""
    sys.exit(main(exit_at_once=True))


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` without the interpreter's teardown.

    With torch, MONAI and SimpleITK imported that teardown (unloading their modules) takes a good part
    of a second, and the Slicer panel loads a result only once the engine has exited.
    Nothing is lost by skipping it: the engine's files are written, checked and renamed into place by
    then (atomic.py), its worker threads have finished or only load what is no longer needed, and the
    exit handlers its libraries register (logging's flush, multiprocessing's, torch's) have nothing to
    do; what stdout and stderr still buffer is flushed here. Training keeps the normal exit (its
    data-loader workers and process group are ended by the teardown)."""
    for name in ("SIGTERM", "SIGINT"):  # a Cancel arriving now must not turn a finished run into a traceback
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # the reader has gone (the panel closed the pipe): there is no one left to tell
    os._exit(code)


def main(
    argv: Optional[Sequence[str]] = None,
    exit_at_once: bool = False,
    build: Callable[[], argparse.ArgumentParser] = build_parser,
    quiet: bool = False,
) -> int:
    """Run one command of the program ``build`` makes; its exit code. ``exit_at_once`` (the program's
    entry, never an in-process caller): a command that asks for it (``exit_at_once`` among its parser's
    defaults) ends the process here. ``quiet``: no progress and no final record (one process of several
    that run one job, e.g. a torchrun rank other than 0); errors are still reported."""
    tolerate_ascii_console()
    parser = build()
    args = parser.parse_args(argv)
    install_signal_handlers()
    if args.command in ("segment", "segment-batch", "standby"):
        from MedSegUNetLib.commands.skipped_imports import skip_unused_imports

        skip_unused_imports()  # before anything imports MONAI
    from MedSegUNetLib.core.progress import make_progress

    progress_kind = getattr(args, "progress", "none")
    progress = make_progress("none" if quiet else progress_kind)
    code = run_command(args, progress, progress_kind, report_done=not quiet)
    if exit_at_once and getattr(args, "exit_at_once", False):
        exit_now(code)
    return code


def run_command(args: argparse.Namespace, progress: Progress, progress_kind: str, report_done: bool = True) -> int:
    """The parsed command run, its expected failures reported as one line; the exit code."""
    try:
        result = args.handler(args, progress) or {}
        if progress_kind == "json" and report_done:
            progress.update("done", 1, 1, **{"message": "finished", **result})
        return EXIT_OK
    except MedSegError as error:
        progress.close()
        report_error(str(error), progress_kind)
        return EXIT_ERROR
    except (Cancelled, KeyboardInterrupt) as reason:
        progress.close()
        if progress_kind == "json":
            print(
                json.dumps({"stage": "cancelled", "done": 0, "total": 0, "message": str(reason) or "cancelled"}),
                flush=True,
            )
        print(f"{PROGRAM}: cancelled", file=sys.stderr, flush=True)
        return EXIT_CANCELLED
    except MemoryError:
        progress.close()
        report_error(OUT_OF_MEMORY, progress_kind)
        return EXIT_ERROR
    except OSError as error:  # disk full, file too large, I/O error: the atomic writers left nothing behind
        progress.close()
        report_error(describe_os_error(error), progress_kind)
        return EXIT_ERROR
    finally:
        progress.close()
