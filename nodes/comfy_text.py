"""Text-encoder training on the MODEL path: which of a ComfyUI CLIP's text encoders train, on which modules, and
under which LoRA keys (``network.train_text_encoder`` with comfy_clip; used by ``nodes/comfy_family.py``).

ComfyUI's CLIP object holds its text encoders as the children of ``clip.cond_stage_model``: ``clip_l`` for SD1.5;
``clip_l`` and ``clip_g`` for SDXL; ``clip_l``, ``clip_g`` and ``t5xxl`` for SD3; ``clip_l`` and ``t5xxl`` for Flux; an
LLM (Gemma, Qwen, Llama …) for Lumina 2, Qwen-Image, HiDream and the like. As kohya's ``train_network.py`` does when
``--network_train_unet_only`` is off, the **CLIP text towers** train (CLIP-L, CLIP-G, CLIP-H: every child whose
weights ComfyUI's LoRA key map names under ``<child>.transformer.text_model.encoder.layers.``), on the same
modules the diffusers families train (``trainer.TEXT_ENCODER_TARGETS``, which preset trains what). T5 and LLM
encoders stay frozen (kohya trains T5 only with ``--train_t5xxl``; an LLM's LoRA layout has no loader convention
to follow); a CLIP with no CLIP tower at all is refused by name.

LoRA keys come from ComfyUI's own ``comfy.lora.model_lora_keys_clip`` (the caller passes it in; this module never
imports ComfyUI): the kohya name when ComfyUI maps it to the module's weight, ``lora_te_…`` where the CLIP has
one text encoder (SD1.5) and ``lora_te1_…`` / ``lora_te2_…`` where it has several (SDXL, SD3, Flux), else the
generic ``text_encoders.<weight name>`` ComfyUI maps for every weight.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..trainer import CrucibleError

CLIP_TOWER = ".transformer.text_model.encoder.layers."  # a CLIP text tower's layers, in ComfyUI's weight names
CLIP_LEVEL = ".transformer."  # kohya names start after it: lora_te1_text_model_encoder_layers_0_…
GENERIC = "text_encoders."  # ComfyUI's generic LoRA key of every text-encoder weight


@dataclass(frozen=True)
class TextTower:
    """One CLIP text tower that trains: the loop's component name (``text_encoder``, ``text_encoder_2``, in the
    CLIP's order, as diffusers names SDXL's CLIP-L and CLIP-G), its child name in ``cond_stage_model`` and module."""

    component: str
    child: str
    module: torch.nn.Module


def text_towers(cond_stage_model: torch.nn.Module, key_map: Mapping[str, str]) -> tuple[list[TextTower], list[str]]:
    """(the CLIP text towers that train, the names of the other text encoders, which stay frozen). A CLIP whose
    encoders include no CLIP tower is refused by name."""
    mapped = set(key_map.values())
    children = [(name, m) for name, m in cond_stage_model.named_children() if isinstance(m, torch.nn.Module)]
    towers, frozen = [], []
    for name, module in children:
        if any(w.startswith(name + CLIP_TOWER) for w in mapped):
            component = "text_encoder" if not towers else f"text_encoder_{len(towers) + 1}"
            towers.append(TextTower(component, name, module))
        else:
            frozen.append(name)
    if not towers:
        raise CrucibleError(f"Crucible Network Options: train_text_encoder: this CLIP's text encoders "
                            f"({', '.join(frozen) or 'none'}) are no CLIP text models; the MODEL path trains CLIP-L/G/H "
                            "text encoders only (T5 and LLM encoders stay frozen). Turn train_text_encoder off")
    return towers, frozen


def tower_modules(tower: TextTower, mapped: set[str]) -> dict[str, torch.nn.Module]:
    """The tower's Linear layers whose weights ComfyUI maps for LoRAs, by their name in ``cond_stage_model``
    (``clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj``: the name peft sees inside the wrapper)."""
    return {f"{tower.child}.{n}": m for n, m in tower.module.named_modules()
            if n and isinstance(m, torch.nn.Linear) and f"{tower.child}.{n}.weight" in mapped}


def tower_targets(modules: Mapping[str, torch.nn.Module], suffixes: Sequence[str]) -> list[str]:
    """The modules a target preset trains: those whose name ends with one of the preset's CLIP module names."""
    return [name for name in modules if any(name.endswith("." + s) for s in suffixes)]


def clip_key_names(module_names: Sequence[str], key_map: Mapping[str, str], numbered: bool) -> dict[str, str]:
    """The LoRA key prefix of each module, from ComfyUI's CLIP key map (LoRA key → weight name). The kohya name is
    preferred when ComfyUI maps it to this module's weight: ``lora_te_…`` for a CLIP with one text encoder,
    ``lora_teN_…`` (``numbered``) for several; else ComfyUI's generic ``text_encoders.<name>``. A module ComfyUI
    does not map raises: its key would never load."""
    from .comfy_keys import preferred_keys  # the key-map inversion the diffusion model's keys use too

    def kohya(name: str, keys: set[str]) -> str | None:
        rest = name.split(CLIP_LEVEL, 1)[-1].replace(".", "_")
        found = sorted((k for k in keys if re.fullmatch(r"lora_te\d?_" + re.escape(rest), k)),
                       key=lambda k: (k.startswith("lora_te_") == numbered, k))
        return found[0] if found else None

    return preferred_keys(module_names, key_map, kohya, lambda name: GENERIC + name, "CLIP")
