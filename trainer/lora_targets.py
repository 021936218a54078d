"""Which modules each LoRA target preset trains: the shared module-name vocabulary of the architectures (UNets,
MMDiT transformers, CLIP, T5) that each family composes into its ``ModelFamily.lora_targets``.

Every entry is a peft ``target_modules`` item: peft adapts a module when its name equals the entry or ends with
``"." + entry``. The four presets grow one into the next:

* ``attn`` – attention projections,
* ``attn_mlp`` – plus the feed-forward layers (on SD3/Flux also the small final output projection ``proj_out``),
* ``all_linear`` – every ``nn.Linear`` of the component (SD1.5 also its 1×1-conv ``proj_in``/``proj_out``),
* ``all_linear_conv`` – plus every ``nn.Conv2d`` (LoCon).

Every module listed here exports to a key prefix that ComfyUI 0.8.0's LoraLoader maps; ``tests/test_export_keys.py``
checks that on the full-size models; the MODEL path's presets (``nodes/comfy_presets.py``) select the same weights
(``tests/test_comfy_preset_words.py``). Left out on purpose:

* CLIP-G's ``text_projection``: ComfyUI maps it (``lora_te2_text_projection``), but no loader test covers that key
  and training it rarely helps.
* Embedding tables (CLIP token embeddings, T5 ``shared``): ComfyUI patches them only with whole-weight ``.diff`` keys.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .config import TARGET_PRESETS as PRESET_NAMES
from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .families.base import ModelFamily

Targets = tuple[str, ...]


def grow(attn: Targets, mlp: Targets, linear: Targets, conv: Targets = ()) -> dict[str, Targets]:
    """The four nested presets from their four layers of modules."""
    return {
        "attn": attn,
        "attn_mlp": attn + mlp,
        "all_linear": attn + mlp + linear,
        "all_linear_conv": attn + mlp + linear + conv,
    }


# --- UNets (SD1.5, SDXL) -------------------------------------------------------------------------------------------
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")  # attn1 (self) and attn2 (cross)
UNET_MLP = ("ff.net.0.proj", "ff.net.2")
# proj_in/proj_out are nn.Linear in SDXL and 1x1 nn.Conv2d in SD1.5 (a per-pixel linear map; kohya trains them too).
UNET_LINEAR = ("proj_in", "proj_out", "time_emb_proj", "time_embedding.linear_1", "time_embedding.linear_2")
UNET_CONV = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "conv_out")

# --- MMDiT transformers (SD3, Flux) --------------------------------------------------------------------------------
# Image-stream and text-stream (``add_*``) attention, ``attn`` and SD3.5's second self-attention ``attn2`` (MMDiT-X
# blocks; nothing else in these transformers ends so); ComfyUI maps q/k/v onto slices of its fused qkv weights.
MMDIT_ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# The feed-forward layers and the final output projection ``proj_out`` (small: width -> patch channels), which
# SimpleTuner's ``all+ffs`` trains too (the MODEL path's attn_mlp: ComfyUI's ``final_layer.linear``).
MMDIT_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_out")

# --- text encoders -------------------------------------------------------------------------------------------------
CLIP = grow(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
            ("mlp.fc1", "mlp.fc2"), ())
T5 = grow(("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o"),
          ("DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo"), ())  # T5 v1.1: gated-gelu
TEXT_ENCODER_TARGETS = {"clip_l": CLIP, "clip_g": CLIP, "t5xxl": T5}  # by EncoderSpec.kind


def lora_target_modules(family: "str | ModelFamily", component: str, preset: str) -> list[str]:
    """peft ``target_modules`` for one family, component (``unet``, ``transformer``, ``text_encoder`` …) and preset."""
    from .families import get_family

    family = get_family(family)
    components = family.lora_targets
    if component not in components:
        raise ConfigError(f"{family.name} has no trainable component '{component}'; it has: {', '.join(components)}")
    if preset not in PRESET_NAMES:
        raise ConfigError(f"network.target_preset is '{preset}'; choose one of: {', '.join(PRESET_NAMES)}")
    return list(components[component][preset])
