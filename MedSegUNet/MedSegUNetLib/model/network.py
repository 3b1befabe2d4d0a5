"""The network builder: one place that turns a bundle's network spec into a torch module.

Training builds its networks here too, so a bundle written by training always loads for inference.
Only the classes in :data:`NETWORK_CLASSES` can be built: a bundle names a class, it never carries code.
MONAI's DynUNet and UNet are the engine's own, and with SegResNet and BasicUNet run imported MONAI bundles;
nnU-Net's PlainConvUNet and ResidualEncoderUNet (from the nnU-Net team's dynamic-network-architectures) run
imported nnU-Net models, their layer types named from
:data:`NNUNET_LAYERS`. A spec with ``members`` > 1 is that many copies whose logits are averaged (folds).
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
    members: int = 1  # copies with their own weights whose logits are averaged (an nnU-Net model's folds)

    def to_dict(self) -> dict:
        data: Dict[str, Any] = {"class": self.cls, "args": self.args}
        if self.members != 1:
            data["members"] = self.members
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "NetworkSpec":
        return cls(str(data["class"]), dict(data.get("args", {})), int(data.get("members", 1)))

    @property
    def in_channels(self) -> int:
        return int(self.args["input_channels" if self.cls in NNUNET_CLASSES else "in_channels"])

    @property
    def out_channels(self) -> int:
        return int(self.args["num_classes" if self.cls in NNUNET_CLASSES else "out_channels"])

    def size_divisor(self) -> List[int]:
        """Per array axis (z, y, x): the patch size must be a multiple of this."""
        if self.cls == "SegResNet":  # halves every axis between its levels
            return [2 ** max(len(self.args.get("blocks_down", (1, 2, 2, 4))) - 1, 0)] * 3
        if self.cls == "BasicUNet":  # four fixed 2x poolings
            return [16, 16, 16]
        strides = self.args.get("strides", [])
        divisor = [1, 1, 1]
        for stride in strides:
            stride = [stride] * 3 if isinstance(stride, int) else list(stride)
            divisor = [d * s for d, s in zip(divisor, stride)]
        return divisor


def _network_classes() -> dict:
    from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet

    return {"DynUNet": DynUNet, "UNet": UNet, "SegResNet": SegResNet, "BasicUNet": BasicUNet}


def _nnunet_classes() -> dict:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    return {"PlainConvUNet": PlainConvUNet, "ResidualEncoderUNet": ResidualEncoderUNet}


NNUNET_CLASSES = ("PlainConvUNet", "ResidualEncoderUNet")
NETWORK_CLASSES = ("DynUNet", "UNet", "SegResNet", "BasicUNet", *NNUNET_CLASSES)
# The layer types an nnU-Net network's arguments may name (nnU-Net's plans spell them as import paths).
NNUNET_LAYERS = {
    "conv_op": ("Conv3d",),
    "norm_op": ("InstanceNorm3d", "BatchNorm3d"),
    "dropout_op": ("Dropout3d",),
    "nonlin": ("LeakyReLU", "ReLU"),
}
_MAX_MEMBERS = 10


def _logit_average(members: List[TorchModule]) -> TorchModule:
    """One module whose output is the mean of its members' outputs (nnU-Net averages its folds' logits)."""
    import torch

    class FoldAverage(torch.nn.Module):
        def __init__(self, networks: List[torch.nn.Module]):
            super().__init__()
            self.members = torch.nn.ModuleList(networks)
            self.out_channels = getattr(networks[0], "out_channels", None)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            total = self.members[0](x)
            for member in self.members[1:]:
                total = total + member(x)
            return total / len(self.members)

    return FoldAverage(members)


def _as_monai_args(args: Dict[str, Any]) -> Dict[str, Any]:
    converted = dict(args)
    for key in _TUPLE_ARGS:
        if isinstance(converted.get(key), list):
            converted[key] = tuple(converted[key])
    return converted


# Bounds for arguments read from untrusted bundles: a forged "filters: [10**9]" must not allocate terabytes.
_MAX_WIDTH = 4096
_MAX_LEVELS = 10
_MAX_BLOCKS = 64


def _widths(spec: NetworkSpec) -> List[Any]:
    """The channel widths of the network's levels, as its arguments give them."""
    if spec.cls == "SegResNet":  # init_filters, doubled at each level
        first, levels = spec.args.get("init_filters", 8), spec.args.get("blocks_down", (1, 2, 2, 4))
        count = min(len(levels), _MAX_LEVELS + 1) if isinstance(levels, (list, tuple)) else 1
        return [first * 2**level for level in range(count)] if isinstance(first, int) else [first]
    return list(
        spec.args.get("filters")
        or spec.args.get("channels")
        or spec.args.get("features_per_stage")
        or spec.args.get("features")
        or []
    )


