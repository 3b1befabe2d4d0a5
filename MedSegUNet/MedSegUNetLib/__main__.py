"""``python -m MedSegUNetLib ...``: the command Slicer's panel runs with PythonSlicer."""

import sys

from .cli import main

sys.exit(main())
