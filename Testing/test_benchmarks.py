"""Smoke check of the benchmarks (benchmarks/README.md): they run, report every field, and the two
inference pipelines agree. Timings are never asserted here: they belong to the benchmark reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The shipped model is part of the repository: without it this fails (test_demo says why), never skips.
pytestmark = pytest.mark.slow


def run_benchmark(script: str, report: Path, *extra: str) -> dict:
    command = [
        sys.executable,
        str(REPO / "benchmarks" / script),
        "--size",
        "tiny",
        "--repeats",
        "1",
        "--json",
        str(report),
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(report.read_text(encoding="utf-8"))


def test_inference_benchmark_reports_and_outputs_agree(tmp_path):
    """On the Slicer panel's files (--panel: the volume as the uncompressed .nrrd the panel writes, ours'
    result the .seg.nrrd it loads), each pipeline in the benchmark and as a whole process."""
    report = run_benchmark("inference.py", tmp_path / "inference.json", "--whole-process", "1", "--panel")
    assert report["files"].startswith("panel")
    for key in ("speedup_vs_monai_baseline", "peak_rss_ratio_vs_monai_baseline", "dice_ours_vs_baseline"):
        assert report[key] > 0
    for side in ("ours", "ready", "baseline"):
        assert set(report[side]["stages_s"]) == {"read", "preprocess", "predict", "restore", "write"}
        assert report[side]["network_floor_s"] > 0 and report[side]["peak_rss_mb"] > 0 and report[side]["windows"] > 0
        assert report[side]["stages_s"]["read"] > 0 and report[side]["stages_s"]["write"] > 0
        # the network's own time inside the run: part of the predict stage, never more
        assert 0 < report[side]["network_in_pipeline_s"] < report[side]["stages_s"]["predict"]
        assert 0 < report[side]["overhead_share_in_run"] < 1
    # equal settings: both on the model's own grid (on the benchmark volume each pipeline resamples with
    # its own grid convention, a sub-voxel shift that alone lowers the Dice: reported, not asserted)
    assert report["dice_ours_vs_baseline_on_model_grid"] > 0.99
    # the .seg.nrrd (ours) against the baseline's NIfTI on the benchmark volume: the same grid, so a Dice
    assert 0.5 < report["dice_ours_vs_baseline"] <= 1
    # ready: segment on the engine started ahead (model loaded, first window run before the clock); both
    # .seg.nrrd files, read back as labelmaps
    assert report["ready_labels_equal_ours"] is True and report["speedup_ready_vs_monai_baseline"] > 0
    whole = report["whole_process"]  # the real command line and the baseline script, imports included
    assert whole["ours_s"] > report["ours"]["total_s"] and whole["baseline_s"] > report["baseline"]["total_s"]
    assert len(whole["ours_runs_s"]) == len(whole["baseline_runs_s"]) == len(whole["ready_runs_s"]) == 1
    assert whole["speedup_vs_monai_baseline"] > 0 and whole["speedup_ready_vs_monai_baseline"] > 0
    # the real standby engine: its start (imports, model, first window) comes before the job, outside its time
    assert whole["ready_start_s"] > 0 and whole["ready_s"] > 0


def test_training_benchmark_reports(tmp_path):
    report = run_benchmark("training.py", tmp_path / "training.json")
    assert report["speedup_vs_monai_baseline"] > 0
    for side in ("ours", "baseline"):
        assert report[side]["steps_per_s"] > 0 and 0 <= report[side]["data_wait_share"] <= 1


def test_batch_benchmark_reports(tmp_path):
    """Two tiny cases: every side reports, and segment-batch's outputs equal the separate processes'."""
    report_path = tmp_path / "batch.json"
    command = [sys.executable, str(REPO / "benchmarks" / "batch.py"), "--size", "tiny", "--cases", "2"]
    result = subprocess.run(
        [*command, "--json", str(report_path)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    for side in ("separate", "batch", "batch_two_predictors"):
        assert report[side]["wall_s"] > 0 and report[side]["peak_rss_mb"] > 0 and report[side]["cases_per_hour"] > 0
    assert report["batch"]["throughput_vs_separate"] > 0 and report["batch"]["peak_rss_vs_single_segment"] > 0
    assert report["batch_outputs_equal_separate"] == 2  # one predictor: the very files `segment` writes
    assert 0 < report["two_predictor_min_dice_vs_separate"] <= 1
    assert "nnunetv2" in str(report["nnunet"])


def test_monai_bundle_baseline_quick_form_compares_monais_inference_with_ours(tmp_path):
    """The tiny form: a wholeBody_ct_segmentation-layout bundle (SegResNet, 105 channels), imported with
    --set as a user picks its low resolution, run by MONAI's own components and by segment, each a whole
    process; the outputs must agree (there are no tied nearest-neighbour voxels at its 5 mm)."""
    report_path = tmp_path / "monai.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "monai_bundle_baseline.py"),
        "--quick",
        "--json",
        str(report_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.loads(report_path.read_text(encoding="utf-8"))["runs"]
    assert run["spacing_mm"] == 5.0 and "SegResNet" in run["network"] and "105 classes" in run["network"]
    for side in ("monai", "ours"):
        assert run[side]["wall_s"] > 0 and run[side]["peak_rss_mb"] > 0 and run[side]["runs"]["wall_s"]
    assert run["ours"]["speedup_vs_monai"] > 0 and run["ours"]["peak_rss_ratio_vs_monai"] > 0
    assert run["ours"]["dice_vs_monai"] >= 0.98, run["ours"]["dice_vs_monai"]
    assert "ours_bf16" not in run  # only with --bf16


def test_nnunet_baseline_quick_form_compares_the_two_predictors(tmp_path):
    """The tiny form: nnU-Net's planner and trainer make a model, import-model brings it in, and
    nnUNetPredictor and segment run it on the same volume, each a whole process; the outputs must agree."""
    from MedSegUNetLib.prediction.inference import cpu_runs_bf16

    report_path = tmp_path / "nnunet.json"
    command = [sys.executable, str(REPO / "benchmarks" / "nnunet_baseline.py"), "--quick", "--json", str(report_path)]
    bf16 = cpu_runs_bf16()  # the bf16 arm where this CPU runs it (segment refuses bf16 elsewhere, tested apart)
    command += ["--body-crop"] + ["--bf16"] * bf16
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    (run,) = report["runs"]
    assert run["network"] == "PlainConvUNet" and run["parameters"] > 0
    for side in ("nnunet", "ours"):
        assert run[side]["wall_s"] > 0 and run[side]["peak_rss_mb"] > 0
    assert run["speedup_vs_nnunet"] > 0 and run["peak_rss_ratio_vs_nnunet"] > 0
    # the same grid and labels that mostly agree (a briefly trained network: not the full form's 0.98);
    # a flipped, shifted or renumbered output falls far below this
    assert run["dice_ours_vs_nnunet"] > 0.7, run["dice_ours_vs_nnunet"]
    assert set(run["goals_met"]) == {"speedup >= 3", "peak memory <= 0.5x", "dice >= 0.98"}
    arms = {"ours_body_crop": True, "ours_bf16": bf16, "ours_bf16_body_crop": bf16}
    assert {arm: arm in run for arm in arms} == arms
    for arm in (arm for arm, ran in arms.items() if ran):
        assert run[arm]["wall_s"] > 0 and run[arm]["dice_vs_nnunet"] > 0.7, (arm, run[arm])
    assert "--body-crop" in run["ours_body_crop"]["options"]


def test_gpu_check_script_parses_and_its_python_parts_answer_help():
    """gpu-check.sh --device cpu --quick takes minutes here (the nnU-Net planner alone about one): its
    syntax, its argument checks and every benchmark it runs are checked instead."""
    script = REPO / "benchmarks" / "gpu-check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    refused = subprocess.run(["bash", str(script), "--device", "tpu"], capture_output=True, text=True)
    assert refused.returncode == 2 and "cuda or cpu" in refused.stderr
    text = script.read_text(encoding="utf-8")
    for part in ("inference.py", "nnunet_baseline.py", "training.py", "tta.py", "monai_bundle_baseline.py"):
        assert part in text
        helped = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / part), "--help"],
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=120,
        )
        assert helped.returncode == 0 and "--device" in helped.stdout, part
    assert "out_of_memory" in text


def test_tta_benchmark_times_both_runs(tmp_path):
    report_file = tmp_path / "tta.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "tta.py"), "--size", "tiny", "--json", str(report_file)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(report_file.read_text(encoding="utf-8"))
    assert report["plain_s"] > 0 and report["tta_s"] > 0
    assert report["tta_over_plain"] == pytest.approx(report["tta_s"] / report["plain_s"], abs=0.02)  # rounded
