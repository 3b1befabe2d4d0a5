"""The slice-by-slice linear resampling onto the network grid (slice_resampling.py) must give ITK's values."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MedSegUNetLib.core.geometry import Grid, index_maps
from MedSegUNetLib.model.bundle import Preprocessing
from MedSegUNetLib.prediction.preprocessing import network_array, network_grid, network_resampler
from MedSegUNetLib.prediction.slice_resampling import SliceResampler


def _signed_permutation(rng) -> np.ndarray:
    matrix = np.zeros((3, 3))
    matrix[rng.permutation(3), range(3)] = rng.choice([-1.0, 1.0], 3)
    return matrix


def _itk_linear(image: sitk.Image, target: Grid, default: float) -> np.ndarray:
    resampled = sitk.Resample(
        image,
        list(target.size),
        sitk.Transform(),
        sitk.sitkLinear,
        target.origin,
        target.spacing,
        target.direction,
        default,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(resampled)


def _fed(image: sitk.Image, target: Grid, default=None) -> np.ndarray:
    resampler = SliceResampler(image.GetSize(), index_maps(Grid.of(image), target), default)
    for slice_yx in sitk.GetArrayViewFromImage(image):
        resampler.add(slice_yx)
    return resampler.result()


@pytest.mark.parametrize("seed", range(4))
def test_axis_aligned_grids_get_itks_linear_values(seed):
    """Random grids that differ from the source by scaling, shift and a signed permutation of axes (the
    network grid of any input is one): the values ITK's linear resampler gives, to float32 rounding,
    including the edges (beyond the outer voxel centres) and the default value outside."""
    rng = np.random.default_rng(seed)
    for case in range(30):
        size = rng.integers(2, 14, 3)
        dtype = np.int16 if case % 2 else np.float32
        values = rng.normal(0, 800, size[::-1]).astype(dtype)
        image = sitk.GetImageFromArray(values)
        image.SetSpacing(rng.uniform(0.5, 3, 3).tolist())
        image.SetOrigin(rng.uniform(-20, 20, 3).tolist())
        image.SetDirection(_signed_permutation(rng).ravel().tolist())
        target = Grid(
            tuple(int(n) for n in rng.integers(2, 25, 3)),
            tuple(rng.uniform(0.3, 3, 3)),
            tuple(rng.uniform(-25, 25, 3)),
            tuple(_signed_permutation(rng).ravel()),
        )
        assert index_maps(Grid.of(image), target) is not None
        ours = _fed(image, target, default=-7.0)
        itk = _itk_linear(image, target, -7.0)
        assert ours.dtype == np.float32 and ours.shape == itk.shape and ours.flags.c_contiguous
        np.testing.assert_allclose(ours, itk, rtol=1e-6, atol=1e-3)
        assert (ours == -7.0).any() == (itk == -7.0).any()


@pytest.mark.parametrize("angle, code", [(0.0, "RAS"), (0.0, "PIR"), (25.0, "RAS"), (25.0, "LPI")])
def test_network_array_is_itks_resampling_onto_the_network_grid(angle, code):
    """The network grid of an oblique or permuted input: the values of one ITK resampling onto it, with
    the input's minimum outside (the rounding of the grid's size can leave its last voxels outside)."""
    rng = np.random.default_rng(5)
    image = sitk.GetImageFromArray(rng.integers(-1024, 1500, (23, 31, 29)).astype(np.int16))
    image.SetSpacing((0.9, 1.1, 2.5))
    image.SetOrigin((-40.0, 12.0, 100.0))
    radians = np.deg2rad(angle)
    image.SetDirection((np.cos(radians), 0.0, np.sin(radians), 0.0, 1.0, 0.0, -np.sin(radians), 0.0, np.cos(radians)))
    preprocessing = Preprocessing(target_spacing=(2.1, 1.7, 3.3), patch_size=(16, 16, 16), orientation=code)
    grid = network_grid(Grid.of(image), preprocessing)
    ours, its_grid = network_array(image, preprocessing)
    assert its_grid == grid
    np.testing.assert_allclose(
        ours, _itk_linear(image, grid, float(sitk.GetArrayViewFromImage(image).min())), rtol=1e-6, atol=1e-3
    )
    assert ours.shape == grid.size[::-1]


def test_outside_the_source_is_its_minimum_unless_told_otherwise():
    values = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) + 100
    image = sitk.GetImageFromArray(values)
    beyond = Grid(
        (10, 5, 4), (1.0, 1.0, 1.0), (-2.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)
    )  # 2 voxels out on each side of x
    minimum = _fed(image, beyond)
    assert np.all(minimum[:, :, :2] == 100) and np.all(minimum[:, :, -2:] == 100)
    np.testing.assert_array_equal(minimum[:, :, 2:8], values)  # the same voxels inside: exactly the values
    assert np.all(_fed(image, beyond, default=-1.0)[:, :, :2] == -1.0)


def test_either_byte_order_gives_the_same_values():
    rng = np.random.default_rng(3)
    values = rng.integers(-1000, 1000, (7, 8, 9)).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    target = Grid((4, 3, 5), (2.0, 2.5, 1.3), (0.3, 0.2, 0.1), (1, 0, 0, 0, -1, 0, 0, 0, 1))
    maps = index_maps(Grid.of(image), target)
    results = []
    for order in "<>":
        resampler = SliceResampler(image.GetSize(), maps)
        for slice_yx in values.astype(order + "i2"):
            resampler.add(slice_yx)
        results.append(resampler.result())
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[0], _itk_linear(image, target, float(values.min())), rtol=1e-6)


def test_wrong_slices_and_an_early_result_are_refused():
    image = sitk.Image(6, 5, 4, sitk.sitkInt16)
    target = Grid((3, 3, 2), (2.0, 1.6, 2.0), (0.5, 0.3, 0.5), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    resampler = SliceResampler(image.GetSize(), index_maps(Grid.of(image), target))
    with pytest.raises(ValueError, match="shape"):
        resampler.add(np.zeros((6, 5), np.int16))  # (x, y), not (y, x)
    resampler.add(np.zeros((5, 6), np.int16))
    with pytest.raises(ValueError, match="1 of 4"):
        resampler.result()
    for _ in range(3):
        resampler.add(np.ones((5, 6), np.int16))
    assert resampler.complete and resampler.result().shape == (2, 3, 3)
    with pytest.raises(ValueError, match="more slices"):
        resampler.add(np.zeros((5, 6), np.int16))


def test_a_streamed_volume_is_never_held_whole():
    """Fed 200 slices of 256x256 float32 (52 MB) made one at a time, the resampler holds the coarse
    target and a few interpolated slices, never the source."""
    import tracemalloc

    source = Grid((256, 256, 200), (0.8, 0.8, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    preprocessing = Preprocessing(target_spacing=(3.0, 3.0, 3.0), patch_size=(16, 16, 16), orientation="RAS")
    tracemalloc.start()
    try:
        resampler, _ = network_resampler(source, preprocessing)
        for k in range(source.size[2]):
            resampler.add(np.full((256, 256), float(k), np.float32))
        result = resampler.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.shape == (67, 68, 68)
    # the planes follow k: target plane z sits at source index (z + 0.5) * 200 / 67 - 0.5
    np.testing.assert_allclose(result[:, 10, 10], np.clip((np.arange(67) + 0.5) * 200 / 67 - 0.5, 0, 199), rtol=1e-6)
    assert peak < result.nbytes + 4 * 2**20 < 256 * 256 * 200 * 4
