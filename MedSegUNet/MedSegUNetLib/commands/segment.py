"""The segment pipeline: read → reorient and resample → normalize → predict → restore → post-process → write."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.core.atomic import check_writable
from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.geometry import Grid, xyz_to_zyx
from MedSegUNetLib.core.memory import return_freed_memory
from MedSegUNetLib.core.progress import Progress
from MedSegUNetLib.imageio.images import check_output_type, read_image, stream_image_slices, write_segmentation
from MedSegUNetLib.model.bundle import Bundle, BundleMeta, load_bundle, read_bundle_metadata
from MedSegUNetLib.prediction.inference import (
    PredictOptions,
    check_memory,
    network_for,
    network_precision,
    predict_labels,
    predict_scores,
    select_device,
)
from MedSegUNetLib.prediction.postprocess import keep_largest_component
from MedSegUNetLib.prediction.preprocessing import (
    NetworkInput,
    network_grid,
    network_resampler,
    prepare_channels,
    restore_labels,
    restore_scores,
    stack_network_input,
)
from MedSegUNetLib.prediction.slice_resampling import SliceResampler
from MedSegUNetLib.prediction.stitching import count_windows, fit_window

STAGES = ("read", "preprocess", "predict", "restore", "postprocess", "write", "done")


@dataclass
class SegmentOptions:
    predict: PredictOptions = field(default_factory=PredictOptions)
    largest_component: bool = False
    series: Optional[str] = None  # DICOM series UID when a folder holds several
    # CT models: the network runs only on the box around the body. None: as the bundle says (the engine's own
    # models crop, imported ones see the whole volume as their tools do); True: every CT model; False: none
    crop_to_body: Optional[bool] = None
    overlap_given: bool = True  # False: the bundle's own overlap (BundleMeta.run_overlap) replaces predict.overlap


def class_to_value_table(bundle: Bundle) -> np.ndarray:
    """Class index (network output channel) -> label value written in the output."""
    table = np.zeros(len(bundle.meta.labels) + 1, dtype=np.uint16)
    for index, label in enumerate(bundle.meta.labels, start=1):
        table[index] = label.value
    return table


def predict_in_body(
    bundle: Bundle, network_input: NetworkInput, options: SegmentOptions, progress: Progress
) -> np.ndarray:
    """Class indices on the network grid; outside the body's box (when cropping) background."""
    body = _body_if_it_pays(bundle, network_input, options)
    every_channel_in_body = (slice(None), *body)
    array = network_input.array[every_channel_in_body]  # a view: no copy
    window = _window(bundle, array.shape[1:])
    inside = predict_labels(bundle.network, array, window, _bundle_predict_options(bundle, options), progress)
    if inside.shape == network_input.array.shape[1:]:
        return inside
    classes = np.zeros(network_input.array.shape[1:], dtype=inside.dtype)
    classes[body] = inside
    return classes


def _bundle_predict_options(bundle: Bundle, options: SegmentOptions) -> PredictOptions:
    """The prediction options with what the bundle fixes: window placement and blending, and for an
    imported model the mirroring axes its trainer allowed."""
    predict = replace(
        options.predict, windows=bundle.meta.windows, blend=bundle.meta.blend, padding=bundle.meta.padding
    )
    if not options.overlap_given:
        predict = replace(predict, overlap=bundle.meta.run_overlap)
    if bundle.meta.mirror_axes is not None:
        predict = replace(predict, mirror_axes=bundle.meta.mirror_axes)
    return predict


def _window(bundle: Bundle, shape_zyx: Sequence[int]) -> List[int]:
    """The bundle's patch, shrunk where the volume is thinner unless the model pads to its whole window."""
    patch = xyz_to_zyx(bundle.meta.preprocessing.patch_size)
    if bundle.meta.padding != "shrink":
        return list(patch)
    return fit_window(patch, shape_zyx, bundle.meta.network.size_divisor())


def _body_if_it_pays(bundle: Bundle, network_input: NetworkInput, options: SegmentOptions) -> Tuple[slice, ...]:
    """The body's box when it needs fewer windows than the whole volume, else the whole volume.

    Windows placed differently see other instance-norm statistics and shift the output a little: a crop
    that saves no window would only do that."""
    whole = (slice(None),) * 3
    if not _crops_to_body(bundle.meta, options) or network_input.body is None:
        return whole
    first_channel_in_body = (0, *network_input.body)
    shape, box = network_input.array.shape[1:], network_input.array[first_channel_in_body].shape
    overlap = _bundle_predict_options(bundle, options).overlap
    if count_windows(box, _window(bundle, box), overlap) < count_windows(shape, _window(bundle, shape), overlap):
        return network_input.body
    return whole


def _crops_to_body(meta: BundleMeta, options: SegmentOptions) -> bool:
    return meta.body_crop if options.crop_to_body is None else options.crop_to_body


