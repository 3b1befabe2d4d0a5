"""``python -m MedSegUNetLib ...``: the command Slicer's panel runs with PythonSlicer."""

import sys

from .cli import entry

if __name__ == "__main__":  # not again in a spawned crop worker (macOS, Windows)
    entry()
