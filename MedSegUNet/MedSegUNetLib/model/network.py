"""The network builder: one place that turns a bundle's network spec into a MONAI module.

Training builds its networks here too, so a bundle written by training always loads for inference.
Only the classes in :data:`NETWORK_CLASSES` can be built: a bundle names a class, it never carries code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

# A torch.nn.Module. Spelled Any: this module and bundle.py must load without torch, and
# Testing/test_slicer_static.py refuses a torch import at their top level even under TYPE_CHECKING.
TorchModule = Any

# JSON has no tuples; these DynUNet/UNet arguments are (name, {options}) pairs that MONAI wants as tuples.
_TUPLE_ARGS = ("norm_name", "act_name", "norm", "act")


@dataclass
class NetworkSpec:
    """A network class from :data:`NETWORK_CLASSES` and its keyword arguments (JSON-compatible)."""

    cls: str
    args: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"class": self.cls, "args": self.args}

    @classmethod
    def from_dict(cls, data: dict) -> "NetworkSpec":
        return cls(str(data["class"]), dict(data.get("args", {})))

    @property
    def in_channels(self) -> int:
        return int(self.args["in_channels"])

    @property
    def out_channels(self) -> int:
        return int(self.args["out_channels"])

    def size_divisor(self) -> List[int]:
        """Per array axis (z, y, x): the patch size must be a multiple of this."""
        strides = self.args.get("strides", [])
        divisor = [1, 1, 1]
        for stride in strides:
            stride = [stride] * 3 if isinstance(stride, int) else list(stride)
            divisor = [d * s for d, s in zip(divisor, stride)]
        return divisor


def _network_classes() -> dict:
    from monai.networks.nets import DynUNet, UNet

    return {"DynUNet": DynUNet, "UNet": UNet}


NETWORK_CLASSES = ("DynUNet", "UNet")


def _as_monai_args(args: Dict[str, Any]) -> Dict[str, Any]:
    converted = dict(args)
    for key in _TUPLE_ARGS:
        if isinstance(converted.get(key), list):
            converted[key] = tuple(converted[key])
    return converted


# Bounds for arguments read from untrusted bundles: a forged "filters: [10**9]" must not allocate terabytes.
_MAX_WIDTH = 4096
_MAX_LEVELS = 10


def check_spec_bounds(spec: NetworkSpec) -> None:
    widths = list(spec.args.get("filters") or spec.args.get("channels") or [])
    if len(widths) > _MAX_LEVELS or len(spec.args.get("strides") or []) > _MAX_LEVELS:
        raise ValueError(f"the network has more than {_MAX_LEVELS} levels")
    for value in widths + [spec.args.get("in_channels", 1), spec.args.get("out_channels", 1)]:
        if not isinstance(value, int) or not 1 <= value <= _MAX_WIDTH:
            raise ValueError(f"network width {value!r} is outside 1..{_MAX_WIDTH}")


def build_network(spec: NetworkSpec) -> TorchModule:
    """A freshly initialised ``torch.nn.Module`` for ``spec`` (raises ValueError for unknown classes)."""
    if spec.cls not in NETWORK_CLASSES:
        raise ValueError(f"unknown network class '{spec.cls}' (known: {', '.join(NETWORK_CLASSES)})")
    check_spec_bounds(spec)
    args = _as_monai_args(spec.args)
    if spec.cls == "DynUNet":
        # Inference wants one output tensor; training asks for deep supervision itself.
        args["deep_supervision"] = False
    return _network_classes()[spec.cls](**args)


def plan_dynunet(
    patch_size_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    in_channels: int,
    out_channels: int,
    base_filters: int = 16,
    max_filters: int = 256,
    max_depth: int = 5,
) -> NetworkSpec:
    """A DynUNet for this patch and spacing, with nnU-Net's rules for kernels and strides.

    An axis is downsampled (stride 2) while its spacing is at most twice the finest one and it still
    has at least 8 voxels; coarse axes get 1-wide kernels until the others catch up, so thick-slice
    scans are not convolved across slices too early.
    """
    sizes = [float(s) for s in patch_size_zyx]
    spacings = [float(s) for s in spacing_zyx]
    kernels: List[List[int]] = []
    strides: List[List[int]] = [[1, 1, 1]]
    while len(strides) < max_depth:
        finest = min(spacings)
        ratios = [s / finest for s in spacings]
        stride = [2 if ratio <= 2 and size >= 8 and size % 2 == 0 else 1 for ratio, size in zip(ratios, sizes)]
        kernels.append([3 if ratio <= 2 else 1 for ratio in ratios])
        if all(s == 1 for s in stride):
            break
        strides.append(stride)
        sizes = [size / s for size, s in zip(sizes, stride)]
        spacings = [sp * s for sp, s in zip(spacings, stride)]
    while len(kernels) < len(strides):
        kernels.append([3, 3, 3])
    kernels = kernels[: len(strides)]
    filters = [min(base_filters * 2**level, max_filters) for level in range(len(strides))]
    return NetworkSpec(
        "DynUNet",
        {
            "spatial_dims": 3,
            "in_channels": int(in_channels),
            "out_channels": int(out_channels),
            "kernel_size": kernels,
            "strides": strides,
            "upsample_kernel_size": strides[1:],
            "filters": filters,
            "norm_name": ["INSTANCE", {"affine": True}],
            "act_name": ["leakyrelu", {"inplace": True, "negative_slope": 0.01}],
            "res_block": True,
        },
    )
