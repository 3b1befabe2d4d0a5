"""Shared fixtures: real Slicer-written data from slicerio, and small bundles made on the spot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MedSegUNet"


def slicerio_data(name: str) -> Path:
    """A file shipped inside the slicerio package (no download)."""
    import slicerio

    path = Path(slicerio.__file__).parent / "data" / name
    assert path.exists(), f"slicerio no longer ships {name}"
    return path


@pytest.fixture(scope="session")
def ct_chest() -> Path:
    """CTChest4.nrrd: a real chest CT written by Slicer (128x128x34, 3.05x3.05x10 mm, RAS axes)."""
    return slicerio_data("CTChest4.nrrd")


@pytest.fixture(scope="session")
def chest_segmentation() -> Path:
    """Segmentation.seg.nrrd: the segmentation Slicer saved for CTChest4 (ribs, spine ...)."""
    return slicerio_data("Segmentation.seg.nrrd")


def make_small_bundle(path: Path, names=("ribs", "spine"), spacing=(6.0, 6.0, 6.0), patch=(32, 32, 16), seed=0) -> Path:
    from MedSegUNetLib.core.labels import default_labels
    from MedSegUNetLib.model.bundle import Normalization, Preprocessing, create_bundle, save_bundle

    preprocessing = Preprocessing(spacing, patch, "RAS", Normalization("ct", (-1000.0, 1000.0)))
    bundle = create_bundle(
        default_labels(list(names)), preprocessing, ["CT"], name=path.stem, seed=seed, base_filters=4
    )
    save_bundle(path, bundle.meta, bundle.network)
    return path


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory) -> Path:
    """A freshly initialised DynUNet bundle, small enough to segment CTChest4 in a few seconds."""
    return make_small_bundle(tmp_path_factory.mktemp("bundle") / "small.safetensors")


TRAINING_COMMANDS = ("train", "sample-data", "demo")


def program(command: str) -> str:
    """The module that runs ``command`` as Slicer's panel does: the engine's, or the whole program (training)."""
    return "training" if command in TRAINING_COMMANDS else "MedSegUNetLib"


def run_cli(*args: str, timeout: float = 300, env=None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m MedSegUNetLib ARGS`` (``-m training`` for training's commands), as the Slicer panel starts it."""
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), str(REPO), environment.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", program(args[0]), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        env=environment,
        **kwargs,
    )


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 1, exactly one stderr line naming the problem, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert lines[0].startswith("medsegunet: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def files_in(folder: Path) -> set:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="session")
def engine_baseline(tmp_path_factory):
    """What a child engine process holds before any work: (address space in bytes after importing the
    engine, torch, MONAI and the training package; a HOME as a user's looks after a first run).

    Tests that run the engine under an address-space limit set it this much above the baseline, so a
    CUDA build of torch (gigabytes of mapped libraries) does not fail to import. Importing MONAI imports
    matplotlib, which writes its font cache into a fresh HOME once: a library's cache, not ours."""
    home = tmp_path_factory.mktemp("warm_home")
    environment = dict(os.environ, HOME=str(home), PYTHONPATH=os.pathsep.join([str(MODULE_DIR), str(REPO)]))
    for variable in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR"):
        environment.pop(variable, None)
    probe = (
        "import MedSegUNetLib.cli, MedSegUNetLib.commands.segment, training.cli, training.scenes,"
        " monai.networks.nets, matplotlib.pyplot\n"
        "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmPeak:')][0])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env=environment,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
        check=True,
    )
    return int(result.stdout.strip()), home


def address_space_limit(engine_baseline, headroom: int = 3 * 2**30) -> int:
    """An RLIMIT_AS that leaves the engine ``headroom`` bytes to allocate after its imports."""
    return engine_baseline[0] + headroom


def streamed_onto_a_coarse_grid(path: Path, compressed: bool):
    """A 600x256x256 int16 CT (78 MB; its body's HU follow z) written to ``path``, then read the way segment
    reads a single image (imageio.stream_image_slices into the network grid's resampler) under
    tracemalloc: (the 3 mm result, the peak of Python-visible memory, the volume's bytes)."""
    import tracemalloc

    import numpy as np
    import SimpleITK as sitk

    from MedSegUNetLib.imageio.images import stream_image_slices
    from MedSegUNetLib.model.bundle import Preprocessing
    from MedSegUNetLib.prediction.preprocessing import network_resampler

    values = np.full((600, 256, 256), -1000, np.int16)
    values[:, 64:192, 48:208] = np.arange(600, dtype=np.int16)[:, None, None]
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.8, 0.8, 0.5))
    sitk.WriteImage(image, str(path), useCompression=compressed)
    preprocessing = Preprocessing(target_spacing=(3.0, 3.0, 3.0), patch_size=(16, 16, 16), orientation="LPS")
    made = []

    def start(grid):
        made.append(network_resampler(grid, preprocessing)[0])
        return made[0].add

    tracemalloc.start()
    try:
        assert stream_image_slices(path, start) is not None
        result = made[0].result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.shape == (100, 68, 68)
    np.testing.assert_allclose(result[:, 34, 34], (np.arange(100) + 0.5) * 6 - 0.5, atol=1e-3)  # 6 slices per plane
    return result, peak, values.nbytes
