"""The engine's forms of what a MONAI bundle runs equal MONAI's own: NormalizeIntensity then ScaleIntensity, the
grid of Spacing after Orientation, and SegResNet and BasicUNet run on (z, y, x) arrays with their kernels
transposed (how import-model carries their weights over)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSegUNetLib.core.geometry import Grid, reoriented_grid, resampled_grid
from MedSegUNetLib.model.bundle import Normalization
from MedSegUNetLib.model.network import NetworkSpec, build_network
from MedSegUNetLib.prediction.preprocessing import normalize


@pytest.mark.parametrize("nonzero", [True, False])
def test_zscore_then_rescale_is_monais(nonzero):
    from monai.transforms import NormalizeIntensity, ScaleIntensity

    array = np.random.default_rng(3).normal(40, 300, size=(1, 20, 30, 40)).astype(np.float32)
    array[:, :4] = 0  # voxels a nonzero z-score leaves alone
    expected = ScaleIntensity(minv=-1.0, maxv=1.0)(NormalizeIntensity(nonzero=nonzero)(array.copy()))
    ours = normalize(array[0].copy(), Normalization("zscore", None, nonzero=nonzero, rescale_to=(-1.0, 1.0)))
    np.testing.assert_allclose(ours, np.asarray(expected)[0], atol=2e-6)
    assert float(ours.min()) == pytest.approx(-1.0) and float(ours.max()) == pytest.approx(1.0)


def test_a_constant_image_is_rescaled_as_monai_rescales_it():
    from monai.transforms import ScaleIntensity

    array = np.full((1, 4, 5, 6), 7.0, dtype=np.float32)
    expected = np.asarray(ScaleIntensity(minv=-1.0, maxv=1.0)(array.copy()))[0]
    np.testing.assert_allclose(
        normalize(array[0].copy(), Normalization("none", None, rescale_to=(-1.0, 1.0))), expected
    )


@pytest.mark.parametrize(
    "size, spacing, pixdim",
    [((64, 64, 20), (3.05, 3.05, 10.0), (1.5, 1.5, 1.5)), ((50, 41, 33), (0.8, 0.8, 2.5), (3.0, 3.0, 3.0))],
)
@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1)])
def test_the_centres_grid_is_monais_spacing_after_orientation(tmp_path, size, spacing, pixdim, direction):
    """MONAI's Orientationd RAS then Spacingd, on a NIfTI it loads, give the grid of resampled_grid's
    ``centres`` rule: the same voxel count and the same voxel centres in space."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin((12.5, -40.0, 7.0))
    image.SetDirection([float(d) for d in direction])
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(image, str(path))
    loaded = Compose(
        [
            LoadImaged("image"),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=pixdim, mode="bilinear"),
        ]
    )({"image": str(path)})["image"]
    monai_shape = tuple(loaded.shape[1:])  # (x, y, z)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    monai_affine = ras_to_lps @ np.asarray(loaded.affine, dtype=float)  # voxel index -> LPS

    grid = resampled_grid(reoriented_grid(Grid.of(sitk.ReadImage(str(path))), "RAS"), pixdim, "centres")
    assert grid.size == monai_shape
    ours = np.eye(4)
    ours[:3, :3] = np.array(grid.direction).reshape(3, 3) * np.array(grid.spacing)
    ours[:3, 3] = grid.origin
    np.testing.assert_allclose(ours, monai_affine, atol=1e-4)


@pytest.mark.parametrize(
    "spec, divisor",
    [
        (
            NetworkSpec(
                "SegResNet",
                {"in_channels": 1, "out_channels": 3, "init_filters": 8, "blocks_down": [1, 2, 2], "blocks_up": [1, 1]},
            ),
            4,
        ),
        (NetworkSpec("SegResNet", {"in_channels": 2, "out_channels": 2, "upsample_mode": "deconv"}), 8),
        (NetworkSpec("BasicUNet", {"in_channels": 1, "out_channels": 3, "features": [4, 4, 8, 8, 16, 4]}), 16),
    ],
)
def test_networks_run_on_transposed_arrays_with_transposed_kernels(spec, divisor):
    """The importer reverses every 5-D weight's last three axes; the network on the (z, y, x) array then
    gives MONAI's scores, transposed, for any input (anisotropic here, so a wrong axis would show)."""
    torch.manual_seed(0)
    theirs = build_network(spec).eval()
    ours = build_network(spec).eval()
    ours.load_state_dict({k: v.permute(0, 1, 4, 3, 2) if v.dim() == 5 else v for k, v in theirs.state_dict().items()})
    assert spec.size_divisor() == [divisor] * 3  # the patch sizes the network accepts
    assert ours.out_channels == spec.out_channels  # what the prediction sizes its buffers and memory check by
    x = torch.randn(1, spec.in_channels, 2 * divisor, 3 * divisor, 4 * divisor)  # (x, y, z)
    with torch.no_grad():
        expected = theirs(x)
        got = ours(x.permute(0, 1, 4, 3, 2).contiguous()).permute(0, 1, 4, 3, 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
