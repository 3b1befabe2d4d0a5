"""The network as a CPU runs it fastest: instance norms as group norms, channels-last memory.

PyTorch computes an instance norm as a batch norm over a reshaped tensor, which needs the standard
layout; a group norm with one group per channel is the same function and has a channels-last CPU
kernel, so oneDNN's convolutions can stay channels-last throughout. On the shipped model (2-core AMD
EPYC, 96x96x48 windows) that is about 1.6x faster per window, with the same argmax on 99.999% of voxels
(benchmarks/README.md). bf16 and torch.compile were measured too, and lost there.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


class ChannelNorm(torch.nn.Module):
    """An ``InstanceNorm3d`` without running statistics, computed as a group norm of one group per channel."""

    def __init__(self, norm: torch.nn.InstanceNorm3d):
        super().__init__()
        self.channels, self.eps = norm.num_features, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.channels, self.weight, self.bias, self.eps)


class ChannelsLast(torch.nn.Module):
    """Feeds the network channels-last input (its weights are channels-last too)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.contiguous(memory_format=torch.channels_last_3d))


def _swap_instance_norms(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.InstanceNorm3d) and not child.track_running_stats:
            setattr(module, name, ChannelNorm(child))
        else:
            _swap_instance_norms(child)


def for_cpu(network: torch.nn.Module) -> torch.nn.Module:
    """An evaluation copy of ``network`` laid out for the CPU (the original, e.g. one in training, is untouched)."""
    fast = copy.deepcopy(network).eval()
    _swap_instance_norms(fast)
    return ChannelsLast(fast.to(memory_format=torch.channels_last_3d))
