"""The panel's process handling (MedSegUNetLib.host.childprocess) with real child processes, no Slicer.

The commands are built by the same functions MedSegUNetLogic calls (segment_command, train_command,
devices_command) and run on real files; progress is read by polling, as the panel's QTimer does.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import typing
from pathlib import Path

import pytest
from conftest import MODULE_DIR, REPO

from MedSegUNetLib.host import childprocess
from MedSegUNetLib.host.childprocess import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    ChildProcess,
    SegmentRequest,
    StandbyEngine,
    TrainRequest,
    devices_command,
    engine_environment,
    parse_devices,
    parse_record,
    segment_arguments,
    segment_command,
    split_device,
    standby_command,
    train_command,
)

posix_only = pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")
MODULE_FILE = MODULE_DIR / "MedSegUNet.py"


def logic_method(name: str):
    """A MedSegUNetLogic method compiled from MedSegUNet.py's own source (slicer cannot be imported here).

    Only command-building methods are taken, which use nothing of Slicer: running what they return is
    running exactly what the panel runs."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedSegUNetLogic")
    function = next(f for f in logic.body if isinstance(f, ast.FunctionDef) and f.name == name)
    namespace = {name: getattr(childprocess, name) for name in dir(childprocess) if not name.startswith("_")}
    namespace.update(typing.__dict__)
    namespace["Path"] = Path
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(MODULE_FILE), "exec"), namespace)
    return namespace[name]


def run_to_end(process: ChildProcess, timeout: float = 300) -> list:
    """Poll as the panel's QTimer does, collecting records, until the child has ended."""
    records, deadline = [], time.monotonic() + timeout
    while process.state == RUNNING:
        assert time.monotonic() < deadline, process.log_text()
        records += process.poll()
        time.sleep(0.05)
    return records + process.poll()


