"""The model bundle: one safetensors file that carries everything needed to segment.

Layout: a standard safetensors file. Its tensors are the network's ``state_dict``; its
``__metadata__["medsegunet"]`` is a JSON document (:class:`BundleMeta`) with the network class and
arguments, the labels, the input channels, the preprocessing and the provenance.

Why safetensors: loading never unpickles anything, so a bundle from a stranger cannot run code, and
the metadata can be read without torch (the Slicer panel does so at start-up).

Every reader and writer of bundles (the CLI, the Slicer module, training) goes through this module.
torch and safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

import datetime
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from MedSegUNetLib import __version__
from MedSegUNetLib.core.atomic import atomic_path
from MedSegUNetLib.core.errors import MedSegError, PathLike
from MedSegUNetLib.core.labels import Label
from MedSegUNetLib.model.network import NetworkSpec, TorchModule

FORMAT = "medsegunet-bundle"
FORMAT_VERSION = 2  # 2: padding, rescale_to and the grid rule, which version 1 readers would ignore
METADATA_KEY = "medsegunet"
BUNDLE_SUFFIX = ".safetensors"
_MAX_HEADER_BYTES = 64 * 1024 * 1024

# safetensors dtype names -> torch dtype names, for checking a header before loading any weights
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64"}


NORMALIZATIONS = ("ct", "zscore", "none", "rescale")
# BundleMeta.blend: the weights of overlapping windows (MONAI's importance-map modes)
BLENDS = ("gaussian", "constant")
# BundleMeta.padding: along an axis thinner than the window, shrink the window or pad to it (with 0, or the edge)
PADDINGS = ("shrink", "zero", "replicate")
# Preprocessing.grid: how the network grid lies over the image (core.geometry.resampled_grid's rules)
GRID_RULES = ("box", "centres")
# Preprocessing.orientation for a model that keeps each image's own axes (nnU-Net), permuted by ``transpose``
IMAGE_AXES = "image"
# The sliding-window overlap of a bundle that names none of its own
DEFAULT_OVERLAP = 0.5


@dataclass
class Normalization:
    """Intensity normalization.

    ``ct``: clip to ``clip`` (HU), then subtract ``mean`` and divide by ``std`` when given (nnU-Net's
    CT scheme), else scale the clip window to 0..1. ``zscore``: per image mean and std (MRI), over
    the non-zero voxels when ``nonzero``. ``none`` and ``rescale`` (the image's minimum..maximum to 0..1)
    are nnU-Net's NoNormalization and RescaleTo01Normalization, for imported models. ``rescale_to``: then
    the image's minimum..maximum to this range (MONAI's ScaleIntensity after another intensity transform).
    """

    kind: str = "ct"
    clip: Optional[Tuple[float, float]] = (-1000.0, 1000.0)
    mean: Optional[float] = None
    std: Optional[float] = None
    nonzero: bool = False
    rescale_to: Optional[Tuple[float, float]] = None

    def __post_init__(self) -> None:
        if self.kind not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization '{self.kind}' (known: {', '.join(NORMALIZATIONS)})")
        if self.kind == "ct" and (self.clip is None or float(self.clip[0]) >= float(self.clip[1])):
            raise ValueError(f"ct normalization needs a clip window low < high, not {self.clip}")
        if self.std is not None and float(self.std) <= 0:
            raise ValueError("normalization std must be positive")
        if self.clip is not None:
            self.clip = (float(self.clip[0]), float(self.clip[1]))
        if self.rescale_to is not None:
            self.rescale_to = (float(self.rescale_to[0]), float(self.rescale_to[1]))


@dataclass
class Preprocessing:
    """How an image is brought to the network: all sizes in (x, y, z) order of the network's grid.

    ``orientation`` is a code (the image is reoriented to it) or :data:`IMAGE_AXES`: the image keeps its
    own array axes, permuted by ``transpose`` (nnU-Net's ``transpose_forward``, in (z, y, x) array order)."""

    target_spacing: Tuple[float, float, float]
    patch_size: Tuple[int, int, int]
    orientation: str = "RAS"
    normalization: Normalization = field(default_factory=Normalization)
    transpose: Tuple[int, int, int] = (0, 1, 2)
    # How the network grid lies over the image: one of GRID_RULES ("centres": MONAI's Spacing)
    grid: str = "box"

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.orientation != IMAGE_AXES:
            del data["transpose"]  # bundles that reorient are written as before
        if self.grid == "box":
            del data["grid"]  # and so are bundles on the box grid (version 1 readers)
        if self.normalization.rescale_to is None:
            del data["normalization"]["rescale_to"]  # and so are those that do not rescale (version 1 readers)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        spacing = tuple(float(s) for s in data["target_spacing"])
        patch = tuple(int(p) for p in data["patch_size"])
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"bad target_spacing {data['target_spacing']}")
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"bad patch_size {data['patch_size']}")
        orientation = str(data.get("orientation", "RAS"))
        orientation = orientation if orientation == IMAGE_AXES else orientation.upper()
        if orientation != IMAGE_AXES and not _is_orientation_code(orientation):
            raise ValueError(f"bad orientation '{orientation}'")
        i, j, k = (int(a) for a in data.get("transpose", (0, 1, 2)))
        if sorted((i, j, k)) != [0, 1, 2]:
            raise ValueError(f"bad transpose {data.get('transpose')}")
        grid = str(data.get("grid", "box"))
        if grid not in GRID_RULES:
            raise ValueError(f"bad grid rule '{grid}' (known: {', '.join(GRID_RULES)})")
        return cls(spacing, patch, orientation, Normalization(**data.get("normalization", {})), (i, j, k), grid)


