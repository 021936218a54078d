"""LoRA key names on the MODEL path, from ComfyUI's own key maps (``comfy.lora.model_lora_keys_unet`` /
``model_lora_keys_clip``: LoRA key prefix → the weight it patches), so the stock LoraLoader loads every key a run
writes by construction. Used by ``nodes/comfy_family.py`` (the diffusion model) and ``nodes/comfy_text.py`` (the CLIP
text towers); never imports ComfyUI.

For each trained module the kohya name is preferred when ComfyUI maps it to the module's weight (what kohya, A1111
and civitai files use), else ComfyUI's generic name of the weight; a module ComfyUI maps no key for is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from ..trainer import CrucibleError, KeyStyle

PREFIX = "diffusion_model."  # ComfyUI's state-dict prefix of the diffusion model inside BaseModel


@dataclass(frozen=True)
class ComfyKeyStyle(KeyStyle):
    """LoRA key prefixes taken from ComfyUI's key map of the loaded model (module name → prefix)."""

    names: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)

    def module_key(self, module_name: str) -> str:
        key = self.names.get(module_name)
        if key is None:
            raise CrucibleError(f"LoRA export: ComfyUI has no LoRA key for module '{module_name}' of this model")
        return key

    def owns(self, key: str) -> bool:
        return any(key.startswith(prefix + ".") for prefix in self.names.values())


def keys_by_weight(key_map: Mapping[str, object]) -> dict[str, set[str]]:
    """ComfyUI's key map inverted: weight name → the LoRA key prefixes that patch that whole weight (keys onto a
    slice of a fused weight, or through a function, are left out)."""
    by_weight: dict[str, set[str]] = {}
    for key, weight in key_map.items():
        if isinstance(weight, str):
            by_weight.setdefault(weight, set()).add(key)
    return by_weight


def preferred_keys(module_names: Sequence[str], key_map: Mapping[str, object],
                   kohya: Callable[[str, set[str]], str | None], generic: Callable[[str], str],
                   what: str) -> dict[str, str]:
    """The LoRA key prefix of each module (named as in ComfyUI's state dict, without ``.weight``):
    ``kohya(name, keys)`` picks the kohya name among the keys ComfyUI maps to the module's weight (None: none of
    them), else ``generic(name)`` if ComfyUI maps it. A module with neither raises: its key would never load."""
    by_weight = keys_by_weight(key_map)
    names = {}
    for name in module_names:
        keys = by_weight.get(name + ".weight", set())
        chosen = kohya(name, keys) or (generic(name) if generic(name) in keys else None)
        if chosen is None:
            raise CrucibleError(f"ComfyUI's LoRA key map for this {what} has no key for '{name}': a LoRA trained on it "
                                "would not load; choose another network.target_preset")
        names[name] = chosen
    return names


def lora_key_names(module_names: Sequence[str], key_map: Mapping[str, object]) -> dict[str, str]:
    """The diffusion model's LoRA key prefixes (modules named ``diffusion_model.x.y``): the kohya ``lora_unet_x_y``
    when ComfyUI maps it to the module's weight, else the generic ``diffusion_model.x.y`` (mapped for every weight)."""
    def kohya(name: str, keys: set[str]) -> str | None:
        key = "lora_unet_" + name.removeprefix(PREFIX).replace(".", "_")
        return key if key in keys else None

    return preferred_keys(module_names, key_map, kohya, lambda name: name, "model")
