"""The network as a CPU runs it fastest: instance norms as group norms, channels-last memory, every
convolution on oneDNN.

PyTorch computes an instance norm as a batch norm over a reshaped tensor, which needs the standard
layout; a group norm with one group per channel is the same function and has a channels-last CPU
kernel, so oneDNN's convolutions can stay channels-last throughout: faster per window, with the same
argmax but for rounding ties (benchmarks/README.md has the figures, and bf16 and torch.compile, tried and
not kept).

For a single window PyTorch's dispatcher sends small 3D convolutions (a batch of one whose first
dimensions multiply to at most 20480, and every transposed one) to its slow im2col path, which also
returns the standard layout and costs a copy at the next convolution. Called directly, oneDNN runs one
window faster than PyTorch runs a batch of two, in half the activation memory; the CPU therefore predicts
one window at a time (``inference.windows_per_batch``).

The scores leave the copy in the standard layout that MONAI blends into (a last 1x1x1 convolution, as
DynUNet's, SegResNet's and BasicUNet's, writes it directly: :class:`PointwiseHead`).
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from MedSegUNetLib.model.lean_decoder import with_lean_decoders


class ChannelNorm(torch.nn.Module):
    """An ``InstanceNorm3d`` without running statistics, computed as a group norm of one group per channel."""

    def __init__(self, norm: torch.nn.InstanceNorm3d):
        super().__init__()
        self.channels, self.eps = norm.num_features, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.channels, self.weight, self.bias, self.eps)


class ChannelsLast(torch.nn.Module):
    """Feeds the network channels-last input in its own type (its weights are channels-last too)."""

    def __init__(self, network: torch.nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.network, self.dtype = network, dtype
        self.out_channels = getattr(network, "out_channels", None)  # the classes it scores, as the network says

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.network(x.to(dtype=self.dtype, memory_format=torch.channels_last_3d))
        return scores.contiguous()  # a no-op after a PointwiseHead; a copy after any other last layer


class PointwiseHead(torch.nn.Module):
    """A network's last 1x1x1 convolution reading channels-last features and writing standard-layout
    scores, as a batched matrix product (equal to the convolution's to rounding: the largest difference
    on the shipped model was 0.0).

    The windows' scores are added into a standard-layout buffer: from channels-last scores that strided
    add is slow, and a separate copy to the standard layout costs a pass; this costs nothing."""

    def __init__(self, conv: torch.nn.Conv3d):
        super().__init__()
        self.weight = torch.nn.Parameter(
            conv.weight.detach().reshape(conv.out_channels, -1).contiguous(), requires_grad=False
        )
        self.bias = (
            None if conv.bias is None else torch.nn.Parameter(conv.bias.detach().reshape(1, -1, 1), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, *spatial = x.shape
        features = x.permute(0, 2, 3, 4, 1).reshape(n, -1, channels).transpose(1, 2)  # a view when channels-last
        weight = self.weight.expand(n, -1, -1)
        scores = torch.bmm(weight, features) if self.bias is None else torch.baddbmm(self.bias, weight, features)
        return scores.view(n, -1, *spatial)


class OneDnnConv(torch.nn.Module):
    """A ``Conv3d`` (zero padding given in voxels) run by oneDNN whatever the batch size."""

    def __init__(self, conv: torch.nn.Conv3d):
        super().__init__()
        assert not isinstance(conv.padding, str)  # "same"/"valid" padding has no oneDNN form here (_one_dnn)
        self.weight, self.bias = conv.weight, conv.bias
        self.padding, self.stride, self.dilation, self.groups = conv.padding, conv.stride, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mkldnn_convolution(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
        )


class OneDnnUpsample(torch.nn.Module):
    """A ``ConvTranspose3d`` whose kernel equals its stride (U-Net upsampling), run by oneDNN: each input
    voxel becomes a block of kernel-many output voxels, one 1x1x1 convolution into channels ordered
    (block position, output channel), then a reshuffle of those channels into the blocks (channels-last)."""

    def __init__(self, conv: torch.nn.ConvTranspose3d):
        super().__init__()
        inputs, self.outputs = conv.weight.shape[:2]
        self.kernel = tuple(conv.kernel_size)
        # (in, out, kz, ky, kx) -> (kz, ky, kx, out) x in, as 1x1x1 kernels
        weight = conv.weight.detach().permute(2, 3, 4, 1, 0).reshape(-1, inputs)[..., None, None, None]
        blocks = weight.shape[0] // self.outputs
        self.weight = torch.nn.Parameter(weight.contiguous(memory_format=torch.channels_last_3d), requires_grad=False)
        bias = None if conv.bias is None else conv.bias.detach().repeat(blocks)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, depth, height, width = x.shape
        kz, ky, kx = self.kernel
        scores = torch.mkldnn_convolution(x, self.weight, self.bias, (0, 0, 0), (1, 1, 1), (1, 1, 1), 1)
        blocks = scores.permute(0, 2, 3, 4, 1).reshape(n, depth, height, width, kz, ky, kx, self.outputs)
        shuffled = blocks.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, depth * kz, height * ky, width * kx, self.outputs)
        return shuffled.permute(0, 4, 1, 2, 3)


def _one_dnn(module: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The oneDNN replacement of a convolution module, or None where it has no exact one."""
    if type(module) is torch.nn.Conv3d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return OneDnnConv(module)
    if (
        type(module) is torch.nn.ConvTranspose3d
        and tuple(module.kernel_size) == tuple(module.stride)
        and not any(module.padding)
        and not any(module.output_padding)
        and set(module.dilation) == {1}
        and module.groups == 1
    ):
        return OneDnnUpsample(module)
    return None


