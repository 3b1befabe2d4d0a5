"""Batches of augmented crops for training, made ahead by worker processes so that the network never
waits for its data (on a GPU a step takes less time than augmenting its crops on one CPU core).

The order of the batches is fixed by the seed and the number of workers: worker ``w`` makes its own
seeded stream and torch's DataLoader takes one batch from each worker in turn. The same seed and
worker count give the same batches, run after run.
"""

from __future__ import annotations

import os
import signal
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, TypedDict

import numpy as np
import torch

from .contrast_agent import ContrastPhases
from .data import ALL_AXES, PreparedCase, augmentations, pad_to_patch
from .field_of_view import SlabCrops
from .losses import IGNORE
from .sampling import class_voxels, crop_starts

WORKER_SEED_STRIDE = 1_000_003  # far apart: the workers' streams never share a seed
FOREGROUND_FRACTION = 0.33  # nnU-Net's default share of crops forced onto foreground


class Batch(TypedDict):
    """One training batch: ``batch_size`` crops of one case."""

    image: torch.Tensor  # (B, C, Z, Y, X) float32
    label: torch.Tensor  # (B, 1, Z, Y, X) int64 class indices (IGNORE: teaches nothing)
    annotated: torch.Tensor  # (B, C) bool: the classes the case annotates (background always)
    case: str  # the case the crops were taken from


def batches(
    cases: List[PreparedCase],
    patch_zyx: Sequence[int],
    classes: int,
    batch_size: int,
    seed: int,
    foreground_fraction: float = FOREGROUND_FRACTION,
    flip_axes: Sequence[int] = ALL_AXES,
    slabs: Optional[SlabCrops] = None,
    phases: Optional[ContrastPhases] = None,
) -> Iterator[Batch]:
    """An endless stream of augmented crops, cycling through the cases in a seeded random order; a share
    ``foreground_fraction`` of each batch's crops is centered on foreground (training/sampling.py); mirrored
    only along ``flip_axes``; a share brightened as in another contrast phase by ``phases``
    (training/contrast_agent.py) and cut to thin slabs by ``slabs`` (training/field_of_view.py). A case
    thinner than the patch is padded with its air (its lowest value), untaught, as segment pads it."""
    from monai.utils import convert_to_numpy

    augment = augmentations(flip_axes)
    augment.set_random_state(seed=seed)
    rng = np.random.default_rng(seed)
    padded: Dict[str, Tuple[np.ndarray, np.ndarray, Dict[int, np.ndarray], float]] = {}
    while True:
        for index in rng.permutation(len(cases)):
            case = cases[index]
            if case.name not in padded:  # once per case: padding and where each class lies
                air = float(case.image.min())
                label = pad_to_patch(case.label, patch_zyx, IGNORE)
                image = pad_to_patch(case.image, patch_zyx, air)
                padded[case.name] = (image, label, class_voxels(label[0], classes), air)
            image, label, voxels, air = padded[case.name]
            crops = []
            for start in crop_starts(label.shape[1:], patch_zyx, voxels, batch_size, foreground_fraction, rng):
                box = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, patch_zyx))
                crop_image = image[box]
                if phases is not None:
                    crop_image = crop_image.copy()  # the case's own array stays as it is
                    phases(crop_image, label[box], rng)
                crop = augment({"image": crop_image, "label": label[box]})
                # copies: a crop the transforms left alone may still share the case's memory
                crop_image, crop_label = (
                    np.array(convert_to_numpy(crop["image"])),
                    np.array(convert_to_numpy(crop["label"])),
                )
                if slabs is not None:
                    slabs(crop_image, crop_label, air, rng)
                crops.append((crop_image, crop_label))
            yield {
                "image": torch.stack([torch.as_tensor(pair[0]) for pair in crops]).float(),
                "label": torch.stack([torch.as_tensor(pair[1]) for pair in crops]).long(),
                "annotated": annotated_classes(case, classes).repeat(len(crops), 1),
                "case": case.name,
            }


def annotated_classes(case: PreparedCase, classes: int) -> torch.Tensor:
    """(1, C) booleans: background and the classes the case annotates (all when it names none)."""
    row = torch.zeros(1, classes, dtype=torch.bool)
    row[0, [0, *case.annotated]] = True
    return row if case.annotated else torch.ones(1, classes, dtype=torch.bool)


class CropBatches(torch.utils.data.IterableDataset):
    """:func:`batches` as a dataset: each DataLoader worker runs its own seeded stream."""

    def __init__(
        self,
        cases: List[PreparedCase],
        patch_zyx: Sequence[int],
        classes: int,
        batch_size: int,
        seed: int,
        foreground_fraction: float = FOREGROUND_FRACTION,
        flip_axes: Sequence[int] = ALL_AXES,
        slabs: Optional[SlabCrops] = None,
        phases: Optional[ContrastPhases] = None,
    ):
        super().__init__()
        self.flip_axes = tuple(flip_axes)
        self.slabs, self.phases = slabs, phases
        self.cases, self.patch_zyx, self.classes, self.batch_size, self.seed = (
            cases,
            patch_zyx,
            classes,
            batch_size,
            seed,
        )
        self.foreground_fraction = foreground_fraction

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        return batches(
            self.cases,
            self.patch_zyx,
            self.classes,
            self.batch_size,
            self.seed + WORKER_SEED_STRIDE * worker,
            self.foreground_fraction,
            self.flip_axes,
            self.slabs,
            self.phases,
        )


def _worker_signals(_: int) -> None:
    """A Ctrl+C or a Cancel reaches the whole process group: the main process saves its checkpoint and
    stops the workers; a worker itself only ends, without a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(device: torch.device, cpus: Optional[int] = None) -> int:
    """Worker processes for the crops: on a GPU all cores but one (up to 8); on a CPU one, which
    overlaps the single-threaded augmentation with the multi-threaded step (none on one core)."""
    cpus = usable_cpus() if cpus is None else cpus
    if device.type == "cuda":
        return max(1, min(8, cpus - 1))
    return 1 if cpus >= 2 else 0


def batch_stream(
    cases: List[PreparedCase],
    patch_zyx: Sequence[int],
    classes: int,
    batch_size: int,
    seed: int,
    workers: int,
    pin_memory: bool = False,
    start_method: Optional[str] = None,
    foreground_fraction: float = FOREGROUND_FRACTION,
    flip_axes: Sequence[int] = ALL_AXES,
    slabs: Optional[SlabCrops] = None,
    phases: Optional[ContrastPhases] = None,
) -> Iterator[Batch]:
    """The training batches: made in ``workers`` processes, or in this one when ``workers`` is 0.
    ``start_method``: how the workers start (default: the platform's; macOS and Windows spawn them)."""
    if workers <= 0:
        return batches(cases, patch_zyx, classes, batch_size, seed, foreground_fraction, flip_axes, slabs, phases)
    loader = torch.utils.data.DataLoader(
        CropBatches(cases, patch_zyx, classes, batch_size, seed, foreground_fraction, flip_axes, slabs, phases),
        batch_size=None,  # each item is already a batch
        num_workers=workers,
        worker_init_fn=_worker_signals,
        pin_memory=pin_memory,
        prefetch_factor=2,
        multiprocessing_context=start_method,
    )
    return iter(loader)