def _is_orientation_code(code: str) -> bool:
    pairs = [set("LR"), set("AP"), set("IS")]
    return len(code) == 3 and all(sum(c in pair for c in code) == 1 for pair in pairs)


@dataclass
class BundleMeta:
    """Everything in a bundle but the weights."""

    network: NetworkSpec
    labels: List[Label]
    channels: List[str]
    preprocessing: Preprocessing
    provenance: Dict[str, Any] = field(default_factory=dict)
    name: str = "model"
    # The (z, y, x) network-array axes that test-time mirroring may flip; None: all three.
    mirror_axes: Optional[Tuple[int, ...]] = None
    # "nnunet": windows spread as nnU-Net's predictor spreads them
    windows: str = "monai"
    # "scores": the class scores are resampled to the input grid before the argmax (nnU-Net's way); "labels":
    # the argmax on the network grid, the labels put back by nearest neighbour (faster, less memory)
    restore: str = "labels"
    # How the windows' scores are weighted where they overlap: "gaussian" (nnU-Net's and the engine's own) or
    # "constant" (MONAI's SlidingWindowInferer default, for an imported MONAI bundle that keeps it)
    blend: str = "gaussian"
    # False: the network always sees the whole volume, as the tool an imported model comes from runs it (a
    # CT model of our own runs only on the box around the body, which changes instance-norm statistics)
    body_crop: bool = True
    # The sliding-window overlap the model's own tool runs it with; segment uses it unless --overlap is given
    overlap: Optional[float] = None
    # Along an axis thinner than the window: "shrink" the window to the volume (the engine's own models);
    # or keep the window and pad with "zero" (nnU-Net's predictor, MONAI's constant) or "replicate" the edge
    padding: str = "shrink"

    @property
    def run_overlap(self) -> float:
        """The overlap segment runs this model with when none is given."""
        return DEFAULT_OVERLAP if self.overlap is None else self.overlap

    def validate(self) -> None:
        if not self.labels:
            raise ValueError("a bundle needs at least one label")
        values = [label.value for label in self.labels]
        if len(set(values)) != len(values) or min(values) < 1 or max(values) > 65535:
            raise ValueError(f"label values must be unique and in 1..65535, not {values}")
        names = [label.name.strip().lower() for label in self.labels]
        if len(set(names)) != len(names):
            raise ValueError("label names must be unique")
        if self.network.out_channels != len(self.labels) + 1:
            raise ValueError(
                f"the network has {self.network.out_channels} outputs for {len(self.labels)} labels + background"
            )
        if self.network.in_channels != len(self.channels):
            raise ValueError(f"the network takes {self.network.in_channels} channels, {len(self.channels)} are named")
        divisor = self.network.size_divisor()
        patch_zyx = self.preprocessing.patch_size[::-1]
        if any(p % d for p, d in zip(patch_zyx, divisor)):
            raise ValueError(f"patch size {self.preprocessing.patch_size} is not a multiple of the network's strides")
        if self.restore not in ("labels", "scores"):
            raise ValueError(f"unknown restore '{self.restore}' (known: labels, scores)")
        if self.windows not in ("monai", "nnunet"):
            raise ValueError(f"unknown window placement '{self.windows}' (known: monai, nnunet)")
        if self.blend not in BLENDS:
            raise ValueError(f"unknown window blending '{self.blend}' (known: {', '.join(BLENDS)})")
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding '{self.padding}' (known: {', '.join(PADDINGS)})")
        if self.overlap is not None and not 0.0 <= self.overlap <= 0.95:
            raise ValueError(f"the overlap must be between 0 and 0.95, not {self.overlap}")
        if self.mirror_axes is not None and not set(self.mirror_axes) <= {0, 1, 2}:
            raise ValueError(f"mirror axes must be among 0, 1, 2, not {list(self.mirror_axes)}")

    def _format_version(self) -> int:
        """The oldest format that holds everything this bundle uses (older readers can still read the rest)."""
        prep = self.preprocessing
        uses_two = self.padding != "shrink" or prep.normalization.rescale_to is not None or prep.grid != "box"
        return 2 if uses_two else 1

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "format_version": self._format_version(),
            "name": self.name,
            "network": self.network.to_dict(),
            "labels": [asdict(label) for label in self.labels],
            "channels": list(self.channels),
            "preprocessing": self.preprocessing.to_dict(),
            "provenance": self.provenance,
        }
        if self.mirror_axes is not None:
            data["mirror_axes"] = list(self.mirror_axes)
        if self.windows != "monai":
            data["windows"] = self.windows
        if self.restore != "labels":
            data["restore"] = self.restore
        if self.blend != "gaussian":
            data["blend"] = self.blend
        if not self.body_crop:
            data["body_crop"] = False
        if self.overlap is not None:
            data["overlap"] = self.overlap
        if self.padding != "shrink":
            data["padding"] = self.padding
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "BundleMeta":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("the metadata is not a MedSegUNet bundle description")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"bundle format version {data['format_version']} is newer than this MedSegUNet understands "
                f"({FORMAT_VERSION}); update MedSegUNet"
            )
        meta = cls(
            network=NetworkSpec.from_dict(data["network"]),
            labels=[Label.from_dict(label) for label in data["labels"]],
            channels=[str(c) for c in data["channels"]],
            preprocessing=Preprocessing.from_dict(data["preprocessing"]),
            provenance=dict(data.get("provenance", {})),
            name=str(data.get("name", "model")),
            mirror_axes=None if data.get("mirror_axes") is None else tuple(int(a) for a in data["mirror_axes"]),
            windows=str(data.get("windows", "monai")),
            restore=str(data.get("restore", "labels")),
            blend=str(data.get("blend", "gaussian")),
            body_crop=data.get("body_crop", True) is not False,
            overlap=None if data.get("overlap") is None else float(data["overlap"]),
            padding=str(data.get("padding", "shrink")),
        )
        meta.validate()
        return meta


