"""The MODEL path on fp8 weights (issue 18: "also when its weights are fp8") on the real ComfyUI 0.8.0 server.

The SD3 check of ``checks_model_path_families.py`` with *Load Diffusion Model*'s ``weight_dtype`` set to
``fp8_e4m3fn``: ComfyUI stores the tiny SD3's Linear weights in float8 and its cast ops turn them into the compute
dtype in each forward; the pack's peft LoRA sits on those cast-op Linear layers. 8 steps, one LoRA at the end: the prompt
succeeds, the loss falls, every exported key is ComfyUI's own (``lora_unet_…``), the stock LoraLoader loads each
one (no unloaded-key line in the server log), and the sweep renders each LoRA unlike the base model.
Then ``model_path_fp8.py`` (ComfyUI's process) loads the same file in fp8 the way UNETLoader does and trains it
through ComfyModelFamily (4 steps: finite losses, every lora_up moved, the user's MODEL still fp8 and
byte-identical after the run), and does the same on ComfyUI's *scaled fp8* format (the file written as ComfyUI's
released scaled files are: its forward near the fp32 file's in each layout, gradients through ComfyUI's dequantize,
the stock loader patches every trained module of the scaled MODEL). Only on ComfyUI 0.8.0.
"""
from __future__ import annotations

import time
from pathlib import Path

from checks_model_path import model_path_ready
from checks_model_path_families import NEEDS, loaders_prompt, train_and_sweep, write_files
from comfy_python import run_script

HERE = Path(__file__).resolve().parent
STEPS, SAVE_EVERY = 8, 8
WEIGHT_DTYPE = "fp8_e4m3fn"


async def run_checks(ctx) -> None:
    results = ctx.results
    if not model_path_ready(ctx, "MODEL path fp8", NEEDS):
        return
    started = time.perf_counter()
    files, output = await write_files(ctx)
    if not results.check("MODEL path fp8: tiny SD3 / CLIP-L / SD3 VAE files written", [] if files else [output]):
        return
    loaders = [{"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"].name, "weight_dtype": WEIGHT_DTYPE}},
               {"class_type": "CLIPLoader", "inputs": {"clip_name": files["clip"].name, "type": "sd3"}},
               {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"].name}}]

    def fp8_prompt(run_name: str, resume: bool = False, sweep: bool = True):
        prompt, ids = loaders_prompt(ctx, run_name, loaders, resume=resume, sweep=sweep)
        prompt[ids["CrucibleTrain"]]["inputs"].update(max_train_steps=STEPS, save_every_n_steps=SAVE_EVERY)
        return prompt, ids

    await train_and_sweep(ctx, f"MODEL path SD3 {WEIGHT_DTYPE}", fp8_prompt, "ci_model_path_sd3_fp8",
                          steps=STEPS, save_every=SAVE_EVERY)
    results.ok("MODEL path fp8: server check time", f"{time.perf_counter() - started:.0f}s")
    started = time.perf_counter()
    await run_script(ctx, HERE / "model_path_fp8.py", timeout=1800)  # cases fp8 and scaled (322 s under load 8-14)
    results.ok("MODEL path fp8: in-process check time (fp8 + scaled fp8)", f"{time.perf_counter() - started:.0f}s")
