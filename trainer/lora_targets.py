"""Which modules each LoRA target preset trains, per model family and component, as data.

Every entry is a peft ``target_modules`` item: peft adapts a module when its name equals the entry or ends with
``"." + entry``. The four presets grow one into the next:

* ``attn`` – attention projections,
* ``attn_mlp`` – plus the feed-forward layers,
* ``all_linear`` – every ``nn.Linear`` of the component (SD1.5 also its 1×1-conv ``proj_in``/``proj_out``),
* ``all_linear_conv`` – plus every ``nn.Conv2d`` (LoCon).

Every module listed here exports to a key prefix that ComfyUI 0.8.0's LoraLoader maps; ``tests/test_export_keys.py``
checks that on the full-size models. Left out on purpose:

* CLIP-G's ``text_projection``: ComfyUI maps it (``lora_te2_text_projection``), but no loader test covers that key
  and training it rarely helps.
* Embedding tables (CLIP token embeddings, T5 ``shared``): ComfyUI patches them only with whole-weight ``.diff`` keys.
"""
from __future__ import annotations

from .config import TARGET_PRESETS as PRESET_NAMES
from .errors import ConfigError

Targets = tuple[str, ...]


def _grow(attn: Targets, mlp: Targets, linear: Targets, conv: Targets = ()) -> dict[str, Targets]:
    """The four nested presets from their four layers of modules."""
    return {
        "attn": attn,
        "attn_mlp": attn + mlp,
        "all_linear": attn + mlp + linear,
        "all_linear_conv": attn + mlp + linear + conv,
    }


# --- UNets (SD1.5, SDXL) -------------------------------------------------------------------------------------------
_UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")  # attn1 (self) and attn2 (cross)
_UNET_MLP = ("ff.net.0.proj", "ff.net.2")
# proj_in/proj_out are nn.Linear in SDXL and 1x1 nn.Conv2d in SD1.5 (a per-pixel linear map; kohya trains them too).
_UNET_LINEAR = ("proj_in", "proj_out", "time_emb_proj", "time_embedding.linear_1", "time_embedding.linear_2")
_SDXL_LINEAR = _UNET_LINEAR + ("add_embedding.linear_1", "add_embedding.linear_2")
_UNET_CONV = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "conv_out")

# --- MMDiT transformers (SD3, Flux) --------------------------------------------------------------------------------
# Image-stream and text-stream (``add_*``) attention; ComfyUI maps q/k/v onto slices of its fused qkv weights.
_MMDIT_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_MMDIT_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
_SD3_LINEAR = ("norm1.linear", "norm1_context.linear", "context_embedder", "norm_out.linear", "proj_out",
               "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
               "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2")
_SD3_CONV = ("pos_embed.proj",)
# Flux single blocks: q/k/v (matched by _MMDIT_ATTN), the MLP input ``proj_mlp`` and ``proj_out``, which projects
# the concatenated attention and MLP outputs. peft matches by name suffix, so ``proj_out`` also picks the small
# final output projection (3072 -> 64); that costs little and ComfyUI maps it too.
_FLUX_MLP = _MMDIT_MLP + ("proj_mlp", "proj_out")
_FLUX_LINEAR = ("norm1.linear", "norm1_context.linear", "norm.linear", "x_embedder", "context_embedder",
                "norm_out.linear",
                "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
                "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
                "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2")

# --- text encoders -------------------------------------------------------------------------------------------------
_CLIP = _grow(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
              ("mlp.fc1", "mlp.fc2"), ())
_T5 = _grow(("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o"),
            ("DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo"), ())  # T5 v1.1: gated-gelu

TARGET_PRESETS: dict[str, dict[str, dict[str, Targets]]] = {
    "sd15": {
        "unet": _grow(_UNET_ATTN, _UNET_MLP, _UNET_LINEAR, _UNET_CONV),
        "text_encoder": _CLIP,  # CLIP-L
    },
    "sdxl": {
        "unet": _grow(_UNET_ATTN, _UNET_MLP, _SDXL_LINEAR, _UNET_CONV),
        "text_encoder": _CLIP,  # CLIP-L
        "text_encoder_2": _CLIP,  # CLIP-G
    },
    "sd3": {
        "transformer": _grow(_MMDIT_ATTN, _MMDIT_MLP, _SD3_LINEAR, _SD3_CONV),
        "text_encoder": _CLIP,  # CLIP-L
        "text_encoder_2": _CLIP,  # CLIP-G
        "text_encoder_3": _T5,  # T5-XXL
    },
    "flux": {
        "transformer": _grow(_MMDIT_ATTN, _FLUX_MLP, _FLUX_LINEAR),  # Flux has no Conv2d
        "text_encoder": _CLIP,  # CLIP-L
        "text_encoder_2": _T5,  # T5-XXL
    },
}


def lora_target_modules(family: str, component: str, preset: str) -> list[str]:
    """peft ``target_modules`` for one family, component (``unet``, ``transformer``, ``text_encoder`` …) and preset."""
    if family not in TARGET_PRESETS:
        raise ConfigError(f"model.family '{family}' has no LoRA targets; choose one of: {', '.join(TARGET_PRESETS)}")
    components = TARGET_PRESETS[family]
    if component not in components:
        raise ConfigError(f"{family} has no trainable component '{component}'; it has: {', '.join(components)}")
    if preset not in PRESET_NAMES:
        raise ConfigError(f"network.target_preset is '{preset}'; choose one of: {', '.join(PRESET_NAMES)}")
    return list(components[component][preset])
