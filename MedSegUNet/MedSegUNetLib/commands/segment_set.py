"""Several bundles as one (``segment IN -m A -m B ...``): the input is read once, each model predicts on
its own network grid, and their labels are merged into one output.

- Read once: a single plain integer ``.nii.gz``/``.nrrd`` is streamed, each slice handed to every
  model's resampler as it is read (segment.stream_network_inputs); anything else is read whole once and
  each model resamples that one in-memory image (segment.preprocess). Each model's network input is
  therefore exactly the one a single-model ``segment`` makes.
- Labels: renumbered 1, 2, ... in the order the models are given, each model's labels in its own value
  order; names, colors and terminology kept. Two models naming the same structure (ignoring case) are
  refused before anything is read.
- Overlap: the first model given keeps a voxel; a later model labels only voxels that all earlier
  models left as background.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.commands.segment import (
    SegmentOptions,
    labels_on_input_grid,
    preprocess,
    read_whole,
    stream_network_inputs,
)
from MedSegUNetLib.core.atomic import check_writable
from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.geometry import Grid
from MedSegUNetLib.core.labels import Label
from MedSegUNetLib.core.progress import Progress
from MedSegUNetLib.imageio.images import check_output_type, write_segmentation
from MedSegUNetLib.model.bundle import Bundle, BundleMeta, load_bundle, read_bundle_metadata
from MedSegUNetLib.model.model_set import check_distinct_structures
from MedSegUNetLib.prediction.inference import network_precision, select_device
from MedSegUNetLib.prediction.preprocessing import NetworkInput


@dataclass
class MergedLabels:
    """The output's labels, and per model the table from its label values to the output's."""

    labels: List[Label]
    tables: List[np.ndarray]


def merged_labels(metas: Sequence[BundleMeta], paths: Sequence[Path]) -> MergedLabels:
    """Values 1, 2, ... in model order; a structure two models name is refused, naming both."""
    check_distinct_structures(metas, paths)
    labels: List[Label] = []
    tables: List[np.ndarray] = []
    for meta in metas:
        table = np.zeros(max((label.value for label in meta.labels), default=0) + 1, dtype=np.uint16)
        for label in sorted(meta.labels, key=lambda label: label.value):
            labels.append(Label(len(labels) + 1, label.name, label.color, label.terminology))
            table[label.value] = len(labels)
        tables.append(table)
    return MergedLabels(labels, tables)


def merge_first_wins(merged: Optional[np.ndarray], labels: sitk.Image, table: np.ndarray) -> np.ndarray:
    """``labels`` (one model's values) through ``table`` into ``merged`` where it is still background."""
    values = table[sitk.GetArrayViewFromImage(labels)]
    if merged is None:
        return values
    free = merged == 0
    merged[free] = values[free]
    return merged


def network_inputs(
    inputs: Sequence[Path], metas: Sequence[BundleMeta], options: SegmentOptions, progress: Progress
) -> Iterator[Tuple[NetworkInput, Grid]]:
    """Each model's network input in turn, the files read once (see the module's docstring)."""
    if len(inputs) == 1 and all(len(meta.channels) == 1 for meta in metas):
        streamed = stream_network_inputs(inputs[0], metas, options, progress)
        if streamed is not None:
            on_grids, input_grid = streamed
            while on_grids:
                yield on_grids.pop(0), input_grid  # each released once predicted
            return
    channels = read_whole(inputs, options, progress)
    for meta in metas:
        yield preprocess(channels, meta, options, progress)


class ModelProgress(Progress):
    """Every update of one model's run says which model it is (``model 2/3 NAME: ...``)."""

    def __init__(self, progress: Progress, index: int, count: int, name: str):
        self.progress, self.prefix = progress, f"model {index}/{count} {name}"

    def update(self, stage: str, done: int, total: int, message: str = "", **extra: Any) -> None:
        self.progress.update(stage, done, total, f"{self.prefix}: {message}" if message else self.prefix, **extra)

    def note(self, message: str) -> None:
        self.progress.note(f"{self.prefix}: {message}")


def check_channels(inputs: Sequence[Path], metas: Sequence[BundleMeta], paths: Sequence[Path]) -> None:
    for path, meta in zip(paths, metas):
        if len(meta.channels) != len(inputs):
            raise MedSegError(
                f"takes {len(meta.channels)} input channel(s) ({', '.join(meta.channels)}), "
                f"{len(inputs)} image(s) were given",
                path,
            )


def run_segment_set(
    inputs: Sequence[Path], bundle_paths: Sequence[Path], output: Path, options: SegmentOptions, progress: Progress
) -> Path:
    """``segment`` with several models: every check that can fail early (the output, each bundle's
    metadata, names shared by two models, channel counts) runs before the input is read."""
    output = Path(output)
    check_writable(output)
    check_output_type(output)
    network_precision(options.predict.precision, select_device(options.predict.device))
    paths = [Path(path) for path in bundle_paths]
    metas = [read_bundle_metadata(path) for path in paths]
    merged_table = merged_labels(metas, paths)
    check_channels(inputs, metas, paths)
    names = ", ".join(path.name for path in paths)
    progress.update("read", 0, len(inputs) + 1, f"{len(paths)} models: {names}")
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsegunet-bundle")
    try:
        loading: List[Future[Bundle]] = [loader.submit(load_bundle, path) for path in paths]
        runs = (  # each bundle taken from the list as its model runs, so that its weights go once it has run
            (network_input, input_grid, loading.pop(0).result())
            for network_input, input_grid in network_inputs(inputs, metas, options, progress)
        )
        image = merged_labels_on_input_grid(runs, paths, merged_table, options, progress)
    finally:
        loader.shutdown(wait=False)
    progress.update("write", 0, 1, str(output))
    write_segmentation(output, image, merged_table.labels)
    progress.update("write", 1, 1, str(output))
    return output


def merged_labels_on_input_grid(
    runs: Iterable[Tuple[NetworkInput, Grid, Bundle]],
    paths: Sequence[Path],
    merged_table: MergedLabels,
    options: SegmentOptions,
    progress: Progress,
) -> sitk.Image:
    """Each model's labels on the input grid, in turn (each network input let go once its model has
    predicted, and the bundle too unless the caller keeps it), merged into one image of the merged labels'
    values."""
    merged: Optional[np.ndarray] = None
    template: Optional[sitk.Image] = None  # the first model's labels: the input's grid
    for index, (network_input, input_grid, bundle) in enumerate(runs):
        model_progress = ModelProgress(progress, index + 1, len(paths), Path(paths[index]).name)
        model_progress.update("predict", 0, 1, bundle.meta.network.cls)
        labels = labels_on_input_grid(network_input, input_grid, bundle, options, model_progress)
        del network_input, bundle
        merged = merge_first_wins(merged, labels, merged_table.tables[index])
        template = template or labels
    assert merged is not None and template is not None
    image = sitk.GetImageFromArray(merged.astype(np.uint8) if len(merged_table.labels) < 256 else merged)
    image.CopyInformation(template)
    return image
