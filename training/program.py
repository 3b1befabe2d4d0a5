"""The ``medsegunet`` program (also ``python -m training``): the engine's commands and training's (train,
sample-data, demo) in one parser. It lives here, above both, so that the engine knows nothing of training."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from MedSegUNetLib import cli

from . import demo, sampledata
from .cli import add_train_parser


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser(extra=(add_train_parser, sampledata.add_parser, demo.add_parser))


def main(argv: Optional[Sequence[str]] = None, exit_at_once: bool = False) -> int:
    """Run one command; its exit code. Under torchrun only rank 0 reports progress and the final record."""
    quiet = os.environ.get("RANK", "0") != "0"
    return cli.main(argv, exit_at_once, build=build_parser, quiet=quiet)


def entry() -> None:
    """The ``medsegunet`` console script."""
    sys.exit(main(exit_at_once=True))
