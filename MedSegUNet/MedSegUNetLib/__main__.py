"""``python -m MedSegUNetLib ...``: the engine's program, which Slicer's panel runs with PythonSlicer."""

from MedSegUNetLib.cli import entry

if __name__ == "__main__":  # not again in a spawned crop worker (macOS, Windows)
    entry()