@dataclass
class Bundle:
    """A loaded bundle: its description and a ready ``torch.nn.Module`` in eval mode (on the CPU)."""

    meta: BundleMeta
    network: TorchModule
    path: Optional[Path] = None


# --- reading ---------------------------------------------------------------------------------------


def _read_header(path: Path) -> Tuple[dict, int]:
    """The safetensors JSON header and its length, after checks that say what the file is instead."""
    if not path.exists():
        raise MedSegError("bundle file not found", path)
    if path.is_dir():
        raise MedSegError("is a folder, not a bundle file", path)
    size = path.stat().st_size
    with open(path, "rb") as stream:
        head = stream.read(9)
        # A safetensors header is JSON right after its 8-byte length; only then can a leading 0x80
        # (a header length of 128 mod 256) be told apart from the pickle protocol marker.
        looks_safetensors = head[8:9] == b"{"
        if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
            raise MedSegError(
                "is a PyTorch pickle/zip checkpoint; MedSegUNet bundles are safetensors files and pickles are "
                "never loaded (they can run code)",
                path,
            )
        if len(head) < 8:
            raise MedSegError("is empty or truncated, not a MedSegUNet bundle", path)
        (header_length,) = struct.unpack("<Q", head[:8])
        if header_length > min(_MAX_HEADER_BYTES, size - 8):
            raise MedSegError("is not a safetensors bundle (bad header length)", path)
        stream.seek(8)
        raw = stream.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MedSegError("is not a safetensors bundle (unreadable header)", path) from None
    if not isinstance(header, dict):
        raise MedSegError("is not a safetensors bundle (bad header)", path)
    return header, header_length


