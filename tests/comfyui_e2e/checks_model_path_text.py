"""Text-encoder training on the MODEL path (issue 18) on the real ComfyUI 0.8.0 server: SD1.5 through *Load
Checkpoint* with Network Options' ``train_text_encoder`` on (``text_encoder_lr`` set), so the CLIP's CLIP-L trains
beside the UNet through ComfyUI's own encode path. ComfyUI builds the full-size CLIP-L for the tiny checkpoint
(seconds per caption on a CPU), so the server run is short: 2 steps at batch 1, one LoRA.

1. checks_model_path's graph (Train fed by Load Checkpoint's MODEL / CLIP / VAE, then the checkpoint sweep): the
   losses are finite; the LoRA holds ComfyUI's kohya keys for the UNet (``lora_unet_…``) **and** for every CLIP-L
   layer's attention and MLP (``lora_te_text_model_encoder_layers_…``); the sweep loads it with the stock loader
   (model and clip strength) with no unloaded-key line in the server log, and renders it unlike the base model.
2. The user's CLIP (and MODEL) are unchanged after the run: a fixed render (Load Checkpoint → CLIPTextEncode →
   KSampler → VAE Decode) is pixel-identical before training and after, with the loader's cached objects (the very
   ones Train adapted) and the text encoded again (not from ComfyUI's cache). The same render through the stock
   *LoraLoader* at strength_model 0, strength_clip 1 differs: the trained CLIP keys load and change the
   conditioning, so a CLIP left adapted would show.
3. The loss trend and Cancel → resume with the CLIP training run in ComfyUI's process at a size CI can afford
   (``model_path_text_training.py``: ComfyUI's own SD1.5 MODEL and a 2-layer ``comfy.sd.CLIP``), and ComfyUI's model
   management unloading / partly unloading that CLIP mid-run with an upstream LoraLoader CLIP LoRA (its ``unload``
   part: same losses and LoRA as undisturbed, every key loads, the CLIP byte-identical after a run, Cancel, error).
The check's wall time is printed with each result. Only on ComfyUI 0.8.0.
"""
from __future__ import annotations

import time
from pathlib import Path

from checks_model_path import last_lora, model_path_prompt
from checks_model_path_families import train_and_sweep
from checks_sweep_memory import fetch_images, mean_difference
from comfy_python import run_script
from watch import run_watched

NEEDS = ("demo_data", "comfy_sd15")
HERE = Path(__file__).resolve().parent
STEPS, SAVE_EVERY, BATCH = 2, 2, 1  # one LoRA: each caption costs seconds through the full-size CLIP-L
LEARNING_RATE = 1e-2  # two steps must still move the render past checks_model_path's DIFFERENT_RENDER
RUN = "ci_model_path_te"
CLIP_LAYERS, CLIP_MODULES = 12, 6  # CLIP-L; q/k/v/out_proj + fc1/fc2 (target preset all_linear)
TEXT_ENCODER_LR = 1e-3
TIMEOUT = 1800.0
LABEL = "MODEL path text encoder (SD1.5)"


def text_encoder_prompt(ctx, run_name: str, resume: bool = False, sweep: bool = True) -> tuple[dict, dict]:
    """checks_model_path's graph with train_text_encoder on, text_encoder_lr set, STEPS steps at batch BATCH, a LoRA
    every SAVE_EVERY, and no text-embedding cache (a trained text encoder's outputs change every step)."""
    prompt, ids = model_path_prompt(ctx, run_name, resume=resume, sweep=sweep)
    prompt[ids["CrucibleNetworkOptions"]]["inputs"]["train_text_encoder"] = True
    prompt[ids["CrucibleOptimizerOptions"]]["inputs"].update(learning_rate=LEARNING_RATE,
                                                             text_encoder_lr=TEXT_ENCODER_LR)
    prompt[ids["CrucibleTrainingOptions"]]["inputs"]["cache_text_embeddings"] = False
    prompt[ids["CrucibleTrain"]]["inputs"].update(max_train_steps=STEPS, save_every_n_steps=SAVE_EVERY,
                                                     batch_size=BATCH)
    return prompt, ids