def _is_pointwise(module: Optional[torch.nn.Module]) -> bool:
    return (
        type(module) is torch.nn.Conv3d
        and tuple(module.kernel_size) == (1, 1, 1)
        and tuple(module.stride) == (1, 1, 1)
        and not isinstance(module.padding, str)
        and not any(module.padding)
        and module.groups == 1
    )


def _output_layer(network: torch.nn.Module) -> Tuple[Optional[torch.nn.Module], str]:
    """The module that holds the network's last layer, and its name there: DynUNet's output block (a
    Convolution whose ``conv`` is the Conv3d), SegResNet's ``conv_final`` (norm, activation, Convolution),
    BasicUNet's ``final_conv``; (None, "") for any other network."""
    block = getattr(getattr(network, "output_block", None), "conv", None)
    if block is not None:
        return block, "conv"
    final = getattr(network, "conv_final", None)
    if isinstance(final, torch.nn.Sequential) and len(final):
        return final[-1], "conv"
    if isinstance(getattr(network, "final_conv", None), torch.nn.Conv3d):
        return network, "final_conv"
    return None, ""


def _with_pointwise_head(network: torch.nn.Module) -> None:
    """The last layer, when it is a 1x1x1 convolution (DynUNet's, SegResNet's, BasicUNet's), as a
    :class:`PointwiseHead`; other networks keep theirs (ChannelsLast then copies their scores to the
    standard layout)."""
    holder, name = _output_layer(network)
    if holder is not None and _is_pointwise(getattr(holder, name, None)):
        setattr(holder, name, PointwiseHead(getattr(holder, name)))


def _swap_modules(module: torch.nn.Module, direct_convolutions: bool) -> None:
    """Replace, in place, instance norms (and convolutions when ``direct_convolutions``) by their CPU
    forms. A module shared by two parents (DynUNet lists its blocks twice) is replaced once: its
    replacement has no children to descend into."""
    for name, child in module.named_children():
        replacement: Optional[torch.nn.Module] = None
        if isinstance(child, torch.nn.InstanceNorm3d) and not child.track_running_stats:
            replacement = ChannelNorm(child)
        elif direct_convolutions:
            replacement = _one_dnn(child)
        if replacement is not None:
            setattr(module, name, replacement)
        else:
            _swap_modules(child, direct_convolutions)


def direct_convolutions_available() -> bool:
    """Whether this PyTorch build has oneDNN (x86 and most ARM builds do) to call directly."""
    return torch.backends.mkldnn.is_available()


def for_cpu(network: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An evaluation copy of ``network`` laid out for the CPU, its weights in ``dtype`` (the original,
    e.g. one in training, is untouched). Its scores come out in ``dtype``.

    In a bf16 copy the norms keep float32 scale and shift: PyTorch's group norm then takes bf16 input
    with float32 statistics and parameters, about 3% faster per window here than all-bf16 and closer
    to float32. A copy made by this function is copied again (in ``dtype``), not wrapped twice."""
    if isinstance(network, ChannelsLast):
        network = network.network
    fast = copy.deepcopy(network).eval()
    # Module.to takes memory_format (documented); torch's overloads for it leave that argument out
    fast.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    _with_pointwise_head(fast)
    _swap_modules(fast, direct_convolutions_available())
    with_lean_decoders(fast)  # nnU-Net's decoders: each skip freed once used, no concatenated copy
    fast.to(dtype)
    for module in fast.modules():
        if isinstance(module, ChannelNorm):
            module.float()
    return ChannelsLast(fast, dtype)
