"""Stage check (ComfyUI 0.8.0 only): the Step Plan's memory estimate for a run through the graph's MODEL
(``nodes/comfy_memory.py``) against the Crucible Model path's estimate for a full-size SDXL that ComfyUI builds, and
against measurements of a tiny SDXL trained in ComfyUI's process: ``model_path_memory.py`` says what and with which
tolerances. Reports its own time."""
from __future__ import annotations

import time
from pathlib import Path

from comfy_python import run_script

HERE = Path(__file__).resolve().parent


async def run_checks(ctx) -> None:
    if ctx.comfy_version != "0.8.0":
        ctx.results.skip("MODEL-path memory estimate", f"runs on ComfyUI 0.8.0 only (this is {ctx.comfy_version})")
        return
    started = time.perf_counter()
    await run_script(ctx, HERE / "model_path_memory.py", timeout=900)
    ctx.results.ok("MODEL-path memory estimate: script time", f"{time.perf_counter() - started:.0f}s")
