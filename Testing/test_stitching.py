"""The window blending (stitching.py) must give MONAI's sliding_window_inference scores up to the per-voxel
weight sum it leaves out, and so the same argmax; no window's scores outlive the next window's call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from MedSegUNetLib.core.progress import Progress
from MedSegUNetLib.prediction.inference import PredictOptions, class_indices, predict_labels
from MedSegUNetLib.prediction.stitching import blended_scores, count_windows, summed_weights, window_slices


def _network(classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """A small random network whose scores depend on each window's content and position in it."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1),
        torch.nn.InstanceNorm3d(4),
        torch.nn.ReLU(),
        torch.nn.Conv3d(4, classes, 3, padding=1),
    ).eval()


CASES = [
    ((40, 50, 60), (16, 16, 16), 0.5, 1),
    ((10, 70, 33), (16, 32, 32), 0.25, 2),  # thinner than the window along z: padded as MONAI pads
    ((16, 16, 16), (16, 16, 16), 0.5, 1),  # one window, exactly
    ((23, 9, 41), (16, 16, 16), 0.6, 3),  # thinner along y, a last batch of fewer windows
]


@pytest.mark.parametrize("shape,window,overlap,batch", CASES)
def test_scores_divided_by_the_summed_weights_are_monais(shape, window, overlap, batch):
    network = _network()
    volume = torch.from_numpy(np.random.default_rng(sum(shape)).normal(size=(1, *shape)).astype(np.float32))
    fill = float(volume.min())
    with torch.inference_mode():
        monai_scores = sliding_window_inference(
            volume[None],
            list(window),
            batch,
            network,
            overlap=overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=fill,
        )[0]
        calls = []

        def predict(windows):
            calls.append(windows.shape[0])
            return network(windows)

        ours = blended_scores(predict, volume, window, 3, overlap, batch, torch.device("cpu"), fill)
    assert ours.shape == monai_scores.shape == (3, *shape)
    assert (
        sum(calls)
        == count_windows(shape, window, overlap)
        == len(window_slices([max(n, w) for n, w in zip(shape, window)], window, overlap))
    )
    assert max(calls) <= batch
    weights = summed_weights([max(n, w) for n, w in zip(shape, window)], window, overlap)
    crop = tuple(slice((max(w - n, 0)) // 2, (max(w - n, 0)) // 2 + n) for n, w in zip(shape, window))
    weights = weights[crop]
    assert float(weights.min()) > 0  # every voxel seen by a window with a positive weight
    torch.testing.assert_close(ours / weights, monai_scores, rtol=1e-5, atol=1e-5)
    # the argmax of the weighted sums is the argmax of MONAI's averages, voxel for voxel
    assert torch.equal(class_indices(ours), class_indices(monai_scores))


def test_predict_labels_is_monais_argmax_with_tta_and_batches():
    network = _network(classes=4, seed=1)
    array = np.random.default_rng(3).normal(size=(1, 30, 37, 29)).astype(np.float32)
    for tta, batch in ((False, 1), (False, 2), (True, 2)):
        labels = predict_labels(
            network, array, (16, 16, 16), PredictOptions(tta=tta, sw_batch_size=batch, device="cpu"), Progress()
        )
        flips = [()] + ([(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if tta else [])

        def averaged(windows, flips=flips):  # flips bound now, not looked up when the loop has moved on
            return sum(
                torch.flip(network(torch.flip(windows, f) if f else windows), f) if f else network(windows)
                for f in flips
            ) / len(flips)

        with torch.inference_mode():
            reference = sliding_window_inference(
                torch.from_numpy(array)[None],
                [16, 16, 16],
                batch,
                averaged,
                overlap=0.5,
                mode="gaussian",
                padding_mode="constant",
                cval=float(array.min()),
            )[0]
        np.testing.assert_array_equal(labels, class_indices(reference).numpy(), err_msg=f"tta={tta} batch={batch}")


def test_each_windows_scores_are_freed_before_the_next_call():
    """Part of what keeps the heap the same from window to window (stitching.py says why): when the
    network is called, no earlier window's scores are still held."""
    import weakref

    network = _network()
    volume = torch.zeros((1, 24, 24, 24))
    alive_at_call = []
    outputs = []

    def predict(windows):
        alive_at_call.append(sum(ref() is not None for ref in outputs))
        output = network(windows)
        outputs.append(weakref.ref(output))
        return output

    with torch.inference_mode():
        blended_scores(predict, volume, (16, 16, 16), 3, 0.5, 1, torch.device("cpu"), 0.0)
    assert len(alive_at_call) == 8 and alive_at_call == [0] * 8


def test_a_network_with_other_output_is_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"scores of shape \(1, 2, 16, 16, 16\).*3 classes"):
        blended_scores(
            lambda w: torch.zeros((w.shape[0], 2, *w.shape[2:])),
            torch.zeros((1, 20, 20, 20)),
            (16, 16, 16),
            3,
            0.5,
            1,
            torch.device("cpu"),
            0.0,
        )


@pytest.mark.parametrize("window", [(128, 128, 128), (64, 160, 96), (7, 20, 33), (1, 40, 40)])
def test_imported_nnunet_models_blend_with_nnunets_own_gaussian(window):
    """The weights of windows placed as nnU-Net places them are its predictor's compute_gaussian, as the
    predictor calls it (scale 10, float16), to one float16 step."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    from MedSegUNetLib.prediction.stitching import window_weights

    theirs = compute_gaussian(window, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    ours = window_weights(window, "gaussian", "nnunet", torch.device("cpu"))
    assert ours.dtype == torch.float32 and ours.shape == window
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-3, atol=0)
    assert float(ours.min()) > 0  # a voxel of weight 0 in every window would divide by zero in nnU-Net


@pytest.mark.parametrize("shape,window,overlap,batch", [CASES[1], CASES[3]])  # the thin ones
def test_replicate_padding_is_monais(shape, window, overlap, batch):
    """A volume thinner than the window, padded by repeating its edge (a MONAI bundle's padding_mode
    replicate): MONAI's scores, up to the weight sum."""
    network = _network(seed=1)
    volume = torch.from_numpy(np.random.default_rng(7).normal(size=(1, *shape)).astype(np.float32))
    with torch.inference_mode():
        theirs = sliding_window_inference(
            volume[None], list(window), batch, network, overlap=overlap, mode="gaussian", padding_mode="replicate"
        )[0]
        ours = blended_scores(
            network, volume, window, 3, overlap, batch, torch.device("cpu"), 0.0, "monai", "gaussian", "replicate"
        )
        constant = blended_scores(network, volume, window, 3, overlap, batch, torch.device("cpu"), 0.0)
    padded = [max(n, w) for n, w in zip(shape, window)]
    crop = tuple(slice((p - n) // 2, (p - n) // 2 + n) for n, p in zip(shape, padded))
    weights = summed_weights(padded, window, overlap)[crop]
    torch.testing.assert_close(ours / weights, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(constant / weights, theirs, atol=1e-3)  # the padding reaches the scores


@pytest.mark.parametrize("placement", ["monai", "nnunet"])
@pytest.mark.parametrize("shape,window,overlap,batch", [*CASES, ((70, 20, 24), (16, 16, 16), 0.25, 2)])
def test_labels_decided_row_by_row_are_the_argmax_of_the_whole_blend(shape, window, overlap, batch, placement):
    """blended_labels holds one window's depth of scores and decides each z slice once no later window
    reaches it: the labels are those of the whole grid's blended scores, voxel for voxel, padding included."""
    from MedSegUNetLib.prediction.stitching import blended_labels

    network = _network(classes=5, seed=2)
    volume = torch.from_numpy(np.random.default_rng(11).normal(size=(1, *shape)).astype(np.float32))
    arguments = (volume, window, 5, overlap, batch, torch.device("cpu"), -1.0, placement, "gaussian")
    with torch.inference_mode():
        whole = class_indices(blended_scores(network, *arguments))
        calls = []

        def predict(windows):
            calls.append(windows.shape[0])
            return network(windows)

        rows = blended_labels(predict, *arguments)
    assert rows.shape == tuple(shape) and rows.dtype == torch.uint8
    assert torch.equal(rows, whole)
    assert len(set(whole.unique().tolist())) > 1  # the network tells voxels apart: the comparison means something
    assert max(calls) <= batch and sum(calls) == len(
        window_slices([max(n, w) for n, w in zip(shape, window)], window, overlap, placement)
    )
