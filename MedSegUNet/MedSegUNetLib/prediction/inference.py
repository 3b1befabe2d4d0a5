"""The prediction loop: device choice, sliding windows with Gaussian blending (stitching.py), mirroring
TTA, fallbacks.

``segment`` and training's validation both call :func:`predict_labels`, so validation Dice measures
exactly what users get.
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.memory import available_memory_bytes
from MedSegUNetLib.core.progress import Progress
from MedSegUNetLib.model.bundle import DEFAULT_OVERLAP
from MedSegUNetLib.prediction.stitching import (
    blended_labels,
    blended_scores,
    class_indices,
    count_windows,
    summed_weights,
)

T = TypeVar("T")


@dataclass
class PredictOptions:
    overlap: float = DEFAULT_OVERLAP
    tta: bool = False
    sw_batch_size: Optional[int] = None  # windows per batch; None: windows_per_batch(device)
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16: see network_precision
    mirror_axes: Optional[Tuple[int, ...]] = None  # (z, y, x) axes TTA may flip (the bundle's); None: all
    windows: str = "monai"  # where the windows go: stitching.PLACEMENTS (the bundle's)
    blend: str = "gaussian"  # how overlapping windows are weighted: "gaussian" or "constant" (the bundle's)
    padding: str = "shrink"  # what pads a volume thinner than the window: BundleMeta.padding (the bundle's)


PRECISIONS = ("auto", "fp32", "bf16")


def network_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The reduced precision the network runs in on ``device``, None for float32.

    auto: fp16 autocast on CUDA (nnU-Net's and MONAI's usual setting), float32 elsewhere. bf16: bf16
    autocast on CUDA; on the CPU a bf16 copy of the network, which oneDNN runs on AVX512-BF16 or AMX
    and PyTorch refuses elsewhere (so it is refused here first, with the reason). On the CPU it pays on
    wide networks (an imported nnU-Net model's) more than on the small shipped one, and labels differ
    slightly from float32 (benchmarks/README.md): an opt-in, never the default.
    Scores are blended in float32 whatever the precision."""
    if precision not in PRECISIONS:
        raise MedSegError(f"unknown precision '{precision}' (use {', '.join(PRECISIONS)})")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.float16
    if device.type == "mps":
        raise MedSegError("--precision bf16 is not supported on Apple's MPS; use auto or fp32")
    if device.type == "cpu" and not cpu_runs_bf16():
        raise MedSegError(
            "--precision bf16 needs a CPU with bf16 instructions oneDNN can use (AVX512-BF16, AMX); use auto or fp32"
        )
    return torch.bfloat16


