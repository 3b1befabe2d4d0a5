"""How the benchmarks start their child processes: the environment each pipeline runs in."""

from __future__ import annotations

import os
import resource
import sys
from typing import Dict

from MedSegUNetLib.host.childprocess import with_malloc_tunables

ENGINE_MALLOC_CHOICES = ("ours", "both", "none")


def child_environment(kind: str, engine_malloc: str = "ours") -> Dict[str, str]:
    """The environment of a child running ``kind`` ("ours" or "baseline").

    Python writes and reuses byte-compiled modules, as in any installed package (a machine-wide
    PYTHONDONTWRITEBYTECODE would make every run compile the project's modules again, about 0.05 s).
    Ours runs with the engine's malloc settings on Linux (huge pages, fixed mmap and trim thresholds:
    childprocess.MALLOC_TUNABLES), as the Slicer module and ``bin/medsegunet`` start the engine; the
    baseline, a plain MONAI script, runs with malloc's defaults unless ``engine_malloc`` is "both"."""
    environment = dict(os.environ)
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    wanted = engine_malloc == "both" or (engine_malloc == "ours" and kind == "ours")
    if wanted and sys.platform.startswith("linux"):
        environment["GLIBC_TUNABLES"] = with_malloc_tunables(environment.get("GLIBC_TUNABLES", ""))
    return environment


def own_peak_rss_mb() -> float:
    """This process's own peak resident memory (MB): VmHWM on Linux.

    Not ``ru_maxrss``: Linux carries the parent's peak across the exec into the child's ``ru_maxrss``
    (a child of a 760 MB harness reported at least 760 MB whatever it held itself)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, kB elsewhere
