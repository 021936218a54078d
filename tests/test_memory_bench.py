"""benchmarks/bench_memory.py without the full-size runs: its output line, its skips, its record file."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_memory  # noqa: E402

LINE = re.compile(r"^case=(sd15|sdxl|sd3|flux)-(lora|full)-(default|low|lowest) res=\d+ peak_gib=\d+\.\d\d "
                  r"budget_gib=\d+(\.\d+)? device=(cpu|cuda) ok=(true|false) method=(full-step|setup\+reduced-step)$")


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
    assert "| sdxl-lora-low (cache_latents True) | full-step | 512 | 8.10 | 0.46 | 8 (over) | 7.76 |" in table


def test_cases_needing_a_missing_option_are_skipped_and_named():
    from trainer.memory_presets import option_path

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--cases", "sd3-full-lowest",
                           "flux-lora-lowest"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("case=")]
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert " skipped: " in line and "estimate" in line
    if option_path("full_bf16") is None:
        assert "needs full_bf16, fused_backward_pass" in lines[1] or "needs full_bf16" in proc.stdout
    if option_path("fp8_base") is None:
        assert "needs fp8_base, blocks_to_swap" in proc.stdout
    elif option_path("blocks_to_swap") is not None:  # after the merge: block swap is CUDA only
        assert "flux-lora-lowest res=512 skipped: CUDA only: blocks_to_swap" in proc.stdout
