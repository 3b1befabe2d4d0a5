"""``python -m training COMMAND ...``: the ``medsegunet`` program (Slicer's Retrain runs ``-m training train``)."""

from training.program import entry

if __name__ == "__main__":  # not again in a spawned crop worker (macOS, Windows)
    entry()
