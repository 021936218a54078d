"""Flux.1 dev / schnell: MMDiT + single-stream transformer on packed latents, CLIP-L pooled + T5-XXL, 16-channel VAE.

As ``FluxPipeline`` and ComfyUI's Flux text encoder do it:

* ``encoder_hidden_states`` = T5-XXL last hidden states (``t5_length`` tokens; 256 as ComfyUI pads), with all-zero
  text ids; ``pooled_projections`` = CLIP-L's (unprojected) pooled output of the first 77 tokens. ``clip_skip`` does
  not apply (only the pooled output of the last layer is used).
* Latents ``[B, 16, h, w]`` are packed into 2×2 patches ``[B, h/2·w/2, 64]`` with image ids (0, row, col); the
  transformer gets σ (``timesteps / 1000``) and, on dev, the guidance value ``extras["guidance"]``
  (``training.guidance_scale`` once :meth:`FluxFamily.configure_training` ran; 1.0 before, kohya's default for dev).
* :meth:`FluxFamily.flow_shift` is dev's resolution-dependent shift (``exp(mu)``, ``mu`` from the image sequence
  length as ``FluxPipeline`` computes it), the same as kohya's ``flux_shift``.

Sampling passes ``guidance`` (training previews: ``sample.guidance``) or else ``cfg`` (the sweep) as the embedded
guidance (ComfyUI's *FluxGuidance*, 3.5 for dev; schnell ignores it); Flux has no negative prompt.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .. import full_size
from ..errors import ConfigError, ModelLoadError
from ..lora_keys import TRANSFORMER, kohya
from ..lora_targets import CLIP, MMDIT_ATTN, MMDIT_MLP, T5, grow
from .base import Components, Conditioning, EncoderSpec
from .clip_text import WINDOW, chunked_token_ids
from .flow_common import FlowFamily, components_by_name
from .ldm_configs import _count
from .split_files import DIFFUSION_PREFIX, load_clip
from .t5_text import encode_t5, t5_token_ids
from .weights import Part, unwrap

if TYPE_CHECKING:  # pragma: no cover
    import torch

FLUX1_WIDTH, FLUX1_MLP = 3072, 12288  # what diffusers' single-file converter assumes for single-block linear1
DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
_LINEAR1 = re.compile(r"single_blocks\.(\d+)\.linear1\.(weight|bias)")


def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes (index, row, column) for a head size: Flux.1's (16, 56, 56) for 128, scaled for others."""
    if head_dim % 32:
        raise ModelLoadError(f"a Flux head size of {head_dim} has no known RoPE split; it must be a multiple of 32")
    return head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16


def flux_original_to_diffusers(sd: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """A BFL/ComfyUI-named Flux transformer state dict (``double_blocks.N.img_attn…``) in diffusers names.

    diffusers' converter splits each single block's fused ``linear1`` with Flux.1's sizes (3072 wide, 4× MLP). For
    other widths the split is done here and the converter is handed a stand-in of the size it expects (a meta
    tensor, no memory); its output for those keys is then replaced.
    """
    import torch
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd = {k.removeprefix(DIFFUSION_PREFIX): v for k, v in sd.items()}
    width = int(sd["img_in.weight"].shape[0])
    split: dict[str, torch.Tensor] = {}
    for key in [k for k in sd if _LINEAR1.fullmatch(k)]:
        block, param = _LINEAR1.fullmatch(key).groups()
        tensor = sd[key]
        mlp = int(tensor.shape[0]) - 3 * width
        if (width, mlp) == (FLUX1_WIDTH, FLUX1_MLP):
            continue
        parts = torch.split(tensor, (width, width, width, mlp), dim=0)
        for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts):
            split[f"single_transformer_blocks.{block}.{name}.{param}"] = part
        sd[key] = torch.empty(3 * FLUX1_WIDTH + FLUX1_MLP, *tensor.shape[1:], device="meta")  # shape only
    converted = convert_flux_transformer_checkpoint_to_diffusers(sd)
    converted.update(split)
    return converted


def flux_transformer_config(sd: Mapping[str, "torch.Tensor"]) -> dict[str, Any]:
    """``FluxTransformer2DModel`` kwargs from a diffusers-named state dict (dev: with guidance embedding)."""
    inner, in_channels = sd["x_embedder.weight"].shape
    head_dim = int(sd["transformer_blocks.0.attn.norm_q.weight"].shape[0])
    out_channels = int(sd["proj_out.weight"].shape[0])
    return {
        "patch_size": 1, "in_channels": int(in_channels),
        "out_channels": None if out_channels == in_channels else out_channels,
        "num_layers": _count(sd, r"transformer_blocks\.(\d+)\."),
        "num_single_layers": _count(sd, r"single_transformer_blocks\.(\d+)\."),
        "attention_head_dim": head_dim, "num_attention_heads": int(inner) // head_dim,
        "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in sd,
        "axes_dims_rope": flux_rope_axes(head_dim),
    }


