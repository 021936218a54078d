"""The demo's base model: a tiny SD1.5-architecture model that already draws flat shapes, pre-trained on the CPU.

``python -m trainer demo-base --out demo_output/demo-base`` (and ``make demo``, on its first run) builds it:

1. Pictures are drawn, not downloaded: a circle, square or triangle in red, green, blue or yellow on a black, white
   or grey background, with a random size and position (:func:`draw`), captioned ``"red circle, black
   background"``.
2. A small VAE (the real AutoencoderKL, 8x downsampling, narrow channels) learns to encode and decode them — and the
   demo concept's pictures too, so it can draw what the LoRA will learn; its ``scaling_factor`` is set so the
   latents have unit variance, as Stable Diffusion's is.
3. The UNet (the tiny SD1.5 UNet of :mod:`trainer.tiny`) learns to denoise the *base* pictures' latents, conditioned on
   the frozen random CLIP text encoder, with 10 % empty captions so classifier-free guidance works. It never sees the
   demo concept.

The concept the demo LoRA then teaches (:data:`CONCEPT`) is a colour and a shape the base has never seen: a magenta
ring, called by the new word ``crucible``. Everything is seeded, so one command rebuilds the same model (bit for bit
on the same machine and torch version); a few CPU minutes with one thread, the folder is about 5 MB.
"""
from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("crucible")

FAMILY = "sd15"  # the demo's chosen family: the smallest one that trains in seconds on a CPU
SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
BACKGROUNDS = {"black": (10, 10, 10), "white": (245, 245, 245), "grey": (128, 128, 128)}
CONCEPT = {"word": "crucible", "shape": "ring", "colour": (230, 40, 230), "backgrounds": ("black", "grey")}
VAE_CHANNELS = (16, 16, 32, 32)
VAE_GROUPS = 8


def draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], rng: random.Random,
         size: int = SIZE):
    """One flat-colour shape, centred near the middle at a random size (PIL image)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    r = rng.uniform(0.26, 0.40) * size
    cx, cy = (size / 2 + rng.uniform(-0.08, 0.08) * size for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        s = r * 0.88
        pen.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx + r * math.sqrt(3) / 2, cy + r / 2), (cx - r * math.sqrt(3) / 2, cy + r / 2)],
                    fill=colour)
    elif shape == "ring":
        pen.ellipse(box, outline=colour, width=max(3, round(r * 0.38)))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def base_pictures(count: int, seed: int) -> list[tuple[object, str]]:
    """``count`` (image, caption) pairs of what the base model knows."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        shape, colour, bg = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        if colour == bg or (colour == "yellow" and bg == "white"):
            bg = "black"
        out.append((draw(shape, COLOURS[colour], BACKGROUNDS[bg], rng), f"{colour} {shape}, {bg} background"))
    return out


def concept_pictures(count: int, seed: int) -> list[tuple[object, str]]:
    """``count`` (image, caption) pairs of the concept the demo LoRA teaches."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        bg = CONCEPT["backgrounds"][i % len(CONCEPT["backgrounds"])]
        out.append((draw(CONCEPT["shape"], CONCEPT["colour"], BACKGROUNDS[bg], rng),
                    f"{CONCEPT['word']}, {bg} background"))
    return out


def write_concept_dataset(folder: str | Path, count: int = 20, seed: int = 1) -> Path:
    """The demo LoRA's dataset: ``<folder>/4_crucible/NN.png`` + caption ``.txt`` (4 repeats, kohya layout)."""
    from .fileio import atomic_write, atomic_write_bytes

    target = Path(folder) / f"4_{CONCEPT['word']}"
    for i, (image, caption) in enumerate(concept_pictures(count, seed)):
        atomic_write(target / f"{i:02d}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
        atomic_write_bytes(target / f"{i:02d}.txt", caption.encode("utf-8"))
    return Path(folder)


def _pixels(images) -> "torch.Tensor":
    import numpy as np
    import torch

    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]).transpose(0, 3, 1, 2)
    return torch.from_numpy(array / 127.5 - 1.0)


def train_vae(pixels: "torch.Tensor", steps: int, seed: int, report: Callable[[str], None]):
    """A narrow AutoencoderKL fitted to ``pixels`` (reconstruction MSE + a small KL term)."""
    import torch
    from diffusers import AutoencoderKL

    from .tiny import tiny_vae_config

    torch.manual_seed(seed)
    vae = AutoencoderKL(**dict(tiny_vae_config(FAMILY), block_out_channels=VAE_CHANNELS, norm_num_groups=VAE_GROUPS))
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        batch = pixels[torch.randint(0, len(pixels), (16,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)).sample
        loss = torch.nn.functional.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            report(f"    vae  step {step}/{steps}  reconstruction mse {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 64]).latent_dist.mean for i in range(0, len(pixels), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def train_unet(comps, latents: "torch.Tensor", captions: list[str], steps: int, seed: int,
               report: Callable[[str], None]) -> None:
    """Teach the tiny UNet to denoise ``latents`` (already scaled) given ``captions`` (epsilon, DDPM)."""
    import torch

    from .families import get_family

    family = get_family(FAMILY)
    torch.manual_seed(seed)
    with torch.no_grad():
        texts = sorted(set(captions)) + [""]
        table = family.encode_text(comps, texts)["encoder_hidden_states"]
    index = torch.tensor([texts.index(c) for c in captions])
    empty = len(texts) - 1
    unet, sched = comps.denoiser, comps.noise_scheduler
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    n_t = sched.config.num_train_timesteps
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(latents), (64,), generator=gen)
        x0 = latents[pick]
        cond_index = torch.where(torch.rand(64, generator=gen) < 0.1, empty, index[pick])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, n_t, (64,), generator=gen)
        pred = unet(sched.add_noise(x0, noise, t), t, table[cond_index]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr.step()
        if step % 200 == 0 or step == steps:
            report(f"    unet step {step}/{steps}  loss {loss.item():.4f}")
    unet.eval()


def build_demo_base(folder: str | Path, seed: int = 0, vae_steps: int = 800, unet_steps: int = 1500,
                    pictures: int = 1200, report: Callable[[str], None] = print) -> Path:
    """Write the pre-trained demo base model as a diffusers folder (see the module docstring); returns it."""
    import torch

    from .tiny import build_tiny_components, build_tiny_tokenizer, save_diffusers_folder

    folder = Path(folder)
    t0 = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and the result does not depend on the core count
    try:
        with torch.random.fork_rng(devices=[]):
            build_tiny_tokenizer(folder / "tokenizer")
            comps = build_tiny_components(FAMILY, seed, tokenizer_dir=folder / "tokenizer")
            base = base_pictures(pictures, seed)
            concept = concept_pictures(max(1, pictures // 6), seed + 1)
            pixels = _pixels([im for im, _ in base + concept])
            report(f"  demo base: VAE on {len(pixels)} drawn pictures ({vae_steps} steps)")
            comps.vae = train_vae(pixels, vae_steps, seed, report)
            with torch.no_grad():
                latents = torch.cat([comps.vae.encode(pixels[i:i + 64]).latent_dist.mean
                                     for i in range(0, len(base), 64)])[: len(base)]
            latents = latents * comps.vae.config.scaling_factor
            report(f"  demo base: UNet on the {len(base)} base pictures, never the concept ({unet_steps} steps)")
            train_unet(comps, latents, [c for _, c in base], unet_steps, seed, report)
            save_diffusers_folder(comps, folder, FAMILY)
    finally:
        torch.set_num_threads(threads)
    report(f"  demo base: written to {folder} in {time.monotonic() - t0:.0f}s")
    return folder
