"""Test-time augmentation's cost: the shipped model on a benchmark volume, `segment` without and with
`--tta`, each a whole process as a user starts it; seconds of each and their ratio.

    python benchmarks/tta.py [--size tiny|full] [--device cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "MedSegUNet"), str(REPO)]  # before benchmarks/, whose training.py is a script

import volumes  # noqa: E402


def segment_seconds(volume: Path, output: Path, device: str, *options: str) -> float:
    command = [sys.executable, "-m", "MedSegUNetLib", "segment", str(volume), "-m", str(volumes.default_model())]
    command += ["-o", str(output), "--device", device, "--progress", "none", *options]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"segment {' '.join(options)} failed: {result.stderr.strip()[-1500:]}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(volumes.SIZES), default="full")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    size = volumes.SIZES[args.size]
    with tempfile.TemporaryDirectory(prefix="medsegunet-tta-") as temporary:
        folder = Path(temporary)
        volume = volumes.write_volume(folder / "volume.nii.gz", size)
        plain = segment_seconds(volume, folder / "plain.nii.gz", args.device, "--no-tta")
        tta = segment_seconds(volume, folder / "tta.nii.gz", args.device, "--tta")
    report = {"volume": size.describe(), "device": args.device, "plain_s": round(plain, 2), "tta_s": round(tta, 2)}
    report["tta_over_plain"] = round(tta / plain, 2)
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
