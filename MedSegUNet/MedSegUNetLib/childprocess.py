"""The engine as a child process: the command lines the Slicer panel runs, and a non-blocking runner.

Plain Python (no Slicer, no Qt, no torch) so that it is tested here with real processes. The panel
starts a :class:`ChildProcess`, polls :meth:`ChildProcess.poll` from a QTimer (never blocking the UI
thread) and calls :meth:`ChildProcess.cancel`, which ends the whole process tree.
"""

from __future__ import annotations

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
from typing import Dict, List, Optional, Sequence

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
EXIT_CANCELLED = 130


def engine_python() -> str:
    """Slicer's ``PythonSlicer`` (Slicer's Python with its environment), else this interpreter."""
    found = shutil.which("PythonSlicer") or shutil.which("PythonSlicer", path=str(Path(sys.executable).parent))
    return found or sys.executable


def engine_environment(module_dir: Path, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment that makes ``MedSegUNetLib`` and ``training`` importable in the child.

    Installed extension: both packages sit in the module folder. Source checkout: ``training`` sits one
    level above ``MedSegUNet/``."""
    environment = dict(os.environ if base is None else base)
    module_dir = Path(module_dir).resolve()
    paths = [str(module_dir)]
    if (module_dir.parent / "training").is_dir():
        paths.append(str(module_dir.parent))
    if environment.get("PYTHONPATH"):
        paths.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they are printed
    return environment


@dataclass
class SegmentRequest:
    inputs: Sequence[Path]
    model: Path
    output: Path
    device: str = "auto"
    overlap: float = 0.5
    tta: bool = False
    largest_component: bool = True


def segment_command(request: SegmentRequest, python: Optional[str] = None) -> List[str]:
    """``PythonSlicer -m MedSegUNetLib segment ... --progress json``, exactly as the panel runs it."""
    command = [python or engine_python(), "-m", "MedSegUNetLib", "segment", *map(str, request.inputs)]
    command += ["-m", str(request.model), "-o", str(request.output), "--device", request.device]
    command += ["--overlap", f"{request.overlap:g}", "--tta" if request.tta else "--no-tta"]
    command += ["--largest-component" if request.largest_component else "--no-largest-component", "--progress", "json"]
    return command


@dataclass
class TrainRequest:
    data: Sequence[Path]  # scenes (.mrb/.mrml) or folders
    output: Path
    init: Optional[Path] = None
    max_minutes: Optional[float] = None
    max_steps: Optional[int] = None
    device: str = "auto"
    extra: List[str] = field(default_factory=list)


def train_command(request: TrainRequest, python: Optional[str] = None) -> List[str]:
    command = [python or engine_python(), "-m", "MedSegUNetLib", "train", *map(str, request.data), "-o", str(request.output)]
    if request.init:
        command += ["--init", str(request.init)]
    if request.max_minutes:
        command += ["--max-minutes", f"{request.max_minutes:g}"]
    if request.max_steps:
        command += ["--max-steps", str(request.max_steps)]
    return command + ["--device", request.device, *request.extra, "--progress", "json"]


class ChildProcess:
    """One engine run: its progress records, its log, and how it ended."""

    def __init__(self, command: Sequence[str], environment: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None):
        self.command = list(command)
        self.records: "queue.Queue[dict]" = queue.Queue()
        self.log_lines: List[str] = []
        self.last_error: Optional[str] = None
        self.result: Optional[dict] = None
        self._cancelled = False
        self._lock = threading.Lock()
        options = {"start_new_session": True} if os.name != "nt" else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=environment,
            cwd=str(cwd) if cwd else None, text=True, encoding="utf-8", errors="replace", bufsize=1, **options,
        )
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    # --- background threads: they only parse and queue, the UI thread reads the queue ---

    def _log(self, line: str) -> None:
        with self._lock:
            self.log_lines.append(line)

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self._log(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a plain line (a library's print): kept in the log only
            if not isinstance(record, dict) or "stage" not in record:
                continue
            if record["stage"] == "error":
                self.last_error = str(record.get("message", ""))
            elif record["stage"] == "done":
                self.result = record
            self.records.put(record)

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            line = line.rstrip("\n")
            self._log(line)
            if line.startswith("medsegunet: error: ") and self.last_error is None:
                self.last_error = line[len("medsegunet: error: ") :]

    # --- called from the UI thread ---

    def poll(self) -> List[dict]:
        """Progress records that arrived since the last call (never blocks)."""
        records = []
        while True:
            try:
                records.append(self.records.get_nowait())
            except queue.Empty:
                return records

    @property
    def state(self) -> str:
        code = self.process.poll()
        if code is None or any(reader.is_alive() for reader in self._readers):
            return RUNNING
        if self._cancelled or code in (EXIT_CANCELLED, -signal.SIGTERM, -signal.SIGINT, -getattr(signal, "SIGKILL", 9)):
            return CANCELLED
        return SUCCEEDED if code == 0 else FAILED

    @property
    def error_message(self) -> str:
        """The engine's one-line message, or the last line it wrote when it died another way."""
        if self.last_error:
            return self.last_error
        lines = [line for line in self.log_text().splitlines() if line.strip()]
        return lines[-1] if lines else f"exited with code {self.process.returncode}"

    def log_text(self) -> str:
        with self._lock:
            return "\n".join([" ".join(self.command), *self.log_lines])

    def cancel(self, grace_seconds: float = 5.0) -> None:
        """SIGTERM to the whole process group (the engine cleans up and exits 130), SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        self._cancelled = True
        self._signal_group(signal.SIGTERM if os.name != "nt" else signal.CTRL_BREAK_EVENT)
        deadline = time.monotonic() + grace_seconds
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.process.poll() is None:
            self._signal_group(getattr(signal, "SIGKILL", signal.SIGTERM))
        self._signal_group(getattr(signal, "SIGKILL", signal.SIGTERM))  # grandchildren that outlived the engine
        self.process.wait(timeout=10)

    def _signal_group(self, which) -> None:
        try:
            if os.name == "nt":
                self.process.send_signal(which)
            else:
                os.killpg(self.process.pid, which)
        except (ProcessLookupError, PermissionError, OSError):
            pass  # already gone

    def wait(self, timeout: Optional[float] = None) -> str:
        """Block until the end (tests and scripts; the panel polls instead)."""
        self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return self.state
