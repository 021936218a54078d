"""A full fine-tune sweep holds one checkpoint at a time, not all of them (issue 12 §4), on the real server.

1. Crucible Train full-fine-tunes the ComfyUI-loadable SD1.5 (``comfy_sd15``) for 6 steps, saving after each:
   6 full checkpoints. The same prompt sweeps 2 of them (a warm-up: the base checkpoint and the training are paid).
2. Sweep 2 checkpoints, then all 6 (base + each through the stock CLIPTextEncode → KSampler → VAEDecode), sampling
   the server's RSS (``/proc/<pid>/status`` VmRSS, every 20 ms) while each prompt runs. The growth of the 6-sweep
   over its start may exceed the 2-sweep's by less than one checkpoint's size in memory: memory does not grow with
   the number of checkpoints (loading each whole would add 4 checkpoints).
3. Every column renders its own weights: all 7 renders differ from each other, and ComfyUI logged no weight it could
   not patch (and the pack none it had to load whole). ComfyUI's Load Diffusion Model cannot detect this cut-down
   UNet from its diffusers file (in 2024 and in 0.8.0), so the renders are not compared with it.
"""
from __future__ import annotations

import copy
import io
import json
import urllib.parse
from pathlib import Path

from run_stage import load_api_workflow, log_since, log_size
from watch import RssSampler, run_watched, server_pid

WORKFLOW = "workflows/api/crucible_ci_lora_sweep.json"  # training + sweep + stock sampler on comfy_sd15
NEEDS = ("demo_data", "comfy_sd15")
RUN_NAME = "ci_full_sweep"
CHECKPOINTS = 6
TIMEOUT = 900.0
DIFFERENT_RENDER = 0.5  # mean |Δ| (0..255) above which two renders differ
# ComfyUI's words for a weight it did not patch, and the pack's for a checkpoint it had to load whole
LOG_FORBIDS = ("could not patch", "shape mismatch", "not merged", "is loaded whole", "lora key not loaded")


def sweep_prompt(ctx, seed: int, every_nth: int) -> tuple[dict, dict]:
    """The CI LoRA-sweep graph turned into a full fine-tune (6 checkpoints) whose sweep renders into a PreviewImage;
    returns (prompt, node ids by role)."""
    prompt = copy.deepcopy(load_api_workflow(ctx.pack_dir / WORKFLOW))
    ids = {n["class_type"]: i for i, n in prompt.items()}
    for drop in [i for i, n in prompt.items() if n["class_type"] == "CrucibleImageGrid"]:
        del prompt[drop]
    prompt[ids["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = ctx.variables["comfy_sd15"]
    prompt[ids["CrucibleModel"]]["inputs"].update(ckpt_name=ctx.variables["comfy_sd15"], path="")
    prompt[ids["CrucibleDataset"]]["inputs"].update(path=ctx.variables["demo_data"], resolution=64, repeats=1)
    prompt[ids["CrucibleNetworkOptions"]]["inputs"].update(network_type="full", train_text_encoder=False)
    prompt[ids["CrucibleOptimizerOptions"]]["inputs"].update(learning_rate=2e-3, lr_scheduler="constant")
    prompt[ids["CrucibleTrain"]]["inputs"].update(run_name=RUN_NAME, epochs=2, max_train_steps=CHECKPOINTS,
                                                  batch_size=4, save_every_n_epochs=0, save_every_n_steps=1,
                                                  checkpoint_limit=0, save_precision="fp16", resume=False)
    prompt[ids["CrucibleCheckpointSweep"]]["inputs"].update(seeds=str(seed), strengths="1.0", include_base=True,
                                                           every_nth=every_nth, name_filter="")
    prompt["90"] = {"class_type": "PreviewImage", "inputs": {"images": [ids["VAEDecode"], 0]}}
    ids["preview"] = "90"
    return prompt, ids


def fetch_images(ctx, watched, node: str) -> list:
    """The node's preview images from /history, as float arrays."""
    import numpy as np
    from PIL import Image

    out = []
    for item in (watched.history or {}).get("outputs", {}).get(node, {}).get("images", []):
        query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
        status, data = ctx.server.raw(f"/view?{query}")
        if status != 200:
            raise RuntimeError(f"/view?{query} -> HTTP {status}")
        out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32))
    return out


def mean_difference(a, b) -> float:
    import numpy as np

    return float(np.abs(a - b).mean()) if a.shape == b.shape else float("inf")


