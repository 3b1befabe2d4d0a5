"""``python -m MedSegUNetLib ...``: the command Slicer's panel runs with PythonSlicer."""

import sys

from .cli import main

if __name__ == "__main__":  # not again in a spawned crop worker (macOS, Windows)
    sys.exit(main())