def wait_for_records(process: ChildProcess, timeout: float = 120) -> list:
    deadline = time.monotonic() + timeout
    while True:
        records = process.poll()
        if records:
            return records
        assert process.state == RUNNING, process.log_text()
        assert time.monotonic() < deadline, process.log_text()
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def living_members_of_group(pgid: int) -> list:
    """Processes (zombies aside: a container's init may never reap them) in process group `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(")")[-1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def spawning_script(pid_file: Path, then: str) -> str:
    """A child that starts a sleeping grandchild (sharing its stdout), reports progress, then does `then`."""
    return textwrap.dedent(
        f"""
        import json, signal, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(grandchild.pid))
        print(json.dumps({{"stage": "predict", "done": 1, "total": 9, "message": "window 1"}}), flush=True)
        {then}
        """
    )


# --- the commands the Logic builds, run on real files --------------------------------------------------


def test_the_segment_command_the_panel_builds_runs_on_a_real_file(tmp_path, ct_chest, small_bundle):
    output = tmp_path / "result.seg.nrrd"
    request = logic_method("segmentRequest")(ct_chest, small_bundle, output, "cpu", 0.25, False, True)
    assert request == SegmentRequest([ct_chest], small_bundle, output, device="cpu", overlap=0.25)
    command = segment_command(request)
    assert command == [
        sys.executable,
        "-m",
        "MedSegUNetLib",
        "segment",
        str(ct_chest),
        "-m",
        str(small_bundle),
        "-o",
        str(output),
        "--device",
        "cpu",
        "--overlap",
        "0.25",
        "--no-tta",
        "--largest-component",
        "--progress",
        "json",
    ]
    process = ChildProcess(command, engine_environment(MODULE_DIR), cwd=tmp_path)
    records = run_to_end(process)
    assert process.state == SUCCEEDED, process.log_text()
    stages = [r["stage"] for r in records]
    assert stages[0] == "read" and stages[-1] == "done" and {"predict", "restore", "write"} <= set(stages)
    assert all(set(r) >= {"stage", "done", "total", "message"} for r in records)
    predict = [r for r in records if r["stage"] == "predict"]
    assert predict[-1]["done"] == predict[-1]["total"] > 0  # the bar reaches its end
    assert output.exists() and process.result["stage"] == "done"
    import slicerio

    segmentation = slicerio.read_segmentation(str(output))
    assert [s["name"] for s in segmentation["segments"]] == ["ribs", "spine"]
    assert "segment" in process.log_text().splitlines()[0]  # the log starts with the command


def test_the_panel_leaves_each_model_its_own_overlap_until_one_is_chosen(tmp_path, ct_chest):
    """Overlap shows the model's own (a set: its first model's); a request without one runs every model
    with its own, as `segment` without --overlap does."""
    import dataclasses

    from conftest import make_small_bundle

    from MedSegUNetLib.model.bundle import load_bundle, save_bundle
    from MedSegUNetLib.model.model_set import write_model_set

    base = make_small_bundle(tmp_path / "base.safetensors", patch=(16, 16, 8))
    bundle = load_bundle(base)
    own = tmp_path / "own.safetensors"
    save_bundle(own, dataclasses.replace(bundle.meta, overlap=0.0, name="own"), bundle.network)
    model_overlap = logic_method("modelOverlap")
    assert (model_overlap(base), model_overlap(own)) == (0.5, 0.0)
    other = make_small_bundle(tmp_path / "other.safetensors", names=("lungs",), patch=(16, 16, 8))
    assert model_overlap(write_model_set(tmp_path / "s.modelset.json", "S", [own, other])) == 0.0

    def windows(overlap):
        request = logic_method("segmentRequest")(ct_chest, own, tmp_path / "o.seg.nrrd", "cpu", overlap, False, True)
        command = segment_command(request, python=sys.executable)
        assert ("--overlap" in command) == (overlap is not None)
        result = subprocess.run(command, capture_output=True, text=True, env=engine_environment(MODULE_DIR))
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines() if '"predict"' in line][-1]["total"]

    assert windows(None) == windows(0.0) < windows(0.5)


def test_options_reach_the_command_line():
    request = SegmentRequest(
        [Path("a.nrrd"), Path("b.nrrd")],
        Path("m.safetensors"),
        Path("o.seg.nrrd"),
        device="cuda:1",
        overlap=0.6,
        tta=True,
        largest_component=False,
    )
    command = segment_command(request, python="PythonSlicer")
    assert command[:6] == ["PythonSlicer", "-m", "MedSegUNetLib", "segment", "a.nrrd", "b.nrrd"]
    assert command[command.index("--device") + 1] == "cuda"  # the GPU is picked by CUDA_VISIBLE_DEVICES
    assert (
        "--tta" in command and "--no-largest-component" in command and command[command.index("--overlap") + 1] == "0.6"
    )
    assert engine_environment(MODULE_DIR, base={}, device="cuda:1")["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in engine_environment(MODULE_DIR, base={}, device="auto")
    assert split_device("MPS") == ("mps", None)
    with pytest.raises(ValueError):
        split_device("tpu")
    with pytest.raises(ValueError):
        segment_command(SegmentRequest([Path("a")], Path("m"), Path("o"), device="cuda:x"))
    train = train_command(
        TrainRequest([Path("s.mrb")], Path("out"), init=None, max_minutes=2.5, max_steps=0), python="P"
    )
    assert train == [
        "P",
        "-m",
        "training",
        "train",
        "s.mrb",
        "-o",
        "out",
        "--max-minutes",
        "2.5",
        "--device",
        "auto",
        "--progress",
        "json",
    ]


def test_a_failing_run_surfaces_the_engines_one_line_message(tmp_path, small_bundle):
    command = segment_command(
        SegmentRequest([tmp_path / "missing.nrrd"], small_bundle, tmp_path / "o.seg.nrrd"), python=sys.executable
    )
    process = ChildProcess(command, engine_environment(MODULE_DIR))
    records = run_to_end(process)
    assert process.state == FAILED and process.process.returncode == 1
    assert process.error_message.endswith("missing.nrrd: input not found"), process.error_message
    assert "\n" not in process.error_message
    assert records[-1]["stage"] == "error"
    assert "medsegunet: error:" in process.log_text()  # the full log has stderr too
    assert list(tmp_path.iterdir()) == []


def test_a_bundle_that_is_not_a_bundle_fails_with_one_line(tmp_path, ct_chest):
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x80\x04K\x01.")  # a pickle, not a safetensors file
    process = ChildProcess(
        segment_command(SegmentRequest([ct_chest], fake, tmp_path / "o.seg.nrrd", device="cpu"), python=sys.executable),
        engine_environment(MODULE_DIR),
    )
    run_to_end(process)
    assert process.state == FAILED
    assert "fake.safetensors" in process.error_message and "\n" not in process.error_message


def test_a_crash_without_a_message_still_says_something():
    process = ChildProcess(
        [sys.executable, "-c", "import sys; print('halfway'); sys.stderr.write('Traceback: boom\\n'); sys.exit(3)"]
    )
    run_to_end(process, timeout=60)
    assert process.state == FAILED and process.error_message == "Traceback: boom"


@posix_only
def test_a_child_killed_by_a_signal_is_a_failure_not_a_cancel():
    """The OOM killer's SIGKILL is not the user's Cancel: the panel must say what happened."""
    process = ChildProcess([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    run_to_end(process, timeout=60)
    assert process.state == FAILED
    assert process.error_message == "the engine was killed by SIGKILL (out of memory?)"


def test_the_devices_command_lists_what_torch_sees():
    process = ChildProcess(devices_command(python=sys.executable), engine_environment(MODULE_DIR))
    assert process.wait(timeout=120) == SUCCEEDED, process.log_text()
    line = next(line for line in process.log_lines if line.startswith("{"))
    import torch

    expected = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    assert [label for label, _ in parse_devices(process.log_lines) if label.startswith("GPU")] == [
        f"GPU {i}: {name}" for i, name in enumerate(expected)
    ]
    assert json.loads(line)["cuda"] == expected
    assert parse_devices(["noise", '{"torch": "2", "cuda": ["A100", "H100"], "mps": false}']) == [
        ("GPU 0: A100", "cuda:0"),
        ("GPU 1: H100", "cuda:1"),
    ]
    assert parse_devices(['{"torch": "2", "cuda": [], "mps": true}']) == [("Apple GPU (MPS)", "mps")]
    assert parse_devices(["Traceback ...", "ModuleNotFoundError: No module named 'torch'"]) == []


def test_progress_lines_are_told_apart_from_other_output():
    assert parse_record('{"stage": "predict", "done": 1, "total": 2, "message": ""}')["done"] == 1
    assert parse_record('{"torch": "2.3"}') is None and parse_record("[1, 2]") is None
    assert parse_record("{not json") is None and parse_record("Downloading ...") is None


def test_records_arrive_while_the_child_runs():
    """The reader thread hands records over as they are printed, not when the child ends."""
    script = (
        "import json, time\nfor i in range(3):\n"
        "    print(json.dumps({'stage': 's', 'done': i, 'total': 3, 'message': ''}), flush=True)\ntime.sleep(60)"
    )
    process = ChildProcess([sys.executable, "-c", script])
    try:
        seen = []
        deadline = time.monotonic() + 30
        while len(seen) < 3:
            assert time.monotonic() < deadline
            seen += process.poll()
            time.sleep(0.02)
        assert [r["done"] for r in seen] == [0, 1, 2] and process.state == RUNNING
    finally:
        process.cancel(grace_seconds=1)
        process.wait(timeout=30)


def test_the_log_keeps_the_most_recent_lines(monkeypatch):
    monkeypatch.setattr(childprocess, "LOG_LINES_KEPT", 50)
    process = ChildProcess([sys.executable, "-c", "for i in range(200): print('line', i)"])
    assert process.wait(timeout=60) == SUCCEEDED
    text = process.log_text().splitlines()
    assert text[1] == "[150 earlier lines not kept]" and text[-1] == "line 199" and len(text) == 52


# --- cancel ----------------------------------------------------------------------------------------------


@posix_only
def test_cancel_ends_the_whole_process_tree(tmp_path):
    """A child that started a grandchild: Cancel must end both (Slicer would otherwise keep a GPU busy)."""
    process = ChildProcess([sys.executable, "-c", spawning_script(tmp_path / "pid", "time.sleep(120)")])
    records = wait_for_records(process)
    assert records[0]["message"] == "window 1"
    grandchild = int((tmp_path / "pid").read_text())
    assert alive(grandchild)
    started = time.monotonic()
    process.cancel(grace_seconds=60)
    assert time.monotonic() - started < 30  # Cancel returns without waiting for the child or its grace period
    assert process.wait(timeout=30) == CANCELLED  # SIGTERM ended it, long before the grace period
    assert wait_gone(grandchild)
    assert living_members_of_group(process.process.pid) == []  # nothing is left in the run's process group


@posix_only
def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    then = (
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        'print(\'{"stage": "x", "done": 0, "total": 1, "message": ""}\', flush=True); time.sleep(120)'
    )
    process = ChildProcess([sys.executable, "-c", spawning_script(tmp_path / "pid", then)])
    while not any(r["stage"] == "x" for r in process.poll()):
        assert process.state == RUNNING, process.log_text()
        time.sleep(0.05)
    grandchild = int((tmp_path / "pid").read_text())
    started = time.monotonic()
    process.cancel(grace_seconds=1)
    assert process.state == RUNNING  # still in its grace period
    assert process.wait(timeout=30) == CANCELLED and time.monotonic() - started < 10
    assert process.process.returncode == -signal.SIGKILL
    assert wait_gone(grandchild)


@posix_only
def test_a_grandchild_left_holding_the_pipes_does_not_hang_the_panel(tmp_path):
    """The engine exits 0 but something it started keeps stdout open: the run still ends, the leftover goes."""
    process = ChildProcess([sys.executable, "-c", spawning_script(tmp_path / "pid", "sys.exit(0)")])
    started = time.monotonic()
    run_to_end(process, timeout=60)
    assert process.state == SUCCEEDED
    assert time.monotonic() - started < childprocess.READER_GRACE_SECONDS + 10
    assert wait_gone(int((tmp_path / "pid").read_text()))


def test_cancel_after_the_end_changes_nothing():
    process = ChildProcess(
        [sys.executable, "-c", 'print(\'{"stage": "done", "done": 1, "total": 1, "message": "ok"}\')']
    )
    assert process.wait(timeout=60) == SUCCEEDED
    process.cancel()
    assert process.state == SUCCEEDED and not process.cancelled and process.result["message"] == "ok"


@posix_only
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
    assert any('"stage": "cancelled"' in line for line in process.log_lines)


# --- the standby engine: started before the click ------------------------------------------------------


def test_a_standby_engine_takes_the_panel_s_job_and_segments_as_a_fresh_engine_does(tmp_path, ct_chest, small_bundle):
    import numpy as np
    import SimpleITK as sitk

    fresh = ChildProcess(
        segment_command(
            SegmentRequest([ct_chest], small_bundle, tmp_path / "fresh.seg.nrrd", device="cpu"), python=sys.executable
        ),
        engine_environment(MODULE_DIR),
    )
    assert fresh.wait(timeout=300) == SUCCEEDED, fresh.log_text()

    standby = StandbyEngine(small_bundle, "cpu", engine_environment(MODULE_DIR), python=sys.executable)
    assert standby.process.command == standby_command(small_bundle, "cpu", python=sys.executable)
    assert standby.process.command[3:] == ["standby", "-m", str(small_bundle), "--device", "cpu", "--progress", "json"]
    assert standby.fits(Path(os.path.relpath(small_bundle)), "cpu") and not standby.fits(small_bundle, "auto")
    assert not standby.fits(tmp_path / "other.safetensors", "cpu")
    wait_for_records(standby.process)  # the engine is starting: the job may come at any time
    request = SegmentRequest([ct_chest], small_bundle, tmp_path / "result.seg.nrrd", device="cpu")
    run = standby.take(request)
    assert run is standby.process and not standby.fits(small_bundle, "cpu")
    assert standby.take(request) is None  # one job per engine
    standby.stop()  # the panel's clean-up: a taken engine is a run, not stopped here
    records = run_to_end(run)
    assert run.state == SUCCEEDED, run.log_text()
    steps = [r["stage"] for r in records if r["stage"] != "standby"]
    assert steps[0] == "read" and steps[-1] == "done" and run.result["output"] == str(tmp_path / "result.seg.nrrd")
    log = run.log_text().splitlines()  # the standby command, then its output, the job among it
    assert log[0].split()[3] == "standby" and f'job: {{"segment": ["{ct_chest}"' in "\n".join(log)
    read = lambda name: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))  # noqa: E731
    assert np.array_equal(read("result.seg.nrrd"), read("fresh.seg.nrrd"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.seg.nrrd", "result.seg.nrrd"]


def test_the_job_line_holds_the_fresh_command_s_arguments():
    request = SegmentRequest([Path("in.nrrd")], Path("m.safetensors"), Path("o.seg.nrrd"), device="cuda:1", overlap=0.3)
    assert segment_command(request, python="P") == [
        "P",
        "-m",
        "MedSegUNetLib",
        "segment",
        *segment_arguments(request),
        "--progress",
        "json",
    ]
    assert standby_command(Path("m.safetensors"), "cuda:1", python="P") == [
        "P",
        "-m",
        "MedSegUNetLib",
        "standby",
        "-m",
        "m.safetensors",
        "--device",
        "cuda",
        "--progress",
        "json",
    ]


def test_a_standby_engine_that_has_ended_takes_no_job(tmp_path, ct_chest, small_bundle):
    standby = StandbyEngine(small_bundle, "cpu", engine_environment(MODULE_DIR), python=sys.executable)
    standby.stop()
    assert standby.process.wait(timeout=60) in (CANCELLED, SUCCEEDED)
    assert not standby.fits(small_bundle, "cpu")
    assert standby.take(SegmentRequest([ct_chest], small_bundle, tmp_path / "o.seg.nrrd", device="cpu")) is None
    assert list(tmp_path.iterdir()) == []


def test_a_job_to_an_engine_that_died_is_refused_not_lost(tmp_path, ct_chest, small_bundle):
    """The engine gone between fits() and the write (killed, crashed): take() says so, so the panel
    starts a fresh engine instead of waiting on a dead one."""
    standby = StandbyEngine(small_bundle, "cpu", engine_environment(MODULE_DIR), python=sys.executable)
    standby.process.process.kill()
    standby.process.process.wait(timeout=30)
    assert standby.take(SegmentRequest([ct_chest], small_bundle, tmp_path / "o.seg.nrrd", device="cpu")) is None
    dead = ChildProcess([sys.executable, "-c", "pass"], stdin=True)
    dead.process.wait(timeout=30)
    with pytest.raises(OSError):
        dead.send_last_line("x" * 200000)  # more than a pipe holds: the write meets the closed end
    assert dead.process.stdin.closed


@posix_only
def test_a_job_written_to_a_dead_engine_does_not_kill_a_host_that_kept_sigpipe_s_default():
    """Slicer embeds Python and may leave SIGPIPE at its default (which ends the writing process): the
    write must still come back as an OSError, in a process that lives on."""
    script = textwrap.dedent(
        f"""
        import signal, sys
        sys.path[:0] = [{str(MODULE_DIR)!r}]
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as an embedding application may leave it
        from MedSegUNetLib.host.childprocess import ChildProcess
        dead = ChildProcess([sys.executable, "-c", "pass"], stdin=True)
        dead.process.wait(timeout=30)
        try:
            dead.send_last_line("x" * 200000)
        except OSError as error:
            print("refused", type(error).__name__, signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["refused", "BrokenPipeError", "True"], (
        result.returncode,
        result.stderr,
    )


@posix_only
def test_cancelling_a_job_of_a_standby_engine_leaves_no_output(tmp_path, ct_chest, small_bundle):
    standby = StandbyEngine(small_bundle, "cpu", engine_environment(MODULE_DIR), python=sys.executable)
    run = standby.take(SegmentRequest([ct_chest], small_bundle, tmp_path / "result.seg.nrrd", device="cpu", tta=True))
    while not any(r["stage"] == "predict" for r in run.poll()):
        assert run.state == RUNNING, run.log_text()
        time.sleep(0.05)
    run.cancel()
    assert run.wait(timeout=60) == CANCELLED and run.process.returncode == 130
    assert list(tmp_path.iterdir()) == []


# --- retrain -------------------------------------------------------------------------------------------------


def test_the_train_command_the_panel_builds_writes_a_bundle(tmp_path, ct_chest, chest_segmentation, small_bundle):
    """What Retrain does: the pairs saved as a scene, `training train` fine-tuning the selected model."""
    from MedSegUNetLib.model.bundle import read_bundle_metadata
    from training.scene_writer import ScenePair, write_mrml_scene

    scene = write_mrml_scene(tmp_path / "scene", "annotations", [ScenePair("ct", ct_chest, chest_segmentation, "seg")])
    command = logic_method("trainCommand")(None, [scene], tmp_path / "model", small_bundle, None, "cpu", 2)
    assert command == train_command(
        TrainRequest([scene], tmp_path / "model", init=small_bundle, max_steps=2, device="cpu")
    )
    assert command[1:4] == ["-m", "training", "train"] and command[command.index("--init") + 1] == str(small_bundle)
    process = ChildProcess(command, engine_environment(MODULE_DIR))
    records = run_to_end(process, timeout=600)
    assert process.state == SUCCEEDED, process.log_text()[-3000:]
    assert any(r["stage"] == "train" and "loss" in r for r in records)
    bundle = Path(process.result["bundle"])
    assert bundle == tmp_path / "model" / "model.safetensors" and bundle.is_file()
    names = [label.name for label in read_bundle_metadata(bundle).labels]
    assert names[:2] == ["ribs", "spine"]  # the initial model's labels are kept


def test_engine_environment_finds_both_packages(tmp_path):
    environment = engine_environment(MODULE_DIR, base={"PYTHONPATH": "/elsewhere"})
    paths = environment["PYTHONPATH"].split(os.pathsep)
    assert paths == [str(MODULE_DIR.resolve()), str(REPO.resolve()), "/elsewhere"]
    assert environment["PYTHONUNBUFFERED"] == "1"
    installed = tmp_path / "qt-scripted-modules"  # an installed extension: training beside MedSegUNetLib
    installed.mkdir()
    assert engine_environment(installed, base={})["PYTHONPATH"] == str(installed.resolve())


def test_engine_python_prefers_pythonslicer(tmp_path, monkeypatch):
    assert childprocess.engine_python() == sys.executable  # no Slicer here
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    if os.name != "nt":
        assert childprocess.engine_python() == str(launcher)


def test_the_engine_runs_with_its_malloc_settings_on_linux():
    """engine_environment sets glibc's malloc for the engine (huge pages, fixed mmap and trim thresholds:
    benchmarks/README.md), keeping whatever tunables the user set, never twice; bin/medsegunet sets the same."""
    from MedSegUNetLib.host.childprocess import MALLOC_TUNABLES, with_malloc_tunables

    ours = ":".join(MALLOC_TUNABLES)
    assert with_malloc_tunables("") == ours
    assert with_malloc_tunables("glibc.malloc.arena_max=2") == f"glibc.malloc.arena_max=2:{ours}"
    kept = with_malloc_tunables("glibc.malloc.hugetlb=0")  # the user's choice stands, the others are added
    assert kept.split(":") == ["glibc.malloc.hugetlb=0", *MALLOC_TUNABLES[1:]]
    assert with_malloc_tunables(with_malloc_tunables("")) == ours
    environment = engine_environment(MODULE_DIR, base={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    seen = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('GLIBC_TUNABLES', ''))"],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if sys.platform.startswith("linux"):
        assert seen == f"glibc.malloc.arena_max=2:{ours}"
    else:
        assert seen == "glibc.malloc.arena_max=2"


def test_bin_medsegunet_sets_the_engines_malloc_settings(tmp_path):
    """The shell launcher's loop, run on its own: the same tunables, in order, the user's value kept."""
    from MedSegUNetLib.host.childprocess import MALLOC_TUNABLES

    script = (REPO / "bin" / "medsegunet").read_text(encoding="utf-8")
    loop = script[script.index("for tunable in") : script.index("export GLIBC_TUNABLES")]
    probe = tmp_path / "probe.sh"
    probe.write_text(loop + 'printf "%s" "$GLIBC_TUNABLES"\n', encoding="utf-8")
    for given, expected in (
        ("", ":".join(MALLOC_TUNABLES)),
        ("glibc.malloc.hugetlb=0", ":".join(["glibc.malloc.hugetlb=0", *MALLOC_TUNABLES[1:]])),
    ):
        result = subprocess.run(
            ["bash", str(probe)],
            env={"GLIBC_TUNABLES": given, "PATH": os.environ.get("PATH", "")},
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout == expected
