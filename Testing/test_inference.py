"""The prediction loop, normalization and post-processing, piece by piece."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.progress import Progress
from MedSegUNetLib.model.bundle import Normalization
from MedSegUNetLib.prediction.inference import (
    PredictOptions,
    WindowPredictor,
    class_indices,
    mirror_axes,
    predict_labels,
    select_device,
    with_memory_fallback,
)
from MedSegUNetLib.prediction.postprocess import keep_largest_component
from MedSegUNetLib.prediction.preprocessing import normalize
from MedSegUNetLib.prediction.stitching import count_windows, fit_window


class Recorder(Progress):
    def __init__(self):
        self.updates, self.notes = [], []

    def update(self, stage, done, total, message="", **extra):
        self.updates.append((stage, done, total))

    def note(self, message):
        self.notes.append(message)


class XGradientNet(torch.nn.Module):
    """Class 1 where the input is positive; mirroring along x changes the answer unless undone."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), 10 * x], dim=1)


@pytest.mark.parametrize(
    "image,roi,overlap",
    [((40, 50, 60), (16, 16, 16), 0.5), ((10, 70, 33), (16, 32, 32), 0.25), ((16, 16, 16), (16, 16, 16), 0.5)],
)
def test_window_count_matches_what_monai_visits(image, roi, overlap):
    progress = Recorder()
    array = np.random.default_rng(0).normal(size=(1, *image)).astype(np.float32)
    predict_labels(XGradientNet(), array, roi, PredictOptions(overlap=overlap, sw_batch_size=3, device="cpu"), progress)
    predict = [u for u in progress.updates if u[0] == "predict"]
    assert predict[-1][1] == predict[-1][2] == count_windows(image, roi, overlap)
    assert predict[0][2] == predict[-1][2]


def test_prediction_is_pointwise_correct_with_and_without_tta():
    array = np.random.default_rng(1).normal(size=(1, 20, 24, 28)).astype(np.float32)
    expected = (array[0] > 0).astype(np.uint8)
    for tta in (False, True):
        result = predict_labels(XGradientNet(), array, (16, 16, 16), PredictOptions(tta=tta, device="cpu"), Progress())
        np.testing.assert_array_equal(result, expected)


def test_tta_averages_all_eight_mirrorings_and_undoes_them():
    assert len(mirror_axes()) == 8 and () in mirror_axes() and (2, 3, 4) in mirror_axes()
    calls = []

    class Asymmetric(torch.nn.Module):
        def forward(self, x):
            calls.append(x.clone())
            ramp = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x)
            return torch.cat([torch.zeros_like(x), ramp - x.shape[-1] / 2 + 0.25], dim=1)

    windows = torch.zeros(1, 1, 4, 4, 6)
    scores = WindowPredictor(Asymmetric(), tta=True, on_windows=lambda n: None)(windows)
    assert len(calls) == 8
    # Half of the mirrorings flip x: after undoing them the ramps (-2.75 .. 2.25 and, flipped back,
    # 2.25 .. -2.75) average to the constant -0.25 along x; without the undoing it would stay a ramp.
    torch.testing.assert_close(scores[0, 1], torch.full((4, 4, 6), -0.25), atol=1e-6, rtol=0)
    single = WindowPredictor(Asymmetric(), tta=False, on_windows=lambda n: None)(windows)
    torch.testing.assert_close(single[0, 1, 0, 0], torch.arange(6.0) - 2.75)


def test_out_of_memory_falls_back_to_smaller_batches_then_cpu():
    attempts = []

    def run(device, batch):
        attempts.append((device.type, batch))
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done on cpu"

    progress = Recorder()
    assert with_memory_fallback(run, torch.device("cuda"), 4, progress) == "done on cpu"
    assert attempts == [("cuda", 4), ("cuda", 2), ("cuda", 1), ("cpu", 1)]
    assert any("retrying with 2" in note for note in progress.notes)
    assert any("falling back to the CPU" in note for note in progress.notes)


def test_out_of_memory_on_cpu_is_a_clear_error():
    def run(device, batch):
        raise torch.cuda.OutOfMemoryError("out of memory")

    with pytest.raises(MedSegError, match="out of memory"):
        with_memory_fallback(run, torch.device("cpu"), 2, Recorder())


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MedSegError, match="no CUDA"):
            select_device("cuda")
    with pytest.raises(MedSegError, match="unknown device"):
        select_device("tpu")


