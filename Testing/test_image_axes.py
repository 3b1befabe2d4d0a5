"""Bundles that keep each image's own array axes (imported nnU-Net models): the network sees the array
nnU-Net would see, transposed by ``transpose_forward``, never reoriented."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.core.geometry import Grid, permuted_grid
from MedSegUNetLib.model.bundle import IMAGE_AXES, Normalization, Preprocessing
from MedSegUNetLib.prediction.preprocessing import network_array, network_grid


def image(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    array = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)  # (z, y, x)
    made = sitk.GetImageFromArray(array)
    made.SetSpacing((1.0, 2.0, 3.0))
    made.SetOrigin((5.0, -4.0, 2.0))
    made.SetDirection(direction)
    return made


def keep_axes(transpose=(0, 1, 2), spacing=(1.0, 2.0, 3.0)) -> Preprocessing:
    zyx_spacing = [spacing[::-1][a] for a in transpose]
    return Preprocessing(tuple(zyx_spacing[::-1]), (8, 8, 8), IMAGE_AXES, Normalization("none", None), transpose)


def test_the_network_sees_the_images_own_array():
    """An image stored with x and y reversed (LPS-like): a reorienting bundle sees the same array for both
    copies; an image-axes bundle sees each copy's own array, as nnU-Net does."""
    original = image()
    flipped = sitk.Flip(original, [True, True, False])  # ITK keeps the physical image: direction flips too
    ras = Preprocessing((1.0, 2.0, 3.0), (8, 8, 8), "RAS", Normalization("none", None))
    assert np.allclose(network_array(original, ras)[0], network_array(flipped, ras)[0])
    own, grid = network_array(flipped, keep_axes())
    assert np.array_equal(own, sitk.GetArrayFromImage(flipped))
    assert grid.direction == Grid.of(flipped).direction


def test_transpose_forward_permutes_the_array_axes():
    """transpose_forward (1, 0, 2): the network array is the image array with z and y swapped, and each
    voxel keeps its physical position."""
    original = image()
    transpose = (1, 0, 2)
    array, grid = network_array(original, keep_axes(transpose))
    assert np.allclose(array, np.transpose(sitk.GetArrayFromImage(original), transpose))
    source = Grid.of(original)
    z, y, x = 2, 5, 3  # a voxel of the network array, and the same voxel of the image
    assert np.allclose(grid.to_physical(np.array([[x, y, z]])), source.to_physical(np.array([[x, z, y]])))
    assert network_grid(source, keep_axes(transpose)) == grid


def test_permuted_grid_is_a_reindexing():
    grid = Grid.of(image((0, 1, 0, 1, 0, 0, 0, 0, -1)))
    assert permuted_grid(grid, (0, 1, 2)) == grid
    moved = permuted_grid(grid, (2, 0, 1))  # new (z, y, x) = old (x, z, y)
    assert moved.size == (grid.size[1], grid.size[2], grid.size[0])
    corners = grid.corners()
    assert np.allclose(sorted(map(tuple, moved.corners())), sorted(map(tuple, corners)))
