"""The engine as a child process: the command lines the Slicer panel runs, and a non-blocking runner.

Plain Python (no Slicer, no Qt, no torch) so that it is tested here with real processes. The panel
starts a :class:`ChildProcess`, polls :meth:`ChildProcess.poll` from a QTimer (never blocking the UI
thread) and calls :meth:`ChildProcess.cancel`, which returns at once and ends the whole process tree:
SIGTERM to the child's process group (the engine removes its temporaries and exits 130), SIGKILL to the
group after a grace period. On Windows the tree is ended with ``taskkill /T /F``.

The progress protocol is MedSegUNetLib.core.progress's: one JSON object per stdout line,
``{"stage", "done", "total", "message", ...}``; the last line of a successful run has stage ``done``, a
failed run prints stage ``error`` with the engine's one-line message (also on stderr as
``medsegunet: error: ...``). Exit codes are MedSegUNetLib.core.errors's: 0, 1 (error), 2 (usage), 130 (cancelled).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Deque, Dict, Iterable, List, Optional, Sequence, Tuple

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
EXIT_CANCELLED = 130
ERROR_PREFIX = "medsegunet: error: "
LOG_LINES_KEPT = 20000  # a long training run prints a line per step: keep the most recent ones
READER_GRACE_SECONDS = 3.0  # after the engine has exited, how long a leftover grandchild may hold its pipes


# --- where the engine runs -------------------------------------------------------------------------


def engine_python() -> str:
    """Slicer's ``PythonSlicer`` (Slicer's Python with its environment), else this interpreter.

    In Slicer, PythonSlicer is on PATH and beside ``sys.executable``; outside Slicer (tests, scripts)
    the current interpreter runs the engine."""
    beside = str(Path(sys.executable).parent)
    found = shutil.which("PythonSlicer") or shutil.which("PythonSlicer", path=beside)
    return found or sys.executable


def split_device(device: Optional[str]) -> Tuple[str, Optional[str]]:
    """The panel's device choice -> (the engine's ``--device``, the CUDA_VISIBLE_DEVICES it needs).

    The engine takes auto/cpu/cuda/mps; a particular GPU ("cuda:1") is chosen by making it the only one
    the child sees."""
    device = (device or "auto").strip().lower()
    if device.startswith("cuda:"):
        index = device.split(":", 1)[1]
        if not index.isdigit():
            raise ValueError(f"not a CUDA device: {device!r}")
        return "cuda", index
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N or mps)")
    return device, None


def engine_environment(
    module_dir: Path, base: Optional[Dict[str, str]] = None, device: Optional[str] = None
) -> Dict[str, str]:
    """The environment that makes ``MedSegUNetLib`` and ``training`` importable in the child.

    Installed extension: both packages sit in the module folder. Source checkout: ``training`` sits one
    level above ``MedSegUNet/``. ``device`` "cuda:N" restricts the child to that GPU."""
    environment = dict(os.environ if base is None else base)
    module_dir = Path(module_dir).resolve()
    paths = [str(module_dir)]
    if (module_dir.parent / "training").is_dir():
        paths.append(str(module_dir.parent))
    if environment.get("PYTHONPATH"):
        paths.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they are printed
    environment["PYTHONIOENCODING"] = "utf-8"  # segment names are not ASCII everywhere
    _, visible = split_device(device)
    if visible is not None:
        environment["CUDA_VISIBLE_DEVICES"] = visible
    if sys.platform.startswith("linux"):
        environment["GLIBC_TUNABLES"] = with_malloc_tunables(environment.get("GLIBC_TUNABLES", ""))
    return environment


# How glibc's malloc serves the engine on Linux (benchmarks/README.md has the measurements). Older glibc
# versions ignore tunables they do not know.
MALLOC_TUNABLES = (
    # Transparent huge pages for malloc's memory (most systems hand them out only on request): every large
    # buffer faults in 2 MB at a time instead of 4 kB, and the convolutions miss the TLB less.
    "glibc.malloc.hugetlb=1",
    # Blocks up to 32 MB (a window's activations are up to 14 MB) from the heap from the first window on:
    # by default malloc maps such blocks afresh, raises its threshold after the first window and grows
    # the heap over the next ones, which then run slower.
    "glibc.malloc.mmap_threshold=33554432",
    # Up to 256 MB of freed heap kept, so one window's activations find the last window's pages still
    # mapped. With less kept, each window handed its activations back and faulted them in again, and the
    # first windows after the read stalled while the kernel assembled huge pages (compaction).
    "glibc.malloc.trim_threshold=268435456",
)


def with_malloc_tunables(tunables: str) -> str:
    """``GLIBC_TUNABLES`` with :data:`MALLOC_TUNABLES` added; a value the user set for one of them stands."""
    items = [item for item in tunables.split(":") if item]
    names = {item.split("=")[0] for item in items}
    return ":".join(items + [tunable for tunable in MALLOC_TUNABLES if tunable.split("=")[0] not in names])


# --- the command lines -----------------------------------------------------------------------------


@dataclass
class SegmentRequest:
    inputs: Sequence[Path]  # one image per model input channel
    model: Path
    output: Path  # a .seg.nrrd
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    overlap: Optional[float] = None  # None: each model's own overlap (segment's default)
    tta: bool = False
    largest_component: bool = True


def segment_command(request: SegmentRequest, python: Optional[str] = None) -> List[str]:
    """``PythonSlicer -m MedSegUNetLib segment ... --progress json``, exactly as the panel runs it."""
    return [
        python or engine_python(),
        "-m",
        "MedSegUNetLib",
        "segment",
        *segment_arguments(request),
        "--progress",
        "json",
    ]


def segment_arguments(request: SegmentRequest) -> List[str]:
    """The ``segment`` arguments of a request (a fresh engine's command line, or a standby engine's job)."""
    device, _ = split_device(request.device)
    arguments = [*map(str, request.inputs), "-m", str(request.model), "-o", str(request.output), "--device", device]
    if request.overlap is not None:
        arguments += ["--overlap", f"{request.overlap:g}"]
    arguments.append("--tta" if request.tta else "--no-tta")
    return arguments + ["--largest-component" if request.largest_component else "--no-largest-component"]


def standby_command(model: Path, device: str, python: Optional[str] = None) -> List[str]:
    """``PythonSlicer -m MedSegUNetLib standby -m MODEL ...``: an engine that waits for one job (standby.py)."""
    engine_device, _ = split_device(device)
    return [
        python or engine_python(),
        "-m",
        "MedSegUNetLib",
        "standby",
        "-m",
        str(model),
        "--device",
        engine_device,
        "--progress",
        "json",
    ]


@dataclass
class TrainRequest:
    data: Sequence[Path]  # scenes (.mrb/.mrml), folders of .mrb files, MSD / nnU-Net folders
    output: Path  # a folder; the bundle is OUTPUT/model.safetensors
    init: Optional[Path] = None  # fine-tune this bundle; None trains from scratch
    max_minutes: Optional[float] = None
    max_steps: Optional[int] = None
    device: str = "auto"
    extra: List[str] = field(default_factory=list)  # more `train` options (tests: a tiny network)


def train_command(request: TrainRequest, python: Optional[str] = None) -> List[str]:
    """``PythonSlicer -m training train DATA... -o OUT --progress json``, exactly as Retrain runs it."""
    device, _ = split_device(request.device)
    command = [python or engine_python(), "-m", "training", "train", *map(str, request.data), "-o", str(request.output)]
    if request.init:
        command += ["--init", str(request.init)]
    if request.max_minutes:
        command += ["--max-minutes", f"{request.max_minutes:g}"]
    if request.max_steps:
        command += ["--max-steps", str(int(request.max_steps))]
    return command + ["--device", device, *request.extra, "--progress", "json"]


def import_command(source: Path, output: Path, python: Optional[str] = None) -> List[str]:
    """``PythonSlicer -m MedSegUNetLib import-model SOURCE -o OUTPUT --progress json``: another tool's model
    (an nnU-Net trained-model folder or .zip, a MONAI bundle) written as a bundle, as Add model runs it."""
    return [python or engine_python(), "-m", "MedSegUNetLib", "import-model", str(source), "-o", str(output)] + [
        "--progress",
        "json",
    ]


def devices_command(python: Optional[str] = None) -> List[str]:
    """``PythonSlicer -m MedSegUNetLib devices``: one JSON line naming the GPUs torch sees."""
    return [python or engine_python(), "-m", "MedSegUNetLib", "devices"]


def parse_devices(lines: Iterable[str]) -> List[Tuple[str, str]]:
    """(label, device) pairs for the panel's device list from the ``devices`` output (GPUs only)."""
    for line in lines:
        try:
            found = json.loads(line)
        except (json.JSONDecodeError, TypeError):
            continue
        if isinstance(found, dict) and "cuda" in found:
            return devices_from_names(found.get("cuda") or [], bool(found.get("mps")))
    return []


