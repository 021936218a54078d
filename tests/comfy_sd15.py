"""The smallest SD1.5 checkpoint that ComfyUI's own *Load Checkpoint* detects and loads: a test fixture.

The real-ComfyUI stage (``.ci/comfyui_stage.sh``) builds it into ``models/checkpoints`` as
``crucible_comfy_sd15.safetensors``; ``tests/comfyui_e2e/test_comfy_checkpoint.py`` checks its shapes without
ComfyUI. It lives under tests/ and is not part of the installed ``trainer`` package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.fileio import save_safetensors
from trainer.tiny import CLIP_MAX_LENGTH

# --- the smallest SD1.5 that ComfyUI's own Load Checkpoint accepts ----------------------------------------------------
# ComfyUI (March 2024 and 0.8.0 alike) recognises SD1.5 by five UNet facts (comfy/supported_models.py, SD15.unet_config,
# read from the weights by comfy/model_detection.py): model_channels 320, context_dim 768, a conv proj_in
# (use_linear_in_transformer False), no label_emb (adm_in_channels None) and no temporal layers; 4 input channels keep
# it from Stable Zero123, which is tried first. Depth, levels and channel multipliers are read from the weights too,
# so the UNet can shrink. CLIP-L and the VAE cannot: ComfyUI builds them from fixed configs (comfy/sd1_clip_config.json;
# the SD VAE ddconfig in comfy/sd.py) with uninitialised weights (comfy.ops.disable_weight_init) and loads them
# non-strictly, so a smaller file would leave layers of garbage memory behind instead of failing.
COMFY_SD15_NAME = "crucible_comfy_sd15"


def comfy_sd15_unet_config() -> dict[str, Any]:
    """UNet2DConditionModel kwargs: SD1.5's 320-channel, 768-context, 8-head UNet cut to two one-block levels, with
    cross-attention in the first and none in the second (SD1.5's last level has none either). Two levels rather
    than one, so a LoRA key map that reversed the up blocks wrongly would show."""
    return dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 320), layers_per_block=1,
                norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768, attention_head_dim=8)


def comfy_sd15_vae_config() -> dict[str, Any]:
    """AutoencoderKL kwargs with the released SD VAE's shapes (ComfyUI's ch 128, ch_mult 1,2,4,4, 2 res blocks)."""
    return dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def comfy_sd15_text_config() -> dict[str, Any]:
    """CLIPTextConfig kwargs of CLIP-L's text tower (comfy/sd1_clip_config.json), so ComfyUI's tokenizer fits it."""
    return dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
                projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def comfy_sd15_components(seed: int = 0):
    """The random :class:`~trainer.families.base.Components` behind :func:`build_comfy_sd15` (no tokenizer: ComfyUI's
    own ``comfy/sd1_tokenizer`` fits the text encoder). Deterministic from ``seed``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.families.base import Components
    from trainer.families.sd15 import make_noise_scheduler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**comfy_sd15_unet_config())
        vae = AutoencoderKL(**comfy_sd15_vae_config())
        text = CLIPTextModel(CLIPTextConfig(**comfy_sd15_text_config()))
    for module in (unet, vae, text):
        module.eval()
    return Components(denoiser=unet, vae=vae, text_encoders=[text], tokenizers=[],
                      noise_scheduler=make_noise_scheduler(), source=f"comfy-sd15-seed{seed}",
                      extras={"family": "sd15", "clip_skip": 1})


def build_comfy_sd15(folder: str | Path, seed: int = 0, name: str = COMFY_SD15_NAME) -> Path:
    """Write ``<folder>/<name>.safetensors`` and return its path: a random SD1.5-architecture single-file checkpoint
    (fp16, about 465 MB) that ComfyUI's stock *Load Checkpoint* detects as SD1.5 and loads with every weight present,
    and that Crucible trains on. Deterministic from ``seed``."""
    import torch

    from trainer.families.ldm_layout import diffusers_to_single_file

    weights = diffusers_to_single_file(comfy_sd15_components(seed), "sd15")
    return save_safetensors(Path(folder) / f"{name}.safetensors", {k: v.to(torch.float16) for k, v in weights.items()})
