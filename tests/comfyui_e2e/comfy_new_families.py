"""Tiny model files of two architectures Crucible has no diffusers adapter for, written so ComfyUI 0.8.0's own
loaders detect them (``checks_model_path_new_families.py`` trains them through the MODEL path). Runs inside the
ComfyUI venv with ComfyUI importable.

What is real and what is substituted:
- **Diffusion models (real architectures, smallest width ComfyUI detects, random weights).** Each is ComfyUI's own
  module class, built with the config ``comfy.model_detection.detect_unet_config`` reads back from its state dict,
  then filled with seeded random weights; :func:`build_all` loads each file with ``comfy.sd.load_diffusion_model``
  (what *Load Diffusion Model* calls) and requires the expected ``comfy.supported_models`` class.
  * ``Lumina2`` (``comfy.ldm.lumina.model.NextDiT``): the original Lumina 2 width (dim 2304, 24 heads / 8 KV heads —
    detection fixes the head layout for that width only), one main layer instead of 26 (the two noise- and two
    context-refiner layers are fixed), about 0.42 G weights.
  * ``Chroma`` (``comfy.ldm.chroma.model.Chroma``): the Flux width detection fixes (3072, 24 heads of 128) with one
    double and one single block instead of 19 + 38, and Chroma's full modulation approximator (5 layers of 5120),
    about 0.62 G weights.
- **Text encoder (substituted).** Lumina 2's Gemma 2 2B and Chroma's T5-XXL are built by ComfyUI from fixed
  configs (2.6 G and 4.7 G weights). The caption-projection width of both models is read from the state dict
  (``cap_embedder.1.weight`` / ``txt_in.weight``), so the tiny models are built 768 wide and conditioned by a real
  CLIP-L text tower (random weights, ``comfy/sd1_clip_config.json`` layout, 0.12 G) through the stock *Load CLIP*
  (type ``stable_diffusion``) with ComfyUI's own CLIP tokenizer. What this changes: the caption features (CLIP-L's
  last hidden state instead of an LLM's), and CLIP-L has no attention mask, so Lumina 2's ``attention_mask`` cond
  is absent (ComfyUI then uses every token, as for any unmasked encoder).
- **VAE (real class, full size).** The Flux/SD3-style 16-channel ``AutoencoderKL`` both families use
  (``latent_formats.Flux``), written with ComfyUI's own class and read back by ``comfy.sd.VAE`` (z_channels from
  ``decoder.conv_in.weight``); random weights, 84 M.
Files are stored in bfloat16 (half the disk); ComfyUI on the CPU loads them in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

CAPTION_WIDTH = 768  # CLIP-L's hidden size: the tiny models' caption-projection input


@dataclass(frozen=True)
class NewFamily:
    name: str  # comfy.supported_models class ComfyUI must detect
    unet_file: str
    module: str  # "module:Class" of ComfyUI's diffusion model
    config: dict


FAMILIES = (
    NewFamily("Lumina2", "crucible_tiny_lumina2.safetensors", "comfy.ldm.lumina.model:NextDiT",
              dict(patch_size=2, in_channels=16, dim=2304, n_layers=1, n_heads=24, n_kv_heads=8, qk_norm=True,
                   cap_feat_dim=CAPTION_WIDTH, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512],
                   rope_theta=10000.0, ffn_dim_multiplier=4.0)),
    NewFamily("Chroma", "crucible_tiny_chroma.safetensors", "comfy.ldm.chroma.model:Chroma",
              dict(image_model="chroma", in_channels=64, out_channels=64, hidden_size=3072,
                   context_in_dim=CAPTION_WIDTH, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1,
                   axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, in_dim=64, out_dim=3072, hidden_dim=5120,
                   n_layers=5, patch_size=2, txt_ids_dims=[], vec_in_dim=None)),
)
CLIP_FILE, VAE_FILE = "crucible_clip_l.safetensors", "crucible_flux_vae.safetensors"
VAE_CONFIG = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                  num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def random_weights(layout: dict, seed: int) -> dict:
    """Seeded random tensors for a state-dict layout (name → tensor on any device, meta included): matrices and
    kernels ~ N(0, 1/fan_in), biases 0, every other vector (norm scales) 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, like in layout.items():
        shape = tuple(like.shape)
        if len(shape) >= 2:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            out[name] = (torch.randn(shape, generator=gen) / fan_in ** 0.5).to(torch.bfloat16)
        elif name.endswith("bias"):
            out[name] = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            out[name] = torch.ones(shape, dtype=torch.bfloat16)
    return out