def read_bundle_metadata(path: PathLike) -> BundleMeta:
    """The bundle's description, read without torch and without touching the weights."""
    path = Path(path)
    header, _ = _read_header(path)
    metadata = header.get("__metadata__") or {}
    if METADATA_KEY not in metadata:
        raise MedSegError("is a safetensors file but not a MedSegUNet bundle (no 'medsegunet' metadata)", path)
    try:
        return BundleMeta.from_json(metadata[METADATA_KEY])
    except (ValueError, KeyError, TypeError) as error:
        raise MedSegError(f"bundle metadata is invalid: {error}", path) from None


def _weight_groups(network: TorchModule) -> List[List[str]]:
    """State-dict names grouped by shared storage (DynUNet registers each block under two names)."""
    groups: Dict[Tuple[int, int], List[str]] = {}
    for name, tensor in network.state_dict().items():
        key = (tensor.data_ptr(), tensor.numel()) if tensor.numel() else (id(tensor), 0)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _check_tensors_against_network(path: Path, header: dict, network: TorchModule) -> None:
    """Compare names, shapes and dtypes in the header with the network before reading weights."""
    expected = network.state_dict()
    stored = {name: info for name, info in header.items() if name != "__metadata__"}
    unexpected = sorted(set(stored) - set(expected))
    missing = [group[0] for group in _weight_groups(network) if not any(name in stored for name in group)]
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise MedSegError(f"weights do not match the declared network ({detail})", path)
    for name, info in stored.items():
        if not isinstance(info, dict):
            raise MedSegError(f"weight '{name}' has a malformed header entry", path)
        shape = tuple(info.get("shape", ()))
        if shape != tuple(expected[name].shape):
            raise MedSegError(
                f"weight '{name}' has shape {list(shape)}, the declared network wants {list(expected[name].shape)}",
                path,
            )
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or _DTYPES.get(dtype) != str(expected[name].dtype).replace("torch.", ""):
            raise MedSegError(f"weight '{name}' has dtype {dtype}, expected {expected[name].dtype}", path)


def load_bundle(path: PathLike) -> Bundle:
    """Read a bundle: description, network built from it, weights checked and loaded. Never unpickles."""
    from safetensors.torch import load_model

    from MedSegUNetLib.model.network import build_network

    path = Path(path)
    meta = read_bundle_metadata(path)
    header, _ = _read_header(path)
    try:
        network = build_network(meta.network)
    except Exception as error:  # arguments from an untrusted file: MONAI may raise anything
        raise MedSegError(f"cannot build the bundle's network {meta.network.cls}: {error}", path) from None
    _check_tensors_against_network(path, header, network)
    try:
        # load_model understands the shared (aliased) weights that save_model stored once.
        load_model(network, str(path), strict=True, device="cpu")
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise MedSegError(f"weights are unreadable ({type(error).__name__}: {error})", path) from None
    network.eval()
    return Bundle(meta, network, path)


