"""The MODEL path on the known families beyond SD1.5 (issue 18) on the real ComfyUI 0.8.0 server.

1. **Same weights, same numbers** (``model_path_equivalence.py``, run in the ComfyUI venv): for SD1.5, SDXL, SD3
   and Flux the denoiser prediction of the MODEL path (ComfyUI's own model objects behind ``ComfyModelFamily``)
   equals the diffusers path's on the same tiny weights; for SD1.5 also the encoded text and latents; the auto σ
   shift of Flux dev equals the diffusers path's at three resolutions. Then the same LoRA trained a few steps through
   both paths by the loop's own step (same data, noise, initial adapter, AdamW) gives the same losses and LoRA
   tensors (``model_path_trained_equivalence.py``; SD3/Flux on the modules unfused in both layouts), and a 1 %
   learning-rate change on one side is reported as a mismatch.
2. **SD3 trained the way users load it**: *Load Diffusion Model* (``UNETLoader``) + *Load CLIP* (type ``sd3``,
   CLIP-L alone) + *Load VAE* (``model_path_files.py`` writes the tiny files) → Crucible Train's comfy_model /
   comfy_clip / comfy_vae, 12 steps, a LoRA every 6: the loss falls, every key is one of ComfyUI's own
   (``lora_unet_…``) and the stock LoraLoader loads each (no unloaded-key line in the server log), the checkpoint
   sweep renders each LoRA unlike the base model, and Cancel → resume gives the uninterrupted run's LoRA and losses.

3. **SDXL and Flux trained in ComfyUI's process** (``model_path_training.py``): no stock loader gives the stage a
   tiny SDXL (ComfyUI's presets fix the released depths) or a Flux text encoder (T5-XXL), see
   ``model_path_files.py``; so ComfyUI's own SDXL / Flux model objects on tiny weights, ComfyUI's VAE and a text
   stand-in go through ComfyModelFamily and the library's loop: the loss falls, ComfyUI's loader patches every
   trained module with no unloaded key, the render changes, the MODEL is unchanged after the run; SDXL's
   Cancel → resume is exact. Flux trains since ``nodes/comfy_autograd.py`` (RoPE backward, out-of-place residual
   updates), at a lower learning rate than the tiny SDXL (its 3072 width diverges at 1e-2).
Each case prints its time.
Only on ComfyUI 0.8.0.
"""
from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path
from typing import Callable

from checks_cancel import lora_difference
from checks_model_path import (LOG_FORBIDS, DIFFERENT_RENDER, SAVE_EVERY, STEPS, TIMEOUT, key_problems, last_lora,
                               manifest, model_path_prompt, widget_defaults)
from comfy_python import run_script
from run_stage import forbidden_lines, log_since, log_size
from watch import run_watched

HERE = Path(__file__).resolve().parent
NEEDS = ("demo_data", "comfy_sd15")  # the CI graph model_path_prompt edits names the SD1.5 checkpoint
LOADER_IDS = ("101", "102", "103")  # MODEL, CLIP, VAE loader nodes replacing Load Checkpoint


def loaders_prompt(ctx, run_name: str, loaders: list[dict], resume: bool = False,
                   sweep: bool = True) -> tuple[dict, dict]:
    """checks_model_path's graph (Train fed by the graph's MODEL/CLIP/VAE, then the sweep) with *Load Checkpoint*
    replaced by three loader nodes (``loaders``: MODEL, CLIP, VAE; class_type + inputs); every link to the
    checkpoint loader's output k now comes from loader k."""
    prompt, ids = model_path_prompt(ctx, run_name, resume=resume, sweep=sweep)
    old = ids.pop("CheckpointLoaderSimple")
    del prompt[old]
    for node_id, loader in zip(LOADER_IDS, loaders):
        inputs = {**widget_defaults(ctx, loader["class_type"]), **loader["inputs"]}
        prompt[node_id] = {"class_type": loader["class_type"], "inputs": inputs}
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == old:
                node["inputs"][name] = [LOADER_IDS[value[1]], 0]
    return prompt, ids


