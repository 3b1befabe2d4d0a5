"""Cropping to the body: the box, and that segment uses it only where it saves windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedSegUNetLib.commands.segment import SegmentOptions, _body_if_it_pays, predict_in_body
from MedSegUNetLib.core.geometry import Grid
from MedSegUNetLib.core.labels import default_labels
from MedSegUNetLib.core.progress import Progress
from MedSegUNetLib.model.bundle import Bundle, Normalization, Preprocessing, create_bundle
from MedSegUNetLib.prediction.preprocessing import BODY_MARGIN_MM, NetworkInput, body_box


def test_body_box_keeps_every_dense_voxel_with_a_margin():
    hu = np.full((40, 50, 60), -1000.0, dtype=np.float32)
    hu[10:20, 15:30, 5:50] = -100.0  # fat counts as body
    box = body_box(hu, (2.0, 2.0, 2.0))
    margin = int(np.ceil(BODY_MARGIN_MM / 2.0))
    assert box == (slice(10 - margin, 20 + margin), slice(15 - margin, 30 + margin), slice(0, 50 + margin))
    assert body_box(np.full((4, 4, 4), -1000.0), (1.0, 1.0, 1.0)) == (slice(None),) * 3


class ConstantNet(torch.nn.Module):
    """Class 1 everywhere: any voxel outside the predicted box stays background."""

    out_channels = 2

    def forward(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), torch.ones_like(x[:, :1])], dim=1)


def _input(shape_zyx, body) -> NetworkInput:
    grid = Grid(tuple(shape_zyx[::-1]), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return NetworkInput(np.zeros((1, *shape_zyx), dtype=np.float32), grid, body)


@pytest.fixture
def bundle() -> Bundle:
    preprocessing = Preprocessing((3.0, 3.0, 3.0), (32, 32, 32), "RAS", Normalization("ct", (-1000.0, 1000.0)))
    made = create_bundle(default_labels(["body"]), preprocessing, ["CT"], base_filters=4)
    return Bundle(made.meta, ConstantNet())


def test_a_box_that_saves_windows_is_used_and_outside_is_background(bundle):
    body = (slice(0, 32), slice(10, 40), slice(20, 50))
    network_input = _input((32, 96, 96), body)
    options = SegmentOptions()
    options.predict.device = "cpu"
    assert _body_if_it_pays(bundle, network_input, options) == body
    classes = predict_in_body(bundle, network_input, options, Progress())
    assert classes[body].min() == 1 and classes.sum() == classes[body].size
    options.crop_to_body = False
    assert predict_in_body(bundle, network_input, options, Progress()).min() == 1


def test_a_box_that_saves_no_window_is_not_used(bundle):
    network_input = _input((32, 48, 48), (slice(0, 32), slice(2, 46), slice(1, 47)))
    assert _body_if_it_pays(bundle, network_input, SegmentOptions()) == (slice(None),) * 3
