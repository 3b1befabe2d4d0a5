"""nnU-Net's U-Nets on the CPU path: the lean decoder gives the library's output, and frees skips as it goes."""

from __future__ import annotations

import pytest
import torch

from MedSegUNetLib.model.lean_decoder import LeanDecoder
from MedSegUNetLib.model.network import NetworkSpec, build_network
from MedSegUNetLib.prediction.inference import prepare_network

COMMON = {
    "input_channels": 1,
    "n_stages": 4,
    "features_per_stage": [8, 16, 32, 32],
    "conv_op": "Conv3d",
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    "num_classes": 3,
    "conv_bias": True,
    "norm_op": "InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "nonlin": "LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
NETWORKS = {
    "PlainConvUNet": {**COMMON, "n_conv_per_stage": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2]},
    "ResidualEncoderUNet": {**COMMON, "n_blocks_per_stage": [1, 2, 2, 2], "n_conv_per_stage_decoder": [1, 1, 1]},
}


def _perturbed(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial norm weights and biases, so that a dropped bias or a swapped half would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return network.eval()


@pytest.mark.parametrize("cls", sorted(NETWORKS))
@pytest.mark.parametrize("members", [1, 2])
def test_the_cpu_copy_of_an_nnunet_unet_has_lean_decoders_and_the_librarys_scores(cls, members):
    torch.manual_seed(0)
    network = _perturbed(build_network(NetworkSpec(cls, NETWORKS[cls], members)), seed=1)
    window = torch.randn(2, 1, 8, 32, 24)
    with torch.inference_mode():
        expected = network(window)
        fast = prepare_network(network, torch.device("cpu"))
        got = fast(window)
    lean = [module for module in fast.modules() if isinstance(module, LeanDecoder)]
    assert len(lean) == members  # every fold's decoder, and the original network keeps its own
    assert not any(isinstance(module, LeanDecoder) for module in network.modules())
    assert got.shape == expected.shape == (2, 3, 8, 32, 24)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_decoder_releases_each_skip_as_its_stage_uses_it():
    torch.manual_seed(0)
    network = _perturbed(build_network(NetworkSpec("PlainConvUNet", NETWORKS["PlainConvUNet"])), seed=2)
    fast = prepare_network(network, torch.device("cpu"))
    decoder = next(module for module in fast.modules() if isinstance(module, LeanDecoder))
    encoder = next(module for name, module in fast.named_modules() if name.endswith("encoder"))
    with torch.inference_mode():
        skips = encoder(torch.randn(1, 1, 8, 32, 32).contiguous(memory_format=torch.channels_last_3d))
        assert len(skips) == 4
        decoder(skips)
    assert skips == []  # the encoder's list no longer holds any skip once the decoder has run


def test_a_decoder_with_deep_supervision_is_left_as_the_library_made_it():
    from MedSegUNetLib.model.lean_decoder import with_lean_decoders

    network = build_network(NetworkSpec("PlainConvUNet", NETWORKS["PlainConvUNet"]))
    network.decoder.deep_supervision = True
    with_lean_decoders(network)
    assert type(network.decoder).__name__ == "UNetDecoder"


@pytest.mark.parametrize("bias", [True, False])
def test_a_split_convolution_is_the_convolution_of_the_concatenation(bias):
    """The split as PyTorch computes it where oneDNN is not called directly (a plain Conv3d)."""
    from MedSegUNetLib.model.lean_decoder import SplitInputConv

    torch.manual_seed(3)
    conv = torch.nn.Conv3d(5, 4, 3, padding=1, bias=bias).eval()
    first, second = torch.randn(2, 2, 6, 7, 8), torch.randn(2, 3, 6, 7, 8)
    with torch.inference_mode():
        expected = conv(torch.cat((first, second), 1))
        features = [first, second]
        got = SplitInputConv(conv, 2)(features)
    assert features == []  # both inputs handed over, so that the caller's references are the last ones
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