def test_ct_normalization_clips_and_scales():
    values = np.array([-3000, -1000, 0, 1000, 5000], dtype=np.float32)
    np.testing.assert_allclose(normalize(values.copy(), Normalization("ct", (-1000, 1000))), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(
        normalize(values.copy(), Normalization("ct", (-1000, 1000), mean=100.0, std=50.0)), [-22, -22, -2, 18, 18]
    )


def test_zscore_normalization_with_and_without_background():
    values = np.array([0, 0, 2, 4, 6], dtype=np.float32)
    whole = normalize(values.copy(), Normalization("zscore", None))
    assert abs(whole.mean()) < 1e-6 and abs(whole.std() - 1) < 1e-5
    foreground = normalize(values.copy(), Normalization("zscore", None, nonzero=True))
    np.testing.assert_allclose(foreground, [0, 0, -1.2247449, 0, 1.2247449], atol=1e-5)


def test_keep_largest_component_per_label():
    array = np.zeros((20, 20, 20), dtype=np.uint8)
    array[2:8, 2:8, 2:8] = 1  # big piece of label 1
    array[15:17, 15:17, 15:17] = 1  # small stray piece of label 1
    array[10:12, 2:4, 2:4] = 2  # label 2: two pieces, the larger one kept
    array[10:11, 15:16, 15:16] = 2
    array[2:4, 15:18, 2:4] = 3  # label 3 is left alone when not asked for
    array[18:19, 18:19, 2:3] = 3
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 1.0, 2.0))
    image.SetOrigin((10.0, -5.0, 3.0))
    result = keep_largest_component(image, [1, 2])
    out = sitk.GetArrayFromImage(result)
    assert np.count_nonzero(out == 1) == 216 and not out[15:17, 15:17, 15:17].any()
    assert np.count_nonzero(out == 2) == 8 and out[10, 15, 15] == 0
    assert np.count_nonzero(out == 3) == np.count_nonzero(array == 3)
    assert result.GetSpacing() == image.GetSpacing() and result.GetOrigin() == image.GetOrigin()


def test_too_large_volume_is_refused_up_front_with_the_estimate():
    from MedSegUNetLib.prediction.inference import check_memory, prediction_memory_bytes

    shape = (1, 800, 512, 512)
    needed = prediction_memory_bytes(shape, 5)
    assert needed == 800 * 512 * 512 * (4 + 20 + 5)
    check_memory(shape, 5, available=2 * needed)
    with pytest.raises(
        MedSegError, match=r"needs about 5\.7 GiB .*512x512x800 voxels, 5 classes.*2\.0 GiB are available"
    ):
        check_memory(shape, 5, available=2 * 2**30)
    # labels decided row by row hold the sums for one window's depth (96 of 800 slices)
    assert prediction_memory_bytes(shape, 5, scores_depth=96) == 800 * 512 * 512 * 5 + 96 * 512 * 512 * 24
    check_memory(shape, 105, available=16 * 2**30, scores_depth=96)  # 105 classes: 10.9 GiB (whole grid: 84 GiB)


def test_window_shrinks_only_where_the_volume_is_thinner_than_the_patch():
    # 13 slices with a z stride product of 4: 16 slices, not a 48-slice window of mostly padding
    assert fit_window([48, 96, 96], [13, 167, 167], [4, 16, 16]) == [16, 96, 96]
    assert fit_window([48, 96, 96], [200, 40, 96], [4, 16, 16]) == [48, 48, 96]
    assert fit_window([48, 96, 96], [1, 1, 1], [4, 16, 16]) == [4, 16, 16]


@pytest.mark.parametrize("classes", [2, 7, 300])
def test_class_indices_is_torch_argmax_ties_included(classes):
    generator = torch.Generator().manual_seed(classes)
    # Few distinct values: many ties, which must go to the lower class as torch.argmax sends them.
    scores = torch.randint(0, 4, (classes, 5, 6, 7), generator=generator).float()
    before = scores.clone()
    indices = class_indices(scores)
    assert indices.dtype == (torch.uint8 if classes <= 256 else torch.int32)
    assert torch.equal(indices.long(), torch.argmax(scores, dim=0))
    assert torch.equal(scores, before)  # the scores are not modified