def devices_from_names(cuda_names: Sequence[str], mps: bool) -> List[Tuple[str, str]]:
    devices = [(f"GPU {index}: {name}", f"cuda:{index}") for index, name in enumerate(cuda_names)]
    if mps:
        devices.append(("Apple GPU (MPS)", "mps"))
    return devices


# --- one run -----------------------------------------------------------------------------------------


class ChildProcess:
    """One engine run: its progress records, its log, and how it ended.

    Background threads read stdout and stderr; they only parse, queue and log. Everything public is
    meant for the UI thread and returns at once, except :meth:`wait` (tests and scripts)."""

    def __init__(
        self,
        command: Sequence[str],
        environment: Optional[Dict[str, str]] = None,
        cwd: Optional[Path] = None,
        stdin: bool = False,
    ):
        self.command = [str(part) for part in command]
        self.records: "queue.Queue[dict]" = queue.Queue()
        self.log_lines: Deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.lines_dropped = 0
        self.last_error: Optional[str] = None
        self.last_stderr: Optional[str] = None  # a crash's last word (a traceback ends there)
        self.result: Optional[dict] = None  # the final "done" record
        self._cancelled = False
        self._exited_at: Optional[float] = None
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            env=environment,
            cwd=str(cwd) if cwd else None,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **_new_group_options(),
        )
        self._readers = [
            threading.Thread(target=self._read_stdout, name="engine-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="engine-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    # --- background threads ---

    def _log(self, line: str) -> None:
        with self._lock:
            if len(self.log_lines) == self.log_lines.maxlen:
                self.lines_dropped += 1
            self.log_lines.append(line)

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None  # opened with stdout=PIPE
        for line in self.process.stdout:
            line = line.rstrip("\r\n")
            self._log(line)
            record = parse_record(line)
            if record is None:
                continue  # a plain line (a library's print): kept in the log only
            if record["stage"] == "error":
                self.last_error = str(record.get("message", "")).strip() or self.last_error
            elif record["stage"] == "done":
                self.result = record
            self.records.put(record)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None  # opened with stderr=PIPE
        for line in self.process.stderr:
            line = line.rstrip("\r\n")
            self._log(line)
            if line.strip():
                self.last_stderr = line.strip()
            if line.startswith(ERROR_PREFIX) and self.last_error is None:
                self.last_error = line[len(ERROR_PREFIX) :].strip()

    # --- for the UI thread: none of these block ---

    def poll(self) -> List[dict]:
        """Progress records that arrived since the last call."""
        records = []
        while True:
            try:
                records.append(self.records.get_nowait())
            except queue.Empty:
                return records

    @property
    def state(self) -> str:
        code = self.process.poll()
        if code is None or not self._readers_done():
            return RUNNING
        if code == 0:
            return SUCCEEDED  # it finished before a late Cancel reached it: the result is there
        if code == EXIT_CANCELLED or self._cancelled:
            return CANCELLED
        return FAILED

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def error_message(self) -> str:
        """The engine's one-line message, or what is known when it died another way."""
        if self.last_error:
            return self.last_error
        code = self.process.returncode
        if code is not None and code < 0:
            name = _signal_name(-code)
            return f"the engine was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        if self.last_stderr:
            return self.last_stderr
        with self._lock:
            lines = [line for line in self.log_lines if line.strip()]
        return lines[-1].strip() if lines else f"the engine exited with code {code}"

    def log_text(self) -> str:
        """The command line, then everything the engine wrote (stdout and stderr as they came)."""
        with self._lock:
            head = [subprocess.list2cmdline(self.command) if os.name == "nt" else " ".join(self.command)]
            if self.lines_dropped:
                head.append(f"[{self.lines_dropped} earlier lines not kept]")
            return "\n".join(head + list(self.log_lines))

    def send_last_line(self, line: str) -> None:
        """Write one line to the child's stdin (started with ``stdin=True``) and close it: the child reads
        to the end of input. OSError (BrokenPipeError) when the child has gone."""
        if self.process.stdin is None or self.process.stdin.closed:
            raise OSError("the engine's input is closed")
        _ignore_sigpipe()
        try:
            self.process.stdin.write(line.rstrip("\n") + "\n")
            self.process.stdin.flush()
        finally:
            self.close_input()

    def close_input(self) -> None:
        """End of input for the child; a child already gone is no error."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    def cancel(self, grace_seconds: float = 5.0) -> None:
        """End the whole process tree; returns at once (a thread escalates to SIGKILL after the grace)."""
        with self._lock:
            if self._cancelled or self.process.poll() is not None:
                return
            self._cancelled = True
        if os.name == "nt":
            self._end_tree()  # a console-less child cannot get CTRL_BREAK: end it now
            return
        self._signal_group(signal.SIGTERM)
        threading.Thread(target=self._escalate, args=(grace_seconds,), name="engine-cancel", daemon=True).start()

    def wait(self, timeout: Optional[float] = None) -> str:
        """Block until the end (tests and scripts; the panel polls :attr:`state` instead)."""
        self.process.wait(timeout=timeout)
        deadline = time.monotonic() + READER_GRACE_SECONDS + 5
        while self.state == RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.state

    # --- internals ---

    def _readers_done(self) -> bool:
        """True once both pipes are drained; a grandchild left holding them is ended after a grace."""
        if not any(reader.is_alive() for reader in self._readers):
            return True
        if self._exited_at is None:
            self._exited_at = time.monotonic()
        if time.monotonic() - self._exited_at < READER_GRACE_SECONDS:
            return False
        self._end_tree()  # the engine is gone; whatever it left behind in its group is ours to end
        for reader in self._readers:
            reader.join(timeout=0.5)
        return True

    def _escalate(self, grace_seconds: float) -> None:
        try:
            self.process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            pass
        self._end_tree()  # the engine if it ignored SIGTERM, and any grandchild that outlived it

    def _end_tree(self) -> None:
        if os.name == "nt":
            subprocess.run(
                ["taskkill", "/T", "/F", "/PID", str(self.process.pid)], capture_output=True, **_new_group_options()
            )
        else:
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, which: int) -> None:
        try:
            os.killpg(self.process.pid, which)  # the child leads its own session and process group
        except (ProcessLookupError, PermissionError):
            pass  # already gone


class StandbyEngine:
    """An engine started before the click (``medsegunet standby``): Python started, torch and MONAI
    imported, the model loaded and its first window run, waiting for one segment job.

    The panel keeps one for the selected model and device; Segment hands it the job when it fits
    (:meth:`take`), and starts the next one once the run has ended. It costs the engine's memory while
    it waits (the engine's resident memory; on a GPU its context); the engine ends itself after 10 idle
    minutes."""

    def __init__(
        self, model: Path, device: str, environment: Optional[Dict[str, str]] = None, python: Optional[str] = None
    ):
        self.model, self.device = Path(model), device or "auto"
        self.process = ChildProcess(standby_command(self.model, self.device, python), environment, stdin=True)
        self.taken = False  # it has its job: it is a run now, and takes no other

    def fits(self, model: Path, device: str) -> bool:
        """Still waiting (or still starting) for a job, for this model file and this device."""
        return (
            not self.taken
            and self.process.state == RUNNING
            and self.device == (device or "auto")
            and _same_file(self.model, model)
        )

    def take(self, request: SegmentRequest) -> Optional[ChildProcess]:
        """The engine, given ``request`` as its job, as the run to follow; None if it cannot take it
        (ended meanwhile: the caller starts a fresh engine). Its records so far are not the job's."""
        if not self.fits(request.model, request.device):
            return None
        self.process.poll()  # "loading", "ready": stay in the log only
        self.taken = True
        job = json.dumps({"segment": segment_arguments(request)})
        try:
            self.process.send_last_line(job)
        except OSError:
            self.process.cancel()
            return None
        self.process._log(f"job: {job}")  # Show log: what this engine was asked to do
        return self.process

    def stop(self) -> None:
        """End of input: the engine exits by itself; a SIGTERM too, for one still importing. Not for
        one that was taken: that is a run, cancelled as runs are."""
        if self.taken:
            return
        self.taken = True
        self.process.close_input()
        self.process.cancel()


def _ignore_sigpipe() -> None:
    """A write to a child that died a moment ago must raise BrokenPipeError, not end this process.

    Python ignores SIGPIPE from its start, but an application embedding it (Slicer) may have left the
    default, which kills the writer. Set only from the main thread (Python's rule), only over the default
    (a handler someone installed stays)."""
    if hasattr(signal, "SIGPIPE") and threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL:
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def _same_file(first: Path, second: Path) -> bool:
    try:
        return Path(first).samefile(second)
    except OSError:
        return False


def parse_record(line: str) -> Optional[dict]:
    """A progress record, or None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("stage"), str) else None


def _new_group_options() -> dict:
    """The child in a process group of its own (so Cancel reaches its children), without a console window."""
    if sys.platform == "win32":  # os.name == "nt"; spelled so that type checkers know the flags exist there
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {"start_new_session": True}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