def pack_latents(latents: "torch.Tensor") -> "torch.Tensor":
    """``[B, C, h, w]`` → ``[B, h/2·w/2, 4C]`` (2×2 patches, as ``FluxPipeline`` packs them)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ConfigError(f"Flux needs an even latent size, got {h}x{w}: use image sizes that are multiples of 16 "
                          "(dataset resolution / bucket_reso_steps)")
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: "torch.Tensor", h: int, w: int) -> "torch.Tensor":
    """The inverse of :func:`pack_latents` for a latent size ``h`` × ``w``."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, h, w, 1)  # sizes already in latent pixels: scale factor 1


def image_ids(h: int, w: int, device=None, dtype=None) -> "torch.Tensor":
    """Flux image position ids ``[h/2·w/2, 3]`` = (0, row, column) of each packed patch."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)


# Single blocks: q/k/v (matched by MMDIT_ATTN), the MLP input ``proj_mlp`` and ``proj_out`` (matched by MMDIT_MLP's
# final ``proj_out`` too: peft matches by name suffix), which projects the concatenated attention and MLP outputs.
_MLP = MMDIT_MLP + ("proj_mlp",)
_LINEAR = ("norm1.linear", "norm1_context.linear", "norm.linear", "x_embedder", "context_embedder", "norm_out.linear",
           "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
           "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
           "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2")


def _full_size_transformer():
    import diffusers

    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))


class FluxFamily(FlowFamily):
    """Flux.1 dev (guidance-distilled) and schnell."""

    honoured_settings = frozenset({"guidance_scale", "t5xxl_max_token_length"})
    guidance_distilled = True

    name = "flux"
    swap_block_attributes = ("transformer_blocks", "single_transformer_blocks")  # training.blocks_to_swap, in running order
    gradient_checkpointing_above_px = 0  # always: 1024 px activations dominate memory (trainer.defaults)
    caches_by_default = True  # T5-XXL resident costs ~9 GiB; cached, it leaves after the captions are encoded
    title = "Flux"
    encoders = (EncoderSpec("text_encoder", "clip_l"), EncoderSpec("text_encoder_2", "t5xxl"))
    # Flux's T5 is the pipeline's text_encoder_2; kohya (and ComfyUI) call it lora_te3 like SD3's.
    key_styles = {"transformer": TRANSFORMER, "text_encoder": kohya("lora_te1", clip=True),
                  "text_encoder_2": kohya("lora_te3")}
    lora_targets = {"transformer": grow(MMDIT_ATTN, _MLP, _LINEAR),  # Flux has no Conv2d
                    "text_encoder": CLIP, "text_encoder_2": T5}  # CLIP-L, T5-XXL
    base_model_version = "flux1"
    modelspec_architecture = "flux-1-dev"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    pipeline_class_name = "FluxPipeline"
    pipeline_class_pattern = r"^Flux"
    transformer_markers = {"original": ("double_blocks.0.img_attn.qkv.weight",),
                           "diffusers": ("x_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight")}
    full_size_components = (("transformer", _full_size_transformer), ("text_encoder", full_size.clip_l),
                            ("text_encoder_2", full_size.t5_xxl), ("vae", full_size.vae(16)))
    full_size_text_tokens = 512
    vae_factors = {"scaling_factor": 0.3611, "shift_factor": 0.1159, "sample_size": 1024}
    t5_length = 256  # ComfyUI pads Flux's T5 tokens to 256

    # --- loading hooks ------------------------------------------------------------------------------------------
    def transformer_class(self):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def load_clip_file(self, part: Part, kind: str, dtype):
        return load_clip(part, kind, dtype, projection=False)

    def to_diffusers(self, sd):
        return flux_original_to_diffusers(sd)

    def transformer_config(self, sd):
        return flux_transformer_config(sd)

    def scheduler_config(self, transformer_config) -> dict[str, Any]:
        return dict(DEV_SCHEDULER if transformer_config.get("guidance_embeds") else SCHNELL_SCHEDULER)

    def text_widths(self, modules: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
        """Pooled input = CLIP-L width; text input = T5 width."""
        config = modules["transformer"].config
        return {"pooled input": (int(modules["clip_l"].config.hidden_size), int(config.pooled_projection_dim)),
                "text input": (int(modules["t5xxl"].config.d_model), int(config.joint_attention_dim))}

    def model_extras(self, transformer) -> dict[str, Any]:
        return {"guidance_embeds": bool(transformer.config.guidance_embeds), "guidance": 1.0}

    def configure_training(self, comps: Components, training) -> None:
        """Train dev with ``training.guidance_scale`` as its guidance embedding (and the T5 length as every flow
        family)."""
        super().configure_training(comps, training)
        comps.extras["guidance"] = float(training.guidance_scale)

    def flow_shift(self, comps: Components, latents: "torch.Tensor") -> float | None:
        """dev: ``exp(mu)`` for this latent size (``FluxPipeline``'s ``calculate_shift``); schnell: ``None``."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = comps.noise_scheduler.config
        if not config.get("use_dynamic_shifting"):
            return None
        seq_len = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        mu = calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return math.exp(mu)

    # --- training -----------------------------------------------------------------------------------------------
    def encode_text(self, comps: Components, captions: Sequence[str], clip_skip: int = 1,
                    max_token_length: int = WINDOW, t5_length: int | None = None) -> Conditioning:
        """``encoder_hidden_states`` ``[B, t5_length, T5 width]`` and ``pooled_projections`` ``[B, CLIP-L width]``.

        ``clip_skip`` and ``max_token_length`` do not apply: Flux uses CLIP's pooled output of the first 77 tokens
        only (as ComfyUI and ``FluxPipeline``)."""
        named = components_by_name(comps)
        clip, clip_tokenizer = named["text_encoder"]
        ids = chunked_token_ids(clip_tokenizer, captions, WINDOW)[:, 0]
        pooled = clip(ids.to(unwrap(clip).device)).pooler_output
        t5, t5_tokenizer = named["text_encoder_2"]
        hidden = encode_t5(t5, t5_token_ids(t5_tokenizer, captions, int(t5_length or comps.extras["t5_length"])))
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def predict(self, comps: Components, noisy_latents: "torch.Tensor", timesteps: "torch.Tensor",
                cond: Conditioning) -> "torch.Tensor":
        """The velocity ``[B, 16, h, w]``; ``timesteps`` are σ·1000 (the transformer takes σ)."""
        import torch

        b, _, h, w = noisy_latents.shape
        device, dtype = noisy_latents.device, unwrap(comps.denoiser).dtype
        context = cond["encoder_hidden_states"].to(device, dtype)
        guidance = None
        if comps.extras.get("guidance_embeds"):
            guidance = torch.full((b,), float(comps.extras.get("guidance", 1.0)), device=device)
        out = comps.denoiser(hidden_states=pack_latents(noisy_latents.to(dtype)), timestep=timesteps.to(device) / 1000,
                             guidance=guidance, pooled_projections=cond["pooled_projections"].to(device, dtype),
                             encoder_hidden_states=context,
                             txt_ids=torch.zeros(context.shape[1], 3, device=device, dtype=dtype),
                             img_ids=image_ids(h, w, device, dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)

    # --- sampling -----------------------------------------------------------------------------------------------
    def pipeline(self, comps: Components):
        from diffusers import FluxPipeline

        named = components_by_name(comps)
        return FluxPipeline(scheduler=self.sampling_scheduler(comps), vae=comps.vae,
                            text_encoder=named["text_encoder"][0], tokenizer=named["text_encoder"][1],
                            text_encoder_2=named["text_encoder_2"][0], tokenizer_2=named["text_encoder_2"][1],
                            transformer=comps.denoiser)

    def sample_conditioning(self, comps: Components, prompt: str, negative_prompt: str, cfg: float
                            ) -> dict[str, "torch.Tensor"]:
        """Prompt embeddings in the transformer's dtype (Flux takes no negative prompt; its guidance is not part of
        the prompt's conditioning)."""
        dtype = unwrap(comps.denoiser).dtype
        pos = self.encode_text(comps, [prompt])
        return {"prompt_embeds": pos["encoder_hidden_states"].to(dtype),
                "pooled_prompt_embeds": pos["pooled_projections"].to(dtype)}

    def pipeline_latents(self, latents: "torch.Tensor", height: int, width: int) -> "torch.Tensor":
        """``FluxPipeline`` returns packed latents."""
        return unpack_latents(latents, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def full_size_forward_inputs(self, resolution: int) -> dict[str, Any]:
        """Packed 2×2 patches of the latents; σ as the timestep; dev's guidance."""
        import torch

        h = w = resolution // self.vae_scale_factor
        n, tokens = (h // 2) * (w // 2), self.full_size_text_tokens
        return {"hidden_states": torch.randn(1, n, 4 * self.latent_channels),
                "encoder_hidden_states": torch.randn(1, tokens, 4096), "pooled_projections": torch.randn(1, 768),
                "timestep": torch.tensor([500.0]) / 1000, "img_ids": torch.zeros(n, 3),
                "txt_ids": torch.zeros(tokens, 3), "guidance": torch.tensor([3.5])}


FAMILY = FluxFamily()