def test_the_cpu_network_is_an_equivalent_copy_and_the_original_is_untouched():
    """On the CPU the engine predicts with a copy whose instance norms run as group norms, channels-last:
    the same function (scores equal to rounding), while the network it came from (training's) keeps its
    own modules, weights and layout."""
    from MedSegUNetLib.core.labels import default_labels
    from MedSegUNetLib.model.bundle import Preprocessing, create_bundle
    from MedSegUNetLib.model.cpu_network import ChannelNorm, PointwiseHead
    from MedSegUNetLib.prediction.inference import prepare_network

    network = create_bundle(
        default_labels(["a", "b"]), Preprocessing((2.0, 2.0, 2.0), (32, 32, 16)), base_filters=4
    ).network
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms with non-trivial scale and shift, so a dropped affine would show
        for module in network.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    before = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    windows = torch.randn(2, 1, 16, 32, 32, generator=generator)
    with torch.inference_mode():
        expected = network.eval()(windows)
        fast = prepare_network(network, torch.device("cpu"))
        got = fast(windows)
        one_by_one = torch.cat([fast(window[None]) for window in windows])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one_by_one, expected, atol=1e-4, rtol=1e-4)
    assert got.is_contiguous()  # scores in the standard layout, as MONAI's blending buffer is
    assert any(isinstance(m, ChannelNorm) for m in fast.modules())
    assert any(isinstance(m, PointwiseHead) for m in fast.modules())
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in network.modules())
    assert all(t.is_contiguous() for t in network.state_dict().values())
    assert all(torch.equal(before[name], tensor) for name, tensor in network.state_dict().items())


def test_a_prepared_network_is_kept_not_copied_again():
    """A run keeps the copy it prepared (network_for), so only one copy of the weights lives: preparing it
    again returns it as it is; in another precision it is prepared afresh from the network inside it,
    never wrapped twice, and the float32 copy is left as it was."""
    from MedSegUNetLib.core.labels import default_labels
    from MedSegUNetLib.model.bundle import Preprocessing, create_bundle
    from MedSegUNetLib.model.cpu_network import ChannelsLast
    from MedSegUNetLib.prediction.inference import network_for, output_classes, prepare_network

    network = create_bundle(
        default_labels(["a", "b"]), Preprocessing((2.0, 2.0, 2.0), (32, 32, 16)), base_filters=4
    ).network
    cpu = torch.device("cpu")
    prepared = network_for(network, PredictOptions(device="cpu"))
    assert isinstance(prepared, ChannelsLast) and prepared is not network
    assert output_classes(prepared) == output_classes(network) == 3  # the stitching buffer is sized up front
    assert prepare_network(prepared, cpu) is prepared
    half = prepare_network(prepared, cpu, torch.bfloat16)
    assert isinstance(half, ChannelsLast) and not isinstance(half.network, ChannelsLast)
    assert half.dtype == torch.bfloat16 and prepared.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in prepared.parameters())
    windows = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(prepared(windows), network.eval()(windows), atol=1e-4, rtol=1e-4)


def test_precision_choices(monkeypatch):
    """auto: fp16 autocast on CUDA, float32 elsewhere; fp32 everywhere; bf16 on CUDA, and on a CPU only
    where oneDNN runs bf16 (else a clear refusal); never on MPS."""
    import MedSegUNetLib.prediction.inference as inference
    from MedSegUNetLib.core.errors import MedSegError
    from MedSegUNetLib.prediction.inference import network_precision

    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert network_precision("auto", cpu) is None and network_precision("auto", mps) is None
    assert network_precision("auto", cuda) is torch.float16
    assert all(network_precision("fp32", device) is None for device in (cpu, cuda, mps))
    assert network_precision("bf16", cuda) is torch.bfloat16
    with pytest.raises(MedSegError, match="MPS"):
        network_precision("bf16", mps)
    with pytest.raises(MedSegError, match="unknown precision"):
        network_precision("fp8", cpu)
    monkeypatch.setattr(inference, "cpu_runs_bf16", lambda: True)
    assert network_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(inference, "cpu_runs_bf16", lambda: False)
    with pytest.raises(MedSegError, match="AVX512-BF16"):
        network_precision("bf16", cpu)


