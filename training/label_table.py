"""One label table across cases: segments are matched by name or terminology, never by label value.

Two scenes that painted "Liver" with value 3 and "liver" with value 1 train one class. A model being
fine-tuned keeps its labels (order and values); structures new to it are appended. A case annotates the
structures it has a segment for (an empty segment: annotated, not there); a segment named like
:data:`IGNORE_NAMES` marks voxels nobody reviewed, which teach nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set

import numpy as np

from MedSegUNetLib.core.labels import Label

from .losses import IGNORE
from .scenes import Case, SegmentInfo

IGNORE_NAMES = ("ignore", "unlabeled", "unlabelled")  # nnU-Net's ignore label, and what a Slicer user would paint


def name_key(name: str) -> str:
    return " ".join(name.split()).casefold()


def terminology_key(terminology: Optional[str]) -> Optional[tuple]:
    """The codes that identify a structure: category, type, modifier, region, region modifier.

    Scheme and code value only (meanings and context names vary between terminology files)."""
    if not terminology:
        return None
    parts = terminology.split("~")
    if len(parts) < 3:
        return None
    codes = []
    for index in (1, 2, 3, 5, 6):
        fields = parts[index].split("^") if index < len(parts) else []
        codes.append(tuple(fields[:2]) if len(fields) >= 2 and fields[1] else None)
    return tuple(codes) if codes[1] else None


@dataclass
class LabelTable:
    labels: List[Label] = field(default_factory=list)
    # per case name: segment position (1-based, as load_case_arrays writes it) -> class index (1-based)
    case_maps: Dict[str, Dict[int, int]] = field(default_factory=dict)
    missing: Dict[str, List[str]] = field(default_factory=dict)  # label name -> cases that do not annotate it

    def lookup_table(self, case: Case) -> np.ndarray:
        """Array mapping the case's merged labelmap values to class indices (0 stays background, IGNORE)."""
        mapping = self.case_maps[case.name]
        table = np.zeros(len(case.segments) + 1, dtype=np.uint8 if len(self.labels) < IGNORE else np.uint16)
        for position, class_index in mapping.items():
            table[position] = class_index
        return table

    def annotated(self, case: Case) -> List[int]:
        """The class indices (1-based) the case annotates, in order."""
        return sorted(set(self.case_maps[case.name].values()) - {IGNORE})

    def describe(self, case: Case) -> str:
        """What the case teaches, in words (for --dry-run)."""
        names = [self.labels[index - 1].name for index in self.annotated(case)]
        absent = [label.name for index, label in enumerate(self.labels, 1) if index not in self.annotated(case)]
        text = f"case {case.name} annotates {', '.join(names) or 'nothing'}"
        text += f"; not annotated (not taught as background): {', '.join(absent)}" if absent else ""
        ignored = [s.name for p, s in enumerate(case.segments, 1) if self.case_maps[case.name].get(p) == IGNORE]
        return text + (f"; voxels of '{ignored[0]}' are ignored" if ignored else "")

    def report(self) -> List[str]:
        return [f"'{name}' is not annotated in {', '.join(cases)}" for name, cases in self.missing.items() if cases]


def is_ignore_region(segment: SegmentInfo) -> bool:
    return name_key(segment.name) in IGNORE_NAMES


def _find(labels: List[Label], segment: SegmentInfo) -> Optional[int]:
    wanted_term = terminology_key(segment.terminology)
    for index, label in enumerate(labels):
        if name_key(label.name) == name_key(segment.name):
            return index
        if wanted_term is not None and terminology_key(label.terminology) == wanted_term:
            return index
    return None


def build_label_table(
    cases: Sequence[Case], initial: Optional[Sequence[Label]] = None, only: Optional[Sequence[str]] = None
) -> LabelTable:
    """``only``: train just these structures (by name, from the cases or the initial labels); every other
    segment counts as background."""
    table = LabelTable(labels=list(initial or []))
    wanted: Optional[Set[str]] = None
    if only:
        wanted = {name_key(name) for name in only}
        found = {name_key(segment.name) for case in cases for segment in case.segments}
        found |= {name_key(label.name) for label in table.labels}  # a fine-tuned model's own structures
        absent = sorted(name for name in only if name_key(name) not in found)
        if absent:
            raise ValueError(f"--labels names segments that no case has: {', '.join(absent)}")
    next_value = max((label.value for label in table.labels), default=0) + 1
    for case in cases:
        mapping: Dict[int, int] = {}
        for position, segment in enumerate(case.segments, start=1):
            if is_ignore_region(segment):
                if IGNORE in mapping.values():
                    raise ValueError(f"{case.name}: more than one segment marks voxels to ignore")
                mapping[position] = IGNORE
                continue
            if wanted is not None and name_key(segment.name) not in wanted and _find(table.labels, segment) is None:
                continue
            index = _find(table.labels, segment)
            if index is None:
                table.labels.append(Label(next_value, segment.name, segment.color, segment.terminology))
                next_value += 1
                index = len(table.labels) - 1
            if index + 1 in mapping.values():
                raise ValueError(f"{case.name}: two segments match '{table.labels[index].name}'")
            mapping[position] = index + 1
        table.case_maps[case.name] = mapping
    if len(table.labels) >= IGNORE and any(IGNORE in m.values() for m in table.case_maps.values()):
        raise ValueError(f"an ignore region needs fewer than {IGNORE} structures; there are {len(table.labels)}")
    for index, label in enumerate(table.labels, start=1):
        table.missing[label.name] = [case.name for case in cases if index not in table.case_maps[case.name].values()]
    return table
