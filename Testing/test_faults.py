"""Faults while writing: a full disk (simulated with a file-size limit) and concurrent runs on one folder."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import slicerio
from conftest import MODULE_DIR, REPO, address_space_limit, assert_clean_failure, make_small_bundle, program


def engine(*args: str, limit_bytes: int = None, address_space: int = None) -> subprocess.Popen:
    def limit_file_size():
        if limit_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), str(REPO)]))
    return subprocess.Popen(
        [sys.executable, "-m", program(args[0]), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=environment,
        preexec_fn=limit_file_size,
    )


@pytest.mark.parametrize("ending, limit", [(".seg.nrrd", 200), (".seg.nrrd", 20000), (".nii.gz", 200)])
def test_disk_full_while_writing_keeps_the_old_output_and_leaves_no_partial_file(
    tmp_path, ct_chest, small_bundle, ending, limit
):
    """The disk fills in the header (200 bytes), or in the middle of the .seg.nrrd's voxel data."""
    if limit > 200:  # the whole file is larger than the limit, its header smaller
        whole = tmp_path / "whole" / f"result{ending}"
        whole.parent.mkdir()
        process = engine("segment", str(ct_chest), "-m", str(small_bundle), "-o", str(whole), "--device", "cpu")
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        written = whole.read_bytes()
        assert written.index(b"\n\n") < limit < len(written)
        shutil.rmtree(whole.parent)
    output = tmp_path / f"result{ending}"
    output.write_bytes(b"the user's earlier result")
    process = engine(
        "segment", str(ct_chest), "-m", str(small_bundle), "-o", str(output), "--device", "cpu", limit_bytes=limit
    )
    stdout, stderr = process.communicate(timeout=300)
    assert_clean_failure(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), output.name)
    assert output.read_bytes() == b"the user's earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]  # no temporary left behind


def test_concurrent_runs_into_one_folder_do_not_corrupt_each_other(tmp_path, ct_chest, small_bundle):
    outputs = [tmp_path / "same.seg.nrrd", tmp_path / "same.seg.nrrd", tmp_path / "other.seg.nrrd"]
    processes = [
        engine("segment", str(ct_chest), "-m", str(small_bundle), "-o", str(o), "--device", "cpu") for o in outputs
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.seg.nrrd", "same.seg.nrrd"]
    for path in set(outputs):
        segmentation = slicerio.read_segmentation(str(path))  # whole, readable files
        assert [s["name"] for s in segmentation["segments"]] == ["ribs", "spine"]
        assert segmentation["voxels"].shape == (128, 128, 34)


def test_volume_too_large_for_the_memory_is_refused_up_front_with_the_estimate(tmp_path, ct_chest, engine_baseline):
    """At a 0.3 mm model spacing CTChest4 becomes 1300x1300x1133 voxels (~9 GiB to predict: the input and
    the labels, with the scores of one 16-slice window's depth). Under an address-space limit 3 GiB above
    what the engine's imports take, the engine must refuse before resampling, not after filling the memory,
    and count the limit as what is available."""
    from MedSegUNetLib.prediction.inference import prediction_memory_bytes

    fine = make_small_bundle(tmp_path / "fine.safetensors", spacing=(0.3, 0.3, 0.3))
    output = tmp_path / "out.seg.nrrd"
    process = engine(
        "segment",
        str(ct_chest),
        "-m",
        str(fine),
        "-o",
        str(output),
        "--device",
        "cpu",
        "--progress",
        "json",
        address_space=address_space_limit(engine_baseline),
    )
    stdout, stderr = process.communicate(timeout=300)
    line = assert_clean_failure(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    needed = prediction_memory_bytes((1, 1133, 1300, 1300), 3, scores_depth=16) / 2**30
    assert 9 < needed < 10  # the whole grid's scores would be 37 GiB
    assert f"needs about {needed:.1f} GiB of memory at the model's spacing (1300x1300x1133 voxels, 3 classes)" in line
    assert float(line.split(", ")[-1].split(" GiB are available")[0]) < 3.5, line  # the address-space limit counts
    stages = [json.loads(text)["stage"] for text in stdout.splitlines()]
    assert "preprocess" not in stages and stages[-1] == "error", "refused before resampling"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fine.safetensors"]


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, ct_chest, small_bundle, monkeypatch, capsys):
    from pathlib import Path

    from MedSegUNetLib.cli import main

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if (
        os.geteuid() == 0
    ):  # root writes through permissions: emulate a folder even root may not write (a read-only mount)
        real_access = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda path, mode, **kw: not (mode & os.W_OK and Path(path) == folder) and real_access(path, mode, **kw),
        )
    try:
        code = main(
            [
                "segment",
                str(ct_chest),
                "-m",
                str(small_bundle),
                "-o",
                str(folder / "out.seg.nrrd"),
                "--progress",
                "json",
            ]
        )
    finally:
        folder.chmod(0o755)
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.strip() == f"medsegunet: error: {folder}: output folder is not writable"
    assert [json.loads(line)["stage"] for line in captured.out.splitlines()] == ["error"], (
        "refused before reading anything"
    )
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("inflater", ["isal", "zlib"])
def test_a_written_nifti_is_checked_whole_before_it_replaces_anything(tmp_path, monkeypatch, inflater):
    """ITK can report success after a short write: the .nii.gz is inflated (CRC and length checked) and
    must hold exactly the voxels written. Each damage below must be caught, with ISA-L and with zlib."""
    import numpy as np
    import SimpleITK as sitk

    from MedSegUNetLib.imageio.gzip_stream import gzip_inflater
    from MedSegUNetLib.imageio.images import _nifti_gz_holds

    if inflater == "zlib":
        monkeypatch.setitem(sys.modules, "isal", None)  # as if ISA-L were not installed
    assert gzip_inflater()[1].__module__.split(".")[0] in ({"zlib"} if inflater == "zlib" else {"igzip_lib", "isal"})
    labels = np.random.default_rng(0).integers(0, 6, (30, 40, 50)).astype(np.uint8)
    path = tmp_path / "labels.nii.gz"
    image = sitk.GetImageFromArray(labels)
    sitk.WriteImage(image, str(path), useCompression=True)
    whole = path.read_bytes()
    assert _nifti_gz_holds(path, image)
    damaged = {
        "truncated in the data": whole[: len(whole) // 2],
        "trailer cut": whole[:-3],
        "one bit flipped": whole[:100] + bytes([whole[100] ^ 1]) + whole[101:],
        "garbage appended": whole + b"\x00" * 16,
    }
    for name, data in damaged.items():
        path.write_bytes(data)
        assert not _nifti_gz_holds(path, image), name
    path.write_bytes(whole)
    other = labels.copy()
    other[5, 5, 5] += 1
    assert not _nifti_gz_holds(path, sitk.GetImageFromArray(other)), "other voxels"
