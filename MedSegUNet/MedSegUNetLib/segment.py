"""The segment pipeline: read → reorient and resample → normalize → predict → restore → post-process → write."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .atomic import check_writable
from .bundle import Bundle, load_bundle
from .errors import MedSegError
from .geometry import Grid, xyz_to_zyx
from .imageio import check_output_type, read_image, write_segmentation
from .inference import PredictOptions, check_memory, fit_window, predict_labels
from .postprocess import keep_largest_component
from .preprocessing import network_grid_size, prepare_channels, restore_labels
from .progress import Progress

STAGES = ("read", "preprocess", "predict", "restore", "postprocess", "write", "done")


@dataclass
class SegmentOptions:
    predict: PredictOptions = field(default_factory=PredictOptions)
    largest_component: bool = False
    series: Optional[str] = None  # DICOM series UID when a folder holds several


def class_to_value_table(bundle: Bundle) -> np.ndarray:
    """Class index (network output channel) -> label value written in the output."""
    table = np.zeros(len(bundle.meta.labels) + 1, dtype=np.uint16)
    for index, label in enumerate(bundle.meta.labels, start=1):
        table[index] = label.value
    return table


def segment_images(
    channels: Sequence[sitk.Image], bundle: Bundle, options: SegmentOptions, progress: Progress
) -> sitk.Image:
    """The label image (bundle label values) on the first channel's exact grid."""
    meta = bundle.meta
    if len(channels) != len(meta.channels):
        raise MedSegError(
            f"the model takes {len(meta.channels)} input channel(s) ({', '.join(meta.channels)}), "
            f"{len(channels)} image(s) were given"
        )
    input_grid = Grid.of(channels[0])
    # Refused here, with the estimate, rather than after resampling to a fine spacing has filled the memory.
    network_size = network_grid_size(channels[0], meta.preprocessing)
    check_memory((len(channels), *xyz_to_zyx(network_size)), len(meta.labels) + 1)
    progress.update("preprocess", 0, 1, f"to {meta.preprocessing.orientation} at {meta.preprocessing.target_spacing} mm")
    network_input = prepare_channels(channels, meta.preprocessing)
    progress.update("preprocess", 1, 1, f"network grid {network_input.grid.describe()}")
    window = fit_window(xyz_to_zyx(meta.preprocessing.patch_size), network_input.array.shape[1:], meta.network.size_divisor())
    classes = predict_labels(bundle.network, network_input.array, window, options.predict, progress)
    progress.update("restore", 0, 1, "back onto the input grid")
    values = class_to_value_table(bundle)[classes]
    values = values.astype(np.uint8) if values.max(initial=0) < 256 else values
    labels = restore_labels(values, network_input.grid, input_grid)
    progress.update("restore", 1, 1, input_grid.describe())
    if options.largest_component:
        progress.update("postprocess", 0, 1, "keeping the largest component of each label")
        labels = keep_largest_component(labels, [label.value for label in meta.labels])
        progress.update("postprocess", 1, 1, "largest components kept")
    return labels


def run_segment(
    inputs: Sequence[Path], bundle_path: Path, output: Path, options: SegmentOptions, progress: Progress
) -> Path:
    """The whole ``segment`` command: every check that can fail early runs before the long work."""
    output = Path(output)
    check_writable(output)
    check_output_type(output)
    progress.update("read", 0, len(inputs) + 1, f"model {Path(bundle_path).name}")
    bundle = load_bundle(bundle_path)
    channels: List[sitk.Image] = []
    for index, path in enumerate(inputs, start=1):
        loaded = read_image(path, series=options.series)
        for warning in loaded.warnings:
            progress.note(warning)
        channels.append(loaded.image)
        progress.update("read", index, len(inputs) + 1, f"{Path(path).name}: {Grid.of(loaded.image).describe()}")
    for path, channel in zip(inputs[1:], channels[1:]):
        if not _same_physical_box(channels[0], channel):
            progress.note(f"{Path(path).name} is on another grid than {Path(inputs[0]).name}: resampled onto it")
    labels = segment_images(channels, bundle, options, progress)
    progress.update("write", 0, 1, str(output))
    write_segmentation(output, labels, bundle.meta.labels)
    progress.update("write", 1, 1, str(output))
    return output


def _same_physical_box(first: sitk.Image, other: sitk.Image) -> bool:
    return Grid.of(first).matches(Grid.of(other), tolerance=1e-3)
