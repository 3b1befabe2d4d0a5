"""nnU-Net's U-Net decoder run in less memory: the same layers and weights, a leaner order of work.

dynamic-network-architectures' ``UNetDecoder`` keeps every skip until the whole decoder has run, and
concatenates the upsampled features with the skip before each stage's first convolution: on a 128³
window the last stage then holds the skip, the upsampled features, their concatenation and the
convolution's output at once. Here each skip is released as soon as its stage has used it, and that
first convolution is split in two along its input channels (one half of the kernel over the upsampled
features, the other over the skip, summed), which is the same sum without the concatenated copy. Its
output equals the library's to float rounding (Testing/test_lean_decoder.py). Our own forward rather than
the library's because the library has no option for it; the modules and weights stay the library's.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.nn.functional as F


class SplitInputConv(torch.nn.Module):
    """A convolution over ``cat((first, second), 1)`` computed as two convolutions summed."""

    def __init__(self, conv: Any, first_channels: int):
        super().__init__()
        weight = conv.weight.detach()
        layout = torch.channels_last_3d if weight.is_contiguous(memory_format=torch.channels_last_3d) else None
        halves = (weight[:, :first_channels], weight[:, first_channels:])
        self.first, self.second = (
            torch.nn.Parameter(h.contiguous(memory_format=layout or torch.contiguous_format), requires_grad=False)
            for h in halves
        )
        self.bias: Optional[torch.Tensor] = conv.bias
        self.padding, self.stride = tuple(conv.padding), tuple(conv.stride)
        self.one_dnn = type(conv).__name__ == "OneDnnConv"

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.one_dnn:
            return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, (1, 1, 1), 1)
        return F.conv3d(x, weight, bias, self.stride, self.padding)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        """``features``: [first, second]; the list is emptied so that each input is freed once used."""
        second = features.pop()
        first = features.pop()
        out = self._conv(first, self.first, self.bias)
        del first
        out += self._conv(second, self.second, None)
        return out


class LeanStage(torch.nn.Module):
    """A decoder stage (StackedConvBlocks of ConvDropoutNormReLU) whose first convolution is split."""

    def __init__(self, stage: Any, upsampled_channels: int):
        super().__init__()
        blocks = list(stage.convs)
        first = list(blocks[0].all_modules)
        self.conv = SplitInputConv(first[0], upsampled_channels)
        self.after_conv = torch.nn.Sequential(*first[1:])
        self.rest = torch.nn.Sequential(*blocks[1:])

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        return self.rest(self.after_conv(self.conv(features)))


class LeanDecoder(torch.nn.Module):
    """``UNetDecoder.forward`` without deep supervision, releasing each skip once used."""

    def __init__(self, decoder: Any):
        super().__init__()
        self.transpconvs: Any = decoder.transpconvs
        self.stages = torch.nn.ModuleList(
            LeanStage(stage, _upsampled_channels(up)) for stage, up in zip(decoder.stages, decoder.transpconvs)
        )
        self.seg_layer: Any = decoder.seg_layers[-1]

    def forward(self, skips: List[torch.Tensor]) -> torch.Tensor:
        """``skips``: the encoder's list, emptied as the stages use it (the network's forward, its only
        other holder, does not read it afterwards): a skip held by the list would outlive its stage."""
        features = skips.pop()
        for upsample, stage in zip(self.transpconvs, self.stages):
            features = stage([upsample(features), skips.pop()])
        return self.seg_layer(features)


def _upsampled_channels(upsample: Any) -> int:
    outputs = getattr(upsample, "outputs", None)  # cpu_network.OneDnnUpsample
    return int(outputs if outputs is not None else upsample.out_channels)


def _is_unet_decoder(module: Any) -> bool:
    """A dynamic-network-architectures UNetDecoder made of plain conv blocks, without deep supervision."""
    if type(module).__name__ != "UNetDecoder" or getattr(module, "deep_supervision", True):
        return False
    try:
        return all(_plain_first_conv(stage.convs[0].all_modules[0]) for stage in module.stages)
    except (AttributeError, TypeError, IndexError):
        return False


def _plain_first_conv(conv: Any) -> bool:
    """A convolution that :class:`SplitInputConv` computes exactly: no dilation, one group."""
    return set(conv.dilation) == {1} and conv.groups == 1 and conv.weight.dim() == 5


def with_lean_decoders(module: torch.nn.Module) -> None:
    """Replace, in place, every nnU-Net UNetDecoder inside ``module`` (folds included) by a LeanDecoder."""
    for name, child in module.named_children():
        if _is_unet_decoder(child):
            setattr(module, name, LeanDecoder(child))
        else:
            with_lean_decoders(child)