def render_prompt(ctx, lora: str | None = None) -> dict:
    """A fixed 64 px render through Load Checkpoint's MODEL / CLIP / VAE (node "1"); with ``lora`` (a name under
    models/loras) a second render through the stock LoraLoader at strength_model 0, strength_clip 1 (preview "17")."""
    def graph(clip, model, first: int) -> dict:
        ids = [str(first + i) for i in range(6)]
        return {
            ids[0]: {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle on a blue square", "clip": clip}},
            ids[1]: {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
            ids[2]: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            ids[3]: {"class_type": "KSampler", "inputs": {
                "model": model, "positive": [ids[0], 0], "negative": [ids[1], 0], "latent_image": [ids[2], 0],
                "seed": 3, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            ids[4]: {"class_type": "VAEDecode", "inputs": {"samples": [ids[3], 0], "vae": ["1", 2]}},
            ids[5]: {"class_type": "PreviewImage", "inputs": {"images": [ids[4], 0]}},
        }

    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ctx.variables["comfy_sd15"]}},
              **graph(["1", 1], ["1", 0], 2)}
    if lora:
        prompt["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                               "lora_name": lora, "strength_model": 0.0,
                                                               "strength_clip": 1.0}}
        prompt.update(graph(["10", 1], ["10", 0], 12))
    return prompt


def text_key_problems(path) -> list[str]:
    """The LoRA's CLIP-L keys: one kohya lora_te_ prefix per trained module (every layer's attention and MLP)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
    te = {k.split(".")[0] for k in keys if k.startswith("lora_te")}
    unet = {k.split(".")[0] for k in keys if k.startswith("lora_unet_")}
    problems = [] if unet else ["no lora_unet_ key"]
    if len(te) != CLIP_LAYERS * CLIP_MODULES or not all(p.startswith("lora_te_text_model_encoder_layers_") for p in te):
        problems.append(f"{len(te)} text-encoder prefixes (want {CLIP_LAYERS * CLIP_MODULES} lora_te_…): "
                        f"{sorted(te)[:4]}")
    return problems


async def render(ctx, lora: str | None = None):
    """(images of the render prompt, the node ids ComfyUI answered from its cache, the watched run)."""
    run = await run_watched(ctx.server, render_prompt(ctx, lora), TIMEOUT)
    cached = {str(n) for e, d in run.events if e == "execution_cached" for n in d.get("nodes", [])}
    images = fetch_images(ctx, run, "7") if run.succeeded else []
    if lora and run.succeeded:
        images += fetch_images(ctx, run, "17")
    return images, cached, run


def unchanged_problems(before, after, cached, run) -> list[str]:
    if not run.succeeded:
        return [run.describe()]
    problems = [] if "1" in cached else ["Load Checkpoint ran again: its cached (trained) objects were not used"]
    if "2" in cached:
        problems.append("the text was not encoded again (ComfyUI answered CLIPTextEncode from its cache)")
    if not (before and after) or before[0].shape != after[0].shape or mean_difference(before[0], after[0]) != 0.0:
        problems.append(f"the render changed: mean |Δ| {mean_difference(before[0], after[0]) if before and after else '?'}")
    return problems


async def run_checks(ctx) -> None:
    results = ctx.results
    if ctx.comfy_version != "0.8.0":
        results.skip(LABEL, f"runs on ComfyUI 0.8.0 only (this is {ctx.comfy_version})")
        return
    missing = [n for n in NEEDS if ctx.resources.get(n, {}).get("status") != "ok"]
    if missing:
        results.fail(LABEL, f"needs the stage resources {missing}")
        return
    started = time.perf_counter()
    await run_script(ctx, HERE / "model_path_text_training.py", timeout=1800)  # ~5 min under load 11; 900 s ran out
    results.ok(f"{LABEL}: in-process training script time", f"{time.perf_counter() - started:.0f}s")
    started = time.perf_counter()
    base, _, first = await render(ctx)
    if not results.check(f"{LABEL}: the base render succeeds", [] if base else [first.describe()]):
        return

    def prompt_of(run_name: str, resume: bool = False, sweep: bool = True):
        return text_encoder_prompt(ctx, run_name, resume=resume, sweep=sweep)

    losses = await train_and_sweep(ctx, LABEL, prompt_of, RUN, steps=STEPS, save_every=SAVE_EVERY,
                                   key_prefixes=("lora_unet_", "lora_te_"), loss_falls=False)
    if not losses:
        return
    lora = last_lora(ctx, RUN)
    results.check(f"{LABEL}: the LoRA holds ComfyUI's lora_te_ keys for every CLIP-L attention and MLP layer",
                  text_key_problems(lora), str(lora))
    after, cached, run = await render(ctx, f"{RUN}/{lora.name}")
    problems = unchanged_problems(base, after, cached, run)
    clip_only = mean_difference(after[0], after[1]) if len(after) == 2 else 0.0
    if clip_only <= 0.0:
        problems.append("the LoRA's CLIP keys alone (strength_model 0) did not change the render: this check "
                        "could not see a changed CLIP")
    results.check(f"{LABEL}: the user's CLIP and MODEL are unchanged after the run (render pixel-identical)", problems,
                  f"base vs after 0.0; with the LoRA's CLIP keys alone mean |Δ| {clip_only:.2f}")
    results.ok(f"{LABEL}: server check time", f"{time.perf_counter() - started:.0f}s")
