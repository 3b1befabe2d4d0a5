"""``segment-batch``: a cohort segmented with the model loaded once, resumable, split across machines by shards.

The cases (batch_cases.py) run through ``segment``'s own steps (batch_pipeline.py), so each output is the
file a single ``segment`` run writes. A case whose output exists is skipped: outputs are renamed into
place whole (core/atomic.py), so one that exists is complete, and a killed run's temporaries are removed
at the next start. A failed case gets its row in the summary and the run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from MedSegUNetLib.commands.batch_cases import Case, in_shard, list_cases
from MedSegUNetLib.commands.batch_pipeline import BatchModel, BatchPipeline, Job, Outcome
from MedSegUNetLib.commands.batch_summary import Summary, SummaryRow, summary_name
from MedSegUNetLib.commands.segment import SegmentOptions
from MedSegUNetLib.commands.segment_set import merged_labels
from MedSegUNetLib.core.atomic import clean_stale_temporaries
from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.progress import Progress
from MedSegUNetLib.model.bundle import BundleMeta, load_bundle, read_bundle_metadata
from MedSegUNetLib.model.model_set import expand_models
from MedSegUNetLib.prediction.inference import network_precision, select_device


@dataclass
class BatchOptions:
    segment: SegmentOptions = field(default_factory=SegmentOptions)
    output_format: str = "seg.nrrd"
    devices: Tuple[str, ...] = ("auto",)  # one predictor per entry
    shard: Optional[Tuple[int, int]] = None  # (I, N): this run takes the cases of shard I of N


@dataclass
class BatchResult:
    summary: Summary
    cases: int

    def describe(self) -> str:
        counts = ", ".join(f"{self.summary.count(status)} {status}" for status in ("done", "skipped", "failed"))
        return f"{self.cases} case(s): {counts}; summary {self.summary.path}"


def run_segment_batch(
    inputs: Sequence[Path],
    list_file: Optional[Path],
    bundle_path: Path,
    output_dir: Path,
    options: BatchOptions,
    progress: Progress,
) -> BatchResult:
    """Every case of the inputs (of this shard) segmented into ``output_dir`` by the bundle or model set at
    ``bundle_path``; what cannot work at all (a bad model, device or output folder) is refused before any case."""
    paths = expand_models([Path(bundle_path)])
    metas = [read_bundle_metadata(path) for path in paths]
    channels = _channel_count(metas, Path(bundle_path))
    merged = merged_labels(metas, paths) if len(paths) > 1 else None
    devices = resolve_devices(options.devices, options.segment.predict.precision)
    output_dir = prepare_output_dir(Path(output_dir))
    cases = in_shard(list_cases(inputs, list_file, channels, skip=output_dir), options.shard)
    summary = Summary(output_dir / summary_name(options.shard))
    jobs = _jobs_to_run(cases, output_dir, f".{options.output_format}", summary)
    summary.write()
    progress.update("cases", len(summary.rows), len(cases), f"{len(cases)} case(s), {len(jobs)} to segment")
    if jobs:
        model = BatchModel([load_bundle(path) for path in paths], paths, merged)
        pipeline = BatchPipeline(jobs, model, devices, options.segment)
        for item in pipeline.outcomes():
            _report(item, summary, len(cases), progress)
    return BatchResult(summary, len(cases))


def _channel_count(metas: Sequence[BundleMeta], model: Path) -> int:
    """The images a case gives: the same for every model of a set (a case is read once for all)."""
    counts = sorted({len(meta.channels) for meta in metas})
    if len(counts) > 1:
        raise MedSegError(f"its models take different numbers of input channels ({counts}): one case feeds all", model)
    return counts[0]


def resolve_devices(devices: Sequence[str], precision: str) -> List[str]:
    """Each device as torch names it (``auto`` chosen here), refused now if this machine lacks it."""
    if not devices:
        raise MedSegError("--devices needs at least one device")
    resolved = []
    for name in devices:
        device = select_device(name.strip())
        network_precision(precision, device)
        resolved.append(str(device))
    return resolved


def prepare_output_dir(folder: Path) -> Path:
    """The output folder, made if missing, without the temporaries of killed runs."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MedSegError(f"cannot make the output folder ({error.strerror or error})", folder) from None
    if not folder.is_dir():
        raise MedSegError("output is not a folder", folder)
    clean_stale_temporaries(folder)
    return folder


def _jobs_to_run(cases: Sequence[Case], output_dir: Path, ending: str, summary: Summary) -> List[Job]:
    """The cases still to segment; the others get their rows (listing problems, complete outputs)."""
    jobs = []
    for case in cases:
        output = output_dir / f"{case.case_id}{ending}"
        if case.problem is not None:
            error = f"{case.inputs[0]}: {case.problem}"
            summary.add(SummaryRow(case.case_id, case.describe_inputs(), "", "failed", error=error), write=False)
        elif output.is_file():
            summary.add(summary.skipped(case.case_id, case.describe_inputs(), str(output)), write=False)
        else:
            jobs.append(Job(case, output))
    return jobs


def _report(item: Union[Outcome, str], summary: Summary, total: int, progress: Progress) -> None:
    """A finished case into the summary and the progress; a case's note to the progress."""
    if not isinstance(item, Outcome):
        progress.note(item)
        return
    row = _outcome_row(item)
    summary.add(row)
    message = f"{row.case}: {row.status}" + (f" ({row.error})" if row.error else "")
    extra = {"case": row.case, "status": row.status, "predictor": item.predictor}
    progress.update("cases", len(summary.rows), total, message, **extra)
    if row.error:
        progress.note(f"{row.case}: {row.error}")  # a log shows every failure, not one line in 30 s


def _outcome_row(outcome: Outcome) -> SummaryRow:
    case = outcome.job.case
    voxels = "" if outcome.voxels is None else str(outcome.voxels)
    seconds = f"{outcome.seconds:.2f}"
    if outcome.error is not None:
        return SummaryRow(case.case_id, case.describe_inputs(), "", "failed", seconds, voxels, outcome.error)
    return SummaryRow(case.case_id, case.describe_inputs(), str(outcome.job.output), "done", seconds, voxels)
