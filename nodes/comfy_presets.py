"""What each target preset trains on the MODEL path, where Crucible knows the architecture only through ComfyUI's
module names (used by ``nodes/comfy_family.py``; never imports ComfyUI).

The presets mean what they mean on the diffusers path (``trainer/lora_targets.py``), and on SD1.5, SDXL, SD3/SD3.5
and Flux they select the same weights (``tests/test_comfy_preset_words.py`` pairs both sides through ComfyUI's key
map on the full-size models):

* ``attn`` – attention projections: ``to_q``/``to_k``/``to_v``/``to_out`` (UNets), fused ``qkv`` and ``proj`` of
  ``attn`` / ``attn2`` / ``img_attn`` / ``txt_attn`` (SD3's MMDiT, SD3.5's second self-attention, Flux), Wan's
  ``self_attn.o`` …; in a single-stream block (``single_blocks``: Flux, Chroma, HunyuanVideo) ``linear1``, which
  holds q/k/v (fused with the MLP input: a LoRA on it adapts both).
* ``attn_mlp`` – plus the feed-forward layers (``ff``, ``mlp``, ``ffn`` …) and a single-stream block's ``linear2``
  (the attention output fused with the MLP output), as the diffusers Flux preset trains ``proj_mlp``/``proj_out``,
  and a DiT's final output projection (``final_layer.linear`` of SD3 and Flux: the diffusers presets' ``proj_out``;
  a top-level ``proj_out``: Qwen-Image, LTXV).
* ``all_linear`` – every Linear, and the 1×1 Conv ``proj_in``/``proj_out`` of SD1.5's transformers.
* ``all_linear_conv`` – every Linear and Conv (LoCon).

Not attention or MLP, whatever their words: a block's output projection ``proj_out`` (SDXL's transformers: the
diffusers preset puts it in ``all_linear``), an embedder's MLP (SD3's ``t_embedder.mlp``: the diffusers preset puts
``time_text_embed`` in ``all_linear``) and the final layer's modulation. Only modules whose weight ComfyUI maps for
LoRAs count.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..trainer import CrucibleError
from .comfy_keys import PREFIX

ATTN_WORDS = ("attn", "attention", "to_q", "to_k", "to_v", "to_out", "qkv")
MLP_WORDS = ("ff", "mlp", "feed_forward", "ffn")
SINGLE_STREAM = "single_blocks"  # Flux-style blocks: linear1 = q/k/v + MLP in, linear2 = attention + MLP out
SINGLE_ATTN, SINGLE_MLP = "linear1", "linear2"
# a DiT's final output projection (SD3, Flux: diffusers' proj_out, which their attn_mlp trains; Qwen-Image, LTXV)
FINAL_LAYERS = ("final_layer.linear", "proj_out")  # the latter only at the top level (SDXL's blocks have one too)
POINTWISE_LINEAR = ("proj_in", "proj_out")  # SD1.5's transformers project in and out with 1×1 convolutions


def words(name: str) -> list[str]:
    """A module name's words: its dotted parts and the parts of underscore-joined ones (``img_attn`` → ``attn``)."""
    return [p for w in name.split(".") for p in (w, *w.split("_")[1:])]


def layer_kind(name: str) -> str | None:
    """``attn``, ``mlp`` or None for a Linear module, by its name."""
    parts = name.split(".")
    if any(p.endswith("embedder") for p in parts):
        return None
    if name.removeprefix(PREFIX) in FINAL_LAYERS:
        return "mlp"
    if SINGLE_STREAM in parts and parts[-1] in (SINGLE_ATTN, SINGLE_MLP):
        return "attn" if parts[-1] == SINGLE_ATTN else "mlp"
    found = words(name)
    if any(w.startswith(ATTN_WORDS) for w in found):
        return "attn"
    if any(w.startswith(MLP_WORDS) for w in found):
        return "mlp"
    return None


def preset_modules(modules: Mapping[str, torch.nn.Module], preset: str, mapped: set[str]) -> list[str]:
    """Module names a target preset trains (only those whose weight ComfyUI maps for LoRAs): see the module doc."""
    chosen = []
    for name, module in modules.items():
        if name + ".weight" not in mapped:
            continue
        linear = isinstance(module, torch.nn.Linear)
        conv = isinstance(module, torch.nn.Conv2d)
        pointwise = conv and tuple(module.kernel_size) == (1, 1) and name.split(".")[-1] in POINTWISE_LINEAR
        kind = layer_kind(name) if linear else None
        wanted = {"attn": kind == "attn", "attn_mlp": kind is not None, "all_linear": linear or pointwise,
                  "all_linear_conv": linear or conv}.get(preset)
        if wanted is None:
            raise CrucibleError(f"network.target_preset '{preset}' is unknown")
        if wanted:
            chosen.append(name)
    return chosen
