"""The output classes of a model (value, name, color, terminology), and default colors for bundles made
without annotated data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple


@dataclass
class Label:
    """One output class: the value written in labelmaps, and how Slicer shows the segment."""

    value: int
    name: str
    color: Tuple[float, float, float]  # RGB, 0..1 as in .seg.nrrd
    terminology: Optional[str] = None  # Slicer's "context~category~type~..." string

    @classmethod
    def from_dict(cls, data: dict) -> "Label":
        color = tuple(float(c) for c in data.get("color", (0.5, 0.5, 0.5)))
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise ValueError(f"label '{data.get('name')}' has a bad color {data.get('color')} (want 3 values in 0..1)")
        return cls(int(data["value"]), str(data["name"]), color, data.get("terminology") or None)


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


def palette_color(index: int) -> Tuple[float, float, float]:
    """A color for the ``index``-th label (0-based); the palette repeats, slightly darker each round."""
    red, green, blue = PALETTE[index % len(PALETTE)]
    shade = 0.85 ** (index // len(PALETTE))
    return round(red * shade, 4), round(green * shade, 4), round(blue * shade, 4)


def default_labels(names: Sequence[str]) -> List[Label]:
    return [Label(value, name, palette_color(value - 1)) for value, name in enumerate(names, start=1)]