def _describe_body(network_input: NetworkInput, meta: BundleMeta, options: SegmentOptions) -> str:
    if not _crops_to_body(meta, options) or network_input.body is None:
        return ""
    first_channel_in_body = (0, *network_input.body)
    box = network_input.array[first_channel_in_body].shape[::-1]
    return f", body box {'x'.join(map(str, box))}"


def segment_images(
    channels: Sequence[sitk.Image], bundle: Bundle, options: SegmentOptions, progress: Progress
) -> sitk.Image:
    """The label image (bundle label values) on the first channel's exact grid; the bundle keeps the
    network prepared for it (prepare_bundle)."""
    network_input, input_grid = preprocess(channels, bundle.meta, options, progress)
    return labels_on_input_grid(network_input, input_grid, bundle, options, progress)


def preprocess(
    channels: Sequence[sitk.Image], meta: BundleMeta, options: SegmentOptions, progress: Progress
) -> Tuple[NetworkInput, Grid]:
    """The channels on the network's grid, and the grid the labels go back onto."""
    if len(channels) != len(meta.channels):
        raise MedSegError(
            f"the model takes {len(meta.channels)} input channel(s) ({', '.join(meta.channels)}), "
            f"{len(channels)} image(s) were given"
        )
    input_grid = Grid.of(channels[0])
    _check_network_memory(input_grid, meta, len(channels))
    progress.update(
        "preprocess", 0, 1, f"to {meta.preprocessing.orientation} at {meta.preprocessing.target_spacing} mm"
    )
    network_input = prepare_channels(channels, meta.preprocessing)
    body = _describe_body(network_input, meta, options)
    progress.update("preprocess", 1, 1, f"network grid {network_input.grid.describe()}{body}")
    return network_input, input_grid


def _check_network_memory(input_grid: Grid, meta: BundleMeta, channels: int = 1) -> None:
    """Refused here, with the estimate, rather than after resampling to a fine spacing has filled the memory."""
    network_size = network_grid(input_grid, meta.preprocessing).size
    depth = meta.preprocessing.patch_size[2] if meta.restore == "labels" else None  # labels decided row by row
    check_memory((channels, *xyz_to_zyx(network_size)), len(meta.labels) + 1, scores_depth=depth)


def prepare_bundle(bundle: Bundle, predict: PredictOptions) -> None:
    """The bundle's network replaced by the copy prepared for ``predict`` (a later call finds it prepared),
    and the loaded weights' memory handed back: one copy of the weights while the windows run."""
    prepared = network_for(bundle.network, predict)
    if prepared is not bundle.network:
        bundle.network = prepared
        return_freed_memory()


def labels_on_input_grid(
    network_input: NetworkInput, input_grid: Grid, bundle: Bundle, options: SegmentOptions, progress: Progress
) -> sitk.Image:
    """Predict, then put the labels (as uint8 where they fit, never probabilities) onto the input grid.

    The bundle keeps its network as prepared for the run (prepare_bundle), reused by the next case."""
    meta = bundle.meta
    prepare_bundle(bundle, _bundle_predict_options(bundle, options))
    if meta.restore == "scores":
        labels = _labels_from_scores(network_input, input_grid, bundle, options, progress)
    else:
        classes = predict_in_body(bundle, network_input, options, progress)
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


def _labels_from_scores(
    network_input: NetworkInput, input_grid: Grid, bundle: Bundle, options: SegmentOptions, progress: Progress
) -> sitk.Image:
    """The scores on the network grid (the body's box when cropping: background beyond it), resampled onto
    the input grid, then the argmax (nnU-Net's way)."""
    body = _body_if_it_pays(bundle, network_input, options)
    every_channel_in_body = (slice(None), *body)
    array = network_input.array[every_channel_in_body]  # a view: no copy
    scores = predict_scores(
        bundle.network, array, _window(bundle, array.shape[1:]), _bundle_predict_options(bundle, options), progress
    )
    del array
    cropped = scores.shape[1:] != network_input.array.shape[1:]
    grid = network_input.grid
    if cropped:
        start_zyx = [axis.indices(size)[0] for axis, size in zip(body, network_input.array.shape[1:])]
        grid = grid.sub_grid(start_zyx[::-1], scores.shape[1:][::-1])
    progress.update("restore", 0, 1, "scores back onto the input grid")
    table = class_to_value_table(bundle)
    values = table.astype(np.uint8) if table.max() < 256 else table
    return restore_scores(scores, grid, input_grid, values, background_outside=cropped)


def run_segment(
    inputs: Sequence[Path],
    bundle_path: Path,
    output: Path,
    options: SegmentOptions,
    progress: Progress,
    preloaded: Optional[Bundle] = None,
) -> Path:
    """The whole ``segment`` command: every check that can fail early runs before the long work.

    ``preloaded``: the bundle at ``bundle_path``, already loaded (the standby engine's)."""
    output = Path(output)
    check_writable(output)
    check_output_type(output)
    network_precision(options.predict.precision, select_device(options.predict.device))  # refused before any reading
    progress.update("read", 0, len(inputs) + 1, f"model {Path(bundle_path).name}")
    if preloaded is not None:
        network_input, input_grid = read_network_input(inputs, preloaded.meta, options, progress)
        bundle = preloaded
    else:
        network_input, input_grid, bundle = _read_while_loading(inputs, bundle_path, options, progress)
    progress.update(
        "read", len(inputs) + 1, len(inputs) + 1, f"model {Path(bundle_path).name}: {bundle.meta.network.cls}"
    )
    labels = labels_on_input_grid(network_input, input_grid, bundle, options, progress)
    progress.update("write", 0, 1, str(output))
    write_segmentation(output, labels, bundle.meta.labels)
    progress.update("write", 1, 1, str(output))
    return output


