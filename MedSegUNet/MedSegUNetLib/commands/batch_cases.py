"""The cases of a cohort: inputs (files, folders, DICOM trees, list files) turned into named cases, and shards.

A case is what one ``segment`` run takes: one image per model input channel (or one DICOM series). Its
id names its output. Channels follow nnU-Net's file naming, ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``,
in the model's channel order (the order ``segment`` takes its inputs in). Ids that collide, whatever
their case, take their parent folders' names (``a_ct``, ``b_ct``) until they differ.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.imageio.images import IMAGE_ENDINGS, SEGMENTATION_ENDING, dicom_series, has_ending

CHANNEL_NAME = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Source:
    """One image: a file, or one series of a DICOM folder."""

    path: Path
    series: Optional[str] = None
    name_parts: Tuple[str, ...] = ()  # the path's parts without the file's ending (and the series when several)


@dataclass(frozen=True)
class Case:
    """One segment job: its id (the output's name), its channel images, and a listing problem if any."""

    case_id: str
    inputs: Tuple[Path, ...]
    series: Optional[str] = None
    problem: Optional[str] = None  # why the case cannot run (a channel missing or misnamed)
    name_parts: Tuple[str, ...] = ()  # where its id comes from: the path's parts, the last first in the id

    def describe_inputs(self) -> str:
        text = ";".join(str(path) for path in self.inputs)
        return f"{text} (series {self.series})" if self.series else text


def list_cases(inputs: Sequence[Path], list_file: Optional[Path], channels: int, skip: Optional[Path]) -> List[Case]:
    """Every case of ``inputs`` and of the lines of ``list_file``, in a stable order, with unique ids;
    ``skip`` (the output folder) is never searched."""
    arguments = list(inputs) + (read_list_file(list_file) if list_file is not None else [])
    if not arguments:
        raise MedSegError("no input: give files, folders or --list FILE")
    sources: Dict[Tuple[Path, Optional[str]], Source] = {}
    for argument in arguments:
        for source in find_sources(Path(argument), skip):
            sources.setdefault((source.path, source.series), source)  # the same image listed twice is one case
    if not sources:
        raise MedSegError(f"no image file or DICOM series found in {', '.join(map(str, arguments[:3]))}")
    cases = group_channels(list(sources.values()), channels)
    return unique_ids(cases)


def read_list_file(path: Path) -> List[Path]:
    """Non-empty, non-comment lines; relative paths are relative to the list file's folder."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MedSegError(f"cannot read the list file ({getattr(error, 'strerror', None) or error})", path) from None
    lines = [line.strip() for line in text.splitlines()]
    return [Path(path).parent / line for line in lines if line and not line.startswith("#")]


def find_sources(argument: Path, skip: Optional[Path]) -> Iterator[Source]:
    """A named file as it is (the reader judges it; a missing one becomes a failed case); a folder searched."""
    if not argument.is_dir():
        yield Source(argument.absolute(), None, _name_parts(argument.absolute()))
        return
    skipped = skip.resolve() if skip is not None else None
    for folder, subfolders, files in os.walk(argument):
        here = Path(folder).absolute()
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and (here / d).resolve() != skipped)
        images = sorted(name for name in files if _is_image_name(name))
        for name in images:
            yield Source(here / name, None, _name_parts(here / name))
        if len(images) < len([name for name in files if not name.startswith(".")]):
            yield from _dicom_sources(here)


def _is_image_name(name: str) -> bool:
    path = Path(name)
    return not name.startswith(".") and has_ending(path, IMAGE_ENDINGS) and not has_ending(path, (SEGMENTATION_ENDING,))


def _dicom_sources(folder: Path) -> Iterator[Source]:
    series = sorted(dicom_series(folder))
    for uid in series:
        parts = folder.parts if len(series) == 1 else (*folder.parts[:-1], f"{folder.name}_{uid}")
        yield Source(folder, uid, tuple(parts))


def _name_parts(path: Path) -> Tuple[str, ...]:
    ending = next((e for e in (".nii.gz", *IMAGE_ENDINGS) if path.name.lower().endswith(e)), path.suffix)
    stem = path.name[: len(path.name) - len(ending)] if ending else path.name
    return (*path.parts[:-1], stem or path.name)


def group_channels(sources: List[Source], channels: int) -> List[Case]:
    """One case per source for a one-channel model (a ``_0000`` ending dropped, as nnU-Net names files);
    for several channels, the files ``CASE_0000``... of one folder grouped in channel order."""
    if channels == 1:
        return [_single_channel_case(source) for source in sources]
    groups: Dict[Tuple[str, ...], Dict[int, Source]] = defaultdict(dict)
    cases = []
    for source in sources:
        match = CHANNEL_NAME.match(source.name_parts[-1]) if source.series is None else None
        if match is None:
            problem = f"the model takes {channels} channels: name its files CASE_0000 ... CASE_{channels - 1:04d}"
            cases.append(Case("", (source.path,), source.series, problem, source.name_parts))
            continue
        groups[source.name_parts[:-1] + (match["case"],)][int(match["channel"])] = source
    for parts, members in groups.items():
        inputs = tuple(members[index].path for index in sorted(members))
        cases.append(Case("", inputs, None, _channel_problem(sorted(members), channels), parts))
    return cases


def _channel_problem(found: List[int], channels: int) -> Optional[str]:
    if found == list(range(channels)):
        return None
    listed = ", ".join(f"_{index:04d}" for index in found)
    return f"has channels {listed}; the model takes {channels} (_0000 to _{channels - 1:04d})"


def _single_channel_case(source: Source) -> Case:
    parts = source.name_parts
    if parts[-1].endswith("_0000") and len(parts[-1]) > 5:
        parts = (*parts[:-1], parts[-1][:-5])
    return Case("", (source.path,), source.series, None, parts)


def unique_ids(cases: List[Case]) -> List[Case]:
    """Each case named by the last part of its path, lengthened by its folders while names collide
    (case-insensitively: macOS and Windows file systems); a last resort adds a hash of the inputs."""
    parts = [case.name_parts for case in cases]
    depth = [1] * len(cases)
    while True:
        names = [_name(p, d) for p, d in zip(parts, depth)]
        lengthened = [
            i
            for group in _collisions(names)
            for i in group
            if depth[i] < len(parts[i]) and any(parts[j] != parts[i] for j in group)  # folders can tell them apart
        ]
        if not lengthened:
            break
        for i in lengthened:
            depth[i] += 1
    for group in _collisions(names):
        for i in group:
            digest = hashlib.sha256(cases[i].describe_inputs().encode("utf-8")).hexdigest()[:8]
            names[i] = f"{names[i]}_{digest}"
    named = [replace(case, case_id=name) for case, name in zip(cases, names)]
    return sorted(named, key=lambda case: case.case_id)


def _name(parts: Tuple[str, ...], depth: int) -> str:
    chosen = [part.strip("/\\") for part in parts[-depth:]]
    return "_".join(part for part in chosen if part) or "case"


def _collisions(names: List[str]) -> List[List[int]]:
    """Groups of the indices of equal names (ignoring case)."""
    seen: Dict[str, List[int]] = defaultdict(list)
    for index, name in enumerate(names):
        seen[name.casefold()].append(index)
    return [group for group in seen.values() if len(group) > 1]


def parse_shard(text: str) -> Tuple[int, int]:
    """``I/N`` with 0 <= I < N (as SLURM's ``--array=0-N-1`` and Kubernetes' completion index count)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise MedSegError(f"--shard {text}: expected I/N, e.g. 0/4")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise MedSegError(f"--shard {text}: I counts from 0 to N-1")
    return index, count


def shard_of(case_id: str, count: int) -> int:
    """The shard a case belongs to: from its id alone, so that adding, removing or reordering other
    inputs never moves it."""
    digest = hashlib.sha256(case_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def in_shard(cases: Sequence[Case], shard: Optional[Tuple[int, int]]) -> List[Case]:
    if shard is None:
        return list(cases)
    index, count = shard
    return [case for case in cases if shard_of(case.case_id, count) == index]