def check_spec_bounds(spec: NetworkSpec) -> None:
    widths = _widths(spec)
    if len(widths) > _MAX_LEVELS or len(spec.args.get("strides") or []) > _MAX_LEVELS:
        raise ValueError(f"the network has more than {_MAX_LEVELS} levels")
    for key in ("blocks_down", "blocks_up"):
        blocks = spec.args.get(key, ())
        if not isinstance(blocks, (list, tuple)) or not all(
            isinstance(n, int) and 0 <= n <= _MAX_BLOCKS for n in blocks
        ):
            raise ValueError(
                f"{key}: blocks per level must be a list of whole numbers in 0..{_MAX_BLOCKS}, not {blocks}"
            )
    channels = [spec.args.get(key, 1) for key in ("in_channels", "out_channels", "input_channels", "num_classes")]
    for value in widths + channels:
        if not isinstance(value, int) or not 1 <= value <= _MAX_WIDTH:
            raise ValueError(f"network width {value!r} is outside 1..{_MAX_WIDTH}")
    if not 1 <= spec.members <= _MAX_MEMBERS:
        raise ValueError(f"{spec.members} averaged networks is outside 1..{_MAX_MEMBERS}")


def build_network(spec: NetworkSpec) -> TorchModule:
    """A freshly initialised ``torch.nn.Module`` for ``spec`` (raises ValueError for unknown classes)."""
    if spec.cls not in NETWORK_CLASSES:
        raise ValueError(f"unknown network class '{spec.cls}' (known: {', '.join(NETWORK_CLASSES)})")
    check_spec_bounds(spec)
    if spec.members > 1:
        return _logit_average([build_network(NetworkSpec(spec.cls, spec.args)) for _ in range(spec.members)])
    if spec.cls in NNUNET_CLASSES:
        return _build_nnunet(spec)
    args = _as_monai_args(spec.args)
    if spec.cls == "DynUNet":
        # Inference wants one output tensor; training asks for deep supervision itself.
        args["deep_supervision"] = False
    network = _network_classes()[spec.cls](**args)
    network.out_channels = spec.out_channels  # read by the prediction (SegResNet and BasicUNet do not keep it)
    return network


def _build_nnunet(spec: NetworkSpec) -> TorchModule:
    """An nnU-Net network, its layer types looked up in :data:`NNUNET_LAYERS` (never an import path), with
    deep supervision off (one output, as nnU-Net predicts)."""
    import torch

    args = dict(spec.args)
    for key, allowed in NNUNET_LAYERS.items():
        name = args.get(key)
        if name is None and key == "dropout_op":
            continue
        if name not in allowed:
            raise ValueError(f"{spec.cls} {key} '{name}' is not supported (known: {', '.join(allowed)})")
        args[key] = getattr(torch.nn, str(name))
    args["deep_supervision"] = False
    network = _nnunet_classes()[spec.cls](**args)
    network.out_channels = spec.out_channels  # read by the prediction to size its blended scores
    return network


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
