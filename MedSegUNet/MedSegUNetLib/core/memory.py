"""How much memory this process may still allocate: what lets the engine refuse a volume up front.

Reading a header that claims 2000^3 voxels, or resampling a scan to a model's fine spacing, would
otherwise allocate first and fail (or swap for an hour) later. Three limits can apply, the smallest wins:
the memory the OS can give without swapping (Linux ``MemAvailable``), a container's cgroup limit, and
this process's address-space limit (``ulimit -v``, ``RLIMIT_AS``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path
from typing import List, Optional


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_number(path: Path) -> Optional[int]:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) is not a number


def _cgroup_headroom() -> Optional[int]:
    """limit - usage of this process's cgroup (v2, then v1), or None without a limit."""
    candidates = []
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as groups:
            for line in groups:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) == 3 and parts[0] == "0":
                    candidates.append((Path("/sys/fs/cgroup") / parts[2].lstrip("/"), "memory.max", "memory.current"))
                elif len(parts) == 3 and "memory" in parts[1].split(","):
                    folder = Path("/sys/fs/cgroup/memory") / parts[2].lstrip("/")
                    candidates.append((folder, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    except OSError:
        return None
    for folder, limit_name, usage_name in candidates:
        limit, usage = _read_number(folder / limit_name), _read_number(folder / usage_name)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes a huge number for "none"
            return max(limit - usage, 0)
    return None


def _address_space_headroom() -> Optional[int]:
    """RLIMIT_AS minus what this process has mapped already, or None without a limit."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return max(soft - int(line.split()[1]) * 1024, 0)
    except (OSError, ValueError):
        pass
    return soft


def available_memory_bytes() -> Optional[int]:
    """The smallest of the limits above, or None when none is known."""
    known: List[int] = [
        v for v in (_meminfo_available(), _cgroup_headroom(), _address_space_headroom()) if v is not None
    ]
    return min(known) if known else None


def describe_bytes(count: float) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def return_freed_memory() -> None:
    """Hand the memory malloc holds freed back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    The engine's malloc keeps up to 256 MB freed for the windows to reuse (host/childprocess.py,
    MALLOC_TUNABLES), which would keep a copy of the weights let go before the windows resident through them."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass
