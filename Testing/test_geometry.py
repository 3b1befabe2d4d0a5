"""Geometry: the same physical image stored any way must give the same segmentation in physical space.

A segmentation that comes out flipped or shifted is the worst bug this project can have. The pipeline
tests use a voxel-wise threshold network (a real 1x1x1 convolution), so the right answer is known on
every grid: the thresholded input itself.
"""

from __future__ import annotations

import itertools

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSegUNetLib.commands.segment import SegmentOptions, segment_images
from MedSegUNetLib.core.geometry import (
    Grid,
    grid_from_ijk_to_lps,
    ijk_array,
    ijk_to_lps,
    image_from_ijk_array,
    orientation_code,
    reorient,
    reoriented_grid,
    resample_onto,
    resampled_grid,
)
from MedSegUNetLib.core.labels import default_labels
from MedSegUNetLib.core.progress import Progress
from MedSegUNetLib.model.bundle import Bundle, Normalization, Preprocessing, create_bundle
from MedSegUNetLib.prediction.inference import PredictOptions

THRESHOLD_HU = 200.0  # bone in CTChest4


class ThresholdNet(torch.nn.Module):
    """Class 1 where the (CT-normalized) intensity is above THRESHOLD_HU: a point-wise real network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, kernel_size=1)
        # Normalized value v = (HU + 1000) / 2000; logit1 - logit0 = 400 * (v - v_threshold).
        v_threshold = (THRESHOLD_HU + 1000.0) / 2000.0
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[1, 0] = 400.0
            self.conv.bias[1] = -400.0 * v_threshold

    def forward(self, x):
        return self.conv(x)


def threshold_bundle(spacing=(2.0, 2.0, 2.0), patch=(32, 32, 32), orientation="RAS") -> Bundle:
    preprocessing = Preprocessing(spacing, patch, orientation, Normalization("ct", (-1000.0, 1000.0)))
    bundle = create_bundle(default_labels(["bone"]), preprocessing, ["CT"], base_filters=4)
    return Bundle(bundle.meta, ThresholdNet())


def segment(image: sitk.Image, bundle: Bundle, **options) -> sitk.Image:
    return segment_images([image], bundle, SegmentOptions(PredictOptions(device="cpu", **options)), Progress())


def thresholded(image: sitk.Image) -> np.ndarray:
    return (sitk.GetArrayFromImage(image) > THRESHOLD_HU).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def physical_centroid(mask_zyx: np.ndarray, reference: sitk.Image) -> np.ndarray:
    k, j, i = np.nonzero(mask_zyx)
    index = np.stack([i, j, k, np.ones_like(i)]).astype(float)
    return (ijk_to_lps(reference) @ index)[:3].mean(axis=1)


@pytest.fixture(scope="module")
def chest(ct_chest) -> sitk.Image:
    return sitk.Cast(sitk.ReadImage(str(ct_chest)), sitk.sitkFloat32)


# --- the conversion functions ----------------------------------------------------------------------


def oblique_direction(angle_degrees: float = 20.0, flip: bool = False) -> np.ndarray:
    a = np.radians(angle_degrees)
    rotation_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rotation_x = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    direction = rotation_z @ rotation_x
    if flip:
        direction = direction @ np.diag([1, 1, -1])  # left-handed index axes
    return direction


@pytest.mark.parametrize("flip", [False, True])
def test_ijk_to_lps_round_trip(flip):
    voxels = np.random.default_rng(0).integers(0, 5, size=(7, 5, 3)).astype(np.uint8)
    matrix = np.eye(4)
    matrix[:3, :3] = oblique_direction(30, flip) @ np.diag([0.7, 1.1, 2.5])
    matrix[:3, 3] = [-12.5, 40.0, 7.25]
    image = image_from_ijk_array(voxels, matrix)
    assert image.GetSize() == (7, 5, 3)
    np.testing.assert_allclose(ijk_to_lps(image), matrix, atol=1e-9)
    np.testing.assert_array_equal(ijk_array(image), voxels)
    # Voxel (i, j, k) of the array is the voxel ITK places at matrix @ (i, j, k, 1).
    point = matrix @ np.array([6, 1, 2, 1.0])
    assert image.TransformPhysicalPointToIndex(point[:3].tolist()) == (6, 1, 2)
    assert image[6, 1, 2] == voxels[6, 1, 2]
    spacing, origin, _ = grid_from_ijk_to_lps(matrix)
    np.testing.assert_allclose(spacing, [0.7, 1.1, 2.5])
    np.testing.assert_allclose(origin, [-12.5, 40.0, 7.25])


def test_slicer_segmentation_maps_onto_its_volume(ct_chest, chest_segmentation):
    """Slicer's own pair: slicerio's voxels and matrix give the grid SimpleITK reads from the .seg.nrrd."""
    import slicerio

    segmentation = slicerio.read_segmentation(str(chest_segmentation))
    via_slicerio = image_from_ijk_array(segmentation["voxels"], segmentation["ijkToLPS"])
    via_itk = sitk.ReadImage(str(chest_segmentation))
    assert Grid.of(via_slicerio).matches(Grid.of(via_itk))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(via_slicerio), sitk.GetArrayFromImage(via_itk))
    assert Grid.of(via_itk).matches(Grid.of(sitk.ReadImage(str(ct_chest))))


def test_resampled_grid_keeps_the_physical_box(chest):
    grid = resampled_grid(Grid.of(chest), (2.0, 2.0, 2.0))
    old = Grid.of(chest)

    def corners(g: Grid) -> np.ndarray:
        direction = np.array(g.direction).reshape(3, 3)
        first = np.array(g.origin) - direction @ (np.array(g.spacing) / 2)
        last = first + direction @ (np.array(g.spacing) * np.array(g.size))
        return np.stack([first, last])

    np.testing.assert_allclose(corners(grid), corners(old), atol=1e-6)
    assert grid.size == (195, 195, 170)
    np.testing.assert_allclose(grid.spacing, [2.0, 2.0, 2.0], rtol=0.01)


@pytest.mark.parametrize("code", ["RAS", "LPS", "LAS", "PIR", "SAL", "ILP"])
def test_reorient_is_exact_reindexing(chest, code):
    oriented = reorient(chest, code)
    assert orientation_code(oriented.GetDirection()) == code
    # Every voxel keeps its physical position and value: resampling back is the identity.
    back = resample_onto(oriented, Grid.of(chest), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(chest))


@pytest.mark.parametrize("code", ["RAS", "LPS", "LAS", "PIR", "SAL", "ILP"])
@pytest.mark.parametrize("angle, flip", [(0.0, False), (20.0, False), (35.0, True)])
def test_reoriented_grid_is_the_grid_reorient_gives(code, angle, flip):
    image = sitk.Image([7, 5, 3], sitk.sitkUInt8)  # unequal sizes and spacings: a swapped axis shows
    image.SetSpacing((0.7, 1.1, 2.5))
    image.SetOrigin((-31.0, 12.5, 140.0))
    image.SetDirection(tuple(oblique_direction(angle, flip).ravel()))
    expected = Grid.of(reorient(image, code))
    computed = reoriented_grid(Grid.of(image), code)
    assert computed.size == expected.size
    assert computed.matches(expected, tolerance=1e-9)


def test_network_grid_in_one_resampling_equals_reorienting_first(chest):
    """to_network_grid folds the reorientation into its resampling: the same values as doing both."""
    from MedSegUNetLib.prediction.preprocessing import network_grid, to_network_grid

    preprocessing = Preprocessing(target_spacing=(1.7, 2.2, 3.1), patch_size=(32, 32, 32), orientation="RAS")
    one_pass = to_network_grid(sitk.Cast(chest, sitk.sitkInt16), preprocessing)  # int16 in, float32 out
    oriented = reorient(chest, "RAS")
    grid = resampled_grid(Grid.of(oriented), preprocessing.target_spacing)
    two_passes = resample_onto(
        oriented, grid, sitk.sitkLinear, default_value=float(sitk.GetArrayViewFromImage(chest).min())
    )
    assert one_pass.GetPixelID() == sitk.sitkFloat32
    assert Grid.of(one_pass).matches(grid, tolerance=1e-9) and network_grid(Grid.of(chest), preprocessing) == Grid.of(
        one_pass
    )
    np.testing.assert_allclose(sitk.GetArrayFromImage(one_pass), sitk.GetArrayFromImage(two_passes), atol=0.01)


@pytest.mark.parametrize("seed", range(4))
def test_nearest_resampling_of_axis_aligned_grids_is_itks(seed):
    """resample_onto's per-axis gather for grids that differ by scaling, shift and a signed permutation
    of axes gives ITK's nearest-neighbour result voxel for voxel: which voxel is nearest, the default
    value outside, the pixel type asked for."""
    from MedSegUNetLib.core.geometry import index_maps

    rng = np.random.default_rng(seed)

    def signed_permutation() -> np.ndarray:
        matrix = np.zeros((3, 3))
        matrix[rng.permutation(3), range(3)] = rng.choice([-1.0, 1.0], 3)
        return matrix

    for _ in range(40):
        size = rng.integers(3, 12, 3)
        image = sitk.GetImageFromArray(rng.integers(0, 250, size[::-1]).astype(np.uint8))
        image.SetSpacing(rng.uniform(0.5, 3, 3).tolist())
        image.SetOrigin(rng.uniform(-20, 20, 3).tolist())
        image.SetDirection(signed_permutation().ravel().tolist())
        target = Grid(
            tuple(int(n) for n in rng.integers(3, 25, 3)),
            tuple(rng.uniform(0.3, 3, 3)),
            tuple(rng.uniform(-25, 25, 3)),
            tuple(signed_permutation().ravel()),
        )
        assert index_maps(Grid.of(image), target) is not None  # the gather is what runs here
        fast = resample_onto(image, target, sitk.sitkNearestNeighbor, default_value=7, pixel_type=sitk.sitkInt16)
        itk = sitk.Resample(
            image,
            list(target.size),
            sitk.Transform(),
            sitk.sitkNearestNeighbor,
            target.origin,
            target.spacing,
            target.direction,
            7,
            sitk.sitkInt16,
        )
        assert fast.GetPixelID() == sitk.sitkInt16 and Grid.of(fast).matches(target, tolerance=1e-12)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(fast), sitk.GetArrayViewFromImage(itk))
    oblique = Grid((5, 5, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(oblique_direction(20.0, False).ravel()))
    assert index_maps(Grid.of(image), oblique) is None  # left to ITK


@pytest.mark.parametrize("angle, flip, code", [(0.0, False, "RAS"), (0.0, False, "PIR"), (20.0, True, "LPS")])
def test_restoring_only_the_labelled_box_equals_resampling_everything(angle, flip, code):
    """restore_labels resamples only the part of the input grid a label can reach: the result must be
    voxel for voxel what one nearest-neighbour resampling of the whole grid gives."""
    from MedSegUNetLib.prediction.preprocessing import restore_labels

    # Finer than the network grid, so that every network voxel is some input voxel's nearest.
    input_grid = Grid(
        (160, 150, 90), (0.8, 0.9, 1.5), (-60.0, 20.0, 100.0), tuple(oblique_direction(angle, flip).ravel())
    )
    network = resampled_grid(reoriented_grid(input_grid, code), (2.3, 3.1, 2.9))
    labels = np.zeros(network.size[::-1], dtype=np.uint8)
    z, y, x = (np.array(f) * n for f, n in zip(((0.3, 0.6), (0.2, 0.5), (0.55, 0.9)), labels.shape))
    labels[int(z[0]) : int(z[1]), int(y[0]) : int(y[1]), int(x[0]) : int(x[1])] = 3
    labels[int(z[1]) + 3, int(y[1]) + 2, int(x[1]) + 1] = 7  # a single voxel: the far corner of the labelled box
    predicted = sitk.GetImageFromArray(labels)
    (
        predicted.SetSpacing(network.spacing),
        predicted.SetOrigin(network.origin),
        predicted.SetDirection(network.direction),
    )
    everything = resample_onto(predicted, input_grid, sitk.sitkNearestNeighbor)
    restored = restore_labels(labels, network, input_grid)
    assert Grid.of(restored).matches(input_grid, tolerance=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(restored), sitk.GetArrayViewFromImage(everything))
    assert {3, 7} <= set(np.unique(sitk.GetArrayViewFromImage(restored)))
    empty = restore_labels(np.zeros_like(labels), network, input_grid)
    assert Grid.of(empty).matches(input_grid) and not sitk.GetArrayViewFromImage(empty).any()
    # Labels on a grid that lies beside the input's (1 m away): no input voxel can receive one.
    elsewhere = Grid(network.size, network.spacing, tuple(np.array(network.origin) + 1000.0), network.direction)
    apart = restore_labels(labels, elsewhere, input_grid)
    assert Grid.of(apart).matches(input_grid) and not sitk.GetArrayViewFromImage(apart).any()


@pytest.mark.parametrize("code", ["LPS", "LAS", "PIR"])
def test_same_voxels_sees_through_storage_order_but_not_shifts(chest, code):
    oriented = reorient(chest, code)
    assert Grid.of(oriented).same_voxels(Grid.of(chest))
    assert not Grid.of(oriented).matches(Grid.of(chest))  # another header, the same voxels
    shifted = sitk.Image(chest)
    shifted.SetOrigin(tuple(np.array(chest.GetOrigin()) + np.array(chest.GetSpacing()) * 0.5))
    assert not Grid.of(shifted).same_voxels(Grid.of(chest))
    coarser = sitk.Image(chest)
    coarser.SetSpacing(tuple(np.array(chest.GetSpacing()) * 1.01))
    assert not Grid.of(coarser).same_voxels(Grid.of(chest))


# --- the whole pipeline ----------------------------------------------------------------------------


def stored_variant(image: sitk.Image, permutation, flips) -> sitk.Image:
    """The same physical image with its index axes permuted and flipped."""
    permuted = sitk.PermuteAxes(image, list(permutation))
    return sitk.Flip(permuted, list(flips)) if any(flips) else permuted


VARIANTS = [((0, 1, 2), (True, False, False)), ((1, 0, 2), (False, False, False)), ((2, 0, 1), (False, True, True))]


@pytest.mark.parametrize("permutation,flips", VARIANTS)
def test_flipped_and_permuted_storage_gives_the_same_segmentation(chest, permutation, flips):
    bundle = threshold_bundle(spacing=(4.0, 4.0, 4.0))
    reference = segment(chest, bundle)
    variant = stored_variant(chest, permutation, flips)
    assert orientation_code(variant.GetDirection()) != orientation_code(chest.GetDirection())
    result = segment(variant, bundle)
    assert Grid.of(result).matches(Grid.of(variant)), "output must sit on the input's grid"
    # Brought back to the original indexing, the answer is identical voxel for voxel.
    back = resample_onto(result, Grid.of(chest), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(reference))
    assert sitk.GetArrayFromImage(reference).any()


def test_nifti_and_nrrd_in_ras_space_give_the_same_segmentation(chest, tmp_path):
    bundle = threshold_bundle(spacing=(4.0, 4.0, 4.0))
    reference = sitk.GetArrayFromImage(segment(chest, bundle))
    # NIfTI stores RAS in its sform; SimpleITK converts to LPS on both ends.
    nifti = tmp_path / "chest.nii.gz"
    sitk.WriteImage(chest, str(nifti))
    from_nifti = sitk.ReadImage(str(nifti), sitk.sitkFloat32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(segment(from_nifti, bundle)), reference)
    # An NRRD written in "right-anterior-superior" space, as some tools do.
    matrix_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps(chest)
    ras_file = tmp_path / "chest_ras.nrrd"
    header = {
        "space": "right-anterior-superior",
        "space directions": matrix_ras[:3, :3].T,
        "space origin": matrix_ras[:3, 3],
        "kinds": ["domain"] * 3,
    }
    nrrd.write(str(ras_file), np.asarray(ijk_array(chest)), header, index_order="F")
    from_ras = sitk.ReadImage(str(ras_file), sitk.sitkFloat32)
    assert Grid.of(from_ras).matches(Grid.of(chest))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(segment(from_ras, bundle)), reference)


# Asymmetric ellipsoids (centre offset from the volume centre, radii), in LPS millimetres.
PHANTOM = [
    ((60.0, -30.0, 40.0), (40.0, 25.0, 50.0)),
    ((-50.0, 40.0, -60.0), (30.0, 30.0, 30.0)),
    ((10.0, 70.0, 90.0), (20.0, 35.0, 25.0)),
]


def phantom_on(grid: Grid, centre: np.ndarray) -> np.ndarray:
    """The analytic phantom sampled at the voxel centres of ``grid``: the answer on any grid, as (z, y, x)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.size[::-1]], indexing="ij")
    index = np.stack([i, j, k]).reshape(3, -1).astype(float)
    direction = np.array(grid.direction).reshape(3, 3)
    points = direction @ (np.array(grid.spacing)[:, None] * index) + np.array(grid.origin)[:, None]
    inside = np.zeros(points.shape[1], dtype=bool)
    for offset, radii in PHANTOM:
        relative = (points - (centre + offset)[:, None]) / np.array(radii)[:, None]
        inside |= (relative**2).sum(axis=0) <= 1.0
    return inside.reshape(grid.size[::-1])


def phantom_image(grid: Grid, centre: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.where(phantom_on(grid, centre), 1000.0, -1000.0).astype(np.float32))
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image


def oblique_grid(image: sitk.Image, angle: float, spacing) -> Grid:
    """An oblique, anisotropic grid around the same centre as ``image``."""
    direction = oblique_direction(angle)
    size = [int(s) for s in np.array(image.GetSize()) * np.array(image.GetSpacing()) / np.array(spacing) * 0.8]
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    origin = centre - direction @ (np.array(spacing) * (np.array(size) - 1) / 2)
    return Grid(tuple(size), tuple(float(s) for s in spacing), tuple(origin), tuple(direction.flatten()))


@pytest.mark.parametrize("bundle_spacing", [(2.0, 2.0, 2.0), (1.5, 1.5, 5.0)])
@pytest.mark.parametrize("angle,input_spacing", [(0.0, (3.05, 3.05, 10.0)), (25.0, (2.5, 1.5, 4.0))])
def test_segmentation_sits_where_the_structure_is(chest, bundle_spacing, angle, input_spacing):
    """Against the analytic answer on the input's own grid: no shift, no flip, only resampling blur."""
    centre = np.array(chest.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in chest.GetSize()]))
    grid = Grid.of(chest) if angle == 0 else oblique_grid(chest, angle, input_spacing)
    image = phantom_image(grid, centre)
    result = segment(image, threshold_bundle(spacing=bundle_spacing))
    assert Grid.of(result).matches(grid), "output must sit on the input's grid"
    predicted = sitk.GetArrayFromImage(result)
    expected = phantom_on(grid, centre)
    assert dice(predicted, expected) > 0.93
    shift = np.linalg.norm(physical_centroid(predicted, image) - physical_centroid(expected, image))
    # Partial-volume blur moves a centroid by a fraction of the coarsest voxel; a flip or an
    # off-by-one would move it by tens of millimetres.
    assert shift < 0.25 * max(bundle_spacing), f"segmentation shifted by {shift:.2f} mm"


@pytest.mark.parametrize("angle", [0.0, 25.0])
def test_same_spacing_round_trip_is_exact(chest, angle):
    """When no resampling is needed, restore must put every voxel back exactly (any shift shows here)."""
    centre = np.array(chest.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in chest.GetSize()]))
    grid = oblique_grid(chest, angle, (2.0, 2.0, 3.0))
    image = phantom_image(grid, centre)
    predicted = sitk.GetArrayFromImage(segment(image, threshold_bundle(spacing=(2.0, 2.0, 3.0))))
    np.testing.assert_array_equal(predicted, phantom_on(grid, centre).astype(np.uint8))


def test_mirrored_half_is_not_confused(chest):
    """An asymmetric structure: if the pipeline flipped left-right, it would land on the empty side."""
    array = np.full(sitk.GetArrayFromImage(chest).shape, -1000.0, dtype=np.float32)
    array[10:20, 30:60, 90:120] = 1000.0  # a block on one side only
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(chest)
    predicted = sitk.GetArrayFromImage(segment(image, threshold_bundle(spacing=(4.0, 4.0, 4.0))))
    assert dice(predicted, array > THRESHOLD_HU) > 0.8
    assert not predicted[:, :, :64].any()


@pytest.mark.parametrize("orientation", ["LPS", "PIR"])
def test_bundle_orientation_does_not_change_the_answer(chest, orientation):
    """A bundle trained in another canonical orientation still segments in the right place."""
    reference = sitk.GetArrayFromImage(segment(chest, threshold_bundle(spacing=(4.0, 4.0, 4.0))))
    predicted = sitk.GetArrayFromImage(
        segment(chest, threshold_bundle(spacing=(4.0, 4.0, 4.0), orientation=orientation))
    )
    # Same spacing, other axis order on the network grid: the same answer up to interpolation ties.
    assert dice(predicted, reference) > 0.98
    assert np.linalg.norm(physical_centroid(predicted, chest) - physical_centroid(reference, chest)) < 0.3


def test_all_orientation_codes_are_valid_targets(chest):
    codes = ["".join(p) for p in itertools.product("LR", "AP", "IS")]
    for code in codes:
        assert orientation_code(reorient(chest, code).GetDirection()) == code


def test_writing_into_a_fresh_image_through_its_voxel_view():
    """writable_image.writable_voxels: a (z, y, x) view of the image's own buffer, of its type; what is
    written there is what SimpleITK reads back (restore_labels and the .nii.gz reader fill images so)."""
    from MedSegUNetLib.core.writable_image import writable_voxels

    for pixel_type, dtype in ((sitk.sitkUInt8, np.uint8), (sitk.sitkInt16, np.int16), (sitk.sitkFloat32, np.float32)):
        image = sitk.Image([7, 5, 3], pixel_type)
        voxels = writable_voxels(image)
        assert voxels.shape == (3, 5, 7) and voxels.dtype == dtype
        voxels[1, 2:4, 5] = 9
        read_back = sitk.GetArrayFromImage(image)
        assert read_back[1, 2, 5] == 9 and read_back[1, 3, 5] == 9 and image[5, 2, 1] == 9
        assert np.count_nonzero(read_back) == 2


def test_a_grid_holds_a_lattice_of_its_own_voxels_in_any_axis_order_and_nothing_else():
    """A cropped .seg.nrrd of a volume is made of the volume's voxels; a shifted or coarser one is not."""
    grid = Grid((50, 40, 30), (0.8, 0.8, 2.5), (10.0, -20.0, 5.0), tuple(np.eye(3).reshape(-1)))
    axes = grid.axis_vectors().T  # columns: one voxel's step along i, j, k

    def lattice(first_index, columns) -> np.ndarray:
        matrix = np.eye(4)
        matrix[:3, :3] = columns
        matrix[:3, 3] = grid.to_physical(np.array([first_index], dtype=float))[0]
        return matrix

    assert grid.holds_lattice(lattice([0, 0, 0], axes))
    assert grid.holds_lattice(lattice([12, 3, 7], axes))  # cropped to a box inside
    assert grid.holds_lattice(lattice([12, 3, 7], axes[:, [1, 0, 2]] * [1, -1, 1]))  # permuted, one axis flipped
    assert not grid.holds_lattice(lattice([12.5, 3, 7], axes))  # half a voxel off
    assert not grid.holds_lattice(lattice([12, 3, 7], axes * 2))  # coarser voxels
    assert not grid.holds_lattice(lattice([60, 3, 7], axes))  # starts outside the grid
    a = np.deg2rad(10.0)
    turned = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ axes
    assert not grid.holds_lattice(lattice([0, 0, 0], turned))  # oblique to it


