"""The cases of a batch run through ``segment``'s own steps in three overlapped stages, in threads.

The model is one bundle, or a model set's bundles: then, as ``segment -m SET`` does (segment_set.py),
each case is read once onto every model's grid and their labels are merged.

One reader reads the next case onto the network grid while the predictors (one per device, each with its
own copy of the loaded network) predict, and one writer writes the last result. What is held at most:
per predictor, two cases on the network grid, a set's on each model's grid (the one predicted and one
read ahead: two slots per predictor, taken before a case is read and given back when its prediction
ends), and two label images (one in the writer's queue, one made while that queue is full), plus the
label image being written.
Reading, inflating, resampling and compressing release Python's lock for most of their time, so the
stages really overlap.

Every stage reports a case's failure as that case's outcome and goes on with the next. A stop (a signal
to the main thread) is noticed by every stage at its next progress step; a write under way finishes
(its rename is atomic: core/atomic.py).
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

from MedSegUNetLib.commands.batch_cases import Case
from MedSegUNetLib.commands.segment import SegmentOptions, labels_on_input_grid, read_network_input
from MedSegUNetLib.commands.segment_set import MergedLabels, merged_labels_on_input_grid, network_inputs
from MedSegUNetLib.core.errors import OUT_OF_MEMORY, Cancelled, MedSegError, describe_os_error
from MedSegUNetLib.core.labels import Label
from MedSegUNetLib.core.progress import Progress
from MedSegUNetLib.imageio.images import write_segmentation
from MedSegUNetLib.model.bundle import Bundle

POLL_SECONDS = 0.2  # how often a waiting stage looks whether the run was stopped
_END = object()  # no more cases for a predictor / the writer


@dataclass
class BatchModel:
    """What a batch runs: one bundle (``merged`` None: its own labels), or a set's bundles in order."""

    bundles: List[Bundle]
    paths: List[Path]
    merged: Optional[MergedLabels] = None

    @property
    def labels(self) -> List[Label]:
        return self.bundles[0].meta.labels if self.merged is None else self.merged.labels

    def copy(self) -> "BatchModel":
        """Another predictor's own copy of the networks."""
        bundles = [replace(bundle, network=copy.deepcopy(bundle.network)) for bundle in self.bundles]
        return replace(self, bundles=bundles)


@dataclass(frozen=True)
class Job:
    case: Case
    output: Path


@dataclass(frozen=True)
class Outcome:
    """A finished case: written when ``error`` is None."""

    job: Job
    seconds: float
    voxels: Optional[int]
    error: Optional[str] = None
    predictor: str = ""  # which predictor made its labels: its device and number (cpu#1)


@dataclass(frozen=True)
class _Crash:
    error: BaseException


@dataclass
class _InFlight:
    job: Job
    started: float  # when its current stage began
    busy: float = 0.0  # seconds of its finished stages: its own work, not its time waiting in a queue
    voxels: Optional[int] = None
    predictor: str = ""
    payload: Any = None  # each model's (network input, input grid) after reading, the label image after predicting

    def stage_starts(self) -> None:
        self.started = time.monotonic()

    def stage_ended(self) -> float:
        """The case's busy seconds so far, this stage included."""
        self.busy += time.monotonic() - self.started
        return self.busy


class _CaseProgress(Progress):
    """The steps of one case: silent, but a stop asked for ends the case's work at its next step; notes
    (a warning about the input) go to the main thread, named by the case."""

    def __init__(self, stop: threading.Event, notes: "queue.Queue[Any]", case_id: str):
        self.stop, self.notes, self.case_id = stop, notes, case_id

    def update(self, stage: str, done: int, total: int, message: str = "", **extra: Any) -> None:
        if self.stop.is_set():
            raise Cancelled("stopped")

    def note(self, message: str) -> None:
        self.notes.put(f"{self.case_id}: {message}")


def describe_error(error: Exception) -> str:
    """One line, as the command line reports the same failure of a single ``segment``."""
    if isinstance(error, MedSegError):
        return str(error)
    if isinstance(error, MemoryError):
        return OUT_OF_MEMORY
    if isinstance(error, OSError):
        return describe_os_error(error)
    return " ".join(f"{type(error).__name__}: {error}".split())  # not expected: named, on one line


class BatchPipeline:
    """Run ``jobs`` with ``model`` on ``devices`` (one predictor each); iterate :meth:`outcomes`."""

    def __init__(self, jobs: Sequence[Job], model: BatchModel, devices: Sequence[str], options: SegmentOptions):
        self.jobs, self.devices, self.options = list(jobs), list(devices), options
        self.models = [model] + [model.copy() for _ in devices[1:]]
        self.stop = threading.Event()
        self.results: "queue.Queue[Union[Outcome, str, _Crash]]" = queue.Queue()
        self.slots = threading.Semaphore(2 * len(devices))
        self.ready: "queue.Queue[Any]" = queue.Queue()  # bounded by the slots
        self.to_write: "queue.Queue[Any]" = queue.Queue(maxsize=len(devices))
        self.threads: List[threading.Thread] = []

    def outcomes(self) -> Iterator[Union[Outcome, str]]:
        """Each case's outcome as it finishes, and the cases' notes (strings); stops every stage and waits
        for them when the caller stops (a signal raised in the main thread)."""
        self._start()
        finished = 0
        try:
            while finished < len(self.jobs):
                try:
                    item = self.results.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                if isinstance(item, _Crash):
                    raise item.error
                finished += isinstance(item, Outcome)
                yield item
        finally:
            self.stop.set()
            for thread in self.threads:
                thread.join()

    def _start(self) -> None:
        threads = _threads_per_predictor(self.devices)
        targets: List[Tuple[Callable[..., None], Tuple[Any, ...]]] = [(self._read, ())]
        targets += [
            (self._predict, (model, f"{device}#{index}", threads))
            for index, (model, device) in enumerate(zip(self.models, self.devices))
        ]
        targets += [(self._write, ())]
        for index, (target, arguments) in enumerate(targets):
            thread = threading.Thread(
                target=self._guarded, args=(target, *arguments), name=f"medsegunet-batch-{index}", daemon=True
            )
            self.threads.append(thread)
            thread.start()

    def _guarded(self, stage: Callable[..., None], *arguments: Any) -> None:
        """A stage's own failure (not a case's) stops the run and reaches the main thread."""
        try:
            stage(*arguments)
        except Cancelled:
            pass  # the main thread asked for the stop and reports it
        except BaseException as error:
            self.stop.set()
            self.results.put(_Crash(error))

    def _progress(self, job: Job) -> _CaseProgress:
        return _CaseProgress(self.stop, self.results, job.case.case_id)

    def _fail(self, flight: _InFlight, error: Exception) -> None:
        seconds = flight.stage_ended()
        self.results.put(Outcome(flight.job, seconds, flight.voxels, describe_error(error), flight.predictor))

    def _read(self) -> None:
        """Read each case onto the network grid, at most two per predictor held at once."""
        try:
            for job in self.jobs:
                while not self.slots.acquire(timeout=POLL_SECONDS):
                    if self.stop.is_set():
                        return
                flight = _InFlight(job, time.monotonic())
                try:
                    read = self._read_case(job)
                except Exception as error:  # this case failed; the next may be fine
                    self.slots.release()
                    self._fail(flight, error)
                    continue
                flight.voxels, flight.payload = _voxels(read[0][1].size), read
                flight.stage_ended()
                self.ready.put(flight)
        finally:
            for _ in self.devices:
                self.ready.put(_END)

    def _read_case(self, job: Job) -> List[Tuple[Any, Any]]:
        """Each model's (network input, input grid) of the case, its files read once."""
        options, progress = replace(self.options, series=job.case.series), self._progress(job)
        metas = [bundle.meta for bundle in self.models[0].bundles]
        if len(metas) == 1:
            return [read_network_input(job.case.inputs, metas[0], options, progress)]
        return list(network_inputs(job.case.inputs, metas, options, progress))

    def _predict(self, model: BatchModel, name: str, torch_threads: Optional[int]) -> None:
        """Predict the cases read, in this thread (its OpenMP team and arena stay warm from case to case)."""
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)  # this thread's own setting
        device = name.split("#")[0]
        options = replace(self.options, predict=replace(self.options.predict, device=device))
        try:
            while True:
                flight = self.ready.get()
                if flight is _END or self.stop.is_set():
                    break
                flight.predictor = name
                flight.payload = self._labels(flight, model, options)
                if flight.payload is not None:
                    flight.stage_ended()
                    self._put(self.to_write, flight)
        finally:
            self._put(self.to_write, _END)

    def _labels(self, flight: _InFlight, model: BatchModel, options: SegmentOptions) -> Any:
        """The case's label image, or None when it failed (reported); its network inputs let go either way."""
        inputs: List[Tuple[Any, Any]] = flight.payload
        flight.payload = None
        flight.stage_starts()
        progress = self._progress(flight.job)
        try:
            if model.merged is None:
                network_input, input_grid = inputs.pop()
                return labels_on_input_grid(network_input, input_grid, model.bundles[0], options, progress)
            runs = ((*inputs.pop(0), bundle) for bundle in model.bundles)  # each input let go once predicted
            return merged_labels_on_input_grid(runs, model.paths, model.merged, options, progress)
        except Exception as error:
            self._fail(flight, error)
            return None
        finally:
            self.slots.release()

    def _write(self) -> None:
        ended = 0
        while ended < len(self.devices):
            flight = self.to_write.get()
            if flight is _END:
                ended += 1
                continue
            if self.stop.is_set():
                continue
            flight.stage_starts()
            try:
                write_segmentation(flight.job.output, flight.payload, self.models[0].labels)
            except Exception as error:
                self._fail(flight, error)
                continue
            finally:
                flight.payload = None
            self.results.put(Outcome(flight.job, flight.stage_ended(), flight.voxels, None, flight.predictor))

    def _put(self, target: "queue.Queue[Any]", item: Any) -> None:
        """Wait for room, unless the run was stopped (the end marker always gets through)."""
        while True:
            try:
                target.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                if self.stop.is_set() and item is not _END:
                    return


def _threads_per_predictor(devices: Sequence[str]) -> Optional[int]:
    """The CPU's cores shared among the CPU predictors; None (torch's default) with a single predictor."""
    on_cpu = sum(device == "cpu" for device in devices)
    if len(devices) == 1 or not on_cpu:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // on_cpu)


def _voxels(size: Sequence[int]) -> int:
    count = 1
    for extent in size:
        count *= int(extent)
    return count
