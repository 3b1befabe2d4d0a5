"""How the benchmarks start their child processes: the environment each pipeline runs in."""

from __future__ import annotations

import os
import sys
from typing import Dict

from MedSegUNetLib.childprocess import with_huge_pages

HUGE_PAGES_CHOICES = ("ours", "both", "none")


def child_environment(kind: str, huge_pages: str = "ours") -> Dict[str, str]:
    """The environment of a child running ``kind`` ("ours" or "baseline").

    Python writes and reuses byte-compiled modules, as in any installed package (a machine-wide
    PYTHONDONTWRITEBYTECODE would make every run compile the project's modules again, about 0.05 s).
    Ours runs with malloc's huge pages requested on Linux, as the Slicer module and ``bin/medsegunet``
    start the engine (childprocess.with_huge_pages); the baseline, a plain MONAI script, runs without
    unless ``huge_pages`` is "both"."""
    environment = dict(os.environ)
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    wanted = huge_pages == "both" or (huge_pages == "ours" and kind == "ours")
    if wanted and sys.platform.startswith("linux"):
        environment["GLIBC_TUNABLES"] = with_huge_pages(environment.get("GLIBC_TUNABLES", ""))
    return environment
