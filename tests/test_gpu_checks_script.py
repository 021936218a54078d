"""benchmarks/gpu_checks.sh, the one command a session lent a GPU runs: it parses, its dry run names every command it
would run (the CUDA tests, each benchmark case at 1024 px recorded to $OUT) and writes its summary, and its exit
status follows the tests and the bench (a stand-in python); and on CUDA the bench runs SD3 and Flux as full steps.
All on the CPU."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def _dry_run(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OUT": str(tmp_path / "out"), "CRUCIBLE_GPU_CHECKS_DRY_RUN": "1", **env}
    return subprocess.run([BASH, str(SCRIPT)], capture_output=True, text=True, timeout=60, env=environ, cwd=tmp_path)


def test_the_script_is_executable_and_bash_parses_it():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True, timeout=30)
    text = SCRIPT.read_text(encoding="utf-8")
    assert "set -uo pipefail" in text and "carry" in text and "--prepare" in text


def test_the_dry_run_names_the_cuda_tests_and_every_bench_case_in_order(tmp_path):
    from trainer.memory_presets import CASES_BY_NAME

    done = _dry_run(tmp_path)
    assert done.returncode == 0, done.stderr
    commands = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert "nvidia-smi" in commands
    tests = [c for c in commands if " -m pytest " in c]
    assert len(tests) == 1 and re.search(r"^timeout -k \d+ (\d+) .* -m pytest .*-m cuda tests/test_cuda\.py", tests[0])
    assert int(re.search(r"^timeout -k \d+ (\d+)", tests[0]).group(1)) <= 150
    assert f"--junitxml {tmp_path / 'out' / 'pytest-junit.xml'}" in tests[0]
    benches = [c for c in commands if "bench_memory.py" in c]
    assert [re.search(r"bench_memory\.py (.*?) --cuda-res", c).group(1) for c in benches] == [
        "--quick", "--cases sd3-full-lowest sd3-full-low",
        "--cases flux-lora-low flux-lora-lowest flux-lora-default"]
    named = {name for c in benches for name in re.findall(r"\b[a-z0-9]+-(?:lora|full)-[a-z]+\b", c)}
    assert named <= set(CASES_BY_NAME) and len(named) == 5  # every name a real case (a typo would skip it)
    for command in benches:
        assert f"--record {tmp_path / 'out' / 'memory-cuda.json'}" in command and "--cuda-res 1024" in command
        assert f"--files-dir {ROOT / '.gpu-bench-files'} " in command  # on the disk, not a RAM-backed /tmp
        assert int(re.search(r"^timeout -k \d+ (\d+)", command).group(1)) <= 540
    assert commands.index(tests[0]) < commands.index(benches[0])  # the tests first: they matter most
    summary = (tmp_path / "out" / "summary.txt").read_text(encoding="utf-8")
    assert "DRY RUN" in summary and "RESULT: dry run" in summary and "bench flux" in summary


def test_stages_that_do_not_fit_the_budget_are_skipped_and_said(tmp_path):
    done = _dry_run(tmp_path, CRUCIBLE_GPU_BUDGET_S="200")
    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert any("-m cuda tests/test_cuda.py" in c for c in commands)
    assert not any("bench_memory.py" in c and "flux-lora" in c for c in commands)
    summary = (tmp_path / "out" / "summary.txt").read_text(encoding="utf-8")
    assert re.search(r"bench flux: SKIPPED: \d+ s left of the budget", summary)


def test_stages_can_be_chosen_and_ordered(tmp_path):
    done = _dry_run(tmp_path, CRUCIBLE_GPU_STAGES="flux")
    commands = [line for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert done.returncode == 0 and not any(" -m pytest " in c for c in commands)
    assert [c for c in commands if "bench_memory.py" in c and "flux-lora-low flux-lora-lowest" in c]
    assert not any("--quick" in c or "sd3-full" in c for c in commands)
    done = _dry_run(tmp_path, CRUCIBLE_GPU_STAGES="flux tests quick")
    benches = [line for line in done.stdout.splitlines() if "bench_memory.py" in line or " -m pytest " in line]
    assert ["-m pytest" in benches[0], "flux-lora" in benches[1], "--quick" in benches[2]] == [True] * 3
    assert len(benches) == 3


FAKE_PYTHON = """#!/usr/bin/env bash
# stands for a python whose torch sees CUDA: pytest and the bench print what they would, with the exit status asked
case "$*" in
  *"-m pytest"*) echo "${FAKE_PYTEST_LINE}"; exit "${FAKE_PYTEST_RC}" ;;
  *bench_memory.py*) echo "case=sd15-lora-default res=1024 peak_gib=4.50 budget_gib=4 device=cuda ok=false"
                     exit "${FAKE_BENCH_RC}" ;;
  *) cat >/dev/null; echo "torch 9.9 cuda 99.9 available True" ;;
