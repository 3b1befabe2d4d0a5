"""Files from a package registry: one exact file fetched by pip (nothing installed), checked, and cached.

No dataset URL is reachable from where this project runs, but PyPI is: the sample scans
(sampledata.py) and the lesion cases (lesion_samples.py) come from packages' distributions.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from MedSegUNetLib.core.errors import MedSegError


def cache_folder() -> Path:
    """``$MEDSEGUNET_CACHE``, else ``~/.cache/medsegunet``."""
    configured = os.environ.get("MEDSEGUNET_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "medsegunet"


def download_from_index(requirement: str, file_name: str, sha256: str, folder: Path, wheel: bool = False) -> Path:
    """pip download of one exact file (no dependencies, nothing installed), checked against its known hash."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(folder)]
    base += ["--only-binary", ":all:"] if wheel else ["--no-binary", ":all:"]
    downloaded, last = folder / file_name, "no output"
    # pip prepares an sdist's metadata; without build isolation it uses our setuptools (no extra download)
    for extra in ([] if wheel else ["--no-build-isolation"], []):
        result = subprocess.run(
            base + extra + [requirement], capture_output=True, text=True, encoding="utf-8", errors="replace"
        )
        if result.returncode == 0 and downloaded.exists():
            break
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
    else:
        raise MedSegError(f"could not download {requirement} from the package index: {last}", folder)
    digest = hashlib.sha256(downloaded.read_bytes()).hexdigest()
    if digest != sha256:
        raise MedSegError(f"downloaded file has sha256 {digest}, expected {sha256}", downloaded)
    return downloaded
