"""The engine started before the click: ``medsegunet standby -m MODEL`` imports torch and MONAI, loads
the bundle, runs one window through the network, then waits for one ``segment`` job on stdin.

Why: every Segment starts a fresh engine process (a crash, a leak or a cancel never touches Slicer or
the next run), and a fresh process spends seconds starting Python and importing torch, SimpleITK and
MONAI before the first voxel, and more on the network's first window (oneDNN makes its kernels, the
thread's first activations are fresh memory; on a GPU the CUDA context and cuDNN's choices). The
panel starts the next engine ahead of time, so a click waits only for the work itself. Still one job per
process: memory is returned and a cancel is a SIGTERM, as for a plain ``segment``.

The job is one line of JSON, ``{"segment": [ARG, ...]}``: the arguments of ``medsegunet segment``, parsed
by the same parser. The loaded bundle serves the job when the job names the same file, unchanged since it
was loaded; any other model is loaded as ``segment`` would. End of input (the panel went away) or
``--idle-minutes`` without a job ends the process with exit 0, having written nothing.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.progress import Progress
from MedSegUNetLib.model.bundle import Bundle, load_bundle

if TYPE_CHECKING:
    from MedSegUNetLib.prediction.inference import PredictOptions

JOB_LINE_LIMIT = 1 << 20  # a job is a few hundred bytes; a megabyte of input without a newline is not a job


@dataclass
class LoadedModel:
    """A bundle loaded by the standby engine, and the file as it was when loaded."""

    path: Path
    identity: Optional[Tuple[int, int, int, int]]  # None: the file could not be examined when loaded
    bundle: Bundle

    def serves(self, path: Path) -> bool:
        """The job's model is this very file, not replaced or rewritten since it was loaded."""
        return self.identity is not None and file_identity(path) == self.identity


def file_identity(path: Path) -> Optional[Tuple[int, int, int, int]]:
    """(device, inode, size, modification time): a retrained bundle written over the old path differs."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def load_and_warm(
    model: Path, device: str, precision: str, batch_size: Optional[int], progress: Progress
) -> LoadedModel:
    """The bundle loaded and one batch of windows run through it in this (the job's) thread."""
    from MedSegUNetLib.prediction.inference import PredictOptions, network_precision, select_device

    network_precision(precision, select_device(device))  # a device or precision this machine lacks: now
    progress.update("standby", 0, 2, f"loading {Path(model).name}")
    identity = file_identity(model)
    bundle = load_bundle(model)
    progress.update("standby", 1, 2, f"warming up {bundle.meta.network.cls} on {select_device(device).type}")
    warm_up(bundle, PredictOptions(device=device, precision=precision, sw_batch_size=batch_size))
    progress.update("standby", 2, 2, "ready: waiting for a job")
    return LoadedModel(Path(model), identity, bundle)


def warm_up(bundle: Bundle, options: PredictOptions) -> None:
    """A batch of zero windows through the prediction loop a job runs, in the calling thread.

    In the calling thread because most of the first window's cost is that thread's: its OpenMP team and
    its malloc arena (a warm-up in another thread left the main thread's first window as slow:
    benchmarks/README.md). oneDNN's kernels are kept per shape, so the window is the bundle's patch."""
    import numpy as np

    from MedSegUNetLib.commands.segment import prepare_bundle
    from MedSegUNetLib.core.geometry import xyz_to_zyx
    from MedSegUNetLib.prediction.inference import predict_labels, select_device, windows_per_batch

    window = list(xyz_to_zyx(bundle.meta.preprocessing.patch_size))
    batch = options.sw_batch_size or windows_per_batch(select_device(options.device))
    shape = [*window[:2], window[2] + (batch - 1) * max(window[2] // 2, 1)]  # `batch` windows along x at overlap 0.5
    zeros = np.zeros((len(bundle.meta.channels), *shape), dtype=np.float32)
    prepare_bundle(bundle, options)  # the job's run finds it prepared: no copy then
    predict_labels(bundle.network, zeros, window, options, Progress())


def wait_for_job(descriptor: int, idle_seconds: float) -> Optional[List[str]]:
    """The job's ``segment`` arguments; None at end of input or after ``idle_seconds`` without a line.

    The line is read in a daemon thread so that the wait stays interruptible: SIGTERM (the panel's
    Cancel, or its stopping the standby) ends it as it ends a run. From the file descriptor, not
    ``sys.stdin``: a thread still blocked in a buffered reader at exit holds its lock, and the
    interpreter aborts when it finalizes that reader."""
    lines: "queue.Queue[bytes]" = queue.Queue()
    threading.Thread(target=lambda: lines.put(read_line(descriptor)), name="standby-job", daemon=True).start()
    try:
        line = lines.get(timeout=idle_seconds)
    except queue.Empty:
        return None
    if not line.strip():
        return None
    return parse_job(line)


def read_line(descriptor: int) -> bytes:
    """Up to the first newline or the end of input, at most JOB_LINE_LIMIT + 1 bytes."""
    line = b""
    while b"\n" not in line and len(line) <= JOB_LINE_LIMIT:
        chunk = os.read(descriptor, 65536)
        if not chunk:
            break
        line += chunk
    return line.split(b"\n", 1)[0] + b"\n" if b"\n" in line else line


def parse_job(line: bytes) -> List[str]:
    if len(line) > JOB_LINE_LIMIT:
        raise MedSegError(f"standby job: longer than {JOB_LINE_LIMIT} bytes")
    try:
        job = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MedSegError(f"standby job: not JSON ({error})") from None
    arguments = job.get("segment") if isinstance(job, dict) else None
    if not isinstance(arguments, list) or not all(isinstance(argument, str) for argument in arguments):
        raise MedSegError('standby job: expected {"segment": ["INPUT", "-m", "MODEL", "-o", "OUTPUT", ...]}')
    return arguments
