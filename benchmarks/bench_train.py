"""Benchmark: LoRA training steps per second on the tiny SD1.5 model, Crucible's trainer vs a minimal diffusers + peft
loop, and the trainer's memory over a long run.

In the same process, on the same tiny SD1.5-architecture model folder, the demo images (12, 64x64), batch 4, seed,
AdamW, constant learning rate, gradient clipping at 1.0 and LoRA targets (the ``attn_mlp`` preset, rank 8):

* **baseline**: the loop of diffusers' ``train_text_to_image_lora.py`` cut to its core. The images are decoded and
  resized once up front; every step VAE-encodes and text-encodes its batch, noises, predicts, steps AdamW.
* **crucible cold**: ``trainer.loop.train`` as users run it by default (images decoded, captions processed and both
  encoders run every step).
* **crucible cached**: the same with ``cache_latents`` and ``cache_text_embeddings``.

Rates count the steps after a warm-up; each configuration runs ``--rounds`` times, interleaved, and its best rate
counts (load from other processes only ever slows a run down). The goal is a ratio ≥ 1.0 cold and ≥ 1.5 cached.
Then one cold run of ``--steps`` steps reads the resident set size from ``/proc/self/status`` every ``--rss-every``
steps; after the warm-up it should stay flat (no growth per step). One torch thread by default (``--threads``).
Not a test: it prints the numbers. ``--quick`` is a short run for ``make bench``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.callbacks import Callbacks  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402

DATA = ROOT / "trainer" / "demo_data"
RESOLUTION = 64
BATCH = 4
SEED = 7
RANK = 8
LR = 1e-4
WARMUP = 10  # steps left out of the rates (lazy initialisation, allocator growth, caches filling)
FLAT_TOLERANCE_MB = 16.0  # RSS growth after warm-up still called "flat" (allocator noise)


# --- measuring ---------------------------------------------------------------------------------------------------

def _status_mb(field: str) -> float:
    """A memory field of ``/proc/self/status`` (Linux) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (the memory check needs Linux)")


def rss_mb() -> float:
    """Resident set size of this process now."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The largest resident set size this process has had (``VmHWM``)."""
    return _status_mb("VmHWM")


class StepClock:
    """Timestamps of every step; steps/s over the steps after the warm-up; RSS every ``rss_every`` steps."""

    def __init__(self, rss_every: int = 0):
        self.times: list[float] = []
        self.rss_every = rss_every
        self.rss: list[tuple[int, float]] = []

    def tick(self, step: int) -> None:
        self.times.append(time.perf_counter())
        if self.rss_every and step % self.rss_every == 0:
            self.rss.append((step, rss_mb()))

    def rate(self) -> float:
        if len(self.times) <= WARMUP + 1:
            raise ValueError(f"need more than {WARMUP + 1} steps to time")
        timed = self.times[WARMUP:]
        return (len(timed) - 1) / (timed[-1] - timed[0])


class ClockCallbacks(Callbacks):
    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_step(self, info) -> None:
        self.clock.tick(info.step)


# --- Crucible ----------------------------------------------------------------------------------------------------

def crucible_config(model: Path, out: Path, steps: int, cached: bool) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"family": "sd15", "path": str(model)},
        "datasets": [{"path": str(DATA), "resolution": RESOLUTION}],
        "network": {"network_dim": RANK, "network_alpha": RANK, "target_preset": "attn_mlp"},
        "optim": {"optimizer": "adamw", "learning_rate": LR, "weight_decay": 1e-2, "lr_scheduler": "constant",
                  "max_grad_norm": 1.0},
        "training": {"batch_size": BATCH, "max_train_steps": steps, "seed": SEED,
                     "cache_latents": cached, "cache_text_embeddings": cached},
        "save": {"output_dir": str(out), "run_name": "cached" if cached else "cold", "save_every_n_epochs": 0,
                 "save_last": False, "save_state": False},
    })


def run_crucible(model: Path, out: Path, steps: int, cached: bool, clock: StepClock) -> float:
    from trainer.loop import train

    result = train(crucible_config(model, out, steps, cached), ClockCallbacks(clock))
    return result.losses[-1]


# --- the diffusers + peft baseline ---------------------------------------------------------------------------------

def decoded_dataset() -> tuple[torch.Tensor, list[str]]:
    """Every demo image center-cropped and resized to RESOLUTION, as [-1, 1] pixels, with its caption."""
    import numpy as np
    from PIL import Image

    pixels, captions = [], []
    for path in sorted(DATA.rglob("*.png")):
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side))
            im = im.resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS)
            pixels.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        captions.append(path.with_suffix(".txt").read_text(encoding="utf-8").strip())
    return torch.stack(pixels), captions


