"""The model bundle: round trip, safe loading, validation of what it declares."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from conftest import MODULE_DIR, make_small_bundle

from MedSegUNetLib.core.errors import Cancelled, MedSegError
from MedSegUNetLib.model.bundle import (
    METADATA_KEY,
    BundleMeta,
    Label,
    Normalization,
    Preprocessing,
    create_bundle,
    load_bundle,
    read_bundle_metadata,
    save_bundle,
)
from MedSegUNetLib.model.network import NetworkSpec

TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~"
    "SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
)


def full_meta_bundle():
    labels = [Label(1, "liver", (0.86, 0.45, 0.39), TERMINOLOGY), Label(5, "spleen", (0.62, 0.35, 0.66))]
    preprocessing = Preprocessing(
        (1.5, 1.5, 3.0), (64, 64, 32), "LPS", Normalization("ct", (-200.0, 300.0), 50.0, 80.0)
    )
    bundle = create_bundle(labels, preprocessing, ["CT"], name="abdomen", seed=3, base_filters=4)
    bundle.meta.provenance["metrics"] = {"dice_liver": 0.93}
    return bundle


def test_round_trip_keeps_everything(tmp_path):
    bundle = full_meta_bundle()
    path = save_bundle(tmp_path / "abdomen.safetensors", bundle.meta, bundle.network)
    loaded = load_bundle(path)
    assert loaded.meta == bundle.meta
    assert loaded.meta.labels[0].terminology == TERMINOLOGY
    assert loaded.meta.preprocessing.normalization.mean == 50.0
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x), bundle.network(x))
    assert not loaded.network.training


def test_unet_bundles_load_too(tmp_path):
    spec = NetworkSpec(
        "UNet",
        {
            "spatial_dims": 3,
            "in_channels": 2,
            "out_channels": 3,
            "channels": [4, 8, 16],
            "strides": [2, 2],
            "num_res_units": 1,
        },
    )
    preprocessing = Preprocessing((1.0, 1.0, 1.0), (32, 32, 32), "RAS", Normalization("zscore", None, nonzero=True))
    bundle = create_bundle(
        [Label(1, "a", (1, 0, 0)), Label(2, "b", (0, 1, 0))], preprocessing, ["T1", "T2"], network=spec
    )
    path = save_bundle(tmp_path / "mr.safetensors", bundle.meta, bundle.network)
    assert load_bundle(path).meta.channels == ["T1", "T2"]


def test_segresnet_with_monais_grid_padding_and_rescale_round_trips_as_format_2(tmp_path):
    """What an imported MONAI bundle may need (MONAI's Spacing grid, replicate padding, a rescale after the
    z-score) is kept, and marks the bundle format 2; a bundle without them stays format 1 with none of the
    keys a version 1 reader would not know."""
    spec = NetworkSpec("SegResNet", {"in_channels": 1, "out_channels": 3, "init_filters": 8})
    normalization = Normalization("zscore", None, nonzero=True, rescale_to=(-1, 1))
    preprocessing = Preprocessing((1.5, 1.5, 1.5), (32, 32, 32), "RAS", normalization, grid="centres")
    bundle = create_bundle([Label(1, "a", (1, 0, 0)), Label(2, "b", (0, 1, 0))], preprocessing, ["CT"], network=spec)
    bundle.meta.padding = "replicate"
    path = save_bundle(tmp_path / "segresnet.safetensors", bundle.meta, bundle.network)
    loaded = read_bundle_metadata(path)
    assert loaded == bundle.meta and json.loads(loaded.to_json())["format_version"] == 2
    assert (loaded.padding, loaded.preprocessing.grid, loaded.preprocessing.normalization.rescale_to) == (
        "replicate",
        "centres",
        (-1.0, 1.0),
    )
    plain = json.loads(full_meta_bundle().meta.to_json())
    assert plain["format_version"] == 1
    assert "padding" not in plain and "grid" not in plain["preprocessing"]
    assert "rescale_to" not in plain["preprocessing"]["normalization"]


@pytest.mark.parametrize(
    "args, message",
    [
        ({"init_filters": 10**6}, "outside 1..4096"),
        ({"init_filters": 1024, "blocks_down": [1, 1, 1, 1]}, "outside 1..4096"),  # 1024 doubled three times
        ({"blocks_down": [1, 10**6]}, "blocks per level"),
        ({"blocks_down": 3}, "blocks per level"),
        ({"blocks_down": list(range(1, 13))}, "more than 10 levels"),
    ],
)
def test_segresnet_arguments_from_a_file_are_bounded_before_anything_is_built(args, message):
    from MedSegUNetLib.model.network import build_network

    with pytest.raises(ValueError, match=message):
        build_network(NetworkSpec("SegResNet", {"in_channels": 1, "out_channels": 2, **args}))


def test_metadata_is_read_without_torch(tmp_path):
    """The Slicer panel reads labels and provenance at start-up, where torch must not be imported."""
    path = make_small_bundle(tmp_path / "m.safetensors", names=("liver", "spleen"))
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['monai'] = None\n"
        "from MedSegUNetLib.model.bundle import read_bundle_metadata\n"
        f"meta = read_bundle_metadata({str(path)!r})\n"
        "print([l.name for l in meta.labels])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env={"PYTHONPATH": str(MODULE_DIR)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['liver', 'spleen']"


def test_create_bundle_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    preprocessing = Preprocessing((2.0, 2.0, 2.0), (32, 32, 32))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = create_bundle([Label(1, "x", (1, 0, 0))], preprocessing, seed=7, base_filters=4)
    after = torch.rand(1)
    b = create_bundle([Label(1, "x", (1, 0, 0))], preprocessing, seed=7, base_filters=4)
    c = create_bundle([Label(1, "x", (1, 0, 0))], preprocessing, seed=8, base_filters=4)
    assert torch.equal(before, after)
    for (name, wa), wb in zip(a.network.state_dict().items(), b.network.state_dict().values()):
        assert torch.equal(wa, wb), name
    assert any(
        not torch.equal(wa, wc) for wa, wc in zip(a.network.state_dict().values(), c.network.state_dict().values())
    )


# --- what is refused -------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create a file: proof that a bundle was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    torch_checkpoint = tmp_path / "model.pt"
    torch.save({"weights": _Payload(str(marker))}, torch_checkpoint)
    raw_pickle = tmp_path / "model.pkl"
    raw_pickle.write_bytes(pickle.dumps(_Payload(str(marker))))
    for path in (torch_checkpoint, raw_pickle):
        with pytest.raises(MedSegError, match="pickle") as caught:
            load_bundle(path)
        assert str(path) in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty or truncated"),
        (b"\x10\x00", "empty or truncated"),
        (b"hello world, this is not a model", "bad header length"),
        (struct.pack("<Q", 4) + b"{{{{", "unreadable header"),
        (struct.pack("<Q", 2) + b"[]", "bad header"),
    ],
)
def test_garbage_is_refused_with_a_clear_message(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(MedSegError, match=message):
        load_bundle(path)


def test_missing_and_folder_are_refused(tmp_path):
    with pytest.raises(MedSegError, match="not found"):
        load_bundle(tmp_path / "nope.safetensors")
    with pytest.raises(MedSegError, match="folder"):
        load_bundle(tmp_path)


def test_plain_safetensors_without_our_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(MedSegError, match="not a MedSegUNet bundle"):
        read_bundle_metadata(path)


@pytest.mark.parametrize("low_byte", [0x80, 0x50])
def test_header_length_that_looks_like_a_pickle_marker_still_loads(tmp_path, small_bundle, low_byte):
    """A header of 128 (mod 256) bytes starts the file with 0x80, the pickle protocol byte (found by a
    training run whose bundle was refused); 0x50 'P' with a following 'K' would look like a zip."""
    raw = small_bundle.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8 : 8 + length], raw[8 + length :]
    padding = (low_byte - len(header)) % 256  # safetensors allows trailing spaces in the header
    header = header + b" " * padding
    assert len(header) % 256 == low_byte
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(struct.pack("<Q", len(header)) + header + data)
    assert padded.read_bytes()[0] == low_byte
    original = load_bundle(small_bundle)
    loaded = load_bundle(padded)
    assert loaded.meta.to_json() == original.meta.to_json()
    for name, tensor in original.network.state_dict().items():
        assert torch.equal(tensor, loaded.network.state_dict()[name])


def rewrite_metadata(source, target, change) -> None:
    """Copy a bundle, editing its metadata JSON (the weights stay as they are)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata()
    data = json.loads(metadata[METADATA_KEY])
    change(data)
    save_file(tensors, str(target), metadata={METADATA_KEY: json.dumps(data)})


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d["network"]["args"].update(filters=[8, 16, 32, 64, 128]), "shape"),
        (lambda d: d["network"].update({"class": "os.system"}), "unknown network class"),
        (lambda d: d["network"]["args"].update(filters=[10**9, 8, 16, 32, 64]), "outside 1..4096"),
        (lambda d: d["network"]["args"].update(kernel_size="x"), "cannot build"),
        (lambda d: d["labels"].pop(), "outputs for"),
        (lambda d: d.update(format_version=99), "newer than"),
        (lambda d: d["labels"][0].update(color=[2, 0, 0]), "bad color"),
        (lambda d: d["labels"][1].update(value=d["labels"][0]["value"]), "unique"),
        (lambda d: d["preprocessing"].update(target_spacing=[1, 0, 1]), "target_spacing"),
        (lambda d: d["preprocessing"].update(orientation="RRS"), "orientation"),
        (lambda d: d["preprocessing"]["normalization"].update(kind="magic"), "normalization"),
        (lambda d: d["preprocessing"].update(patch_size=[33, 32, 16]), "multiple"),
        (lambda d: d["preprocessing"].update(grid="corners"), "grid rule"),
        (lambda d: d.update(padding="reflect"), "unknown padding"),
    ],
)
def test_declared_network_and_metadata_are_validated(tmp_path, small_bundle, change, message):
    tampered = tmp_path / "tampered.safetensors"
    rewrite_metadata(small_bundle, tampered, change)
    with pytest.raises(MedSegError, match=message) as caught:
        load_bundle(tampered)
    assert str(tampered) in str(caught.value)


