"""`medsegunet segment` end to end on real files, as the Slicer panel runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import MODULE_DIR, REPO, assert_clean_failure, files_in, run_cli

from MedSegUNetLib.cli import main
from MedSegUNetLib.core.geometry import Grid
from MedSegUNetLib.model.bundle import read_bundle_metadata


def test_segment_ctchest_writes_a_slicer_segmentation(tmp_path, ct_chest, small_bundle):
    """The issue's 'done when': every segment named, on the input's grid, readable by slicerio."""
    output = tmp_path / "out.seg.nrrd"
    result = run_cli("segment", str(ct_chest), "-m", str(small_bundle), "-o", str(output), "--progress", "none")
    assert result.returncode == 0, result.stderr
    segmentation = slicerio.read_segmentation(str(output))
    meta = read_bundle_metadata(small_bundle)
    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == [label.name for label in meta.labels]
    assert [s["labelValue"] for s in segments] == [label.value for label in meta.labels]
    for segment, label in zip(segments, meta.labels):
        np.testing.assert_allclose(segment["color"], label.color, atol=1e-6)
    reference = sitk.ReadImage(str(ct_chest))
    assert segmentation["voxels"].shape == reference.GetSize()
    written = sitk.ReadImage(str(output))
    assert Grid.of(written).matches(Grid.of(reference))
    values = set(np.unique(segmentation["voxels"]).tolist())
    assert values <= {0} | {label.value for label in meta.labels}
    assert files_in(tmp_path) == {"out.seg.nrrd"}


def test_terminology_and_empty_segments_reach_the_file(tmp_path, ct_chest):
    """Labels the model never predicts are still segments (empty), with their terminology."""
    from MedSegUNetLib.core.labels import Label
    from MedSegUNetLib.imageio.images import write_segmentation

    terminology = (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~"
        "SCT^113197003^Rib~^^~Anatomic codes - DICOM master list~^^~^^"
    )
    labels = [Label(1, "rib", (1.0, 0.9, 0.8), terminology), Label(7, "tumour", (0.2, 0.3, 0.4))]
    image = sitk.ReadImage(str(ct_chest))
    mask = sitk.Cast(sitk.BinaryThreshold(image, 200, 5000, 1, 0), sitk.sitkUInt8)
    write_segmentation(tmp_path / "t.seg.nrrd", mask, labels)
    segmentation = slicerio.read_segmentation(str(tmp_path / "t.seg.nrrd"))
    rib, tumour = segmentation["segments"]
    assert rib["terminology"]["type"][1] == "113197003"
    assert tumour["name"] == "tumour" and tumour["labelValue"] == 7
    assert list(tumour["extent"]) == [0, -1, 0, -1, 0, -1]
    k, j, i = np.nonzero(sitk.GetArrayFromImage(mask))
    assert list(rib["extent"]) == [i.min(), i.max(), j.min(), j.max(), k.min(), k.max()]


def test_json_progress_protocol(tmp_path, ct_chest, small_bundle):
    output = tmp_path / "out.nii.gz"
    result = run_cli("segment", str(ct_chest), "-m", str(small_bundle), "-o", str(output), "--progress", "json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert all({"stage", "done", "total", "message"} <= set(r) for r in records)
    stages = [r["stage"] for r in records if not r.get("note")]
    order = ["read", "preprocess", "predict", "restore", "write", "done"]
    assert list(dict.fromkeys(stages)) == order
    predict = [r for r in records if r["stage"] == "predict"]
    assert predict[-1]["done"] == predict[-1]["total"] > 1
    assert [r["done"] for r in predict] == sorted(r["done"] for r in predict)
    assert records[-1] == {**records[-1], "stage": "done", "output": str(output)}
    # A labelmap on the input grid.
    assert Grid.of(sitk.ReadImage(str(output))).matches(Grid.of(sitk.ReadImage(str(ct_chest))))


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_a_nifti_gz_or_nrrd_resampled_as_it_is_read_segments_as_the_same_scan_read_whole(
    tmp_path, ct_chest, small_bundle, byte_order
):
    """A single .nii.gz CT goes to the network grid slice by slice while it inflates (never held at full
    resolution), and so does an NRRD, gzip (as Slicer saves scenes) or raw (as the Slicer panel hands its
    volume to the engine); the same scan as MetaImage is read whole first. The labels must be the same
    voxel for voxel (an untrained network: its argmax flips at the slightest difference in its input),
    the progress the same stages in the same order."""
    import nibabel as nib

    reference = sitk.ReadImage(str(ct_chest))
    nifti, whole = tmp_path / "chest.nii.gz", tmp_path / "chest.mha"
    sitk.WriteImage(reference, str(nifti), useCompression=True)
    sitk.WriteImage(reference, str(whole), useCompression=True)
    sources = {"whole": whole, "streamed": nifti}
    if byte_order == ">":  # the same voxels and geometry, stored big-endian
        loaded = nib.load(str(nifti))
        header = loaded.header.copy()
        header.set_data_dtype(np.dtype(">i2"))
        big = nib.Nifti1Image(np.asanyarray(loaded.dataobj).astype(">i2"), loaded.affine, header)
        nib.save(big, str(nifti))
        assert Grid.of(sitk.ReadImage(str(nifti))).matches(Grid.of(reference), tolerance=1e-6)
    else:
        raw = tmp_path / "chest-raw.nrrd"
        sitk.WriteImage(reference, str(raw), useCompression=False)
        assert b"encoding: gzip" in ct_chest.read_bytes()[:1000] and b"encoding: raw" in raw.read_bytes()[:1000]
        sources.update({"streamed gzip nrrd": ct_chest, "streamed raw nrrd": raw})
    runs = {}
    for name, source in sources.items():
        output = tmp_path / f"{name}.nii.gz"
        result = run_cli("segment", str(source), "-m", str(small_bundle), "-o", str(output), "--progress", "json")
        assert result.returncode == 0, result.stderr
        runs[name] = ([json.loads(line) for line in result.stdout.splitlines()], sitk.ReadImage(str(output)))
    for name, (records, _) in runs.items():
        stages = [r["stage"] for r in records if not r.get("note")]
        assert list(dict.fromkeys(stages)) == ["read", "preprocess", "predict", "restore", "write", "done"], name
        streamed = any("as it is read" in r["message"] for r in records)
        assert streamed == name.startswith("streamed"), name
    whole_labels = runs["whole"][1]
    assert sitk.GetArrayViewFromImage(whole_labels).any()
    for name, (_, labels) in runs.items():
        assert Grid.of(labels).matches(Grid.of(whole_labels), tolerance=1e-6), name
        np.testing.assert_array_equal(
            sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(whole_labels), err_msg=name
        )


def test_console_script_runs(tmp_path, ct_chest, small_bundle):
    script = Path(sys.executable).parent / "medsegunet"
    assert script.exists(), "pip install -e . should have made the medsegunet script"
    result = subprocess.run(
        [str(script), "info", str(small_bundle)], capture_output=True, text=True, encoding="utf-8", errors="replace"
    )
    assert result.returncode == 0, result.stderr
    assert "ribs" in result.stdout and "DynUNet" in result.stdout


def test_log_without_a_terminal_gets_plain_progress_lines(tmp_path, ct_chest, small_bundle):
    """Default progress in a log (nohup, a batch job): readable lines on stdout, stderr left empty."""
    output = tmp_path / "x.seg.nrrd"
    result = run_cli("segment", str(ct_chest), "-m", str(small_bundle), "-o", str(output))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "\r" not in result.stdout
    stages = [line.split()[1] for line in result.stdout.splitlines() if re.match(r"\d\d:\d\d:\d\d \w+ \d+/\d+", line)]
    assert {"read", "predict", "write"} <= set(stages), result.stdout


def test_dicom_folder_input(tmp_path, ct_chest, small_bundle):
    image = sitk.Cast(sitk.ReadImage(str(ct_chest)), sitk.sitkInt16)
    folder = tmp_path / "dicom"
    write_dicom_series(image, folder, "1.2.826.0.1.3680043.2.1125.1")
    output = tmp_path / "out.seg.nrrd"
    assert main(["segment", str(folder), "-m", str(small_bundle), "-o", str(output), "--progress", "none"]) == 0
    read_back = sitk.ReadImage(str(output))
    series = sitk.ImageSeriesReader()
    series.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    assert Grid.of(read_back).matches(Grid.of(series.Execute()), tolerance=1e-3)


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str) -> None:
    """A real CT series (one file per slice) with the tags GDCM needs to sort and place slices."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": series_uid,
            "0020|0032": "\\".join(f"{p:.6f}" for p in position),
            "0020|0037": "\\".join(
                f"{d:.6f}" for d in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
            ),
            "0020|0013": str(k + 1),
            "0008|0018": f"{series_uid}.{k + 1}",
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid}_{k:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_folder_with_two_series_lists_them(tmp_path, ct_chest, small_bundle, capsys):
    image = sitk.Cast(sitk.ReadImage(str(ct_chest)), sitk.sitkInt16)[:, :, :4]
    folder = tmp_path / "two"
    write_dicom_series(image, folder, "1.2.3.4.1")
    write_dicom_series(image, folder, "1.2.3.4.2")
    output = tmp_path / "out.seg.nrrd"
    assert main(["segment", str(folder), "-m", str(small_bundle), "-o", str(output), "--progress", "none"]) == 1
    error = capsys.readouterr().err
    assert "2 DICOM series" in error and "1.2.3.4.1" in error and "1.2.3.4.2" in error and "--series" in error
    assert (
        main(
            [
                "segment",
                str(folder),
                "-m",
                str(small_bundle),
                "-o",
                str(output),
                "--series",
                "1.2.3.4.2",
                "--progress",
                "none",
            ]
        )
        == 0
    )
    assert output.exists()


def test_dicom_series_with_a_duplicated_slice_is_refused(tmp_path, ct_chest):
    """Two files at one position (a slice exported twice) are not stacked as two slices."""
    from MedSegUNetLib.core.errors import MedSegError
    from MedSegUNetLib.imageio.images import read_image

    folder = tmp_path / "dup"
    write_dicom_series(sitk.Cast(sitk.ReadImage(str(ct_chest)), sitk.sitkInt16)[:, :, :4], folder, "1.2.3.4.601")
    twin = sitk.ReadImage(str(sorted(folder.iterdir())[1]))
    twin.SetMetaData("0008|0018", "1.2.3.4.601.99")
    twin.SetMetaData("0020|0013", "99")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(folder / "twin.dcm"))
    writer.Execute(twin)
    with pytest.raises(MedSegError, match="two slices at the same position") as caught:
        read_image(folder)
    assert str(folder) in str(caught.value)


