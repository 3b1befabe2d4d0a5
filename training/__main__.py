"""``python -m training train ...``: the same command as ``medsegunet train ...``."""

import sys

from MedSegUNetLib.cli import main

if __name__ == "__main__":  # not again in a spawned crop worker (macOS, Windows)
    sys.exit(main(sys.argv[1:] if sys.argv[1:2] == ["train"] else ["train", *sys.argv[1:]]))