async def measured(ctx, prompt: dict, pid: int):
    sampler = RssSampler(pid).start()
    try:
        watched = await run_watched(ctx.server, prompt, TIMEOUT)
    finally:
        start, peak = sampler.stop()
    return watched, (peak - start) / 1024.0  # MiB


async def run_checks(ctx) -> None:
    results = ctx.results
    name = "full-checkpoint sweep memory"
    missing = [n for n in NEEDS if ctx.resources.get(n, {}).get("status") != "ok"]
    if missing:
        results.skip(name, f"needs the stage resources {missing}")
        return
    port = urllib.parse.urlparse(ctx.server.url).port
    pid = server_pid(port)
    if pid is None:
        results.fail(name, f"cannot find the server process (set CRUCIBLE_COMFY_PID, or let this user read /proc "
                           f"for port {port})")
        return

    # 1. train 6 full checkpoints (+ a warm-up sweep of 2)
    warm, ids = sweep_prompt(ctx, seed=1, every_nth=CHECKPOINTS - 1)
    first = await run_watched(ctx.server, warm, TIMEOUT)
    run_json = ctx.comfy_root / "output" / "crucible" / RUN_NAME / "run.json"
    saved = json.loads(run_json.read_text()).get("checkpoints", []) if run_json.is_file() else []
    if not results.check(f"{name}: {CHECKPOINTS} full checkpoints trained and swept once",
                         [] if first.succeeded and len(saved) == CHECKPOINTS and all(c["kind"] == "full" for c in saved)
                         else [f"{len(saved)} checkpoints; {first.describe()}"], f"{CHECKPOINTS} checkpoints"):
        return
    one_checkpoint = 2 * Path(saved[-1]["path"]).stat().st_size / 2**20  # fp16 file -> fp32 weights, MiB

    # 2. sweep 2, then 6, measuring the server's RSS
    two, _ = sweep_prompt(ctx, seed=2, every_nth=CHECKPOINTS - 1)
    run2, grow2 = await measured(ctx, two, pid)
    six, _ = sweep_prompt(ctx, seed=3, every_nth=1)
    log_start = log_size(ctx.server_log)
    run6, grow6 = await measured(ctx, six, pid)
    problems = [f"the {n}-checkpoint sweep failed: {r.describe()}" for n, r in ((2, run2), (6, run6)) if not r.succeeded]
    images = fetch_images(ctx, run6, ids["preview"]) if not problems else []
    # every_nth keeps 2 of the 6, and the sweep also keeps the checkpoint with the lowest validation loss when it is
    # another one: 3 or 4 renders with the base column.
    few = len(fetch_images(ctx, run2, ids["preview"])) if not problems else 0
    if not problems and (few not in (3, 4) or len(images) != CHECKPOINTS + 1):
        problems.append(f"expected 3-4 and {CHECKPOINTS + 1} renders (base + checkpoints), got {few} and {len(images)}")
    if not problems and grow6 - grow2 >= one_checkpoint:
        problems.append(f"RSS grew by {grow6:.0f} MiB sweeping {CHECKPOINTS} checkpoints vs {grow2:.0f} MiB for 2: "
                        f"{grow6 - grow2:.0f} MiB more, one checkpoint is {one_checkpoint:.0f} MiB in memory")
    if not results.check(f"{name}: peak RSS does not grow with the number of checkpoints", problems,
                         f"growth {grow2:.0f} MiB (2 checkpoints) vs {grow6:.0f} MiB ({CHECKPOINTS}); "
                         f"one checkpoint = {one_checkpoint:.0f} MiB"):
        return

    # 3. each column its own weights (ComfyUI's Load Diffusion Model cannot detect this cut-down UNet's diffusers
    # file, so the renders are compared with each other, and the log must show every weight patched)
    problems = []
    same = [(i, j, d) for i in range(len(images)) for j in range(i) if (d := mean_difference(images[i], images[j]))
            <= DIFFERENT_RENDER]
    problems += [f"render {i} equals render {j} (mean |Δ| {d:.2f}): a column did not get its own weights"
                 for i, j, d in same]
    logged = [line for line in log_since(ctx.server_log, log_start).splitlines()
              if any(n in line.lower() for n in LOG_FORBIDS)]
    if logged:
        problems.append("the server log while sweeping:\n" + "\n".join(logged[:10]))
    results.check(f"{name}: every column renders its own checkpoint", problems,
                  f"{len(images)} renders pairwise different (mean |Δ| >= "
                  f"{min(mean_difference(a, b) for i, a in enumerate(images) for b in images[:i]):.1f}); "
                  "every weight patched from its file")
