"""The exceptions the command line turns into one clear line and an exit code."""

from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

# Exit codes shared by every command (the Slicer panel relies on them).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130


class MedSegError(Exception):
    """An expected failure (bad input file, bad bundle, unwritable output): shown without a traceback."""

    def __init__(self, message: str, path: Optional[PathLike] = None):
        super().__init__(message)
        self.message = message
        self.path = os.fspath(path) if path is not None else None

    def __str__(self) -> str:
        one_line = " ".join(self.message.split())
        return f"{self.path}: {one_line}" if self.path else one_line


OUT_OF_MEMORY = "out of memory: try a smaller --batch-size, a GPU, or a machine with more memory"


def describe_os_error(error: OSError) -> str:
    """Disk full, file too large, I/O error: one line naming the file when the error names one."""
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}"


class Cancelled(BaseException):
    """The run was asked to stop (SIGINT/SIGTERM or the panel's Cancel).

    A BaseException, like KeyboardInterrupt: the ``except Exception`` that turns a library's error on an
    untrusted file into a MedSegError must not turn a cancel into "bad file" (exit 1 instead of 130)."""
