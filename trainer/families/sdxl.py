"""Stable Diffusion XL: UNet with size/crop conditioning, CLIP-L + CLIP-G (with projection), 8× VAE (×0.13025).

Conditioning as in diffusers' SDXL pipeline and kohya's SDXL trainer:

* ``encoder_hidden_states`` = CLIP-L and CLIP-G penultimate hidden states (no final layer norm) concatenated on the
  feature axis; ``clip_skip`` 1 means that standard penultimate layer and each step more goes one layer further back.
* ``text_embeds`` = CLIP-G's projected pooled output of the first 75-token window.
* ``time_ids`` = (original h, w, crop top, crop left, target h, w) per image, see :func:`sdxl_time_ids`. The data
  pipeline knows the sizes, ``encode_text`` does not: the loop adds each image's ``image_geometry`` (original size
  and crop offset, as kohya and diffusers pass them) to the conditioning and the target is the latent size; without
  it :meth:`StableDiffusionXLFamily.predict` falls back to the latent size (uncropped, original = target).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .. import full_size
from ..lora_keys import kohya
from ..lora_targets import CLIP, UNET_ATTN, UNET_CONV, UNET_LINEAR, UNET_MLP, grow
from .base import Components, Conditioning, EncoderSpec
from .kohya_blocks import SDXL_BLOCKS
from .token_weights import apply_token_weights, token_weights
from .clip_text import WINDOW, check_clip_skip, chunked_token_ids, encode_windows
from .sd15 import StableDiffusionFamily
from .weights import param_dtype, unwrap

if TYPE_CHECKING:  # pragma: no cover
    import torch

Size = tuple[int, int]  # (height, width) in pixels


def sdxl_time_ids(original_sizes: Sequence[Size], crops_top_left: Sequence[Size] | None = None,
                  target_sizes: Sequence[Size] | None = None) -> "torch.Tensor":
    """SDXL's added time ids ``[B, 6]``: original (h, w), crop top-left (top, left), target (h, w) per image.

    Crops default to (0, 0) and targets to the original sizes.
    """
    import torch

    crops = crops_top_left if crops_top_left is not None else [(0, 0)] * len(original_sizes)
    targets = target_sizes if target_sizes is not None else original_sizes
    if not len(original_sizes) == len(crops) == len(targets):
        raise ValueError("original_sizes, crops_top_left and target_sizes need one entry per image")
    rows = [[*map(int, o), *map(int, c), *map(int, t)] for o, c, t in zip(original_sizes, crops, targets)]
    return torch.tensor(rows, dtype=torch.float32)


def _full_size_unet():
    import diffusers

    return diffusers.UNet2DConditionModel(
        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), addition_embed_type="text_time", projection_class_embeddings_input_dim=2816,
        addition_time_embed_dim=256, use_linear_projection=True, layers_per_block=2, sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL base (epsilon; v-prediction / zero-terminal-SNR fine-tunes via the config or ComfyUI's markers)."""

    name = "sdxl"
    title = "SDXL"
    block_layout = SDXL_BLOCKS
    gradient_checkpointing_above_px = 0  # always: 1024 px activations dominate memory (trainer.defaults)
    vae_fp32 = True  # the SDXL VAE overflows to NaN in fp16 (kohya no_half_vae)
    encoders = (EncoderSpec("text_encoder", "clip_l"), EncoderSpec("text_encoder_2", "clip_g"))
    key_styles = {"unet": kohya("lora_unet"), "text_encoder": kohya("lora_te1", clip=True),
                  "text_encoder_2": kohya("lora_te2", clip=True)}
    lora_targets = {"unet": grow(UNET_ATTN, UNET_MLP, UNET_LINEAR + ("add_embedding.linear_1", "add_embedding.linear_2"),
                                 UNET_CONV),
                    "text_encoder": CLIP, "text_encoder_2": CLIP}  # CLIP-L, CLIP-G
    base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    pipeline_class_name = "StableDiffusionXLPipeline"
    pipeline_class_pattern = r"XL"
    pipeline_index_extras = {}
    vae_factors = {"scaling_factor": 0.13025, "sample_size": 1024}
    unet_sample_size = 128
    single_file_prefixes = {"text_encoder": "conditioner.embedders.0.transformer.",
                            "text_encoder_2": "conditioner.embedders.1.model."}  # CLIP-G in OpenCLIP layout
    text_time_conditioning = True
    full_size_components = (("unet", _full_size_unet), ("text_encoder", full_size.clip_l),
                            ("text_encoder_2", full_size.clip_g), ("vae", full_size.vae(4)))
    full_size_context_width = 2048  # CLIP-L 768 + CLIP-G 1280
    full_size_pooled_width = 1280  # CLIP-G's projection

    def matches_single_file(self, keys) -> bool:
        return any(k.startswith(self.single_file_prefixes["text_encoder_2"]) for k in keys)

    def full_size_forward_inputs(self, resolution: int) -> dict[str, Any]:
        import torch

        inputs = super().full_size_forward_inputs(resolution)
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, self.full_size_pooled_width),
                                       "time_ids": torch.randn(1, 6)}
        return inputs

    def encode_text(self, comps: Components, captions: Sequence[str], clip_skip: int = 1,
                    max_token_length: int = WINDOW, weights=None) -> Conditioning:
        """``encoder_hidden_states`` ``[B, 77·windows, 768+1280]`` and ``text_embeds`` ``[B, 1280]``."""
        import torch

        layer = -(clip_skip + 1)
        hidden = []
        pooled = None
        for encoder, tokenizer in zip(comps.text_encoders, comps.tokenizers):
            check_clip_skip(encoder, clip_skip, extra=1)
            ids = chunked_token_ids(tokenizer, captions, max_token_length)
            states, out = encode_windows(encoder, ids, layer, final_norm=False)
            if weights is not None:
                states = apply_token_weights(states, token_weights(tokenizer, weights, max_token_length))
            hidden.append(states)
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds.reshape(ids.shape[0], ids.shape[1], -1)[:, 0]
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def _added_cond(self, comps: Components, latents: "torch.Tensor", cond: Conditioning) -> dict:
        """``text_embeds`` and ``time_ids`` (from the latent size when the batch did not bring its own)."""
        dtype = param_dtype(comps.denoiser)
        batch = latents.shape[0]
        time_ids = cond.get("time_ids")
        geometry = cond.get("image_geometry")
        if time_ids is None:
            scale = self.vae_scale_factor_of(comps)
            target = [(latents.shape[-2] * scale, latents.shape[-1] * scale)] * batch
            if geometry is not None and len(geometry) == batch:
                rows = [tuple(int(v) for v in row) for row in geometry]
                time_ids = sdxl_time_ids([r[:2] for r in rows], [r[2:4] for r in rows], target)
            else:
                time_ids = sdxl_time_ids(target)
        elif time_ids.shape[0] == 1 and batch > 1:
            time_ids = time_ids.expand(batch, -1)
        elif time_ids.shape[0] != batch:
            raise ValueError(f"time_ids has {time_ids.shape[0]} rows for a batch of {batch} latents")
        return {"text_embeds": cond["text_embeds"].to(latents.device, dtype),
                "time_ids": time_ids.to(latents.device, dtype)}

    @staticmethod
    def vae_scale_factor_of(comps: Components) -> int:
        """Pixels per latent of the loaded VAE (8 for real models and Crucible's tiny ones)."""
        return 2 ** (len(unwrap(comps.vae).config.block_out_channels) - 1)

    def pipeline(self, comps: Components):
        from diffusers import StableDiffusionXLPipeline

        from .sd15 import sampling_scheduler

        return StableDiffusionXLPipeline(vae=comps.vae, text_encoder=comps.text_encoders[0],
                                         text_encoder_2=comps.text_encoders[1], tokenizer=comps.tokenizers[0],
                                         tokenizer_2=comps.tokenizers[1], unet=comps.denoiser,
                                         scheduler=sampling_scheduler(comps.noise_scheduler))

    def prompt_embeds(self, comps: Components, prompt: str, negative_prompt: str, clip_skip: int,
                      max_token_length: int) -> dict[str, "torch.Tensor"]:
        """Prompt embeddings; an empty negative prompt is left to the pipeline, which uses zeros as SDXL does."""
        pos = self.encode_text(comps, [prompt], clip_skip, max_token_length)
        kwargs = {"prompt_embeds": pos["encoder_hidden_states"], "pooled_prompt_embeds": pos["text_embeds"]}
        if negative_prompt:
            neg = self.encode_text(comps, [negative_prompt], clip_skip, max_token_length)
            kwargs.update(negative_prompt_embeds=neg["encoder_hidden_states"],
                          negative_pooled_prompt_embeds=neg["text_embeds"])
        return kwargs


FAMILY = StableDiffusionXLFamily()
