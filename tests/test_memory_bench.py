"""benchmarks/bench_memory.py without the full-size runs: its output line, its skips, its record file."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_memory  # noqa: E402

LINE = re.compile(r"^case=(sd15|sdxl|sd3|flux)-(lora|full)-(default|low|lowest) res=\d+ peak_gib=\d+\.\d\d "
                  r"budget_gib=\d+(\.\d+)? device=(cpu|cuda) ok=(true|false) method=(full-step|setup\+reduced-step) "
                  r"weights=(files|in-memory)$")


def _row(case="sdxl-lora-low", peak=8.33, ok=False):
    return {"case": case, "res": 512, "peak_gib": peak, "base_gib": 0.46, "device": "cpu", "method": "full-step",
            "budget_gib": 8.0, "ok": ok, "estimate_gib": 7.3, "settings": {"cache_latents": True}}


def test_result_line_is_the_issue_format():
    assert LINE.match(bench_memory.result_line(_row()))
    assert bench_memory.result_line(_row()).startswith(
        "case=sdxl-lora-low res=512 peak_gib=8.33 budget_gib=8 device=cpu ok=false")


def test_record_replaces_a_case_and_keeps_the_others(tmp_path):
    path = tmp_path / "memory.json"
    bench_memory.record_rows(path, [_row("sd15-lora-default", 3.7, True), _row()], "CPU: x", "2.13.0+cpu")
    bench_memory.record_rows(path, [_row(peak=8.1)], "CPU: x", "2.13.0+cpu")
    record = json.loads(path.read_text())
    assert [(r["case"], r["peak_gib"]) for r in record["rows"]] == [("sd15-lora-default", 3.7), ("sdxl-lora-low", 8.1)]
    assert record["device"] == "CPU: x" and record["torch"] == "2.13.0+cpu" and all(r["date"] for r in record["rows"])
    table = bench_memory.markdown_rows(record)
    assert "| sdxl-lora-low (cache_latents True) | full-step, in-memory | 512 | 8.10 | 0.46 | 8 (over) | 7.76 |" in table


def test_cuda_only_and_too_large_cases_are_skipped_and_named():
    """Every preset option exists now (no "needs <option>" branch): block swap is skipped on the CPU as CUDA only, and
    a case whose estimate is over --max-ram-gib is not started."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--cases", "flux-lora-lowest",
                           "flux-lora-default", "--max-ram-gib", "1"], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("case=")]
    assert len(lines) == 2 and "needs" not in proc.stdout, proc.stdout
    assert "flux-lora-default res=512 skipped: estimate " in proc.stdout and "> --max-ram-gib 1" in proc.stdout
    assert "flux-lora-lowest res=512 skipped: CUDA only: blocks_to_swap" in proc.stdout


def test_a_preset_naming_an_option_no_config_has_is_an_error():
    from trainer.memory_presets import Case, resolve_case

    with pytest.raises(ValueError, match="no_such_option"):
        resolve_case(Case("sdxl", "lora", "low", 8.0, {"no_such_option": True}), "cpu")

def test_reduced_step_model_has_the_same_width_and_fewer_blocks():
    """setup+reduced-step: the step runs on a same-width model (hidden sizes, heads, text widths unchanged) with each
    layer stack cut to REDUCED_LAYERS; SD3's CLIP-L is built as the class the family loads (with its projection)."""
    import transformers

    import bench_memory_reduced as reduced
    from trainer.full_size import build_meta

    for family, denoiser in (("sd3", "transformer"), ("flux", "transformer")):
        full, small = build_meta(family, denoiser), reduced.reduced_module(family, denoiser)
        cut = {k: v for k, v in small.config.items() if k in reduced.LAYER_KEYS}
        assert cut and all(v == reduced.REDUCED_LAYERS for v in cut.values())
        same = {k: v for k, v in full.config.items() if k not in reduced.LAYER_KEYS and not k.startswith("_")}
        assert {k: small.config[k] for k in same} == same
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters()) / 5
    t5 = reduced.reduced_module("sd3", "text_encoder_3")
    assert t5.config.num_layers == reduced.REDUCED_LAYERS and t5.config.d_model == 4096
    clip = reduced.reduced_module("sd3", "text_encoder", transformers.CLIPTextModelWithProjection, reduced=False)
    assert isinstance(clip, transformers.CLIPTextModelWithProjection) and clip.config.num_hidden_layers == 12
    assert reduced.reduced_module("sd3", "vae") is not None


def test_setup_and_reduced_step_combine_into_one_labelled_row():
    import bench_memory_reduced as reduced

    setup = {"ready_gib": 14.0, "setup_peak_gib": 14.6, "precision": "bf16", "base_gib": 0.46}
    row = reduced.combine("sd3-full-lowest", 512, setup, {"step_gib": 0.5}, 0.46)
    assert row["peak_gib"] == 14.6 and row["train_peak_gib"] == 14.5 and row["method"] == "setup+reduced-step"
    assert reduced.combine("sd3-full-lowest", 512, setup, {"step_gib": 1.0}, 0.46)["peak_gib"] == 15.0
    row.update(budget_gib=16.0, ok=True)
    assert LINE.match(bench_memory.result_line(row)) and bench_memory.result_line(row).endswith(
        "method=setup+reduced-step weights=in-memory")
    assert "left_out" in row  # the row says what the reduced step cannot hold


def test_a_files_row_names_its_weights_and_its_phases():
    row = {**_row("sdxl-lora-low", 9.1, False), "weights": "files", "setup_peak_gib": 9.1, "setup_anon_peak_gib": 6.9,
           "caching_peak_gib": 8.2, "step_peak_gib": 5.4, "train_peak_gib": 8.2}
    assert bench_memory.result_line(row).endswith("method=full-step weights=files")
    table = bench_memory.markdown_rows({"rows": [row]})
    assert "| full-step, files | 512 | 9.10 (set-up 9.10 (anonymous 6.90), caching 8.20, steps 5.40) |" in table


def test_case_processes_pin_glibcs_mmap_threshold_unless_the_caller_set_one():
    """Left dynamic, glibc's threshold depends on what the process freed before (a file load raises it), and the
    step's freed activations stay in the RSS: the rows would measure the allocation history, not the run."""
    assert bench_memory.child_env({"PATH": "/bin"}) == {"PATH": "/bin", "MALLOC_MMAP_THRESHOLD_": "131072"}
    assert bench_memory.child_env({"MALLOC_MMAP_THRESHOLD_": "65536"})["MALLOC_MMAP_THRESHOLD_"] == "65536"