def test_the_bf16_cpu_copy_scores_as_float32_does_where_the_cpu_runs_bf16():
    """The bf16 CPU copy: weights and activations in bf16 (the norms' scale and shift in float32), scores
    within bf16's rounding of float32's.
    Where the CPU cannot run oneDNN's bf16 convolutions PyTorch refuses the copy outright, which is why
    --precision bf16 checks cpu_runs_bf16 first."""
    from MedSegUNetLib.core.labels import default_labels
    from MedSegUNetLib.model.bundle import Preprocessing, create_bundle
    from MedSegUNetLib.model.cpu_network import ChannelNorm
    from MedSegUNetLib.prediction.inference import cpu_runs_bf16, prepare_network

    network = create_bundle(
        default_labels(["a", "b"]), Preprocessing((2.0, 2.0, 2.0), (32, 32, 16)), base_filters=4
    ).network
    windows = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = prepare_network(network, torch.device("cpu"))(windows)
        half = prepare_network(network, torch.device("cpu"), torch.bfloat16)
        norms = [p for m in half.modules() if isinstance(m, ChannelNorm) for p in m.parameters()]
        others = [p for m in half.modules() if not isinstance(m, ChannelNorm) for p in m.parameters(recurse=False)]
        assert norms and all(p.dtype == torch.float32 for p in norms)  # bf16 input, float32 scale and shift
        assert others and all(p.dtype == torch.bfloat16 for p in others)
        if not cpu_runs_bf16():
            with pytest.raises(RuntimeError, match="bf16"):
                half(windows)
            return
        got = half(windows)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape and got.is_contiguous()
    scale = float(expected.abs().max())
    torch.testing.assert_close(got.float(), expected, atol=0.05 * scale, rtol=0.05)
    assert float((got.float() - expected).abs().max()) > 0  # it did run in bf16


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_pointwise_head_is_the_convolution_in_the_standard_layout(bias, batch):
    """The last 1x1x1 convolution as a matrix product: the Conv3d's scores (bias or none) from
    channels-last features, handed back in the standard layout MONAI blends into."""
    from MedSegUNetLib.model.cpu_network import PointwiseHead

    generator = torch.Generator().manual_seed(batch)
    conv = torch.nn.Conv3d(8, 7, kernel_size=1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        if bias:
            conv.bias.copy_(torch.randn(7, generator=generator))
    features = torch.randn(batch, 8, 5, 6, 7, generator=generator).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        expected = conv(features)
        got = PointwiseHead(conv)(features)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        {"cls": "SegResNet", "args": {"in_channels": 1, "out_channels": 5, "init_filters": 8}},
        {"cls": "BasicUNet", "args": {"in_channels": 1, "out_channels": 5, "features": [4, 4, 8, 8, 16, 4]}},
    ],
)
def test_segresnet_and_basicunet_copies_write_their_scores_through_a_pointwise_head(spec):
    """Their last 1x1x1 convolution writes the standard layout directly: no copy of the scores after it."""
    from MedSegUNetLib.model.cpu_network import PointwiseHead
    from MedSegUNetLib.model.network import NetworkSpec, build_network
    from MedSegUNetLib.prediction.inference import prepare_network

    torch.manual_seed(0)
    network = build_network(NetworkSpec(spec["cls"], spec["args"])).eval()
    windows = torch.randn(2, 1, 32, 32, 16)
    with torch.inference_mode():
        expected = network(windows)
        fast = prepare_network(network, torch.device("cpu"))
        got = fast(windows)
    assert sum(isinstance(m, PointwiseHead) for m in fast.modules()) == 1
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_unet_copy_scores_in_the_standard_layout_too():
    """A network without DynUNet's 1x1x1 output block keeps its last layer: ChannelsLast copies its scores."""
    from monai.networks.nets import UNet

    from MedSegUNetLib.model.cpu_network import PointwiseHead
    from MedSegUNetLib.prediction.inference import prepare_network

    network = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,))
    windows = torch.randn(1, 1, 8, 16, 16)
    with torch.inference_mode():
        expected = network.eval()(windows)
        fast = prepare_network(network, torch.device("cpu"))
        got = fast(windows)
    assert not any(isinstance(m, PointwiseHead) for m in fast.modules())
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", [(2, 2, 2), (1, 2, 2), (2, 1, 1)])
@pytest.mark.parametrize("batch", [1, 3])
def test_onednn_upsample_is_the_transposed_convolution(kernel, batch):
    """The reshuffled 1x1x1 convolution computes what ConvTranspose3d computes (bias included), for
    channels-last and standard input, and hands back channels-last."""
    from MedSegUNetLib.model.cpu_network import OneDnnUpsample

    generator = torch.Generator().manual_seed(batch)
    transposed = torch.nn.ConvTranspose3d(6, 5, kernel_size=kernel, stride=kernel, bias=True)
    with torch.no_grad():
        transposed.weight.copy_(torch.randn(transposed.weight.shape, generator=generator))
        transposed.bias.copy_(torch.randn(5, generator=generator))
    x = torch.randn(batch, 6, 3, 4, 5, generator=generator)
    with torch.inference_mode():
        expected = transposed(x)
        upsample = OneDnnUpsample(transposed)
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            got = upsample(x.contiguous(memory_format=layout))
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            assert got.is_contiguous(memory_format=torch.channels_last_3d)


