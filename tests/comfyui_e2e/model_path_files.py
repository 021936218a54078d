"""Model files for the MODEL-path family checks, written where ComfyUI's stock loaders look (a test fixture).

``python model_path_files.py <ComfyUI models folder>`` (run in the stage's ComfyUI venv) writes, once:

* ``diffusion_models/crucible_tiny_sd3.safetensors`` — a 2-block SD3 MMDiT (128 wide, 2 heads of 64) that
  ComfyUI's *Load Diffusion Model* (``UNETLoader``) detects as ``SD3``: ComfyUI reads depth, patch size and the
  context/pooled widths from the weights. The widths are the ones ComfyUI's SD3 text encoder produces with CLIP-L
  alone (context zero-padded to 4096, pooled CLIP-L ‖ zero CLIP-G = 2048), so the stock *Load CLIP* feeds it.
* ``text_encoders/crucible_clip_l.safetensors`` — CLIP-L's text tower at its real size (ComfyUI builds CLIP-L from
  a fixed config; ``tests/comfy_sd15.py``), random, fp16, loaded with *Load CLIP* type ``sd3``.
* ``vae/crucible_sd3_vae.safetensors`` — an SD-shaped VAE with SD3's 16 latent channels in diffusers names
  (ComfyUI converts them and reads the latent channels from the weights), loaded with *Load VAE*.

SDXL and Flux have no such files: ComfyUI's loaders detect SDXL only at its released depths (the smallest preset,
Segmind Vega, is 745M weights) and Flux's text encoder needs T5-XXL (4.7G weights, built from a fixed config).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: the model fixtures
sys.path.insert(2, str(Path(__file__).resolve().parents[2]))  # the pack: its trainer library

SD3_FILES = {"unet": ("diffusion_models", "crucible_tiny_sd3.safetensors"),
             "clip": ("text_encoders", "crucible_clip_l.safetensors"),
             "vae": ("vae", "crucible_sd3_vae.safetensors")}


def sd3_transformer(seed: int = 0):
    import torch
    from diffusers import SD3Transformer2DModel

    from tiny_flow import tiny_transformer_config

    config = dict(tiny_transformer_config("sd3"), joint_attention_dim=4096, pooled_projection_dim=768 + 1280)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(**config).eval()


def write_sd3_files(models: Path, seed: int = 0) -> dict[str, Path]:
    """The three SD3 files under ``models`` (kept when present); returns their paths by role."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfy_sd15 import comfy_sd15_text_config, comfy_sd15_vae_config
    from trainer.families import get_family
    from trainer.families.base import Components
    from trainer.fileio import save_safetensors

    paths = {role: models / sub / name for role, (sub, name) in SD3_FILES.items()}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    if not paths["unet"].is_file():
        comps = Components(denoiser=sd3_transformer(seed), vae=None, text_encoders=[], tokenizers=[],
                           noise_scheduler=None, denoiser_name="transformer", text_encoder_names=())
        save_safetensors(paths["unet"], get_family("sd3").full_export_state_dict(comps))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        if not paths["clip"].is_file():
            text = CLIPTextModel(CLIPTextConfig(**comfy_sd15_text_config()))
            state = {k if k.startswith("text_model.") else "text_model." + k: v.to(torch.float16)
                     for k, v in text.state_dict().items()}  # transformers 5 drops the prefix ComfyUI detects by
            state["text_projection.weight"] = torch.eye(768, dtype=torch.float16)  # what ComfyUI's CLIP-L holds
            save_safetensors(paths["clip"], state)
        if not paths["vae"].is_file():
            vae = AutoencoderKL(**dict(comfy_sd15_vae_config(), latent_channels=16))
            save_safetensors(paths["vae"], {k: v.to(torch.float16) for k, v in vae.state_dict().items()})
    return paths


if __name__ == "__main__":
    for role, path in write_sd3_files(Path(sys.argv[1])).items():
        print(f"{role}: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