def cpu_runs_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions on this CPU (PyTorch refuses them without AVX-512 or AVX-NE-CONVERT)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an unavailable explicit choice is an error."""
    cuda = torch.cuda.is_available()
    mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    kind, _, index = name.partition(":")
    if kind == "cuda" and not cuda:
        raise MedSegError(f"--device {name} was asked for, but this torch {torch.__version__} sees no CUDA GPU")
    if name == "mps" and not mps:
        raise MedSegError("--device mps was asked for, but Apple's MPS is not available here")
    if name not in ("cpu", "cuda", "mps") and not (kind == "cuda" and index.isdigit()):
        raise MedSegError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    if index and int(index) >= torch.cuda.device_count():
        raise MedSegError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(name)


def prediction_memory_bytes(shape_czyx: Sequence[int], classes: int, scores_depth: Optional[int] = None) -> int:
    """What the stitched prediction holds at once: the input, the per-class score sums (stitching.py) and
    the argmax's running maximum and indices. ``scores_depth``: the sums are held for that many z slices
    only (labels decided row by row: ``blended_labels``), else for the whole grid."""
    voxels = int(np.prod(shape_czyx[1:], dtype=np.int64))
    depth = shape_czyx[1] if scores_depth is None else min(scores_depth, shape_czyx[1])
    held = voxels // max(shape_czyx[1], 1) * depth
    return voxels * (4 * shape_czyx[0] + 1) + held * (4 * classes + 4)


def check_memory(
    shape_czyx: Sequence[int], classes: int, available: Optional[int] = None, scores_depth: Optional[int] = None
) -> None:
    """Refuse up front, with the estimate, a volume that would not fit (instead of swapping for an hour)."""
    available = available_memory_bytes() if available is None else available
    needed = prediction_memory_bytes(shape_czyx, classes, scores_depth)
    if available is not None and needed > 0.9 * available:
        raise MedSegError(
            f"the volume needs about {needed / 2**30:.1f} GiB of memory at the model's spacing "
            f"({'x'.join(map(str, shape_czyx[1:][::-1]))} voxels, {classes} classes), "
            f"{available / 2**30:.1f} GiB are available"
        )


def windows_per_batch(device: torch.device) -> int:
    """Windows predicted at once by default: one on a CPU whose convolutions the CPU copy runs on oneDNN
    directly (as fast per window as two, in half the activation memory: cpu_network.py), else two."""
    if device.type == "cpu":
        from MedSegUNetLib.model.cpu_network import direct_convolutions_available

        return 1 if direct_convolutions_available() else 2
    return 2


def output_classes(network: torch.nn.Module) -> int:
    """The classes a network scores (its ``out_channels``; 2 for a network that does not say)."""
    return int(getattr(network, "out_channels", 0) or 2)


def mirror_axes(spatial_dims: int = 3, allowed: Optional[Sequence[int]] = None) -> List[Tuple[int, ...]]:
    """Every subset of the spatial axes of a (B, C, Z, Y, X) tensor (the 8 mirrorings in 3D), or of the
    ``allowed`` ones (0 = z) when given, as nnU-Net mirrors a model along its allowed axes only."""
    axes = [2 + a for a in (range(spatial_dims) if allowed is None else sorted(set(allowed)))]
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


def prepare_network(
    network: torch.nn.Module, device: torch.device, dtype: Optional[torch.dtype] = None
) -> torch.nn.Module:
    """The network in evaluation mode on ``device``, laid out as that device runs it fastest; on the
    CPU a copy in ``dtype`` when given (elsewhere reduced precision is autocast: :func:`_autocast`)."""
    network.eval()
    if device.type == "cpu":
        from MedSegUNetLib.model.cpu_network import ChannelsLast, for_cpu

        if isinstance(network, ChannelsLast) and network.dtype == (dtype or torch.float32):
            return network  # prepared already (network_for): no second copy of the weights
        return for_cpu(network, dtype or torch.float32)
    return network.to(device)


def network_for(network: torch.nn.Module, options: PredictOptions) -> torch.nn.Module:
    """The network prepared once as ``options`` run it, for a caller that keeps only this copy (a segment
    run, a waiting engine): every prediction then uses it as it is, and the original's weights can go."""
    device = select_device(options.device)
    return prepare_network(network, device, network_precision(options.precision, device))


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager[object]:
    if dtype is None or device.type == "cpu":  # the CPU copy is itself in dtype
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class WindowPredictor:
    """The network's scores (logits) for a batch of windows, averaged over mirrorings when TTA is on.

    Logits, not probabilities, are blended across windows and mirrorings, as nnU-Net does and as
    MONAI's ``sliding_window_inference`` does with a bare network (stitching.py blends them with its
    weights): the argmax is taken once, at the end,
    and no softmax pass over every window is needed (on the CPU that pass cost 4% of a whole segment)."""

    def __init__(
        self,
        network: torch.nn.Module,
        tta: bool,
        on_windows: Callable[[int], None],
        allowed: Optional[Sequence[int]] = None,
    ):
        self.network = network
        self.flips = mirror_axes(allowed=allowed) if tta else [()]
        self.on_windows = on_windows

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        scores: Optional[torch.Tensor] = None
        for axes in self.flips:
            batch = torch.flip(windows, axes) if axes else windows
            output = self.network(batch).float()
            output = torch.flip(output, axes) if axes else output
            scores = output if scores is None else scores + output
        assert scores is not None  # self.flips is never empty: () is the unmirrored pass
        self.on_windows(windows.shape[0])
        return scores / len(self.flips) if len(self.flips) > 1 else scores


