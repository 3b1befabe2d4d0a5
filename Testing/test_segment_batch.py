"""`medsegunet segment-batch` on real files: outputs as single `segment` runs write them, failures kept to
their case, resume after SIGKILL, shards, DICOM trees, name collisions, two predictors."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import SimpleITK as sitk
import torch
from conftest import MODULE_DIR, REPO, assert_clean_failure, files_in, run_cli
from test_cli_segment import write_dicom_series

from MedSegUNetLib.cli import main
from MedSegUNetLib.commands.batch_cases import in_shard, list_cases, parse_shard, shard_of
from MedSegUNetLib.core.errors import MedSegError


def read_summary(path: Path) -> Dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["case", "input", "output", "status", "seconds", "voxels", "error"]
    return {row["case"]: row for row in rows}


_ALONE: Dict[tuple, bytes] = {}


def segment_alone(
    inputs: List[Path], bundle: Path, folder: Path, *extra: str, ending: str = ".seg.nrrd", threads: int = 0
) -> bytes:
    """What one `segment` run writes for these inputs (run once per inputs, model and options), with
    ``threads`` torch threads (0: torch's default)."""
    key = (tuple(inputs), bundle, extra, ending, threads)
    if key not in _ALONE:
        output = folder / f"alone-{len(_ALONE)}{ending}"
        arguments = ["segment", *map(str, inputs), "-m", str(bundle), "-o", str(output), "--progress", "none"]
        default = torch.get_num_threads()
        torch.set_num_threads(threads or default)
        try:
            assert main([*arguments, *extra]) == 0
        finally:
            torch.set_num_threads(default)
        _ALONE[key] = output.read_bytes()
    return _ALONE[key]


def small_chest(ct_chest: Path) -> sitk.Image:
    """The middle of CTChest4 (64x64x34): a few windows of the small bundle per case."""
    return sitk.ReadImage(str(ct_chest))[32:96, 32:96, :]


def records_of(stdout: str) -> List[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, ct_chest) -> Path:
    """Two files named ct in two folders, an .nrrd, and a .nii.gz whose data is cut short."""
    root = tmp_path_factory.mktemp("cohort")
    chest = small_chest(ct_chest)
    for folder in ("a", "b"):
        (root / folder).mkdir()
    sitk.WriteImage(chest[:, :, :14], str(root / "a" / "ct.nii.gz"), useCompression=True)
    sitk.WriteImage(chest[:, :, 16:28], str(root / "b" / "ct.nii.gz"), useCompression=True)
    sitk.WriteImage(chest[:, 8:56, 10:30], str(root / "b" / "other.nrrd"))
    whole = (root / "a" / "ct.nii.gz").read_bytes()
    (root / "b" / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    return root


GOOD = {"a_ct": "a/ct.nii.gz", "b_ct": "b/ct.nii.gz", "other": "b/other.nrrd"}  # the cohort's good cases


def test_a_cohort_with_a_corrupt_case_runs_on_two_predictors_as_single_segment_runs(tmp_path, cohort, small_bundle):
    """The corrupt case gets its row and one-line error, the others are the very files `segment` writes
    (with the torch threads of one predictor: an untrained network's near-ties flip with the threads'
    rounding), the run exits 1 with one line, both predictors worked, and the progress counts the cases."""
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    out = tmp_path / "out"
    result = run_cli(
        "segment-batch", str(cohort), "-m", str(small_bundle), "-o", str(out), "--devices", "cpu,cpu",
        "--progress", "json",
    )  # fmt: skip
    line = assert_clean_failure(result, "1 of 4 case(s) failed", str(out / "summary.csv"))
    assert "Traceback" not in result.stdout, line
    summary = read_summary(out / "summary.csv")
    assert set(summary) == {"a_ct", "b_ct", "other", "cut"}
    cut = summary["cut"]
    assert cut["status"] == "failed" and cut["output"] == ""
    assert cut["error"] == f"{cohort / 'b' / 'cut.nii.gz'}: image data is truncated or corrupt"
    for case, source in GOOD.items():
        row = summary[case]
        assert row["status"] == "done" and row["error"] == "" and row["input"] == str(cohort / source)
        assert row["output"] == str(out / f"{case}.seg.nrrd") and float(row["seconds"]) > 0
        image = sitk.ReadImage(str(cohort / source))
        assert int(row["voxels"]) == image.GetNumberOfPixels()
        alone = segment_alone([cohort / source], small_bundle, tmp_path, threads=threads)
        assert (out / f"{case}.seg.nrrd").read_bytes() == alone, case
    assert files_in(out) == {"a_ct.seg.nrrd", "b_ct.seg.nrrd", "other.seg.nrrd", "summary.csv"}
    records = records_of(result.stdout)
    per_case = [r for r in records if r["stage"] == "cases" and "case" in r]
    assert [r["done"] for r in per_case] == [1, 2, 3, 4] and {r["total"] for r in per_case} == {4}
    assert {r["predictor"] for r in per_case if r["status"] == "done"} == {"cpu#0", "cpu#1"}
    assert records[-1]["stage"] == "error"


def test_resume_after_sigkill_finishes_the_rest_and_leaves_no_partial_file(tmp_path, cohort, small_bundle):
    """Killed after its first case: what it left in place is complete, the next run skips it, does the rest
    and removes the killed run's temporaries; every output is the file a single `segment` run writes."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "MedSegUNetLib", "segment-batch", str(cohort), "-m", str(small_bundle)]
    command += ["-o", str(out), "--progress", "json", "--device", "cpu"]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), str(REPO)]))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    assert process.stdout is not None
    for line in process.stdout:  # until the first case is written, whatever the machine's load
        if json.loads(line).get("status") == "done":
            break
    process.kill()
    process.communicate()
    left = {name[: -len(".seg.nrrd")] for name in files_in(out) if name.endswith(".seg.nrrd") and name[0] != "."}
    assert left, "the first case was written before the kill"
    # Killed, or (a machine fast enough to finish in the moment the kill took) ended with the corrupt case failed.
    assert process.returncode == -signal.SIGKILL or (process.returncode == 1 and left == set(GOOD))
    for case in left:  # complete: a whole file, as `segment` writes it
        assert (out / f"{case}.seg.nrrd").read_bytes() == segment_alone([cohort / GOOD[case]], small_bundle, tmp_path)

    assert main(["segment-batch", str(cohort), "-m", str(small_bundle), "-o", str(out), "--progress", "none"]) == 1
    assert files_in(out) == {*(f"{case}.seg.nrrd" for case in GOOD), "summary.csv"}, "no temporary is left"
    summary = read_summary(out / "summary.csv")
    assert {case for case, row in summary.items() if row["status"] == "skipped"} == left
    assert {case for case, row in summary.items() if row["status"] == "done"} == set(GOOD) - left
    assert summary["cut"]["status"] == "failed"
    for case in set(GOOD) - left:
        assert (out / f"{case}.seg.nrrd").read_bytes() == segment_alone([cohort / GOOD[case]], small_bundle, tmp_path)


def test_shards_are_disjoint_complete_and_stable_when_the_list_changes(tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    for index in range(60):
        (folder / f"patient{index:03d}.nii.gz").write_bytes(b"")  # listing reads no file
    cases = list_cases([folder], None, 1, skip=None)
    assert len(cases) == 60
    shards = [in_shard(cases, (index, 4)) for index in range(4)]
    ids = [case.case_id for shard in shards for case in shard]
    assert sorted(ids) == sorted(case.case_id for case in cases) and len(set(ids)) == 60  # once each
    assert all(len(shard) >= 5 for shard in shards), [len(shard) for shard in shards]
    # Listed otherwise (a list file, in another order, with cases added and removed): no case moves.
    listed = tmp_path / "cases.txt"
    names = [f"cohort/patient{index:03d}.nii.gz" for index in range(59, 9, -1)] + ["cohort/new.nii.gz"]
    listed.write_text("# a comment\n\n" + "\n".join(names) + "\n")
    (folder / "new.nii.gz").write_bytes(b"")
    relisted = list_cases([], listed, 1, skip=None)
    assert len(relisted) == 51
    before = {case.case_id: shard_of(case.case_id, 4) for case in cases}
    for case in relisted:
        if case.case_id != "new":
            assert shard_of(case.case_id, 4) == before[case.case_id]
            assert case in in_shard(relisted, (before[case.case_id], 4))


@pytest.mark.parametrize("text", ["4/4", "1", "a/b", "0/0", "-1/3"])
def test_a_bad_shard_is_refused(text):
    with pytest.raises(MedSegError, match="--shard"):
        parse_shard(text)


def test_two_shards_into_one_folder_cover_the_cohort_once(tmp_path, cohort, small_bundle):
    out = tmp_path / "out"
    arguments = ["segment-batch", str(cohort), "-m", str(small_bundle), "-o", str(out), "--progress", "none"]
    codes = [main([*arguments, "--shard", f"{index}/2"]) for index in range(2)]
    summaries = [read_summary(out / f"summary-shard-{index}-of-2.csv") for index in range(2)]
    assert not set(summaries[0]) & set(summaries[1])
    assert set(summaries[0]) | set(summaries[1]) == {*GOOD, "cut"}
    for code, summary in zip(codes, summaries):
        assert code == (1 if "cut" in summary else 0)
        assert all(row["status"] == "done" for case, row in summary.items() if case != "cut")
    assert files_in(out) == {
        *(f"{case}.seg.nrrd" for case in GOOD),
        "summary-shard-0-of-2.csv",
        "summary-shard-1-of-2.csv",
    }
    for case, source in GOOD.items():
        assert (out / f"{case}.seg.nrrd").read_bytes() == segment_alone([cohort / source], small_bundle, tmp_path)


def test_a_dicom_tree_gives_one_output_per_series(tmp_path, ct_chest, small_bundle, capsys):
    """Two patients' series in folders of the same name, and a folder with two series; an output folder
    inside the tree is not searched."""
    image = sitk.Cast(small_chest(ct_chest), sitk.sitkInt16)
    tree = tmp_path / "tree"
    write_dicom_series(image[:, :, :12], tree / "p1" / "CT", "1.2.826.0.1.3680043.2.1125.11")
    write_dicom_series(image[:, :, 10:30], tree / "p2" / "CT", "1.2.826.0.1.3680043.2.1125.12")
    write_dicom_series(image[:, :, :8], tree / "two", "1.2.3.4.1")
    write_dicom_series(image[:, :, 20:], tree / "two", "1.2.3.4.2")
    out = tree / "results"
    arguments = ["segment-batch", str(tree), "-m", str(small_bundle), "-o", str(out), "--format", "nii.gz"]
    assert main([*arguments, "--progress", "none"]) == 0
    expected = {"p1_CT": (tree / "p1" / "CT", None), "p2_CT": (tree / "p2" / "CT", None)}
    expected.update({f"two_{uid}": (tree / "two", uid) for uid in ("1.2.3.4.1", "1.2.3.4.2")})
    assert set(read_summary(out / "summary.csv")) == set(expected)
    for case, (folder, series) in expected.items():
        extra = ("--series", series) if series else ()
        alone = segment_alone([folder], small_bundle, tmp_path, *extra, ending=".nii.gz")
        assert (out / f"{case}.nii.gz").read_bytes() == alone, case
    assert main([*arguments, "--progress", "lines"]) == 0
    assert "4 case(s): 0 done, 4 skipped" in capsys.readouterr().out


def test_colliding_names_get_their_folders_and_channels_are_grouped(tmp_path):
    for relative in ("a/ct.nii.gz", "b/ct.nii.gz", "c/CT.nrrd", "d/x/scan.nii.gz", "d/y/scan.nii.gz", "e/ct.nrrd"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    (tmp_path / "e" / "ct.nii.gz").write_bytes(b"")  # the same name in one folder: only the ending differs
    (tmp_path / "e" / "labels.seg.nrrd").write_bytes(b"")  # a segmentation is not an input
    cases = list_cases([tmp_path], None, 1, skip=None)
    ids = [case.case_id for case in cases]
    assert len({case_id.casefold() for case_id in ids}) == len(ids) == 7
    assert {"a_ct", "b_ct", "c_CT", "x_scan", "y_scan"} <= set(ids)
    e_ids = [case.case_id for case in cases if case.inputs[0].parent.name == "e"]
    assert len(e_ids) == 2 and all(re.fullmatch(r"e_ct_[0-9a-f]{8}", case_id) for case_id in e_ids)  # a hash added

    channels = tmp_path / "channels"
    channels.mkdir()
    for name in (
        "p1_0000.nii.gz",
        "p1_0001.nii.gz",
        "p2_0001.nii.gz",
        "p2_0000.nii.gz",
        "p3_0000.nii.gz",
        "odd.nii.gz",
    ):
        (channels / name).write_bytes(b"")
    grouped = {case.case_id: case for case in list_cases([channels], None, 2, skip=None)}
    assert set(grouped) == {"p1", "p2", "p3", "odd"}
    assert [path.name for path in grouped["p2"].inputs] == ["p2_0000.nii.gz", "p2_0001.nii.gz"]
    assert grouped["p1"].problem is None and grouped["p2"].problem is None
    assert "has channels _0000; the model takes 2" in str(grouped["p3"].problem)
    assert "CASE_0000" in str(grouped["odd"].problem)
    single = {case.case_id for case in list_cases([channels / "p1_0000.nii.gz"], None, 1, skip=None)}
    assert single == {"p1"}  # nnU-Net's one-channel naming


def test_two_channel_cases_segment_as_segment_s_multi_input(tmp_path, ct_chest):
    from MedSegUNetLib.core.labels import default_labels
    from MedSegUNetLib.model.bundle import Normalization, Preprocessing, create_bundle, save_bundle

    preprocessing = Preprocessing((6.0, 6.0, 6.0), (32, 32, 16), "RAS", Normalization("zscore", None))
    bundle = create_bundle(default_labels(["a", "b"]), preprocessing, ["T1", "T2"], name="two", base_filters=4)
    model = save_bundle(tmp_path / "two.safetensors", bundle.meta, bundle.network)
    chest = small_chest(ct_chest)
    cohort = tmp_path / "in"
    cohort.mkdir()
    sitk.WriteImage(chest, str(cohort / "p1_0000.nrrd"))
    sitk.WriteImage(sitk.InvertIntensity(chest, 1000), str(cohort / "p1_0001.nrrd"))
    sitk.WriteImage(chest, str(cohort / "p2_0001.nrrd"))
    out = tmp_path / "out"
    assert main(["segment-batch", str(cohort), "-m", str(model), "-o", str(out), "--progress", "none"]) == 1
    summary = read_summary(out / "summary.csv")
    assert summary["p1"]["status"] == "done" and summary["p2"]["status"] == "failed"
    assert "p2_0001.nrrd: has channels _0001" in summary["p2"]["error"]
    alone = segment_alone([cohort / "p1_0000.nrrd", cohort / "p1_0001.nrrd"], model, tmp_path)
    assert (out / "p1.seg.nrrd").read_bytes() == alone


def test_sigterm_cancels_the_cohort_cleanly(tmp_path, cohort, small_bundle):
    """Exit 130, no temporary left, every output in place complete."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "MedSegUNetLib", "segment-batch", str(cohort), "-m", str(small_bundle)]
    command += ["-o", str(out), "--progress", "json"]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), str(REPO)]))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    assert process.stdout is not None
    for line in process.stdout:
        if json.loads(line)["stage"] == "cases":  # the cases are listed: the pipeline starts
            break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip() == "medsegunet: cancelled" and records_of(stdout)[-1]["stage"] == "cancelled"
    assert all(not name.startswith(".") for name in files_in(out)), files_in(out)
    for name in files_in(out) - {"summary.csv"}:
        case = name[: -len(".seg.nrrd")]
        assert (out / name).read_bytes() == segment_alone([cohort / GOOD[case]], small_bundle, tmp_path)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--devices", "gpu"], "unknown device 'gpu'"),
        (["--devices", "cuda:7"], "cuda:7"),
        (["--shard", "2/2"], "--shard 2/2"),
        (["--list", "missing.txt"], "missing.txt: cannot read the list file"),
        (["--list", "empty.txt"], "no image file or DICOM series found"),
    ],
)
def test_what_cannot_work_at_all_is_refused_before_any_case(tmp_path, cohort, small_bundle, extra, message, capsys):
    out = tmp_path / "out"
    (tmp_path / "nothing").mkdir()
    (tmp_path / "empty.txt").write_text(f"# no case\n{tmp_path / 'nothing'}\n")
    inputs = [] if "empty.txt" in extra else [str(cohort)]
    extra = [str(tmp_path / argument) if argument == "empty.txt" else argument for argument in extra]
    code = main(["segment-batch", *inputs, "-m", str(small_bundle), "-o", str(out), *extra])
    assert code == 1
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (out / "summary.csv").exists()