def test_weights_with_wrong_dtype_are_refused(tmp_path, small_bundle):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(small_bundle), "pt") as handle:
        tensors = {name: handle.get_tensor(name).double() for name in handle.keys()}
        metadata = handle.metadata()
    path = tmp_path / "double.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(MedSegError, match="dtype"):
        load_bundle(path)


def test_failed_save_leaves_the_old_bundle(tmp_path, small_bundle):
    bundle = load_bundle(small_bundle)
    target = tmp_path / "keep.safetensors"
    save_bundle(target, bundle.meta, bundle.network)
    before = target.read_bytes()
    broken = BundleMeta(bundle.meta.network, [], bundle.meta.channels, bundle.meta.preprocessing)
    with pytest.raises(ValueError):
        save_bundle(target, broken, bundle.network)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def test_a_cancel_while_loading_stays_a_cancel(small_bundle, monkeypatch):
    """A signal that lands while MONAI builds the network is a cancel (exit 130), not "a bad bundle"."""
    import MedSegUNetLib.model.network

    def interrupted(spec):
        raise Cancelled("stopped by signal SIGTERM")

    monkeypatch.setattr(MedSegUNetLib.model.network, "build_network", interrupted)
    with pytest.raises(Cancelled):
        load_bundle(small_bundle)
