"""A model source as a folder: the folder itself, or a ``.zip`` unpacked safely into a temporary folder."""

from __future__ import annotations

import shutil
import stat
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, List

from MedSegUNetLib.core.errors import MedSegError

# Refused beyond these: a zip bomb must not fill the disk (TotalSegmentator's largest model is ~1 GB).
MAX_UNPACKED_BYTES = 32 * 2**30
MAX_MEMBERS = 100_000


def safe_members(archive: zipfile.ZipFile, path: Path) -> List[zipfile.ZipInfo]:
    """The archive's members, after refusing any that would land outside the folder or are not plain files."""
    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise MedSegError(f"the zip holds {len(members)} entries (more than {MAX_MEMBERS}); refused", path)
    total = 0
    for member in members:
        name = PurePosixPath(member.filename.replace("\\", "/"))
        if name.is_absolute() or ".." in name.parts or ":" in member.filename:
            raise MedSegError(f"the zip entry '{member.filename}' points outside its folder; refused", path)
        if stat.S_ISLNK(member.external_attr >> 16):
            raise MedSegError(f"the zip entry '{member.filename}' is a symbolic link; refused", path)
        total += member.file_size
    if total > MAX_UNPACKED_BYTES:
        raise MedSegError(f"the zip unpacks to {total / 2**30:.1f} GiB, more than allowed; refused", path)
    return members


@contextmanager
def source_folder(path: Path, wanted: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """``path`` itself when it is a folder; for a zip, a temporary folder holding its ``wanted`` entries
    (removed afterwards). Entries are checked before any is written."""
    if path.is_dir():
        yield path
        return
    if not path.exists():
        raise MedSegError("not found", path)
    if not zipfile.is_zipfile(path):
        raise MedSegError("is neither a model folder nor a .zip of one", path)
    folder = Path(tempfile.mkdtemp(prefix="medsegunet-import-"))
    try:
        try:
            with zipfile.ZipFile(path) as archive:
                for member in safe_members(archive, path):
                    if not member.is_dir() and wanted(member.filename):
                        target = folder.joinpath(*PurePosixPath(member.filename.replace("\\", "/")).parts)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with archive.open(member) as source, open(target, "wb") as sink:
                            shutil.copyfileobj(source, sink, 2**20)
        except (zipfile.BadZipFile, EOFError) as error:
            raise MedSegError(f"the zip is damaged ({error})", path) from None
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
