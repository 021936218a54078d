"""A full fine-tune's SD3 and Flux export is detected by ComfyUI's own Load Diffusion Model code.

The check itself is ``tests/comfyui_e2e/checks_detection.py``. CI runs it inside the ComfyUI 0.8.0 venv as part of
the real-ComfyUI stage (``.ci/comfyui_stage.sh``; there a missing SD3/Flux is a FAIL, not a skip). This test runs the
same script against any ComfyUI tree you point it at:
``CRUCIBLE_COMFYUI_ROOT=/path/to/ComfyUI CRUCIBLE_COMFYUI_PYTHON=/path/to/its/python pytest tests/test_comfy_detection.py``
(the stage's venv is ``~/.cache/crucible-comfyui/venv-0.8.0``, its tree ``~/.cache/crucible-comfyui/src-0.8.0/ComfyUI-0.8.0``).
Without ``CRUCIBLE_COMFYUI_ROOT`` it skips: the unit suite never needs a ComfyUI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "comfyui_e2e" / "checks_detection.py"
MARK = "@@crucible-check@@"
COMFY = os.environ.get("CRUCIBLE_COMFYUI_ROOT", "")
PYTHON = os.environ.get("CRUCIBLE_COMFYUI_PYTHON", sys.executable)


@pytest.mark.skipif(not (COMFY and (Path(COMFY) / "comfy" / "supported_models.py").is_file()),
                    reason="set CRUCIBLE_COMFYUI_ROOT to a ComfyUI tree with SD3/Flux support (CI runs this check "
                           "in its ComfyUI 0.8.0 stage)")
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_full_export_is_detected_by_comfyui_load_diffusion_model(family):
    out = subprocess.run([PYTHON, str(SCRIPT), "--comfy-root", COMFY, "--pack-dir", str(ROOT), "--comfy-version",
                          "0.8.0", "--only", family], capture_output=True, text=True, timeout=900)
    results = [json.loads(line[len(MARK):]) for line in out.stdout.splitlines() if line.startswith(MARK)]
    assert out.returncode == 0 and results, out.stdout[-2000:] + out.stderr[-3000:]
    assert [r["status"] for r in results] == ["pass"], results
