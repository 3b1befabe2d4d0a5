"""`medsegunet standby`: the engine started before the click, as the Slicer panel runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import MODULE_DIR, REPO, files_in, make_small_bundle, run_cli

from MedSegUNetLib.commands.standby import JOB_LINE_LIMIT, LoadedModel, file_identity, parse_job, warm_up
from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.model.bundle import load_bundle
from MedSegUNetLib.prediction.inference import PredictOptions


class StandbyEngine:
    """``python -m MedSegUNetLib standby ...`` with pipes, read record by record."""

    def __init__(self, model: Path, *extra: str):
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), str(REPO)]), PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "MedSegUNetLib",
                "standby",
                "-m",
                str(model),
                "--device",
                "cpu",
                "--progress",
                "json",
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
        )
        self.records: List[dict] = []

    def read_until(self, stage: str, message_start: str = "") -> dict:
        for line in self.process.stdout:
            record = json.loads(line)
            self.records.append(record)
            if record["stage"] == stage and record["message"].startswith(message_start):
                return record
        raise AssertionError(f"the engine ended before {stage}: {self.records}, {self.process.stderr.read()!r}")

    def send(self, line: bytes) -> None:
        self.process.stdin.write(line)
        self.process.stdin.close()

    def finish(self, timeout: float = 120):
        """Exit code, every record, stderr; stdin is left as it is (open: only the engine may end it)."""
        errors: List[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(self.process.stderr.read()))
        reader.start()
        watchdog = threading.Timer(timeout, self.process.kill)
        watchdog.start()
        try:
            self.records += [json.loads(line) for line in self.process.stdout if line.strip()]
            self.process.wait()
            reader.join()
        finally:
            watchdog.cancel()
        return self.process.returncode, self.records, errors[0].decode("utf-8", "replace")


def job_line(*arguments: str) -> bytes:
    return json.dumps({"segment": list(arguments)}).encode() + b"\n"


def voxels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def plain_segment(source: Path, model: Path, output: Path) -> np.ndarray:
    result = run_cli(
        "segment", str(source), "-m", str(model), "-o", str(output), "--device", "cpu", "--progress", "none"
    )
    assert result.returncode == 0, result.stderr
    return voxels(output)


def test_a_job_segments_exactly_as_segment_does(tmp_path, ct_chest, small_bundle):
    """The loaded, warmed-up model gives the labels a fresh `segment` gives, voxel for voxel; the panel
    sees the standby's stages, then the usual ones, then done with the output."""
    expected = plain_segment(ct_chest, small_bundle, tmp_path / "plain.nii.gz")
    folder = tmp_path / "out"
    folder.mkdir()
    engine = StandbyEngine(small_bundle)
    engine.read_until("standby", "ready")
    engine.send(
        job_line(str(ct_chest), "-m", str(small_bundle), "-o", str(folder / "result.nii.gz"), "--device", "cpu")
    )
    code, records, stderr = engine.finish()
    assert code == 0, stderr
    assert np.array_equal(voxels(folder / "result.nii.gz"), expected)
    stages = list(dict.fromkeys(r["stage"] for r in records if not r.get("note")))
    assert stages == ["standby", "read", "preprocess", "predict", "restore", "write", "done"]
    assert [r["done"] for r in records if r["stage"] == "standby"] == [0, 1, 2]
    assert records[-1]["output"] == str(folder / "result.nii.gz")
    assert files_in(folder) == {"result.nii.gz"}


def test_a_job_sent_before_the_engine_is_ready_waits_for_it(tmp_path, ct_chest, small_bundle):
    """The panel sends the job as soon as the volume is written, while the engine may still be importing."""
    engine = StandbyEngine(small_bundle)
    engine.send(job_line(str(ct_chest), "-m", str(small_bundle), "-o", str(tmp_path / "result.seg.nrrd")))
    code, records, stderr = engine.finish()
    assert code == 0, stderr
    assert records[2]["message"] == "ready: waiting for a job" and records[-1]["stage"] == "done"
    assert (tmp_path / "result.seg.nrrd").is_file()


def test_another_model_or_a_rewritten_bundle_is_loaded_afresh(tmp_path, ct_chest):
    """The loaded model serves only a job naming that very file, unchanged: a bundle retrained over the
    same path, or another bundle, is loaded as `segment` loads it."""
    first = make_small_bundle(tmp_path / "first.safetensors", seed=0)
    other = make_small_bundle(tmp_path / "other.safetensors", seed=1)
    with_first = plain_segment(ct_chest, first, tmp_path / "first.nii.gz")
    with_other = plain_segment(ct_chest, other, tmp_path / "other.nii.gz")
    assert not np.array_equal(with_first, with_other), "the two random models must label differently for this test"

    engine = StandbyEngine(first)
    engine.read_until("standby", "ready")
    engine.send(job_line(str(ct_chest), "-m", str(other), "-o", str(tmp_path / "job1.nii.gz"), "--device", "cpu"))
    assert engine.finish()[0] == 0
    assert np.array_equal(voxels(tmp_path / "job1.nii.gz"), with_other)

    engine = StandbyEngine(first)
    engine.read_until("standby", "ready")
    os.replace(make_small_bundle(tmp_path / "retrained.safetensors", seed=1), first)  # a new model at the same path
    engine.send(job_line(str(ct_chest), "-m", str(first), "-o", str(tmp_path / "job2.nii.gz"), "--device", "cpu"))
    assert engine.finish()[0] == 0
    assert np.array_equal(voxels(tmp_path / "job2.nii.gz"), with_other)