def _sliding_window(
    network: torch.nn.Module,
    array: np.ndarray,
    patch_size_zyx: Sequence[int],
    options: PredictOptions,
    device: torch.device,
    batch_size: int,
    progress: Progress,
    mean_scores: bool = False,
) -> np.ndarray:
    """Class index per voxel of a (C, Z, Y, X) array, on ``device``; with ``mean_scores`` the windows'
    weighted mean scores (classes, Z, Y, X) instead."""
    total = count_windows(array.shape[1:], patch_size_zyx, options.overlap)
    done = 0
    classes = output_classes(network)
    stitch_on = stitching_device(device, array.shape, classes)

    def advance(count: int) -> None:
        nonlocal done
        done = min(done + count, total)
        progress.update("predict", done, total, f"window {done}/{total} on {device.type}")

    dtype = network_precision(options.precision, device)
    predictor = WindowPredictor(prepare_network(network, device, dtype), options.tta, advance, options.mirror_axes)
    window_xyz = "x".join(str(n) for n in reversed(list(patch_size_zyx)))
    progress.update("predict", 0, total, f"{total} windows of {window_xyz} voxels on {device.type}")
    with torch.inference_mode(), _autocast(device, dtype):
        volume = torch.from_numpy(array).to(stitch_on)
        declared = getattr(network, "out_channels", None)  # None: sized from the first window's scores
        fill = 0.0 if options.padding == "zero" else float(array.min())  # the shrunk window's fill: air on a CT
        mode = "replicate" if options.padding == "replicate" else "constant"
        overlap = options.overlap
        if not mean_scores and declared is not None:
            labels = blended_labels(predictor, volume, patch_size_zyx, declared, overlap, batch_size, device, fill,
                                    options.windows, options.blend, mode)  # fmt: skip
            return labels.cpu().numpy()
        scores = blended_scores(predictor, volume, patch_size_zyx, declared, overlap, batch_size, device, fill,
                                options.windows, options.blend, mode)  # fmt: skip
        if mean_scores:
            weights = summed_weights(array.shape[1:], patch_size_zyx, overlap, options.windows, options.blend)
            scores = scores.cpu()
            scores /= weights  # in place: no second scores-sized array
            return scores.numpy()
        return class_indices(scores).cpu().numpy()


def stitching_device(device: torch.device, shape_czyx: Sequence[int], classes: int) -> torch.device:
    """Where the windows are blended: on a CUDA GPU when the whole blend fits in half its free memory
    (then no window's scores travel back to the CPU, and the argmax runs there too), else the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if prediction_memory_bytes(shape_czyx, classes) < free / 2 else torch.device("cpu")


def with_memory_fallback(
    run: Callable[[torch.device, int], T], device: torch.device, batch_size: int, progress: Progress
) -> T:
    """Run ``run(device, batch)``; on CUDA out-of-memory halve the batch, then fall back to the CPU."""
    while True:
        try:
            return run(device, batch_size)
        except torch.cuda.OutOfMemoryError:
            if device.type != "cuda":
                raise MedSegError("out of memory while predicting") from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if batch_size > 1:
                batch_size //= 2
                progress.note(f"CUDA out of memory: retrying with {batch_size} window(s) per batch")
            else:
                device = torch.device("cpu")
                progress.note("CUDA out of memory with 1 window per batch: falling back to the CPU")


def predict_labels(
    network: torch.nn.Module,
    array: np.ndarray,
    patch_size_zyx: Sequence[int],
    options: PredictOptions,
    progress: Progress,
) -> np.ndarray:
    """Class indices (0 = background) for a (C, Z, Y, X) float32 array, as a (Z, Y, X) array."""
    return _predict(network, array, patch_size_zyx, options, progress, mean_scores=False)


def predict_scores(
    network: torch.nn.Module,
    array: np.ndarray,
    patch_size_zyx: Sequence[int],
    options: PredictOptions,
    progress: Progress,
) -> np.ndarray:
    """The windows' blended mean scores (logits; the bundle's blending), (classes, Z, Y, X) float32: for a
    bundle whose labels are taken after the scores are resampled to the input grid (an imported model)."""
    return _predict(network, array, patch_size_zyx, options, progress, mean_scores=True)


def _predict(
    network: torch.nn.Module,
    array: np.ndarray,
    patch_size_zyx: Sequence[int],
    options: PredictOptions,
    progress: Progress,
    mean_scores: bool,
) -> np.ndarray:
    device = select_device(options.device)
    check_memory(array.shape, output_classes(network), scores_depth=None if mean_scores else patch_size_zyx[0])
    network.eval()

    def run(run_device: torch.device, batch: int) -> np.ndarray:
        return _sliding_window(network, array, patch_size_zyx, options, run_device, batch, progress, mean_scores)

    try:
        return with_memory_fallback(run, device, options.sw_batch_size or windows_per_batch(device), progress)
    finally:
        network.to("cpu")