@pytest.mark.parametrize("angle, flip, code", [(0.0, False, "RAS"), (20.0, True, "LPS")])
def test_restoring_scores_in_slabs_equals_the_argmax_of_whole_resampled_scores(monkeypatch, angle, flip, code):
    """restore_scores resamples each class onto one slab of input slices at a time: the labels must be
    voxel for voxel the argmax of every class resampled onto the whole grid at once (nnU-Net's way)."""
    import MedSegUNetLib.prediction.preprocessing as preprocessing

    direction = tuple(oblique_direction(angle, flip).ravel())
    input_grid = Grid((70, 60, 41), (0.8, 0.9, 1.5), (-60.0, 20.0, 100.0), direction)
    network = resampled_grid(reoriented_grid(input_grid, code), (2.3, 3.1, 2.9))
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, *network.size[::-1])).astype(np.float32)
    values = np.array([0, 5, 9, 200], dtype=np.uint8)
    whole = []
    for class_scores in scores:
        image = sitk.GetImageFromArray(class_scores)
        image.SetSpacing(network.spacing), image.SetOrigin(network.origin), image.SetDirection(network.direction)
        resampled = resample_onto(image, input_grid, sitk.sitkLinear, float(class_scores.min()))
        whole.append(sitk.GetArrayFromImage(resampled))
    expected = values[np.argmax(np.stack(whole), axis=0)]
    monkeypatch.setattr(preprocessing, "RESTORE_SLAB_VOXELS", 70 * 60 * 4)  # 11 slabs, the last one short
    restored = preprocessing.restore_scores(scores, network, input_grid, values)
    assert Grid.of(restored).matches(input_grid, tolerance=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(restored), expected)
    assert set(np.unique(expected)) == set(values.tolist())
