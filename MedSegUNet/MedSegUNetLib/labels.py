"""Default segment names and colors for bundles made without annotated data."""

from __future__ import annotations

from typing import List, Sequence

from .bundle import Label

# Distinct, readable colors (0..1 RGB) in the spirit of Slicer's GenericAnatomyColors.
PALETTE = [
    (0.85, 0.40, 0.35),
    (0.62, 0.35, 0.66),
    (0.30, 0.60, 0.85),
    (0.95, 0.80, 0.30),
    (0.40, 0.75, 0.45),
    (0.90, 0.55, 0.20),
    (0.55, 0.80, 0.85),
    (0.80, 0.45, 0.70),
    (0.65, 0.55, 0.35),
    (0.35, 0.45, 0.80),
]


def palette_color(index: int):
    """A color for the ``index``-th label (0-based); the palette repeats, slightly darker each round."""
    base = PALETTE[index % len(PALETTE)]
    shade = 0.85 ** (index // len(PALETTE))
    return tuple(round(c * shade, 4) for c in base)


def default_labels(names: Sequence[str]) -> List[Label]:
    return [Label(value, name, palette_color(value - 1)) for value, name in enumerate(names, start=1)]