def test_a_missing_model_is_refused_at_once(tmp_path, cohort):
    result = run_cli("segment-batch", str(cohort), "-m", str(tmp_path / "none.safetensors"), "-o", str(tmp_path))
    assert_clean_failure(result, "none.safetensors")


def test_another_machine_s_temporary_in_a_shared_folder_is_left_while_it_may_be_written(tmp_path):
    """Shards on several machines share the output folder: a process id from another machine means nothing
    here, so its temporary is removed only once untouched for an hour; this machine's dead ones at once."""
    from MedSegUNetLib.core.atomic import FOREIGN_TEMPORARY_SECONDS, clean_stale_temporaries, temporary_sibling

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ours = temporary_sibling(tmp_path / "a.seg.nrrd")
    mine_dead = ours.with_name(ours.name.replace(f"-tmp-{os.getpid()}-", f"-tmp-{dead.pid}-"))
    host = ours.name.split("-tmp-")[1].split("-")[1]
    foreign = mine_dead.with_name(mine_dead.name.replace(f"-{host}-", "-0f0f0f-"))
    old_foreign = foreign.with_name(foreign.name.replace(".seg.nrrd", "x.seg.nrrd"))
    for path in (ours, mine_dead, foreign, old_foreign):
        path.write_bytes(b"half")
    hours_ago = time.time() - FOREIGN_TEMPORARY_SECONDS - 60
    os.utime(old_foreign, (hours_ago, hours_ago))
    assert clean_stale_temporaries(tmp_path) == 2
    assert files_in(tmp_path) == {ours.name, foreign.name}
