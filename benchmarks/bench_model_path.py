"""Benchmark: Crucible's MODEL path against ComfyUI's native ``TrainLoraNode`` on the same model and data, in one run.

Run it with the Python of a ComfyUI venv (0.8.0), pointing at a ComfyUI tree; no server is started::

    ~/.cache/crucible-comfyui/venv-0.8.0/bin/python benchmarks/bench_model_path.py --comfy-root PATH/TO/ComfyUI

Both trainers get the tiny SD1.5 that ComfyUI detects (``tests/comfy_sd15.py``, loaded by ComfyUI's own
``load_state_dict_guess_config`` with its CLIP and VAE, the same seed, so the same weights) and the demo images
(12, written at ``--resolution`` once, so neither side resizes) with their captions:

* **crucible**: ``trainer.train`` through ``nodes/comfy_family.ComfyModelFamily`` (what the Train node runs with
  comfy_model / comfy_clip / comfy_vae), latents and text embeddings cached.
* **comfyui**: ``comfy_extras.nodes_train.TrainLoraNode.execute`` called as a function, fed the latents ComfyUI's VAE
  encodes and the conditioning its CLIP encodes from the same captions.

Matched: rank, scale (alpha 1 and the same rank: ComfyUI's trainer fixes alpha = 1), learning rate (constant),
steps, batch size, AdamW (weight decay 0.01 on both), no gradient clipping, fp32 compute and adapter weights,
gradient checkpointing (``--checkpointing``, off by default), the seed value, uniform timesteps. Not matchable (the
report repeats this): ComfyUI's trainer adapts *every* weighted module (LoRA on every Linear/Conv, and full
differences of every norm weight and every bias), Crucible the ``all_linear_conv`` preset; its loss is the MSE of the
predicted x0, Crucible's of ε; the two draw noise and timesteps from different random streams and initialise the
LoRA factors the other way round. So each trainer's own loss is printed, and both trained models are also scored the
same way: ε-MSE and x0-MSE over every training latent at four fixed σ with fixed noise (and the base model's).

Each trainer runs in its own child process (``--only``), so the peak memory is its own: the resident set's high-water
mark on the CPU (``VmHWM``, minus the RSS once the model is loaded: ``train peak``), ``torch.cuda.max_memory_allocated``
on CUDA. Steps/s counts the steps after ``--warmup``. Not a test (``make test`` never runs it); ``--quick`` is a short
run. ``tests/test_bench_model_path.py`` checks the argument parsing and the report without ComfyUI.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
DEMO = ROOT / "trainer" / "demo_data"
MARK = "@@bench-model-path@@"
CACHE = Path(os.environ.get("CRUCIBLE_COMFY_CACHE", Path.home() / ".cache" / "crucible-comfyui"))  # the stage's
COMFY_REQUIREMENTS = ("torchsde", "einops")  # ComfyUI needs them; Crucible's own venv has neither
TRAINERS = ("crucible", "comfyui")
EVAL_TIMESTEPS = (100, 300, 600, 900)
UNMATCHED = (
    "targets: ComfyUI trains every weighted module (LoRA on each Linear/Conv + full diffs of every norm weight and "
    "bias); Crucible LoRA on all_linear_conv",
    "training loss: ComfyUI reports the MSE of the predicted x0, Crucible the MSE of ε (compare the common scores)",
    "random streams: noise, timesteps and batch order are drawn differently from the same seed value",
    "LoRA init: ComfyUI zeroes the down factor, peft the up factor",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy-root", default=os.environ.get("CRUCIBLE_COMFY_ROOT", str(CACHE / "src-0.8.0" / "ComfyUI-0.8.0")),
                    help="a ComfyUI tree (0.8.0; default $CRUCIBLE_COMFY_ROOT or the stage's cached one); not written")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of steps/s")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="8 steps, 2 warm-up")
    ap.add_argument("--parallel", action="store_true",
                    help="run the two trainers at the same time (quicker; their steps/s then share the CPU)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--only", choices=TRAINERS, help=argparse.SUPPRESS)  # a child process: one trainer
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 8, 2
    if args.steps <= args.warmup + 1:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) + 1 to time any step")
    if min(args.batch_size, args.rank, args.resolution) < 1 or args.resolution % 8:
        ap.error("--batch-size and --rank must be ≥ 1 and --resolution a multiple of 8")
    return args


# --- the report (no ComfyUI needed) -------------------------------------------------------------------------------
def ratios(crucible: dict, comfyui: dict) -> dict[str, float | None]:
    """crucible ÷ comfyui of each shared number (speed > 1: Crucible faster; memory, loss < 1: Crucible lower)."""
    out = {}
    for key in ("steps_per_s", "train_peak_mb", "peak_mb", "eval_eps_mse", "eval_x0_mse"):
        a, b = crucible.get(key), comfyui.get(key)
        out[key] = (a / b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
    return out


def format_report(results: dict[str, dict], settings: dict) -> str:
    def num(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    lines = [f"MODEL path vs ComfyUI TrainLoraNode — {settings.get('device', 'cpu')}, {settings.get('steps')} steps, "
             f"batch {settings.get('batch_size')}, rank {settings.get('rank')}, lr {settings.get('lr')}, "
             f"{settings.get('resolution')} px, seed {settings.get('seed')}"]
    header = f"{'trainer':10} {'own loss (first→last 5)':>26} {'eval ε-MSE':>11} {'eval x0-MSE':>12} " \
             f"{'steps/s':>8} {'peak MB':>9} {'train peak MB':>14} {'trained params':>15}"
    lines += [header, "-" * len(header)]
    base = next((r.get("base_eps_mse") for r in results.values() if r.get("base_eps_mse") is not None), None)
    for name in TRAINERS:
        r = results.get(name, {})
        if "error" in r:
            lines.append(f"{name:10} failed: {r['error']}")
            continue
        own = f"{num(r.get('loss_first'), '.4f')} → {num(r.get('loss_last'), '.4f')} ({r.get('loss_kind', '?')})"
        lines.append(f"{name:10} {own:>26} {num(r.get('eval_eps_mse'), '.5f'):>11} {num(r.get('eval_x0_mse'), '.5f'):>12} "
                     f"{num(r.get('steps_per_s'), '.3f'):>8} {num(r.get('peak_mb'), '.0f'):>9} "
                     f"{num(r.get('train_peak_mb'), '.0f'):>14} {num(r.get('trained_params'), ',d'):>15}")
    lines.append(f"{'base':10} {'':>26} {num(base, '.5f'):>11}")
    if all(n in results and "error" not in results[n] for n in TRAINERS):
        r = ratios(results["crucible"], results["comfyui"])
        lines.append("crucible / comfyui: " + ", ".join(f"{k} {num(v, '.2f')}" for k, v in r.items()))
    lines.append("not matched: " + "; ".join(UNMATCHED))
    return "\n".join(lines)


# --- measuring ------------------------------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class StepClock:
    """Times per step (``tick`` once a step); steps/s over the steps after ``warmup``."""

    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def tick(self) -> None:
        self.times.append(time.perf_counter())

    def rate(self) -> float | None:
        timed = self.times[self.warmup:]
        return (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 and timed[-1] > timed[0] else None


def write_data(folder: Path, resolution: int) -> list[tuple[Path, str]]:
    """The demo images at ``resolution`` (so neither trainer resizes) with their captions; [(image, caption)]."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for png in sorted(DEMO.glob("*/*.png")):
        caption = png.with_suffix(".txt").read_text(encoding="utf-8").strip()
        target = folder / png.name
        Image.open(png).convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS).save(target)
        target.with_suffix(".txt").write_text(caption, encoding="utf-8")
        items.append((target, caption))
    return items


# --- one trainer in this process ------------------------------------------------------------------------------------
def _setup_comfy(args) -> None:
    os.chdir(args.comfy_root)
    sys.argv = [os.path.join(args.comfy_root, "main.py"), *(["--cpu"] if args.device == "cpu" else [])]
    sys.path[:0] = [args.comfy_root, str(ROOT), str(TESTS), str(TESTS / "comfyui_e2e")]
    import comfy.options

    comfy.options.enable_args_parsing()


def _encoded(model, clip, vae, items):
    """(raw VAE latents [N,C,h,w], ComfyUI conditioning per image) of the data, as ComfyUI's nodes make them."""
    import numpy as np
    import torch
    from PIL import Image

    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255.0) for p, _ in items])
        latents = vae.encode(pixels)
        conds = []
        for _, caption in items:
            out = clip.encode_from_tokens(clip.tokenize(caption), return_dict=True)
            conds.append([out.pop("cond"), out])
    return latents, conds


def score(model, latents, conds, seed: int) -> tuple[float, float]:
    """(ε-MSE, x0-MSE) of ``model`` over every latent at the fixed σ of EVAL_TIMESTEPS with fixed noise."""
    import torch

    base = model.model
    ms = base.model_sampling
    device = next(base.diffusion_model.parameters()).device
    x0 = base.process_latent_in(latents).to(device)
    generator = torch.Generator().manual_seed(seed + 1000)
    eps_sum = x0_sum = 0.0
    with torch.no_grad():
        for t in EVAL_TIMESTEPS:
            noise = torch.randn(x0.shape, generator=generator).to(device)
            sigma = ms.sigma(torch.tensor([float(t)])).to(device)
            for i in range(x0.shape[0]):
                x = x0[i:i + 1] + sigma.view(1, 1, 1, 1) * noise[i:i + 1]
                denoised = base.apply_model(x, sigma, c_crossattn=conds[i][0].to(device), transformer_options={}).float()
                eps_sum += float(((x - denoised) / sigma - noise[i:i + 1]).square().mean())
                x0_sum += float((denoised - x0[i:i + 1]).square().mean())
    count = len(EVAL_TIMESTEPS) * x0.shape[0]
    return eps_sum / count, x0_sum / count


def _memory(args, loaded_rss: float) -> dict:
    import torch

    if args.device == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "train_peak_mb": None}
    peak = _status_mb("VmHWM")
    return {"peak_mb": peak, "train_peak_mb": peak - loaded_rss}


def run_one(args) -> dict:
    """Train with ``args.only`` in this process; its numbers."""
    import torch

    _setup_comfy(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from model_path_run import comfy_sd15

    items = [(p, p.with_suffix(".txt").read_text(encoding="utf-8")) for p in sorted(Path(args.data).glob("*.png"))]
    with torch.inference_mode():  # as ComfyUI's loaders run
        model, clip, vae = comfy_sd15(seed=0)
        latents, conds = _encoded(model, clip, vae, items)
    base_eps, _ = score(model, latents, conds, args.seed)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded_rss = _status_mb("VmRSS")
    clock = StepClock(args.warmup)
    out = _train_crucible(args, model, clip, vae, clock, latents, conds) if args.only == "crucible" else \
        _train_comfyui(args, model, latents, conds, clock)
    out.update(_memory(args, loaded_rss), steps_per_s=clock.rate(), base_eps_mse=base_eps, steps=len(clock.times))
    return out


def _train_crucible(args, model, clip, vae, clock: StepClock, latents, conds) -> dict:
    import torch

    from model_path_run import load_comfy_family, train_model_path
    from trainer.callbacks import Callbacks

    class Clock(Callbacks):
        def on_step(self, info):
            clock.tick()

    with tempfile.TemporaryDirectory(prefix="bench-mp-") as tmp:
        result, family = train_model_path(
            load_comfy_family(ROOT), model, clip, vae, Path(tmp), Clock(), network_type="lora", steps=args.steps,
            rank=args.rank, alpha=1.0, lr=args.lr, seed=args.seed, batch_size=args.batch_size,
            preset="all_linear_conv", resolution=args.resolution, data=Path(args.data),
            gradient_checkpointing=args.checkpointing, optim_max_grad_norm=0.0, optim_weight_decay=0.01,
            optim_optimizer="adamw")
        try:
            trained = sum(p.numel() for n, p in model.model.diffusion_model.named_parameters() if "lora_" in n)
            eps, x0 = score(model, latents, conds, args.seed)
        finally:
            family.restore()
    losses = result.losses
    return {"loss_first": sum(losses[:5]) / len(losses[:5]), "loss_last": sum(losses[-5:]) / len(losses[-5:]),
            "loss_kind": "ε", "eval_eps_mse": eps, "eval_x0_mse": x0, "trained_params": trained}


def _train_comfyui(args, model, latents, conds, clock: StepClock) -> dict:
    import torch

    import comfy.model_management as mm
    import comfy_extras.nodes_train as nodes_train

    class TimedSampler(nodes_train.TrainSampler):  # the node's sampler, with a clock on its per-step loss callback
        def __init__(self, *a, loss_callback=None, **kw):
            def timed(loss):
                clock.tick()
                if loss_callback:
                    loss_callback(loss)

            super().__init__(*a, loss_callback=timed, **kw)

    original, nodes_train.TrainSampler = nodes_train.TrainSampler, TimedSampler
    try:
        with torch.inference_mode():  # as ComfyUI runs a node
            out = nodes_train.TrainLoraNode.execute(
                model=[model], latents=[{"samples": latents}], positive=[[c] for c in conds],
                batch_size=[args.batch_size], steps=[args.steps], grad_accumulation_steps=[1],
                learning_rate=[args.lr], rank=[args.rank], optimizer=["AdamW"], loss_function=["MSE"],
                seed=[args.seed], training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"],
                gradient_checkpointing=[args.checkpointing], existing_lora=["[None]"], bucket_mode=[False])
    finally:
        nodes_train.TrainSampler = original
    trained_model, lora_sd, loss_map = out.args[0], out.args[1], out.args[2]
    mm.load_models_gpu([trained_model], force_full_load=True)
    eps, x0 = score(trained_model, latents, conds, args.seed)
    losses = loss_map["loss"]
    return {"loss_first": sum(losses[:5]) / len(losses[:5]), "loss_last": sum(losses[-5:]) / len(losses[-5:]),
            "loss_kind": "x0", "eval_eps_mse": eps, "eval_x0_mse": x0,
            "trained_params": sum(t.numel() for t in lora_sd.values())}


# --- the parent: both trainers, one child process each ------------------------------------------------------------
def child_command(args, trainer: str, data: Path, python: str = sys.executable) -> list[str]:
    cmd = [python, str(Path(__file__).resolve()), "--comfy-root", str(args.comfy_root), "--only", trainer,
           "--data", str(data), "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--rank",
           str(args.rank), "--lr", repr(args.lr), "--seed", str(args.seed), "--resolution", str(args.resolution),
           "--warmup", str(args.warmup), "--device", args.device, "--threads", str(args.threads)]
    return cmd + (["--checkpointing"] if args.checkpointing else [])


def comfy_python(root: str) -> str | None:
    """An interpreter that can import ComfyUI at ``root``: this one if it has ComfyUI's requirements, else the
    stage's cached 0.8.0 venv, else None."""
    import importlib.util

    if not (Path(root) / "comfy" / "sd.py").is_file():
        return None
    if all(importlib.util.find_spec(m) is not None for m in COMFY_REQUIREMENTS):
        return sys.executable
    cached = CACHE / "venv-0.8.0" / "bin" / "python"
    return str(cached) if cached.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    python = comfy_python(args.comfy_root)
    if python is None:
        print(f"skipped: needs a ComfyUI tree at --comfy-root ({args.comfy_root}) and a Python with its requirements "
              f"(run .ci/comfyui_stage.sh once to build {CACHE / 'venv-0.8.0'})")
        return 0
    if args.only:
        print(MARK + json.dumps(run_one(args)), flush=True)
        return 0
    settings = {k: getattr(args, k) for k in ("device", "steps", "batch_size", "rank", "lr", "resolution", "seed",
                                               "warmup", "checkpointing", "threads", "parallel")}
    settings["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-mp-data-") as tmp:
        write_data(Path(tmp), args.resolution)
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        running, outputs = {}, {}
        for trainer in TRAINERS:
            running[trainer] = subprocess.Popen(child_command(args, trainer, Path(tmp), python), env=env, text=True,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if not args.parallel:
                outputs[trainer] = running[trainer].communicate()[0]
        for trainer, proc in running.items():
            output = outputs[trainer] if trainer in outputs else proc.communicate()[0]
            line = next((l for l in output.splitlines() if l.startswith(MARK)), None)
            results[trainer] = json.loads(line[len(MARK):]) if line else \
                {"error": f"exit {proc.returncode}: {output[-1500:]}"}
    print(format_report(results, settings))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "results": results,
                                               "ratios": ratios(results.get("crucible", {}), results.get("comfyui", {})),
                                               "not_matched": list(UNMATCHED)}, indent=2), encoding="utf-8")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