# --- bad input: one line, exit 1, no traceback, no output ------------------------------------------


def _image(array: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    return image


def make_bad_input(kind: str, folder: Path) -> Path:
    if kind == "missing":
        return folder / "nothing_here.nrrd"
    if kind == "empty":
        path = folder / "empty.nrrd"
        path.write_bytes(b"")
        return path
    if kind == "text":
        path = folder / "notes.nii.gz"
        path.write_text("this is not an image\n" * 20)
        return path
    if kind == "truncated":
        path = folder / "truncated.nrrd"
        sitk.WriteImage(_image(np.random.rand(40, 40, 40).astype(np.float32)), str(path), useCompression=False)
        path.write_bytes(path.read_bytes()[:-20000])
        return path
    if kind in ("truncated-nii-gz", "corrupt-nii-gz"):  # a CT read (and resampled) as it inflates
        path = folder / f"{kind}.nii.gz"
        # large enough that ITK's header read does not reach the damage (it reports a small file itself)
        sitk.WriteImage(
            _image(np.random.default_rng(0).integers(-1000, 1000, (64, 128, 128)).astype(np.int16)),
            str(path),
            useCompression=True,
        )
        data = bytearray(path.read_bytes())
        if kind == "truncated-nii-gz":
            data = data[: len(data) // 2]
        else:
            data[len(data) * 3 // 4] ^= 0xFF
        path.write_bytes(bytes(data))
        return path
    if kind == "2d":
        path = folder / "flat.nrrd"
        sitk.WriteImage(_image(np.zeros((40, 40), np.float32)), str(path))
        return path
    if kind == "4d":
        path = folder / "dynamic.nii.gz"
        sitk.WriteImage(sitk.JoinSeries([_image(np.zeros((8, 8, 8), np.float32))] * 3), str(path))
        return path
    if kind == "vector":
        path = folder / "rgb.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8, 3), np.uint8), isVector=True), str(path))
        return path
    if kind == "nan":
        path = folder / "nan.mha"
        sitk.WriteImage(_image(np.full((16, 16, 16), np.nan, np.float32)), str(path))
        return path
    if kind == "wrong-type":
        path = folder / "scan.png"
        path.write_bytes(b"\x89PNG\r\n")
        return path
    if kind == "empty-dicom-folder":
        path = folder / "dicom"
        path.mkdir()
        (path / "readme.txt").write_text("no dicom here")
        return path
    raise ValueError(kind)


BAD_INPUTS = {
    "missing": "input not found",
    "empty": "is empty",
    "text": "not a readable image",
    "truncated": "truncated or corrupt",
    "truncated-nii-gz": "truncated or corrupt",
    "corrupt-nii-gz": "truncated or corrupt",
    "2d": "2D image",
    "4d": "4D image",
    "vector": "3 components",
    "nan": "no finite voxel",
    "wrong-type": "unsupported file type",
    "empty-dicom-folder": "no DICOM series",
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_line(tmp_path, small_bundle, kind, capsys):
    bad = make_bad_input(kind, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = main(["segment", str(bad), "-m", str(small_bundle), "-o", str(out_dir / "x.seg.nrrd"), "--progress", "none"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("medsegunet: error: ")
    assert BAD_INPUTS[kind] in lines[0] and bad.name in lines[0]
    assert list(out_dir.iterdir()) == []


def test_bad_input_in_a_real_process_has_no_traceback_and_keeps_old_output(tmp_path, small_bundle):
    bad = make_bad_input("truncated", tmp_path)
    output = tmp_path / "previous.seg.nrrd"
    output.write_bytes(b"the user's earlier result")
    result = run_cli("segment", str(bad), "-m", str(small_bundle), "-o", str(output), "--progress", "json")
    line = assert_clean_failure(result, "truncated.nrrd", "truncated or corrupt")
    error_record = json.loads(result.stdout.strip().splitlines()[-1])
    assert error_record["stage"] == "error" and error_record["message"] in line
    assert output.read_bytes() == b"the user's earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous.seg.nrrd", "truncated.nrrd"]


@pytest.mark.parametrize(
    "make_bundle,message",
    [
        (lambda d: d / "absent.safetensors", "bundle file not found"),
        (lambda d: _write(d / "model.pt", b"\x80\x04\x95junk"), "pickle"),
        (lambda d: _write(d / "model.safetensors", b"\x00" * 3), "truncated"),
    ],
)
def test_bad_bundle_is_refused(tmp_path, ct_chest, make_bundle, message):
    bundle = make_bundle(tmp_path)
    result = run_cli(
        "segment", str(ct_chest), "-m", str(bundle), "-o", str(tmp_path / "o.seg.nrrd"), "--progress", "none"
    )
    assert_clean_failure(result, bundle.name, message)
    assert not (tmp_path / "o.seg.nrrd").exists()


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "output,message",
    [
        ("missing_folder/out.seg.nrrd", "output folder does not exist"),
        ("out.png", "unsupported output type"),
        (".", "existing folder"),
    ],
)
def test_bad_output_is_refused_before_work(tmp_path, ct_chest, small_bundle, output, message, capsys):
    code = main(["segment", str(ct_chest), "-m", str(small_bundle), "-o", str(tmp_path / output), "--progress", "none"])
    assert code == 1
    assert message in capsys.readouterr().err


def test_bf16_on_a_cpu_without_bf16_instructions_is_refused_before_any_reading(
    tmp_path, small_bundle, monkeypatch, capsys
):
    """--precision bf16 where oneDNN cannot run bf16: one line, exit 1, before the input is even looked
    at (the input here does not exist: its error would come first otherwise)."""
    import MedSegUNetLib.prediction.inference as inference

    monkeypatch.setattr(inference, "cpu_runs_bf16", lambda: False)
    output = tmp_path / "o.nii.gz"
    code = main(
        [
            "segment",
            str(tmp_path / "missing.nii.gz"),
            "-m",
            str(small_bundle),
            "-o",
            str(output),
            "--device",
            "cpu",
            "--precision",
            "bf16",
            "--progress",
            "none",
        ]
    )
    assert code == 1
    error = capsys.readouterr().err
    assert "--precision bf16 needs a CPU with bf16 instructions" in error and "missing.nii.gz" not in error
    assert len(error.strip().splitlines()) == 1 and not output.exists()


def test_wrong_channel_count_is_refused(tmp_path, ct_chest, small_bundle, capsys):
    code = main(
        [
            "segment",
            str(ct_chest),
            str(ct_chest),
            "-m",
            str(small_bundle),
            "-o",
            str(tmp_path / "o.nrrd"),
            "--progress",
            "none",
        ]
    )
    assert code == 1
    assert "1 input channel" in capsys.readouterr().err
    assert not (tmp_path / "o.nrrd").exists()


def test_usage_errors_exit_2(tmp_path, ct_chest, small_bundle):
    result = run_cli("segment", str(ct_chest), "-m", str(small_bundle))
    assert result.returncode == 2 and "-o/--output" in result.stderr
    code = main(["segment", str(ct_chest), "-m", str(small_bundle), "-o", str(tmp_path / "o.nrrd"), "--overlap", "1.5"])
    assert code == 1


def test_partial_nan_is_replaced_and_reported(tmp_path, small_bundle):
    array = np.random.default_rng(0).normal(0, 100, (24, 24, 24)).astype(np.float32)
    array[3:5, 3:5, 3:5] = np.nan
    path = tmp_path / "some_nan.mha"
    sitk.WriteImage(_image(array), str(path))
    result = run_cli(
        "segment", str(path), "-m", str(small_bundle), "-o", str(tmp_path / "o.seg.nrrd"), "--progress", "json"
    )
    assert result.returncode == 0, result.stderr
    notes = [json.loads(line)["message"] for line in result.stdout.splitlines() if json.loads(line).get("note")]
    assert any("8 NaN/Inf voxels replaced" in note for note in notes)


# --- cancellation --------------------------------------------------------------------------------


class StagedRun:
    """``segment`` in a child whose JSON progress goes through a pipe the test can fill up.

    A full pipe makes the engine block on its next progress line, so a signal sent after the first
    line of stage X is certain to land in stage X: a stage ends with (or the next begins with) a
    line, and that line cannot be written. The pipe is filled through a second, non-blocking open of
    its write end (/proc/self/fd), so the engine's own end stays blocking.
    """

    def __init__(self, arguments, folder: Path):
        self.folder = folder
        read_end, write_end = os.pipe()
        self.read_end = read_end
        self.filler = os.open(f"/proc/self/fd/{write_end}", os.O_WRONLY | os.O_NONBLOCK)
        environment = dict(os.environ, PYTHONPATH=f"{MODULE_DIR}{os.pathsep}{REPO}")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "MedSegUNetLib", "segment", *arguments, "--progress", "json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=environment,
        )
        os.close(write_end)
        self.buffer = b""
        self.records = []

    def read_until_stage(self, stage: str) -> dict:
        while True:
            while b"\n" not in self.buffer:
                chunk = os.read(self.read_end, 65536)
                assert chunk, f"the engine ended before stage {stage}"
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            record = json.loads(line)
            self.records.append(record)
            if record["stage"] == stage and not record.get("note"):
                return record

    def fill_pipe(self) -> None:
        for size in (65536, 1):
            try:
                while True:
                    os.write(self.filler, b"\n" * size)
            except BlockingIOError:
                pass

    def wait_until_stopped(self) -> None:
        """Until the engine is stopped ('T' in /proc) or gone."""
        stat = Path(f"/proc/{self.process.pid}/stat")
        while self.process.poll() is None:
            try:
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return
            if state in ("T", "t", "Z", "X"):
                return

    def stop_while_writing(self) -> Optional[Path]:
        """Stop the engine (SIGSTOP) while its output's temporary file exists: the write has begun and the
        rename has not happened. None when the write finished before the engine could be stopped (a busy
        machine); the engine then runs on."""
        while self.process.poll() is None:
            names = [name for name in os.listdir(self.folder) if ".medseg-tmp-" in name]
            if names:
                self.process.send_signal(signal.SIGSTOP)
                self.wait_until_stopped()  # the stop is delivered asynchronously: only then is the check true
                if (self.folder / names[0]).exists():
                    return self.folder / names[0]
                self.process.send_signal(signal.SIGCONT)
                return None
        return None

    def finish(self):
        """Drain the pipe (padding included) to the end; returns (exit code, JSON records, stderr)."""
        os.close(self.filler)
        rest = [self.buffer]
        while True:
            chunk = os.read(self.read_end, 65536)
            if not chunk:
                break
            rest.append(chunk)
        os.close(self.read_end)
        stderr = self.process.stderr.read().decode("utf-8", "replace")
        self.process.wait(timeout=60)
        records = [json.loads(line) for line in b"".join(rest).decode("utf-8").splitlines() if line.strip()]
        return self.process.returncode, self.records + records, stderr


def run_into_stage(arguments, folder: Path, stage: str, old_output: bool, tries: int = 5) -> StagedRun:
    """A run certain to be inside ``stage``: its progress pipe is full, or (the write, which ends with a
    rename) it is stopped while the temporary output exists. A write that finishes before it can be
    stopped (a loaded machine) is run again, with the folder as it was."""
    for _ in range(tries):
        run = StagedRun(arguments, folder)
        run.read_until_stage(stage)
        if stage != "write":
            run.fill_pipe()  # the engine cannot report the end of this stage
            return run
        if run.stop_while_writing() is not None:
            return run
        run.finish()
        for name in os.listdir(folder):
            (folder / name).unlink()
        if old_output:
            (folder / "result.seg.nrrd").write_bytes(b"keep me")
    raise AssertionError(f"the write finished before the engine could be stopped, {tries} times")


@pytest.mark.parametrize(
    "stage,signal_number,old_output,streamed",
    [
        ("read", signal.SIGTERM, True, False),
        ("preprocess", signal.SIGTERM, True, False),
        ("predict", signal.SIGTERM, True, False),
        ("restore", signal.SIGTERM, True, False),
        ("write", signal.SIGTERM, True, False),
        ("predict", signal.SIGINT, False, False),
        ("read", signal.SIGTERM, True, True),  # a .nii.gz, resampled as it inflates
        ("preprocess", signal.SIGTERM, True, True),
    ],
)
def test_signal_at_every_stage_cancels_cleanly(
    tmp_path, ct_chest, small_bundle, stage, signal_number, old_output, streamed
):
    """SIGTERM (the panel's Cancel) or SIGINT (Ctrl-C) in any stage: exit 130, "cancelled" last, no new
    output and no temporary, an existing output untouched."""
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "result.seg.nrrd"
    if old_output:
        output.write_bytes(b"keep me")
    source = ct_chest
    if streamed:
        source = tmp_path / "chest.nii.gz"
        sitk.WriteImage(sitk.ReadImage(str(ct_chest)), str(source), useCompression=True)
    arguments = [str(source), "-m", str(small_bundle), "-o", str(output), "--device", "cpu"]
    for _ in range(5):  # the engine can run ahead of the test into the next stage before it is held: again
        run = run_into_stage(arguments, folder, stage, old_output)
        run.process.send_signal(signal_number)
        run.process.send_signal(signal.SIGCONT)  # stopped in the write: the signal's handler runs as it resumes
        code, records, stderr = run.finish()
        # Wherever it landed, the cancel is clean.
        assert code == 130, stderr
        assert "Traceback" not in stderr and stderr.strip() == "medsegunet: cancelled", stderr
        assert records[-1]["stage"] == "cancelled"
        assert files_in(folder) == ({"result.seg.nrrd"} if old_output else set())
        if old_output:
            assert output.read_bytes() == b"keep me"
        steps = [r for r in records[:-1] if not r.get("note")]
        if steps[-1]["stage"] == stage:
            break
    assert steps[-1]["stage"] == stage, f"the signal should have landed in {stage}: {steps[-3:]}"
    if stage == "write":
        assert steps[-1]["done"] == 0, "cancelled while writing, before the output was renamed into place"


def test_sigkill_while_writing_keeps_the_old_output_and_the_next_run_cleans_up(tmp_path, ct_chest, small_bundle):
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "result.seg.nrrd"
    output.write_bytes(b"keep me")
    arguments = [str(ct_chest), "-m", str(small_bundle), "-o", str(output), "--device", "cpu"]
    run = run_into_stage(arguments, folder, "write", old_output=True)  # stopped while the temporary exists
    temporaries = files_in(folder) - {"result.seg.nrrd"}
    run.process.kill()
    code, _, _ = run.finish()
    assert code == -signal.SIGKILL
    assert len(temporaries) == 1 and files_in(folder) <= {"result.seg.nrrd", *temporaries}  # at most the temporary
    # The old bytes, or (when the kill landed after the rename, as on a loaded machine) a whole new file.
    killed = None if output.read_bytes() == b"keep me" else slicerio.read_segmentation(str(output))
    assert main(["segment", str(ct_chest), "-m", str(small_bundle), "-o", str(output), "--progress", "none"]) == 0
    assert files_in(folder) == {"result.seg.nrrd"}, "the next run removed the stale temporary"
    clean = slicerio.read_segmentation(str(output))
    assert [s["name"] for s in clean["segments"]] == ["ribs", "spine"]
    if killed is not None:
        assert [s["name"] for s in killed["segments"]] == ["ribs", "spine"]
        assert np.array_equal(killed["voxels"], clean["voxels"]), "a result in place is never torn"


def test_stale_temporary_of_a_killed_run_is_cleaned(tmp_path, ct_chest, small_bundle):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.medseg-tmp-{dead.pid}-abcd1234.seg.nrrd"
    stale.write_bytes(b"half a file")
    output = tmp_path / "out.seg.nrrd"
    assert main(["segment", str(ct_chest), "-m", str(small_bundle), "-o", str(output), "--progress", "none"]) == 0
    assert files_in(tmp_path) == {"out.seg.nrrd"}


def test_thin_slab_runs_windows_no_deeper_than_the_slab(tmp_path, ct_chest, small_bundle):
    """A 3-slice slab (30 mm, 5 slices at the model's 6 mm) gets shallow windows and a result on its grid."""
    slab = tmp_path / "slab.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(ct_chest))[:, :, 15:18], str(slab))
    output = tmp_path / "slab.seg.nrrd"
    result = run_cli("segment", str(slab), "-m", str(small_bundle), "-o", str(output), "--progress", "json")
    assert result.returncode == 0, result.stderr
    meta = read_bundle_metadata(small_bundle)
    divisor = meta.network.size_divisor()[0]
    depth = -(-5 // divisor) * divisor  # 5 slices rounded up to what the strides accept
    assert depth < meta.preprocessing.patch_size[2]
    predict = [json.loads(line) for line in result.stdout.splitlines() if '"predict"' in line]
    assert f"windows of 32x32x{depth} voxels" in predict[0]["message"], predict[0]
    assert Grid.of(sitk.ReadImage(str(output))).matches(Grid.of(sitk.ReadImage(str(slab))))


def test_segment_skips_monai_s_plotting_and_signal_imports(tmp_path, ct_chest, small_bundle):
    """skipped_imports: segment (and standby) keep MONAI from importing matplotlib and scipy.signal (about
    1 s and 49 MB of the engine's start) and work without them; other commands import them as usual."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), str(REPO)]))
    output = tmp_path / "o.seg.nrrd"
    probe = (
        "import sys\nfrom MedSegUNetLib.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "skipped = [name for name in ('matplotlib', 'scipy.signal')"
        " if name in sys.modules and sys.modules[name] is None]\n"
        "print(code, 'monai' in sys.modules, ','.join(skipped))\n"
        "import matplotlib\n"  # fails where skipped
    )
    segment = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            "segment",
            str(ct_chest),
            "-m",
            str(small_bundle),
            "-o",
            str(output),
            "--progress",
            "none",
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert segment.stdout.splitlines()[-1] == "0 True matplotlib,scipy.signal", segment.stderr
    assert "ModuleNotFoundError: import of matplotlib halted" in segment.stderr and output.is_file()
    info = subprocess.run(
        [sys.executable, "-c", probe, "info", str(small_bundle)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert (
        info.returncode == 0
        and info.stdout.splitlines()[-1].startswith("0 ")
        and info.stdout.splitlines()[-1].endswith(" ")
    ), info.stderr


def test_engine_commands_exit_without_the_teardown_and_lose_no_output(tmp_path, ct_chest, small_bundle):
    """cli.exit_now: segment (and standby, devices) end the process once their output is flushed, skipping
    the interpreter's 0.5 s teardown the panel would wait for; the exit handlers never run. Nothing is
    lost: the last line printed without a flush to a pipe arrives, and so does a failure's one line.
    Other commands exit normally (the same probe sees their exit handlers run)."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), str(REPO)]))
    environment.pop("PYTHONUNBUFFERED", None)  # stdout to a pipe then buffers whole blocks, as it does by default
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('teardown ran', flush=True))\n"
        "from MedSegUNetLib.cli import entry\n"
        "sys.argv[0] = 'medsegunet'\n"
        "entry()\n"
    )

    def run(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", probe, *arguments], capture_output=True, text=True, env=environment, timeout=300
        )

    output = tmp_path / "out.seg.nrrd"
    segment = run("segment", str(ct_chest), "-m", str(small_bundle), "-o", str(output), "--progress", "lines")
    assert segment.returncode == 0, segment.stderr
    assert segment.stdout.splitlines()[-1] == f"wrote {output}", segment.stdout  # print() without a flush
    assert "teardown ran" not in segment.stdout and output.is_file()
    missing = tmp_path / "missing.nrrd"
    failed = run(
        "segment", str(missing), "-m", str(small_bundle), "-o", str(tmp_path / "o.seg.nrrd"), "--progress", "json"
    )
    assert_clean_failure(failed, str(missing))
    assert json.loads(failed.stdout.splitlines()[-1])["stage"] == "error" and "teardown ran" not in failed.stdout
    info = run("info", str(small_bundle))
    assert info.returncode == 0 and info.stdout.splitlines()[-1] == "teardown ran", info.stdout
