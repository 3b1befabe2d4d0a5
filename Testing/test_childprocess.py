"""The panel's process handling (MedSegUNetLib.childprocess) with real child processes, no Slicer."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from MedSegUNetLib.childprocess import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    ChildProcess,
    SegmentRequest,
    TrainRequest,
    engine_environment,
    segment_command,
    train_command,
)

from conftest import MODULE_DIR, REPO


def run_to_end(process: ChildProcess, timeout: float = 300) -> list:
    """Poll as the panel's QTimer does, collecting records, until the child has ended."""
    records, deadline = [], time.monotonic() + timeout
    while process.state == RUNNING:
        assert time.monotonic() < deadline, process.log_text()
        records += process.poll()
        time.sleep(0.05)
    return records + process.poll()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_the_segment_command_the_panel_builds_runs_on_a_real_file(tmp_path, ct_chest, small_bundle):
    output = tmp_path / "result.seg.nrrd"
    command = segment_command(SegmentRequest([ct_chest], small_bundle, output, device="cpu", overlap=0.25), python=sys.executable)
    assert command[1:4] == ["-m", "MedSegUNetLib", "segment"] and command[-2:] == ["--progress", "json"]
    assert "--no-tta" in command and "--largest-component" in command
    process = ChildProcess(command, engine_environment(MODULE_DIR), cwd=tmp_path)
    records = run_to_end(process)
    assert process.state == SUCCEEDED, process.log_text()
    stages = [r["stage"] for r in records]
    assert stages[0] == "read" and stages[-1] == "done" and {"predict", "restore", "write"} <= set(stages)
    assert all(set(r) >= {"stage", "done", "total", "message"} for r in records)
    assert output.exists() and process.result["stage"] == "done"
    assert "segment" in process.log_text().splitlines()[0]  # the log starts with the command


def test_a_failing_run_surfaces_the_engines_one_line_message(tmp_path, small_bundle):
    command = segment_command(SegmentRequest([tmp_path / "missing.nrrd"], small_bundle, tmp_path / "o.seg.nrrd"), python=sys.executable)
    process = ChildProcess(command, engine_environment(MODULE_DIR))
    run_to_end(process)
    assert process.state == FAILED
    assert process.error_message.endswith("missing.nrrd: input not found"), process.error_message
    assert "\n" not in process.error_message


def test_cancel_ends_the_whole_process_tree(tmp_path):
    """A child that started a grandchild: Cancel must end both (Slicer would otherwise keep a GPU busy)."""
    script = textwrap.dedent(
        f"""
        import json, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(tmp_path / 'pids')!r}, "w").write(str(grandchild.pid))
        print(json.dumps({{"stage": "predict", "done": 1, "total": 9, "message": "window 1"}}), flush=True)
        time.sleep(120)
        """
    )
    process = ChildProcess([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    records = []
    while not records:
        assert time.monotonic() < deadline
        records = process.poll()
        time.sleep(0.05)
    assert records[0]["message"] == "window 1"
    grandchild = int((tmp_path / "pids").read_text())
    assert alive(grandchild)
    started = time.monotonic()
    process.cancel(grace_seconds=2)
    assert process.wait(timeout=30) == CANCELLED
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period():
    script = "import signal, time, json; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(json.dumps({'stage': 'x', 'done': 0, 'total': 1, 'message': ''}), flush=True); time.sleep(120)"
    process = ChildProcess([sys.executable, "-c", script])
    while not process.poll():
        time.sleep(0.05)
    started = time.monotonic()
    process.cancel(grace_seconds=1)
    assert process.wait(timeout=30) == CANCELLED and time.monotonic() - started < 10


def test_cancelling_a_real_segment_run_leaves_no_output(tmp_path, ct_chest, small_bundle):
    output = tmp_path / "result.seg.nrrd"
    request = SegmentRequest([ct_chest], small_bundle, output, device="cpu", tta=True)
    process = ChildProcess(segment_command(request, python=sys.executable), engine_environment(MODULE_DIR))
    while not any(r["stage"] == "predict" for r in process.poll()):
        assert process.state == RUNNING, process.log_text()
        time.sleep(0.05)
    process.cancel()
    assert process.wait(timeout=60) == CANCELLED
    assert process.process.returncode == 130  # the engine's own clean exit, not a SIGKILL
    assert list(tmp_path.iterdir()) == []  # no output, no temporary


def test_the_train_command_the_panel_builds_writes_a_bundle(tmp_path, ct_chest, chest_segmentation):
    from training.scene_writer import ScenePair, write_mrml_scene

    scene = write_mrml_scene(tmp_path / "scene", "annotations", [ScenePair("ct", ct_chest, chest_segmentation, "seg")])
    request = TrainRequest([scene], tmp_path / "model", max_steps=2, device="cpu",
                           extra=["--spacing", "6", "6", "6", "--patch-size", "32", "32", "16", "--filters", "4"])
    command = train_command(request, python=sys.executable)
    assert command[1:4] == ["-m", "MedSegUNetLib", "train"] and "--max-steps" in command
    process = ChildProcess(command, engine_environment(MODULE_DIR))
    records = run_to_end(process, timeout=600)
    assert process.state == SUCCEEDED, process.log_text()[-3000:]
    assert any(r["stage"] == "train" and "loss" in r for r in records)
    assert Path(process.result["bundle"]) == tmp_path / "model" / "model.safetensors"


def test_engine_environment_finds_both_packages(tmp_path):
    environment = engine_environment(MODULE_DIR, base={"PYTHONPATH": "/elsewhere"})
    paths = environment["PYTHONPATH"].split(os.pathsep)
    assert paths == [str(MODULE_DIR.resolve()), str(REPO.resolve()), "/elsewhere"]
    assert environment["PYTHONUNBUFFERED"] == "1"
    installed = tmp_path / "qt-scripted-modules"  # an installed extension: training beside MedSegUNetLib
    installed.mkdir()
    assert engine_environment(installed, base={})["PYTHONPATH"] == str(installed.resolve())