def _read_while_loading(
    inputs: Sequence[Path], bundle_path: Path, options: SegmentOptions, progress: Progress
) -> Tuple[NetworkInput, Grid, Bundle]:
    """The inputs on the network grid and the bundle, the weights loading in a thread meanwhile."""
    meta = read_bundle_metadata(bundle_path)  # a bad bundle (a pickle, bad metadata) fails before any image is read
    # Building the network imports MONAI (seconds from a cold start), and reading is mostly out of Python's
    # lock (inflating, copying, the kernel's fresh pages).
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsegunet-bundle")
    try:
        loading = loader.submit(load_bundle, bundle_path)
        network_input, input_grid = read_network_input(inputs, meta, options, progress)
        return network_input, input_grid, loading.result()
    finally:
        loader.shutdown(wait=False)  # a bad image is reported at once, not after the weights have loaded


def read_network_input(
    inputs: Sequence[Path], meta: BundleMeta, options: SegmentOptions, progress: Progress
) -> Tuple[NetworkInput, Grid]:
    """The inputs on the network's grid, and the grid the labels go back onto.

    A single plain ``.nii.gz`` (the usual CT) is resampled slice by slice while it inflates, never held
    at full resolution (:func:`stream_network_inputs`); anything else is read whole, then resampled."""
    streamed = (
        stream_network_inputs(inputs[0], [meta], options, progress) if len(inputs) == 1 == len(meta.channels) else None
    )
    if streamed is not None:
        return streamed[0][0], streamed[1]
    return preprocess(read_whole(inputs, options, progress), meta, options, progress)


def read_whole(inputs: Sequence[Path], options: SegmentOptions, progress: Progress) -> List[sitk.Image]:
    """The input channels read whole; one on another grid than the first is said to be resampled onto it."""
    channels = read_channels(inputs, options, progress)
    for path, channel in zip(inputs[1:], channels[1:]):
        if not _same_physical_box(channels[0], channel):
            progress.note(f"{Path(path).name} is on another grid than {Path(inputs[0]).name}: resampled onto it")
    return channels


def stream_network_inputs(
    path: Path, metas: Sequence[BundleMeta], options: SegmentOptions, progress: Progress
) -> Optional[Tuple[List[NetworkInput], Grid]]:
    """One input resampled onto each model's network grid as it is read (imageio.stream_image_slices):
    every slice goes to every model's resampler, so the file is read once for all. None where the file is
    not read that way."""
    made: List[Tuple[SliceResampler, Grid]] = []  # made once the header is read

    def start(input_grid: Grid) -> Callable[[np.ndarray], None]:
        for meta in metas:
            _check_network_memory(input_grid, meta)
        progress.update("read", 0, 2, f"{Path(path).name}: {input_grid.describe()}, to the network grid as it is read")
        made.extend(network_resampler(input_grid, meta.preprocessing) for meta in metas)
        if len(made) == 1:
            return made[0][0].add
        adders = [resampler.add for resampler, _ in made]

        def add_to_each(slice_yx: np.ndarray) -> None:
            for add in adders:
                add(slice_yx)

        return add_to_each

    input_grid = stream_image_slices(path, start)
    if input_grid is None:
        return None
    progress.update("read", 1, 2, f"{Path(path).name}: {input_grid.describe()}")
    on_grids = []
    for meta, (resampler, grid) in zip(metas, made):
        progress.update(
            "preprocess",
            0,
            1,
            f"resampled to {meta.preprocessing.orientation} at {meta.preprocessing.target_spacing} mm while read",
        )
        on_grid = stack_network_input([resampler.result()], grid, meta.preprocessing)
        progress.update("preprocess", 1, 1, f"network grid {grid.describe()}{_describe_body(on_grid, meta, options)}")
        on_grids.append(on_grid)
    return on_grids, input_grid


def read_channels(inputs: Sequence[Path], options: SegmentOptions, progress: Progress) -> List[sitk.Image]:
    channels: List[sitk.Image] = []
    for index, path in enumerate(inputs, start=1):
        loaded = read_image(path, series=options.series)
        for warning in loaded.warnings:
            progress.note(warning)
        channels.append(loaded.image)
        progress.update("read", index, len(inputs) + 1, f"{Path(path).name}: {Grid.of(loaded.image).describe()}")
    return channels


def _same_physical_box(first: sitk.Image, other: sitk.Image) -> bool:
    return Grid.of(first).matches(Grid.of(other), tolerance=1e-3)