esac
"""


@pytest.mark.parametrize("pytest_rc, line, bench_rc, status", [
    (0, "11 passed, 1 xfailed in 40.00s", 0, 0),
    (0, "11 passed, 1 xfailed in 40.00s", 1, 2),  # a case over its budget: the tests still passed
    (1, "1 failed, 10 passed in 40.00s", 0, 1),
    (0, "10 passed, 2 skipped in 4.00s", 0, 1),  # a CUDA test skipped on a GPU machine is not a pass
], ids=["pass", "over-budget", "test-failed", "skipped"])
def test_the_exit_status_and_summary_follow_the_tests_and_the_bench(tmp_path, pytest_rc, line, bench_rc, status):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON, encoding="utf-8")
    fake.chmod(0o755)
    environ = {**os.environ, "OUT": str(tmp_path / "out"), "CRUCIBLE_GPU_PYTHON": str(fake),
               "CRUCIBLE_GPU_FILES_DIR": str(tmp_path / "files"), "CRUCIBLE_GPU_WHEELS": str(tmp_path / "no-wheels"),
               "FAKE_PYTEST_RC": str(pytest_rc),
               "FAKE_PYTEST_LINE": line, "FAKE_BENCH_RC": str(bench_rc)}
    environ.pop("CRUCIBLE_GPU_CHECKS_DRY_RUN", None)
    done = subprocess.run([BASH, str(SCRIPT)], capture_output=True, text=True, timeout=60, env=environ, cwd=tmp_path)
    assert done.returncode == status, done.stdout + done.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text(encoding="utf-8")
    assert f"tests: rc {status if status == 1 else 0} " in summary and line in summary
    assert summary.count("  case=sd15-lora-default res=1024 peak_gib=4.50") == 3  # one per bench stage
    assert f"bench flux: rc {bench_rc} " in summary and f"(exit {status})" in summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.log", "env.txt", "pytest.txt",
                                                                  "summary.txt"]


def test_on_cuda_the_bench_runs_sd3_and_flux_as_full_steps_from_their_files(monkeypatch, capsys):
    """On a GPU every family takes real steps from its model files: SD3 and Flux were skipped there before (the
    CPU's setup+reduced-step stays the CPU's). The case processes are stubbed; what is checked is which kind runs."""
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a stand-in GPU")
    monkeypatch.setattr(bench_memory.ModelFiles, "of", lambda self, family, remaining: {"path": f"{family}.st"})
    monkeypatch.setattr(bench_memory.ModelFiles, "done", lambda self, family, remaining: None)
    monkeypatch.setattr(bench_memory, "run_child", lambda name, res, steps, timeout, files=None: calls.append(
        ("full-step", name, res, files["path"])) or "(stub)")
    monkeypatch.setattr(bench_memory, "measure_reduced", lambda name, *a, **k: calls.append(("reduced", name)) or "")
    import types

    import trainer.memory

    monkeypatch.setattr(trainer.memory, "estimate_case", lambda *a, **k: types.SimpleNamespace(total_gib=1.0))
    bench_memory.main(["--cases", "sd3-full-low", "flux-lora-lowest", "sdxl-lora-low"])
    assert calls == [("full-step", "sdxl-lora-low", 1024, "sdxl.st"), ("full-step", "flux-lora-lowest", 1024, "flux.st"),
                     ("full-step", "sd3-full-low", 1024, "sd3.st")]
    assert "skipped" not in capsys.readouterr().out