def test_end_of_input_or_idle_time_ends_it_with_nothing_written(tmp_path, small_bundle):
    engine = StandbyEngine(small_bundle)
    engine.read_until("standby", "ready")
    engine.process.stdin.close()  # the panel stopped it
    code, records, stderr = engine.finish()
    assert code == 0 and stderr == "", stderr
    assert records[-1]["stage"] == "done" and "no job" in records[-1]["message"]

    engine = StandbyEngine(small_bundle, "--idle-minutes", "0.01")
    started = time.monotonic()
    code, records, stderr = engine.finish(timeout=120)  # stdin left open: only the idle time ends it
    assert code == 0 and records[-1]["stage"] == "done", stderr
    assert time.monotonic() - started < 100
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize(
    "line,message",
    [
        (b"segment it please\n", "standby job: not JSON"),
        (b'["in.nrrd"]\n', 'standby job: expected {"segment"'),
        (b'{"segment": ["in.nrrd", 3]}\n', 'standby job: expected {"segment"'),
        (job_line("in.nrrd", "-m", "x.safetensors"), "standby job: the following arguments are required: -o/--output"),
        (
            job_line("in.nrrd", "-m", "x.safetensors", "-o", "o.nii.gz", "--frobnicate"),
            "standby job: unrecognized arguments: --frobnicate",
        ),
        (
            job_line("in.nrrd", "-m", "x.safetensors", "-o", "o.nii.gz", "--progress", "bar"),
            "differs from the standby's --progress json",
        ),
    ],
)
def test_a_bad_job_gets_one_line_and_exit_1(tmp_path, small_bundle, line, message):
    engine = StandbyEngine(small_bundle)
    engine.send(line)
    code, records, stderr = engine.finish()
    assert code == 1, stderr
    assert stderr.strip().splitlines() == [f"medsegunet: error: {records[-1]['message']}"], stderr
    assert message in records[-1]["message"] and records[-1]["stage"] == "error"
    assert "Traceback" not in stderr


def test_a_job_with_a_bad_input_fails_as_segment_does_and_keeps_the_old_output(tmp_path, small_bundle):
    bad = tmp_path / "broken.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: short\n")
    output = tmp_path / "result.seg.nrrd"
    output.write_bytes(b"keep me")
    engine = StandbyEngine(small_bundle)
    engine.send(job_line(str(bad), "-m", str(small_bundle), "-o", str(output)))
    code, records, stderr = engine.finish()
    assert code == 1 and "broken.nrrd" in records[-1]["message"], stderr
    assert output.read_bytes() == b"keep me" and files_in(tmp_path) == {"broken.nrrd", "result.seg.nrrd"}


def test_a_bad_model_fails_at_once_without_waiting_for_a_job(tmp_path):
    pickle = tmp_path / "model.safetensors"
    pickle.write_bytes(b"\x80\x04\x95 not a bundle")
    engine = StandbyEngine(pickle)
    code, records, stderr = engine.finish(timeout=120)  # stdin stays open: it must not wait on it
    assert code == 1 and records[-1]["stage"] == "error" and "model.safetensors" in records[-1]["message"], stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--idle-minutes", "0"], "--idle-minutes must be positive"),
        (["--idle-minutes", "nan"], "--idle-minutes must be positive"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_bad_standby_options_fail_at_once(small_bundle, extra, message):
    engine = StandbyEngine(small_bundle, *extra)
    code, records, stderr = engine.finish(timeout=120)  # stdin stays open: it must not wait on it
    assert code == 1 and stderr.strip() == f"medsegunet: error: {message}", stderr
    assert [r["stage"] for r in records] == ["error"]  # refused before the model is loaded


def test_sigterm_while_waiting_cancels(small_bundle):
    engine = StandbyEngine(small_bundle)
    engine.read_until("standby", "ready")
    engine.process.send_signal(signal.SIGTERM)
    code, records, stderr = engine.finish()
    assert code == 130 and records[-1]["stage"] == "cancelled", stderr
    assert stderr.strip() == "medsegunet: cancelled"


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_warm_up_runs_one_batch_of_windows_of_the_bundle_s_patch(small_bundle, batch):
    """oneDNN keeps its kernels per shape: the warm-up must run the job's own batch of whole windows."""
    shapes = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, inputs: (
            shapes.append(tuple(inputs[0].shape)) if type(module).__name__ == "ChannelsLast" else None
        )
    )
    try:
        warm_up(load_bundle(small_bundle), PredictOptions(device="cpu", sw_batch_size=batch))
    finally:
        hook.remove()
    assert shapes == [(batch, 1, 16, 32, 32)]  # the bundle's patch is 32x32x16 (x, y, z)


def test_loaded_model_serves_only_the_same_unchanged_file(tmp_path, small_bundle):
    path = tmp_path / "model.safetensors"
    path.write_bytes(small_bundle.read_bytes())
    loaded = LoadedModel(path, file_identity(path), load_bundle(path))
    assert loaded.serves(path) and loaded.serves(Path(os.path.relpath(path)))
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    assert not loaded.serves(copy)
    path.write_bytes(path.read_bytes() + b" ")
    assert not loaded.serves(path)
    path.unlink()
    assert not loaded.serves(path)


def test_parse_job_limits():
    assert parse_job(job_line("a", "-o", "ü.nii.gz")) == ["a", "-o", "ü.nii.gz"]
    with pytest.raises(MedSegError, match="longer than"):
        parse_job(b"x" * (JOB_LINE_LIMIT + 1))
    with pytest.raises(MedSegError, match="not JSON"):
        parse_job(b"\xff\xfe\n")