def test_one_window_runs_on_onednn_only():
    """With one window per batch (the CPU default) no convolution of the CPU copy may reach PyTorch's
    slow im2col path, which the plain network takes for small windows (2.5x slower per window)."""
    from torch.profiler import ProfilerActivity, profile

    from MedSegUNetLib.core.labels import default_labels
    from MedSegUNetLib.model.bundle import Preprocessing, create_bundle
    from MedSegUNetLib.model.cpu_network import OneDnnConv, OneDnnUpsample, direct_convolutions_available
    from MedSegUNetLib.prediction.inference import prepare_network, windows_per_batch

    assert direct_convolutions_available(), "this PyTorch build has no oneDNN: the CPU copy would keep the slow path"
    assert windows_per_batch(torch.device("cpu")) == 1
    network = create_bundle(default_labels(["a"]), Preprocessing((2.0, 2.0, 2.0), (32, 32, 16)), base_filters=4).network
    window = torch.randn(1, 1, 16, 32, 32)

    def operators(model) -> set:
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as profiled:
            model(window)
        return {event.key for event in profiled.key_averages()}

    slow = {"aten::slow_conv3d_forward", "aten::slow_conv_transpose3d"}
    assert operators(network.eval()) & slow  # the plain network does take the slow path here
    fast = prepare_network(network, torch.device("cpu"))
    assert any(isinstance(m, OneDnnConv) for m in fast.modules())
    assert any(isinstance(m, OneDnnUpsample) for m in fast.modules())
    assert not any(isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) for m in fast.modules())
    assert not operators(fast) & slow


def test_without_onednn_the_cpu_keeps_torch_convolutions_and_two_windows(monkeypatch):
    """A PyTorch build without oneDNN (some ARM builds): the CPU copy keeps PyTorch's own convolutions
    (still with the channels-last group norms) and predicts two windows at a time, where the dispatcher
    does not fall back to its slow path."""
    from MedSegUNetLib.core.labels import default_labels
    from MedSegUNetLib.model.bundle import Preprocessing, create_bundle
    from MedSegUNetLib.model.cpu_network import ChannelNorm, OneDnnConv, OneDnnUpsample
    from MedSegUNetLib.prediction.inference import prepare_network, windows_per_batch

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert windows_per_batch(torch.device("cpu")) == 2
    network = create_bundle(default_labels(["a"]), Preprocessing((2.0, 2.0, 2.0), (32, 32, 16)), base_filters=4).network
    fast = prepare_network(network, torch.device("cpu"))
    assert any(isinstance(m, ChannelNorm) for m in fast.modules())
    assert not any(isinstance(m, (OneDnnConv, OneDnnUpsample)) for m in fast.modules())
    assert any(isinstance(m, torch.nn.Conv3d) for m in fast.modules())
    windows = torch.randn(2, 1, 16, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fast(windows).contiguous(), network.eval()(windows), atol=1e-4, rtol=1e-4)
