"""Stable Diffusion 3 / 3.5: MMDiT transformer, CLIP-L + CLIP-G (+ optional T5-XXL), 16-channel VAE, rectified flow.

Text conditioning follows ComfyUI's SD3 text encoder (and diffusers' ``StableDiffusion3Pipeline``):

* CLIP-L and CLIP-G penultimate hidden states (no final layer norm; ``clip_skip`` 1 = that layer, each step more one
  layer further back, as SDXL) joined on the feature axis and zero-padded to the T5 width (``joint_attention_dim``,
  4096); captions longer than 75 tokens use 75-token windows as in :mod:`trainer.families.sd15`.
* T5-XXL last hidden states (``t5_length`` tokens: the caption, ``</s>``, ``<pad>``…; 77 as ComfyUI pads) appended on
  the sequence axis. Without T5 the context is the CLIP part alone, as in ComfyUI.
* ``pooled_projections`` = CLIP-L pooled output (unprojected, as ComfyUI and SAI's reference code use it: a CLIP-L
  loaded from a file gets an identity projection, which is what diffusers does too) ‖ CLIP-G projected pooled output.

The training objective (``target = noise − latents``, σ·1000 as the timestep) lives in
:class:`trainer.families.objectives.FlowMatchingObjective`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .. import full_size
from ..errors import ModelLoadError
from ..lora_keys import TRANSFORMER, kohya
from ..lora_targets import CLIP, MMDIT_ATTN, MMDIT_MLP, T5, grow
from .base import Components, Conditioning, EncoderSpec
from .clip_text import WINDOW, check_clip_skip, chunked_token_ids, encode_windows, windows_needed
from .flow_common import FlowFamily, components_by_name
from .ldm_configs import _count
from .split_files import DIFFUSION_PREFIX, load_clip
from .t5_text import encode_t5, t5_token_ids
from .weights import Part, unwrap

if TYPE_CHECKING:  # pragma: no cover
    import torch

HEAD_DIM = 64  # every SD3/3.5 transformer; ComfyUI derives the head count the same way (width / 64)
SAMPLE_SIZE = 128  # SD3's default latent size (1024 px); shapes cannot tell it and nothing in training uses it
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}  # SD3 and SD3.5 (stabilityai/*/scheduler)


def sd3_original_to_diffusers(sd: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """A ComfyUI/SAI-named SD3 transformer state dict (``joint_blocks.N.x_block…``) in diffusers names."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers({k.removeprefix(DIFFUSION_PREFIX): v for k, v in sd.items()})


def sd3_transformer_config(sd: Mapping[str, "torch.Tensor"]) -> dict[str, Any]:
    """``SD3Transformer2DModel`` kwargs from a diffusers-named state dict (SD3 medium, SD3.5 medium/large)."""
    inner, in_channels, patch, _ = sd["pos_embed.proj.weight"].shape
    if inner % HEAD_DIM:
        raise ModelLoadError(f"the transformer width {inner} is not a multiple of SD3's head size {HEAD_DIM}")
    layers = _count(sd, r"transformer_blocks\.(\d+)\.")
    positions = int(sd["pos_embed.pos_embed"].shape[1])
    return {
        "sample_size": SAMPLE_SIZE, "patch_size": int(patch), "in_channels": int(in_channels),
        "num_layers": layers, "attention_head_dim": HEAD_DIM, "num_attention_heads": int(inner) // HEAD_DIM,
        "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
        "caption_projection_dim": int(sd["context_embedder.weight"].shape[0]),
        "pooled_projection_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "out_channels": int(sd["proj_out.weight"].shape[0]) // int(patch) ** 2,
        "pos_embed_max_size": math.isqrt(positions),
        "dual_attention_layers": tuple(i for i in range(layers) if f"transformer_blocks.{i}.attn2.to_q.weight" in sd),
        "qk_norm": "rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in sd else None,
    }


_LINEAR = ("norm1.linear", "norm1_context.linear", "context_embedder", "norm_out.linear",
           "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
           "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2")
_CONV = ("pos_embed.proj",)


def _full_size_transformer():
    import diffusers

    return diffusers.SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192)