def _layout(family: NewFamily) -> dict:
    import importlib

    import comfy.ops

    module, cls = family.module.split(":")
    model = getattr(importlib.import_module(module), cls)(**family.config, device="meta",
                                                          operations=comfy.ops.disable_weight_init)
    return model.state_dict()


def clip_l_weights(seed: int) -> dict:
    """CLIP-L's text tower (transformers layout, ``text_model.*``), random; what ``comfy.sd.load_clip`` detects as
    CLIP_L."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfy_sd15 import comfy_sd15_text_config

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**comfy_sd15_text_config()))
    layout = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
              for k, v in model.state_dict().items() if not k.endswith("position_ids")}  # transformers 5 drops the prefix
    layout["text_projection.weight"] = torch.empty(768, 768, device="meta")  # ComfyUI's CLIP-L projects the pooled output
    return random_weights(layout, seed)


def vae_weights(seed: int) -> dict:
    import comfy.ldm.models.autoencoder as ae
    import torch

    with torch.device("meta"):
        model = ae.AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=VAE_CONFIG["z_channels"])
    return random_weights(model.state_dict(), seed)


def _all_weights_taken(log, path: Path) -> None:
    """ComfyUI loads state dicts non-strictly and only logs what it left out: any such line is a wrong layout."""
    left = log.matching("missing", "unexpected", "leftover")
    if left:
        raise AssertionError(f"ComfyUI did not take every weight of {path.name}: {left[0][:300]}")


def build_all(models_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Write the two diffusion models, CLIP-L and the VAE under ``models_dir`` (ComfyUI's ``models/``) and load each
    back with ComfyUI's own loaders; returns {what: detail} and raises AssertionError on a wrong detection."""
    import comfy.sd
    import comfy.utils

    from comfy_python import LogCapture
    from trainer.fileio import save_safetensors

    found = {}
    for folder in ("diffusion_models", "text_encoders", "vae"):
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
    for index, family in enumerate(FAMILIES):
        path = save_safetensors(models_dir / "diffusion_models" / family.unet_file,
                                random_weights(_layout(family), seed + index))
        with LogCapture() as log:
            patcher = comfy.sd.load_diffusion_model(str(path))
        _all_weights_taken(log, path)
        got = type(patcher.model.model_config).__name__
        if got != family.name:
            raise AssertionError(f"ComfyUI detected {path.name} as {got}, not {family.name}")
        found[family.name] = (f"{path.name}: {got}, {sum(p.numel() for p in patcher.model.parameters()) / 1e6:.0f} M "
                              f"weights, {type(patcher.model.model_sampling).__bases__[0].__name__}")
        del patcher
    path = save_safetensors(models_dir / "text_encoders" / CLIP_FILE, clip_l_weights(seed))
    with LogCapture() as log:
        clip = comfy.sd.load_clip([str(path)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    _all_weights_taken(log, path)
    width = clip.encode_from_tokens(clip.tokenize("a test"), return_dict=True)["cond"].shape[-1]
    if width != CAPTION_WIDTH:
        raise AssertionError(f"Load CLIP gave {width}-wide features, not {CAPTION_WIDTH}")
    found["CLIP-L"] = f"{path.name}: {type(clip.cond_stage_model).__name__}, {width}-wide features"
    path = save_safetensors(models_dir / "vae" / VAE_FILE, vae_weights(seed))
    with LogCapture() as log:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
    _all_weights_taken(log, path)
    if vae.latent_channels != 16:
        raise AssertionError(f"ComfyUI read {path.name} as a {vae.latent_channels}-channel VAE, not 16")
    found["VAE"] = f"{path.name}: {type(vae.first_stage_model).__name__}, {vae.latent_channels} latent channels"
    return found
