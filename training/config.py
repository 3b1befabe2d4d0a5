"""Training configuration and the auto-configuration from the data's fingerprint (nnU-Net's spirit)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from MedSegUNetLib.model.bundle import Normalization, Preprocessing

Number = TypeVar("Number", int, float)


@dataclass
class TrainConfig:
    """What a run does. ``None`` fields are filled in by :func:`plan` and printed."""

    output: str
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None
    spacing: Optional[Tuple[float, float, float]] = None
    patch_size: Optional[Tuple[int, int, int]] = None
    batch_size: Optional[int] = None
    filters: int = 16
    lr: float = 1e-3
    optimizer: str = "adamw"
    schedule: str = "poly"
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.2
    validate_every: int = 50
    modality: str = "ct"
    memory_budget_gb: float = 4.0
    init: Optional[str] = None
    resume: bool = False
    amp: Optional[bool] = None  # None: mixed precision on CUDA only
    workers: Optional[int] = None  # processes making the augmented crops; None: stream.default_workers
    # Imbalance (training/sampling.py, training/losses.py): the share of each batch's crops centered on a
    # foreground voxel (nnU-Net's 0.33; 0: uniform crops), and Dice computed over the whole batch.
    foreground_fraction: float = 0.33
    batch_dice: bool = True
    # The share of crops cut to a thin slab head to foot, as a scan thinner than the window reaches the
    # network (training/field_of_view.py); 0: none.
    slab_crops: float = 0.0
    # The share of crops brightened structure by structure as in another contrast phase
    # (training/contrast_agent.py; CT only); 0: none.
    contrast_phases: float = 0.0


@dataclass
class Fingerprint:
    """What plan() needs to know of the data, measured in the bundle's canonical orientation."""

    spacings: List[Tuple[float, float, float]] = field(default_factory=list)
    sizes_mm: List[Tuple[float, float, float]] = field(default_factory=list)
    foreground_values: Optional[np.ndarray] = None


@dataclass
class Plan:
    preprocessing: Preprocessing
    batch_size: int
    steps: int
    reasons: List[str]

    def to_dict(self) -> dict:
        return {
            "preprocessing": asdict(self.preprocessing),
            "batch_size": self.batch_size,
            "steps": self.steps,
            "reasons": self.reasons,
        }


def _three(values: Sequence[Number]) -> Tuple[Number, Number, Number]:
    """(x, y, z) from a sequence of three (a flag's list, a median's array)."""
    x, y, z = values
    return x, y, z


def _patch_for(median_shape: Sequence[float], spacing: Sequence[float], budget_voxels: int) -> Tuple[int, int, int]:
    """Largest multiple-of-16 patch (multiple of 8 on short axes) within the image and the voxel budget."""
    patch = [max(16, int(min(s, 128) // 16 * 16)) for s in median_shape]
    while np.prod(patch) > budget_voxels and max(patch) > 16:
        axis = int(np.argmax(np.array(patch) * np.array(spacing)))  # shrink the longest physical side
        patch[axis] = max(16, patch[axis] - 16)
    return _three([int(p) for p in patch])


def plan(config: TrainConfig, fingerprint: Fingerprint, cases: int, fixed: Optional[Preprocessing] = None) -> Plan:
    """Spacing (median), patch and batch size (image size and memory), normalization (foreground intensities)."""
    reasons: List[str] = []
    if fixed is not None:
        preprocessing = fixed
        reasons.append("preprocessing: kept from the --init bundle")
    else:
        spacing = (
            _three(config.spacing)
            if config.spacing
            else _three([float(s) for s in np.median(fingerprint.spacings, axis=0)])
        )
        reasons.append(
            f"spacing {'x'.join(f'{s:.3g}' for s in spacing)} mm "
            f"({'flag' if config.spacing else 'median of the cases'})"
        )
        median_shape = np.median(fingerprint.sizes_mm, axis=0) / np.array(spacing)
        budget = int(config.memory_budget_gb * 2**30 / (4 * 2 * config.filters * 20))  # activations per voxel, rough
        patch = _three(config.patch_size) if config.patch_size else _patch_for(median_shape, spacing, budget)
        reasons.append(
            f"patch {'x'.join(map(str, patch))} "
            f"({'flag' if config.patch_size else 'median image size and memory budget'})"
        )
        preprocessing = Preprocessing(spacing, patch, "RAS", _normalization(config, fingerprint, reasons))
    batch = config.batch_size or 2
    reasons.append(f"batch size {batch}")
    steps = config.max_steps or (config.epochs or 50) * max(cases, 1) * 4
    reasons.append(f"steps {steps} ({'--max-steps' if config.max_steps else 'epochs x cases x 4 crops'})")
    return Plan(preprocessing, batch, steps, reasons)


def _normalization(config: TrainConfig, fingerprint: Fingerprint, reasons: List[str]) -> Normalization:
    if config.modality == "mri":
        reasons.append("normalization z-score per image (MRI)")
        return Normalization("zscore", None)
    values = fingerprint.foreground_values
    if values is None or values.size < 100:
        reasons.append("normalization CT window -1000..1000 HU (too little foreground to measure)")
        return Normalization("ct", (-1000.0, 1000.0))
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    clipped = np.clip(values, low, high)
    mean, std = float(clipped.mean()), float(max(clipped.std(), 1e-3))
    reasons.append(f"normalization CT clip {low:.0f}..{high:.0f} HU, mean {mean:.0f}, std {std:.0f} (foreground)")
    return Normalization("ct", (low, high), mean, std)