class SD3Family(FlowFamily):
    """SD3 medium and SD3.5 medium/large (T5 optional)."""

    honoured_settings = frozenset({"clip_skip", "max_token_length", "t5xxl_max_token_length"})

    name = "sd3"
    swap_block_attributes = ("transformer_blocks",)  # training.blocks_to_swap, in running order
    gradient_checkpointing_above_px = 0  # always: 1024 px activations dominate memory (trainer.defaults)
    caches_by_default = True  # T5-XXL resident costs ~9 GiB; cached, it leaves after the captions are encoded
    title = "SD3"
    encoders = (EncoderSpec("text_encoder", "clip_l"), EncoderSpec("text_encoder_2", "clip_g"),
                EncoderSpec("text_encoder_3", "t5xxl", required=False))
    key_styles = {"transformer": TRANSFORMER, "text_encoder": kohya("lora_te1", clip=True),
                  "text_encoder_2": kohya("lora_te2", clip=True), "text_encoder_3": kohya("lora_te3")}
    lora_targets = {"transformer": grow(MMDIT_ATTN, MMDIT_MLP, _LINEAR, _CONV),
                    "text_encoder": CLIP, "text_encoder_2": CLIP, "text_encoder_3": T5}  # CLIP-L, CLIP-G, T5-XXL
    base_model_version = "sd3"
    modelspec_architecture = "stable-diffusion-3-medium"
    modelspec_implementation = "diffusers"
    pipeline_class_name = "StableDiffusion3Pipeline"
    pipeline_class_pattern = r"StableDiffusion3"
    transformer_markers = {"original": ("joint_blocks.0.x_block.attn.qkv.weight",),
                           "diffusers": ("pos_embed.proj.weight", "transformer_blocks.0.attn.add_q_proj.weight")}
    vae_factors = {"scaling_factor": 1.5305, "shift_factor": 0.0609, "sample_size": 1024}
    t5_length = 77  # ComfyUI pads SD3's T5 tokens to 77
    full_size_components = (("transformer", _full_size_transformer), ("text_encoder", full_size.clip_l_projected),
                            ("text_encoder_2", full_size.clip_g), ("text_encoder_3", full_size.t5_xxl),
                            ("vae", full_size.vae(16)))
    full_size_text_tokens = 333  # 77 CLIP + 256 T5 tokens

    def scale_shift_swapped(self, module_name: str, weight_shape: tuple[int, ...]) -> bool:
        """Also the last block's ``norm1_context.linear`` (an ``AdaLayerNormContinuous`` there: 2·dim outputs,
        against 6·dim for the ``AdaLayerNormZero`` of the other blocks)."""
        out_features, in_features = weight_shape
        return super().scale_shift_swapped(module_name, weight_shape) or (
            module_name.endswith("norm1_context.linear") and out_features == 2 * in_features)

    def full_size_forward_inputs(self, resolution: int) -> dict[str, Any]:
        import torch

        h = w = resolution // self.vae_scale_factor
        return {"hidden_states": torch.randn(1, self.latent_channels, h, w),
                "encoder_hidden_states": torch.randn(1, self.full_size_text_tokens, 4096),
                "pooled_projections": torch.randn(1, 2048), "timestep": torch.tensor([500.0])}

    # --- loading hooks ------------------------------------------------------------------------------------------
    def transformer_class(self):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def encoder_class(self, kind: str):
        from transformers import CLIPTextModelWithProjection

        return CLIPTextModelWithProjection if kind == "clip_l" else super().encoder_class(kind)

    def load_clip_file(self, part: Part, kind: str, dtype):
        return load_clip(part, kind, dtype, projection=True, identity_projection=kind == "clip_l")

    def to_diffusers(self, sd):
        return sd3_original_to_diffusers(sd)

    def transformer_config(self, sd):
        return sd3_transformer_config(sd)

    def scheduler_config(self, transformer_config) -> dict[str, Any]:
        return dict(SCHEDULER)

    def text_widths(self, modules: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
        """Pooled input = CLIP-L width + CLIP-G projection; text input ≥ CLIP-L + CLIP-G width and = T5 width."""
        config = modules["transformer"].config
        clip_l, clip_g = modules["clip_l"].config, modules["clip_g"].config
        joint = int(config.joint_attention_dim)
        widths = {"pooled input": (clip_l.hidden_size + clip_g.projection_dim, int(config.pooled_projection_dim)),
                  "text input": (max(joint, clip_l.hidden_size + clip_g.hidden_size), joint)}
        if "t5xxl" in modules:
            widths["T5 input"] = (int(modules["t5xxl"].config.d_model), joint)
        return widths

    def model_extras(self, transformer) -> dict[str, Any]:
        return {"joint_attention_dim": int(transformer.config.joint_attention_dim)}

    # --- training -----------------------------------------------------------------------------------------------
    def encode_text(self, comps: Components, captions: Sequence[str], clip_skip: int = 1,
                    max_token_length: int = WINDOW, t5_length: int | None = None) -> Conditioning:
        """``encoder_hidden_states`` ``[B, 77·windows (+ t5_length), joint_attention_dim]`` and
        ``pooled_projections`` ``[B, CLIP-L width + CLIP-G projection]``."""
        import torch
        import torch.nn.functional as F

        named = components_by_name(comps)
        hidden, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            encoder, tokenizer = named[name]
            check_clip_skip(encoder, clip_skip, extra=1)
            ids = chunked_token_ids(tokenizer, captions, max_token_length)
            states, out = encode_windows(encoder, ids, -(clip_skip + 1), final_norm=False)
            hidden.append(states)
            pooled.append(out.text_embeds.reshape(ids.shape[0], ids.shape[1], -1)[:, 0])  # the first window's
        clip = torch.cat(hidden, dim=-1)
        context = F.pad(clip, (0, int(comps.extras["joint_attention_dim"]) - clip.shape[-1]))  # zeros up to T5 width
        if "text_encoder_3" in named:
            encoder, tokenizer = named["text_encoder_3"]
            ids = t5_token_ids(tokenizer, captions, int(t5_length or comps.extras["t5_length"]))
            context = torch.cat([context, encode_t5(encoder, ids).to(context.dtype)], dim=1)
        return {"encoder_hidden_states": context, "pooled_projections": torch.cat(pooled, dim=-1)}

    def predict(self, comps: Components, noisy_latents: "torch.Tensor", timesteps: "torch.Tensor",
                cond: Conditioning) -> "torch.Tensor":
        """The velocity ``[B, 16, h, w]``; ``timesteps`` are σ·1000 as the scheduler and pipeline use them."""
        device, dtype = noisy_latents.device, unwrap(comps.denoiser).dtype
        return comps.denoiser(hidden_states=noisy_latents.to(dtype), timestep=timesteps.to(device),
                              encoder_hidden_states=cond["encoder_hidden_states"].to(device, dtype),
                              pooled_projections=cond["pooled_projections"].to(device, dtype), return_dict=False)[0]

    # --- sampling -----------------------------------------------------------------------------------------------
    def pipeline(self, comps: Components):
        from diffusers import StableDiffusion3Pipeline

        named = components_by_name(comps)
        t5, t5_tokenizer = named.get("text_encoder_3", (None, None))
        return StableDiffusion3Pipeline(
            transformer=comps.denoiser, scheduler=self.sampling_scheduler(comps), vae=comps.vae,
            text_encoder=named["text_encoder"][0], tokenizer=named["text_encoder"][1],
            text_encoder_2=named["text_encoder_2"][0], tokenizer_2=named["text_encoder_2"][1],
            text_encoder_3=t5, tokenizer_3=t5_tokenizer)

    def sample_conditioning(self, comps: Components, prompt: str, negative_prompt: str, cfg: float
                            ) -> dict[str, "torch.Tensor"]:
        """Prompt (and, with ``cfg`` > 1, negative prompt) embeddings in the transformer's dtype."""
        clip_skip = int(comps.extras.get("clip_skip", 1))
        length = WINDOW * windows_needed(comps.tokenizers[0], [prompt, negative_prompt])
        dtype = unwrap(comps.denoiser).dtype
        pos = self.encode_text(comps, [prompt], clip_skip, length)
        kwargs = {"prompt_embeds": pos["encoder_hidden_states"].to(dtype),
                  "pooled_prompt_embeds": pos["pooled_projections"].to(dtype)}
        if cfg > 1:
            neg = self.encode_text(comps, [negative_prompt], clip_skip, length)
            kwargs.update(negative_prompt_embeds=neg["encoder_hidden_states"].to(dtype),
                          negative_pooled_prompt_embeds=neg["pooled_projections"].to(dtype))
        return kwargs


FAMILY = SD3Family()
