"""benchmarks/bench_model_path.py without ComfyUI: its arguments, its ratios and its report (the runs themselves need
a ComfyUI venv and are not part of ``make test``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_model_path as bench  # noqa: E402


def _result(rate, peak, eps, kind="ε"):
    return {"loss_first": 1.0, "loss_last": 0.8, "loss_kind": kind, "eval_eps_mse": eps, "eval_x0_mse": eps / 10,
            "steps_per_s": rate, "peak_mb": peak + 1000, "train_peak_mb": peak, "trained_params": 1234,
            "base_eps_mse": 1.1}


def test_arguments_default_quick_and_refusals(tmp_path):
    args = bench.parse_args(["--comfy-root", str(tmp_path)])
    assert (args.steps, args.warmup, args.rank, args.device, args.only) == (30, 3, 4, "cpu", None)
    quick = bench.parse_args(["--comfy-root", str(tmp_path), "--quick", "--rank", "8", "--lr", "2e-4"])
    assert (quick.steps, quick.warmup, quick.rank, quick.lr) == (8, 2, 8, 2e-4)
    with pytest.raises(SystemExit):
        bench.parse_args(["--comfy-root", str(tmp_path), "--steps", "3", "--warmup", "3"])  # nothing left to time
    with pytest.raises(SystemExit):
        bench.parse_args(["--comfy-root", str(tmp_path), "--resolution", "60"])


def test_child_command_passes_every_setting_on(tmp_path):
    args = bench.parse_args(["--comfy-root", str(tmp_path), "--steps", "12", "--lr", "0.003", "--checkpointing"])
    cmd = bench.child_command(args, "comfyui", tmp_path / "data", "/py")
    child = bench.parse_args(cmd[2:])
    assert cmd[0] == "/py" and child.only == "comfyui" and child.data == str(tmp_path / "data")
    for name in ("steps", "batch_size", "rank", "lr", "seed", "resolution", "warmup", "device", "checkpointing"):
        assert getattr(child, name) == getattr(args, name), name


def test_ratios_are_crucible_over_comfyui_and_skip_missing_numbers():
    r = bench.ratios(_result(2.0, 300.0, 0.5), _result(1.0, 600.0, 0.25))
    assert r["steps_per_s"] == 2.0 and r["train_peak_mb"] == 0.5 and r["eval_eps_mse"] == 2.0
    assert bench.ratios({"steps_per_s": None}, {"steps_per_s": 1.0})["steps_per_s"] is None
    assert bench.ratios({"steps_per_s": 1.0}, {"steps_per_s": 0})["steps_per_s"] is None


def test_report_has_both_rows_the_ratios_and_what_was_not_matched():
    text = bench.format_report({"crucible": _result(2.0, 300.0, 0.5), "comfyui": _result(1.0, 600.0, 0.25, "x0")},
                               {"device": "cpu", "steps": 30, "batch_size": 4, "rank": 4, "lr": 1e-3,
                                "resolution": 64, "seed": 7})
    lines = text.splitlines()
    assert lines[0].startswith("MODEL path vs ComfyUI TrainLoraNode — cpu, 30 steps")
    crucible = next(l for l in lines if l.startswith("crucible "))
    assert "1.0000 → 0.8000 (ε)" in crucible and "2.000" in crucible and "300" in crucible
    assert "(x0)" in next(l for l in lines if l.startswith("comfyui "))
    assert "crucible / comfyui: steps_per_s 2.00, train_peak_mb 0.50" in text
    assert "base" in text and "1.10000" in text
    assert text.splitlines()[-1].startswith("not matched: targets: ComfyUI trains every weighted module")


def test_report_names_a_failed_trainer_and_prints_no_ratio():
    text = bench.format_report({"crucible": _result(2.0, 300.0, 0.5), "comfyui": {"error": "exit 1: boom"}}, {})
    assert "comfyui    failed: exit 1: boom" in text and "crucible / comfyui" not in text


def test_step_clock_leaves_the_warm_up_out():
    clock = bench.StepClock(warmup=2)
    clock.times = [0.0, 5.0, 10.0, 11.0, 12.0]
    assert clock.rate() == 1.0  # 2 steps over 10 → 12
    clock.times = [0.0, 1.0, 2.0]
    assert clock.rate() is None


def test_without_a_comfyui_tree_it_skips_cleanly(tmp_path, capsys):
    assert bench.comfy_python(str(tmp_path)) is None
    assert bench.main(["--comfy-root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("skipped: needs a ComfyUI tree")
