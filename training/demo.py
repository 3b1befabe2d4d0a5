"""`medsegunet demo`: the whole job on real scans, start to finish, on a laptop CPU in minutes.

Sample scans (from PyPI, cached) -> segment the held-out scan with the shipped model -> evaluate against
its reference -> overlay PNG, metrics JSON/CSV and a short table. ``--retrain`` also fine-tunes the
shipped model on the training scene (the Slicer edit-and-retrain loop, offline) and shows both results.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

from .sampledata import SOURCE_NOTE, cache_folder, write_samples

if TYPE_CHECKING:
    import SimpleITK as sitk

    from MedSegUNetLib.core.labels import Label
    from MedSegUNetLib.core.progress import Progress

    from .sampledata import WrittenSample
    from .scenes import SegmentInfo

DEFAULT_MODEL = "abdomen-ct"
TRAINING_SAMPLE, HELDOUT_SAMPLE = "abdomen-ct", "heldout-ct"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "demo",
        help="segment a real held-out CT with the shipped model, evaluate it, draw it",
        description="Gets the sample scans (downloaded once), segments the held-out CT with the shipped model, "
        "evaluates it against its reference and writes the .seg.nrrd, an overlay PNG and metrics (JSON, CSV).",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("medsegunet-demo"), help="folder to write (medsegunet-demo)"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="shipped model name or a bundle path (abdomen-ct)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument(
        "--retrain", action="store_true", help="also fine-tune the model on the training scene and compare"
    )
    parser.add_argument("--retrain-minutes", type=float, default=3.0, help="time budget of --retrain (3)")
    parser.set_defaults(handler=run_demo_command, progress="bar")


def resolve_model(name: str) -> Path:
    from MedSegUNetLib.model.shipped import find_model

    path = Path(name)
    return path if path.suffix == ".safetensors" and path.exists() else find_model(name)


def samples(log: Callable[[str], None] = print) -> Dict[str, WrittenSample]:
    """The sample scans, written once into the cache beside the download."""
    folder = cache_folder() / "samples"
    marker = folder / ".complete"
    if not marker.exists():
        written = write_samples(folder, [TRAINING_SAMPLE, HELDOUT_SAMPLE], log=log)
        marker.write_text(SOURCE_NOTE + "\n", encoding="utf-8")
    else:
        from .sampledata import SAMPLES

        written = [_existing(folder, s.name, s.role) for s in SAMPLES if s.name in (TRAINING_SAMPLE, HELDOUT_SAMPLE)]
    return {sample.name: sample for sample in written}


def _existing(folder: Path, name: str, role: str) -> WrittenSample:
    from .sampledata import WrittenSample

    image = folder / name / "image.nii.gz"
    if not image.exists():
        image = folder / name / "image.nrrd"
    dicom = folder / name / "dicom"
    return WrittenSample(
        name,
        role,
        image,
        folder / name / "reference.nii.gz",
        folder / name / "reference.seg.nrrd",
        folder / f"{name}.mrb",
        dicom if dicom.is_dir() else None,
    )


def segment_and_evaluate(
    model: Path, heldout: WrittenSample, output: Path, tag: str, device: str, progress: Progress
) -> dict:
    """Segment the held-out scan, evaluate by segment name, draw the overlay. Returns the metrics report."""
    from MedSegUNetLib.commands.evaluate import evaluate_paths, write_reports
    from MedSegUNetLib.commands.segment import SegmentOptions, run_segment
    from MedSegUNetLib.prediction.inference import PredictOptions

    prediction = output / f"{HELDOUT_SAMPLE}-{tag}.seg.nrrd"
    started = time.perf_counter()
    run_segment(
        [heldout.dicom or heldout.image],
        model,
        prediction,
        SegmentOptions(PredictOptions(device=device), largest_component=True),
        progress,
    )
    seconds = time.perf_counter() - started
    progress.close()
    report = evaluate_paths(prediction, heldout.segmentation)
    report["segment_seconds"] = round(seconds, 1)
    report["model"] = str(model)
    write_reports(report, json_path=output / f"metrics-{tag}.json", csv_path=output / f"metrics-{tag}.csv")
    draw(heldout, prediction, output / f"overlay-{tag}.png", f"{tag}: {model.name} on the held-out CT")
    return report


def draw(heldout: WrittenSample, prediction: Path, path: Path, title: str) -> Path:
    from MedSegUNetLib.imageio.images import read_image

    from .overlay import write_overlay_png
    from .scenes import read_segments

    image = read_image(heldout.dicom or heldout.image).image
    predicted_segments = read_segments(prediction)
    wanted = {s.name.casefold() for s in predicted_segments}
    reference_labels = [s for s in read_segments(heldout.segmentation) if s.name.casefold() in wanted]
    columns = [
        ("prediction", _labelmap(prediction, image, predicted_segments), _as_labels(predicted_segments)),
        (
            "reference (TotalSegmentator)",
            _labelmap(heldout.segmentation, image, reference_labels, like=predicted_segments),
            _as_labels(predicted_segments),
        ),
    ]
    return write_overlay_png(path, image, columns, title=title)


def _as_labels(segments: Sequence[SegmentInfo]) -> List[Label]:
    from MedSegUNetLib.core.labels import Label

    return [Label(index, s.name, s.color) for index, s in enumerate(segments, start=1)]


def _labelmap(
    path: Path, image: sitk.Image, segments: List[SegmentInfo], like: Optional[List[SegmentInfo]] = None
) -> sitk.Image:
    """A labelmap on ``image``'s grid; segments take the value of their name's position in ``like``."""
    from .scenes import segments_labelmap

    order = [s.name.casefold() for s in (like or segments)]
    return segments_labelmap(path, segments, image, [order.index(s.name.casefold()) + 1 for s in segments])


def print_table(reports: List[dict], titles: List[str]) -> None:
    """Structure, Dice and HD95 per model; for a structure absent from the held-out reference, the volume
    predicted anyway (a false positive), which no Dice shows."""
    rows = {
        title: {row["label"]: row for row in report["cases"][0]["labels"]} for title, report in zip(titles, reports)
    }
    names = list(rows[titles[0]])
    print(f"{'structure':<14}" + "".join(f"{title + ' Dice':>16}{'HD95 mm':>10}" for title in titles))
    for name in names:
        line = f"{name:<14}"
        for title in titles:
            row = rows[title][name]
            if row["note"].startswith("not in the reference"):
                volume = float(row.get("volume_prediction_ml") or 0.0)
                line += f"{f'false {volume:.1f} ml' if volume > 0 else 'absent: none':>16}{'':>10}"
                continue
            hd = "inf" if row["hd95_mm"] == float("inf") else f"{row['hd95_mm']:.1f}"
            line += f"{row['dice']:>16.3f}{hd:>10}"
        print(line)
    print("false N ml: predicted where the reference has none of that structure; absent: none predicted either")


def run_demo_command(args: argparse.Namespace, progress: Progress) -> dict:
    from MedSegUNetLib.core.progress import make_progress

    model = resolve_model(args.model)
    args.output.mkdir(parents=True, exist_ok=True)
    found = samples()
    heldout = found[HELDOUT_SAMPLE]
    reports, titles = (
        [segment_and_evaluate(model, heldout, args.output, "shipped", args.device, make_progress("bar"))],
        ["shipped"],
    )
    if args.retrain:
        tuned = retrain(model, found[TRAINING_SAMPLE], args.output / "retrained", args.retrain_minutes, args.device)
        reports.append(
            segment_and_evaluate(tuned, heldout, args.output, "retrained", args.device, make_progress("bar"))
        )
        titles.append("retrained")
    print()
    print_table(reports, titles)
    print(f"\nsegmented the held-out CT in {reports[0]['segment_seconds']} s; files in {args.output}/")
    for tag in titles:
        print(f"  {HELDOUT_SAMPLE}-{tag}.seg.nrrd  overlay-{tag}.png  metrics-{tag}.json  metrics-{tag}.csv")
    print(SOURCE_NOTE)
    return {"output": str(args.output)}


def retrain(model: Path, training_sample: WrittenSample, folder: Path, minutes: float, device: str) -> Path:
    """Fine-tune ``model`` on the training scene with a time budget (what Slicer's Retrain runs)."""
    from MedSegUNetLib.core.progress import make_progress
    from MedSegUNetLib.model.bundle import read_bundle_metadata

    from .cli import add_train_parser

    names = ",".join(label.name for label in read_bundle_metadata(model).labels)  # the model's structures only
    parser = argparse.ArgumentParser(prog="medsegunet")
    add_train_parser(parser.add_subparsers(dest="command"))
    arguments = parser.parse_args(
        [
            "train",
            str(training_sample.scene),
            "-o",
            str(folder),
            "--init",
            str(model),
            "--labels",
            names,
            "--max-minutes",
            str(minutes),
            "--device",
            device,
            "--validate-every",
            "100",
        ]
    )
    result = arguments.handler(arguments, make_progress("bar"))
    return Path(result["bundle"])