async def write_files(ctx) -> tuple[dict[str, Path] | None, str]:
    """The tiny SD3 files in ComfyUI's model folders (a subprocess of the ComfyUI venv); (paths, its output)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, str(HERE / "model_path_files.py"),
                                                str(ctx.comfy_root / "models"), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, cwd=str(ctx.comfy_root))
    out, _ = await asyncio.wait_for(proc.communicate(), 900)
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        return None, text[-3000:]
    from model_path_files import SD3_FILES

    return {role: ctx.comfy_root / "models" / sub / name for role, (sub, name) in SD3_FILES.items()}, text


async def train_and_sweep(ctx, label: str, prompt_of: Callable[..., tuple[dict, dict]], run_name: str,
                          steps: int = STEPS, save_every: int = SAVE_EVERY,
                          key_prefixes: tuple[str, ...] = ("lora_unet_",), loss_falls: bool = True) -> list[float]:
    """Train (``steps``, a LoRA every ``save_every``) → sweep through the MODEL path; the checks of
    checks_model_path on this family (every key one of ``key_prefixes``; the loss falls, or with ``loss_falls``
    off, for a run too short to show a trend, every loss is finite). Returns the losses."""
    results = ctx.results
    started = time.perf_counter()
    offset = log_size(ctx.server_log)
    prompt, ids = prompt_of(run_name)
    run = await run_watched(ctx.server, prompt, TIMEOUT)
    record = manifest(ctx, run_name)
    losses = record.get("losses", [])
    took = time.perf_counter() - started
    if not results.check(f"{label}: loaders → Train ({steps} steps) → sweep succeeds",
                         [] if run.succeeded else [run.describe()], f"{len(losses)} steps, {took:.0f}s"):
        return []
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    falls = last < first if loss_falls else all(math.isfinite(x) for x in losses)
    results.check(f"{label}: the training loss {'falls' if loss_falls else 'is finite'}",
                  [] if len(losses) == steps and falls and record.get("family") == "comfy" else
                  [f"family {record.get('family')!r}, {len(losses)} losses: {[round(x, 4) for x in losses]}"],
                  f"mean of the first five steps {first:.4f} → the last five {last:.4f}" if loss_falls else
                  f"losses {[round(x, 4) for x in losses]}")
    lora = last_lora(ctx, run_name)
    results.check(f"{label}: exported keys come from ComfyUI's key map (kohya {'/'.join(key_prefixes)}*)",
                  key_problems(lora, key_prefixes) if lora else [f"no LoRA in models/loras/{run_name}"], str(lora))
    results.check(f"{label}: the stock loader loads every key (server log)",
                  forbidden_lines(log_since(ctx.server_log, offset), LOG_FORBIDS),
                  "no 'lora key not loaded' / unpatched-weight lines")
    from checks_sweep_memory import fetch_images, mean_difference

    images = fetch_images(ctx, run, ids["preview"])
    differs = [round(mean_difference(images[0], im), 2) for im in images[1:]] if images else []
    results.check(f"{label}: the sweep renders every checkpoint, each unlike the base model",
                  [] if len(images) == 1 + steps // save_every and all(d > DIFFERENT_RENDER for d in differs)
                  else [f"{len(images)} images, mean |Δ| to base {differs}"], f"mean |Δ| to base {differs}")
    return losses


async def cancel_and_resume(ctx, label: str, prompt_of: Callable[..., tuple[dict, dict]], reference: str,
                            losses: list[float], run_name: str, steps: int = STEPS) -> None:
    """Cancel once the first periodic LoRA is on disk, queue again with resume: the final LoRA and losses must equal
    the uninterrupted run ``reference``'s (``steps`` long)."""
    results = ctx.results
    started = time.perf_counter()
    prompt, ids = prompt_of(run_name, sweep=False)
    train_id, sent = ids["CrucibleTrain"], False

    def on_event(event: str, data: dict) -> None:
        nonlocal sent
        if not sent and event == "progress" and str(data.get("node")) == str(train_id) \
                and last_lora(ctx, run_name) is not None:
            sent = True
            ctx.server.request("/interrupt", {})

    cancelled = await run_watched(ctx.server, prompt, TIMEOUT, on_event=on_event)
    state = manifest(ctx, run_name)
    if not results.check(f"{label}: Cancel stops the run with its state saved",
                         [] if cancelled.interrupted and 0 < len(state.get("losses", [])) < steps else
                         [f"interrupted {cancelled.interrupted}, {len(state.get('losses', []))} steps; "
                          + cancelled.describe()]):
        return
    resumed = await run_watched(ctx.server, prompt_of(run_name, resume=True, sweep=False)[0], TIMEOUT)
    problems = [] if resumed.succeeded else [resumed.describe()]
    ours, theirs = last_lora(ctx, reference), last_lora(ctx, run_name)
    if not problems:
        problems = lora_difference(ours, theirs) if ours and theirs else ["a final LoRA is missing"]
        if manifest(ctx, run_name).get("losses") != losses:
            problems.append(f"losses differ: {manifest(ctx, run_name).get('losses')} vs {losses}")
    results.check(f"{label}: Cancel → resume equals the uninterrupted run (LoRA and losses)", problems,
                  f"cancelled after {len(state.get('losses', []))} steps; {time.perf_counter() - started:.0f}s")


async def run_checks(ctx) -> None:
    results = ctx.results
    if ctx.comfy_version != "0.8.0":
        results.skip("MODEL path families", f"runs on ComfyUI 0.8.0 only (this is {ctx.comfy_version})")
        return
    started = time.perf_counter()
    await run_script(ctx, HERE / "model_path_equivalence.py", timeout=1500)
    results.ok("MODEL path families: equivalence script time", f"{time.perf_counter() - started:.0f}s")

    started = time.perf_counter()
    families = "sdxl,flux"
    await run_script(ctx, HERE / "model_path_training.py", timeout=1500, extra=["--only", families])
    results.ok("MODEL path families: SDXL/Flux training script time", f"{time.perf_counter() - started:.0f}s")

    missing = [n for n in NEEDS if ctx.resources.get(n, {}).get("status") != "ok"]
    if missing:
        results.fail("MODEL path SD3", f"needs the stage resources {missing}")
        return
    files, output = await write_files(ctx)
    if not results.check("MODEL path SD3: tiny SD3 / CLIP-L / SD3 VAE files written", [] if files else [output]):
        return
    loaders = [{"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"].name, "weight_dtype": "default"}},
               {"class_type": "CLIPLoader", "inputs": {"clip_name": files["clip"].name, "type": "sd3"}},
               {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"].name}}]

    def sd3_prompt(run_name: str, resume: bool = False, sweep: bool = True):
        return loaders_prompt(ctx, run_name, loaders, resume=resume, sweep=sweep)

    losses = await train_and_sweep(ctx, "MODEL path SD3", sd3_prompt, "ci_model_path_sd3")
    if losses:
        await cancel_and_resume(ctx, "MODEL path SD3", sd3_prompt, "ci_model_path_sd3", losses,
                                "ci_model_path_sd3_cancel")