def run_baseline(model: Path, steps: int, clock: StepClock) -> float:
    """diffusers' LoRA example loop, minimal: frozen VAE/CLIP/UNet, peft LoRA on the UNet, AdamW, MSE on epsilon."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainer.lora_targets import lora_target_modules

    torch.manual_seed(SEED)
    tokenizer = CLIPTokenizer.from_pretrained(str(model / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(model / "text_encoder"))
    vae = AutoencoderKL.from_pretrained(str(model), subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(str(model), subfolder="scheduler")
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=True,
                                target_modules=lora_target_modules("sd15", "unet", "attn_mlp")))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)
    pixels, captions = decoded_dataset()
    generator = torch.Generator().manual_seed(SEED)
    order: list[int] = []
    loss = torch.zeros(())
    for step in range(1, steps + 1):
        if len(order) < BATCH:  # a fresh shuffle each epoch
            order = torch.randperm(len(captions), generator=generator).tolist()
        batch, order = order[:BATCH], order[BATCH:]
        with torch.no_grad():
            latents = vae.encode(pixels[batch]).latent_dist.sample(generator) * vae.config.scaling_factor
            ids = tokenizer([captions[i] for i in batch], padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            hidden = text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick(step)
    return loss.item()


# --- report --------------------------------------------------------------------------------------------------------

def rss_verdict(samples: list[tuple[int, float]]) -> str:
    """Whether RSS stayed flat after the first sample (which is taken once warm-up is over)."""
    if len(samples) < 3:
        return "too few samples to judge (run more steps)"
    settled = samples[1:]  # the first sample still includes warm-up growth
    growth = max(mb for _, mb in settled) - settled[0][1]
    steps = settled[-1][0] - settled[0][0]
    flat = growth <= FLAT_TOLERANCE_MB
    return (f"{'FLAT' if flat else 'GROWING'}: +{growth:.1f} MiB over steps {settled[0][0]}..{settled[-1][0]} "
            f"({growth * 1024 / max(steps, 1):.1f} KiB/step; flat means <= {FLAT_TOLERANCE_MB:.0f} MiB)")


def best_rates(model: Path, out: Path, steps: int, rounds: int) -> dict[str, float]:
    """Each configuration ``rounds`` times, interleaved so that load from other processes hits all of them alike;
    the best rate of each (as ``timeit`` does: noise only ever slows a run down)."""
    runs: dict[str, Callable[[StepClock], float]] = {
        "crucible cold": lambda c: run_crucible(model, out, steps, False, c),
        "crucible cached": lambda c: run_crucible(model, out, steps, True, c),
        "diffusers+peft": lambda c: run_baseline(model, steps, c),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(1, rounds + 1):
        for name, run in runs.items():
            clock = StepClock()
            last_loss = run(clock)
            rates[name].append(clock.rate())
            print(f"  round {round_} {name:<16}: {rates[name][-1]:7.2f} steps/s (last loss {last_loss:.4f})",
                  flush=True)
    return {name: max(values) for name, values in rates.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps of the RSS run (default 1000)")
    parser.add_argument("--speed-steps", type=int, default=0, help="steps per timed run (default 100)")
    parser.add_argument("--rounds", type=int, default=0, help="timed runs per configuration (default 3)")
    parser.add_argument("--rss-every", type=int, default=0, help="RSS sample interval (default 50)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the tiny model's ops are too small to gain from more, and "
                             "on a shared machine several threads make every rate swing wildly)")
    parser.add_argument("--quick", action="store_true",
                        help="short run: 2 rounds of 40 timed steps, RSS over 60 steps every 10")
    args = parser.parse_args(argv)
    steps = args.steps if not args.quick else 60
    speed_steps = args.speed_steps or (40 if args.quick else 100)
    rounds = args.rounds or (2 if args.quick else 3)
    rss_every = args.rss_every or (10 if args.quick else 50)
    torch.set_num_threads(args.threads)
    from trainer.tiny import build_tiny_pipeline

    print(f"tiny SD1.5, {RESOLUTION}x{RESOLUTION}, batch {BATCH}, LoRA rank {RANK} (attn_mlp), AdamW, "
          f"{torch.get_num_threads()} torch thread(s); rates exclude each run's first {WARMUP} steps")
    with tempfile.TemporaryDirectory(prefix="crucible-bench-train-") as tmp:
        model = build_tiny_pipeline(Path(tmp) / "sd15", family="sd15", seed=0)
        print(f"speed: best of {rounds} interleaved runs of {speed_steps} steps per configuration")
        rates = best_rates(model, Path(tmp) / "out", speed_steps, rounds)
        print(f"memory: one cold Crucible run of {steps} steps, RSS every {rss_every} steps", flush=True)
        clock = StepClock(rss_every)
        run_crucible(model, Path(tmp) / "out", steps, False, clock)
    base = rates["diffusers+peft"]
    for name, rate in rates.items():
        print(f"{name:<16}: {rate:7.2f} steps/s")
    print(f"ratio cold      : {rates['crucible cold'] / base:7.2f}x  (goal >= 1.0)")
    print(f"ratio cached    : {rates['crucible cached'] / base:7.2f}x  (goal >= 1.5)")
    print("RSS (MiB) at step: " + ", ".join(f"{s}: {mb:.0f}" for s, mb in clock.rss))
    print(f"peak RSS of the process: {peak_rss_mb():.0f} MiB")
    print("RSS after warm-up: " + rss_verdict(clock.rss))


if __name__ == "__main__":
    main()