# --- writing ---------------------------------------------------------------------------------------


def save_bundle(path: PathLike, meta: BundleMeta, network: TorchModule) -> Path:
    """Write ``meta`` and the network's weights atomically (a temporary file renamed on success)."""
    from safetensors.torch import save_model

    meta.validate()
    path = Path(path)
    try:
        with atomic_path(path) as temporary:
            # save_model stores weights that DynUNet registers under two names only once.
            save_model(network, str(temporary), metadata={METADATA_KEY: meta.to_json()})
    except MedSegError:
        raise
    except Exception as error:  # safetensors' own error type for I/O failures (disk full, folder removed)
        raise MedSegError(f"could not write the bundle ({error}); any previous file is unchanged", path) from None
    return path


def default_provenance(**extra: Any) -> Dict[str, Any]:
    provenance = {
        "medsegunet_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    provenance.update(extra)
    return provenance


def create_bundle(
    labels: Sequence[Label],
    preprocessing: Preprocessing,
    channels: Sequence[str] = ("CT",),
    network: Optional[NetworkSpec] = None,
    name: str = "untrained",
    seed: int = 0,
    base_filters: int = 16,
) -> Bundle:
    """A bundle around a freshly initialised network (for tests, and as the start of training).

    Without ``network``, a DynUNet is planned from the patch size and spacing (nnU-Net's rules).
    """
    import torch

    from MedSegUNetLib.model.network import build_network, plan_dynunet

    if network is None:
        network = plan_dynunet(
            preprocessing.patch_size[::-1],
            preprocessing.target_spacing[::-1],
            in_channels=len(channels),
            out_channels=len(labels) + 1,
            base_filters=base_filters,
        )
    meta = BundleMeta(
        network=network,
        labels=list(labels),
        channels=list(channels),
        preprocessing=preprocessing,
        provenance=default_provenance(training={"status": "untrained (freshly initialised)", "seed": seed}),
        name=name,
    )
    meta.validate()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        module = build_network(network)
    finally:
        torch.random.set_rng_state(generator_state)
    module.eval()
    return Bundle(meta, module)


def describe(meta: BundleMeta) -> str:
    """A few human lines: the labels, spacing, channels and provenance (for `medsegunet info` and the panel)."""
    prep = meta.preprocessing
    normalization = prep.normalization.kind
    if prep.normalization.rescale_to is not None:
        normalization += " then to {:g}..{:g}".format(*prep.normalization.rescale_to)
    lines = [
        f"{meta.name}: {meta.network.cls}, {len(meta.labels)} labels, channels {', '.join(meta.channels)}",
        f"spacing {'x'.join(f'{s:g}' for s in prep.target_spacing)} mm, patch {'x'.join(map(str, prep.patch_size))}, "
        f"orientation {prep.orientation}, normalization {normalization}",
        "labels: " + ", ".join(f"{label.value} {label.name}" for label in meta.labels),
    ]
    created = meta.provenance.get("created")
    if created:
        lines.append(f"created {created} by MedSegUNet {meta.provenance.get('medsegunet_version', '?')}")
    source = meta.provenance.get("source")
    if isinstance(source, dict) and source:
        lines.append("imported from: " + ", ".join(f"{k} {v}" for k, v in source.items() if k != "licence"))
        if source.get("licence"):
            lines.append(f"licence of the source: {source['licence']}")
    metrics = meta.provenance.get("metrics")
    if isinstance(metrics, dict) and metrics:
        lines.append("validation: " + ", ".join(f"{k} {v}" for k, v in list(metrics.items())[:6]))
    return "\n".join(lines)


def is_bundle_file(path: os.PathLike) -> bool:
    return str(path).endswith(BUNDLE_SUFFIX)
