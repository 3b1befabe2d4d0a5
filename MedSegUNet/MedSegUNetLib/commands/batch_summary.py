"""``DIR/summary.csv`` of a batch run: one row per case, rewritten whole (atomically) as each case ends,
so that a killed run leaves a summary of what it finished."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from MedSegUNetLib.core.atomic import atomic_path

STATUSES = ("done", "skipped", "failed")


@dataclass(frozen=True)
class SummaryRow:
    case: str
    input: str
    output: str
    status: str  # done (written by this run), skipped (complete from an earlier run), failed
    seconds: str = ""  # reading, predicting and writing it (not its time waiting between them)
    voxels: str = ""  # of the input's grid
    error: str = ""


COLUMNS = [column.name for column in fields(SummaryRow)]


def summary_name(shard: Optional[Tuple[int, int]]) -> str:
    """``summary.csv``; one per shard (``summary-shard-I-of-N.csv``), as shards may share the folder."""
    return "summary.csv" if shard is None else f"summary-shard-{shard[0]}-of-{shard[1]}.csv"


def read_summary(path: Path) -> Dict[str, SummaryRow]:
    """An earlier run's rows by case (none when there is no readable summary)."""
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    return {
        row["case"]: SummaryRow(**{column: row.get(column) or "" for column in COLUMNS})
        for row in rows
        if row.get("case")
    }


class Summary:
    """The rows of this run, in the order the cases ended, written to ``path`` after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.earlier = read_summary(path)
        self.rows: List[SummaryRow] = []

    def add(self, row: SummaryRow, write: bool = True) -> None:
        self.rows.append(row)
        if write:
            self.write()

    def skipped(self, case: str, inputs: str, output: str) -> SummaryRow:
        """A case complete from an earlier run, with that run's voxel count when it recorded one."""
        earlier = self.earlier.get(case)
        voxels = earlier.voxels if earlier is not None and earlier.status == "done" else ""
        return SummaryRow(case, inputs, output, "skipped", voxels=voxels)

    def write(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(row) for row in self.rows)
        with atomic_path(self.path) as temporary:
            temporary.write_text(text.getvalue(), encoding="utf-8")

    def count(self, status: str) -> int:
        return sum(row.status == status for row in self.rows)
