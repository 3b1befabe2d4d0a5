"""Writing files so that a failed or killed run never leaves a partial file or damages an old one.

Everything MedSegUNet writes (segmentations, bundles, checkpoints, reports) is written to a temporary
file beside the target, flushed to disk, and renamed over the target only on success.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Iterator

from MedSegUNetLib.core.errors import MedSegError, PathLike

_TEMP_MARK = ".medseg-tmp-"


def _suffixes(path: Path) -> str:
    """Keep multi-part endings (.seg.nrrd, .nii.gz) so writers still recognise the format."""
    name = path.name
    for ending in (".seg.nrrd", ".nii.gz", ".seg.nii.gz"):
        if name.endswith(ending):
            return ending
    return path.suffix


# Another machine's temporary (a folder shared by the jobs of an array) is left alone while it can still be
# written: its process id means nothing here. Untouched this long, it is a killed run's.
FOREIGN_TEMPORARY_SECONDS = 3600.0


def _host_mark() -> str:
    """A short mark of this machine in a temporary's name."""
    return hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:6]


def temporary_sibling(path: Path) -> Path:
    ending = _suffixes(path)
    stem = path.name[: len(path.name) - len(ending)] if ending else path.name
    return path.with_name(f".{stem}{_TEMP_MARK}{os.getpid()}-{_host_mark()}-{secrets.token_hex(4)}{ending}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(folder: Path) -> int:
    """Remove temporaries left by runs that were killed (their process is gone); returns how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    for candidate in folder.glob(f".*{_TEMP_MARK}*"):
        if _is_stale(candidate):
            with contextlib.suppress(OSError):
                candidate.unlink()
                removed += 1
    return removed


def _is_stale(temporary: Path) -> bool:
    """This machine's temporary whose process is gone, or another machine's left untouched for long."""
    fields = temporary.name.split(_TEMP_MARK, 1)[1].split("-")  # pid-host-token (pid-token: before the host)
    if not fields[0].isdigit():
        return False
    if len(fields) > 2 and fields[1] != _host_mark():
        return _untouched_for(temporary, FOREIGN_TEMPORARY_SECONDS)
    return not _pid_alive(int(fields[0]))


def _untouched_for(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def check_writable(path: Path) -> None:
    """Fail before the long work if ``path`` cannot be written (missing folder, no permission, a folder)."""
    path = Path(path)
    if path.is_dir():
        raise MedSegError("output is an existing folder, expected a file name", path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise MedSegError("output folder does not exist", parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MedSegError("output folder is not writable", parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise MedSegError("output file exists and is not writable", path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _match_permissions(temporary: Path, path: Path) -> None:
    """Writers such as mkstemp create 0600 files: give the result the mode a plain open() would."""
    if path.exists():
        mode = path.stat().st_mode & 0o777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(temporary, mode)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename.

    On any exception (including cancellation) the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    clean_stale_temporaries(path.parent if str(path.parent) else Path("."))
    temporary = temporary_sibling(path)
    try:
        yield temporary
        if not temporary.exists():
            raise MedSegError("writer produced no file", path)
        _fsync_file(temporary)
        _match_permissions(temporary, path)
        os.replace(temporary, path)
        _fsync_folder(path.parent if str(path.parent) else Path("."))
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise MedSegError(f"cannot write ({error.strerror or error})", path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
