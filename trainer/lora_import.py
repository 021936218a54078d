"""Read LoRA files (ComfyUI / kohya / PEFT names, LoRA, DoRA, LoHa, LoKr) back into peft adapters: resume from a
LoRA, and the round-trip tests. The inverse of :mod:`trainer.export`: each module's scale is converted from
ComfyUI's reading of the file (``comfy/weight_adapter``) to the adapter's peft scaling.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

from .errors import CrucibleError
from .export import (LOHA_PARAMS, LOKR_PARAMS, PEFT_MODEL_PREFIX, adapter_layers, layer_kind, lokr_rank, lora_delta,
                     row_norms)
from .lora_keys import KeyStyle, is_scale_shift_swapped, key_style, swap_halves

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn

    from .families.base import ModelFamily


# LoRA down/up suffix pairs read back from files (ComfyUI reads these and a few more).
_FILE_DOWN_UP = (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight"),
                 ("lora.down.weight", "lora.up.weight"))


_FILE_SUFFIXES = tuple(s for pair in _FILE_DOWN_UP for s in pair) + ("alpha", "dora_scale") + LOHA_PARAMS + LOKR_PARAMS


def import_lora(family: "str | ModelFamily", component: str, tensors: Mapping[str, "Tensor"], module: "nn.Module", *,
                adapter_name: str = "default") -> tuple[dict[str, "Tensor"], list[str]]:
    """Convert one component's keys of a LoRA file into a peft state dict for ``module``'s adapter.

    The inverse of :func:`export_lora`: names are matched against ``module``'s own adapter layers (so the
    ``text_model.`` level is added or dropped as the model needs), and each module's scale is converted from
    ComfyUI's reading of the file to the adapter's peft scaling. Returns ``(peft_state, untouched)``, where
    ``untouched`` lists the adapter's modules the file has no weights for.
    """
    from .families import get_family

    family = get_family(family)
    style = key_style(family, component)
    layers = adapter_layers(module, adapter_name)
    names = _names_by_prefix(style, layers)
    file_modules = _group_file(style, tensors, family, component)
    unknown = sorted(set(file_modules) - set(names))
    if unknown:
        raise CrucibleError(f"LoRA file: {len(unknown)} '{component}' module(s) such as '{unknown[0]}' are not "
                            "trained by this run's adapter; use the network type and target preset the file was "
                            "trained with")
    state: dict[str, Tensor] = {}
    for prefix, parts in file_modules.items():
        name = names[prefix]
        params = _import_module(parts, layers[name], name=name, family=family, adapter_name=adapter_name)
        state.update({f"{name}.{param}": value for param, value in params.items()})
    untouched = sorted(names[p] for p in set(names) - set(file_modules))
    return state, untouched


def load_lora_into(family: "str | ModelFamily", component: str, module: "nn.Module", tensors: Mapping[str, "Tensor"], *,
                   adapter_name: str = "default") -> list[str]:
    """Load a LoRA file's weights for ``component`` into ``module``'s (already injected) peft adapter.

    Returns the adapter modules the file does not cover (they keep their current weights).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state, untouched = import_lora(family, component, tensors, module, adapter_name=adapter_name)
    expected = get_peft_model_state_dict(module, adapter_name=adapter_name, save_embedding_layers=False)
    prefix = PEFT_MODEL_PREFIX if any(k.startswith(PEFT_MODEL_PREFIX) for k in expected) else ""
    state = {prefix + k: v for k, v in state.items()}
    for key, value in state.items():
        if key not in expected:
            raise CrucibleError(f"LoRA file: '{key}' has no matching parameter in the '{component}' adapter; use the "
                                "network type the file was trained with")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CrucibleError(f"LoRA file: '{key}' has shape {tuple(value.shape)} but the '{component}' adapter "
                                f"expects {tuple(expected[key].shape)}; set network_dim (and conv_dim) to the file's rank")
    result = set_peft_model_state_dict(module, state, adapter_name=adapter_name)
    if result.unexpected_keys:  # pragma: no cover - the checks above should make this impossible
        raise CrucibleError(f"LoRA file: peft did not load '{result.unexpected_keys[0]}' into '{component}'")
    return untouched


def _names_by_prefix(style: KeyStyle, layers: Iterable[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    for name in layers:
        prefix = style.module_key(name)
        if prefix in names:
            raise CrucibleError(f"modules '{names[prefix]}' and '{name}' share the LoRA key prefix '{prefix}'")
        names[prefix] = name
    return names


def _group_file(style: KeyStyle, tensors: Mapping[str, "Tensor"], family: "ModelFamily",
                component: str) -> dict[str, dict[str, "Tensor"]]:
    """``{prefix: {suffix: tensor}}`` for the file keys that belong to ``style``'s component."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if not style.owns(key):
            continue
        suffix = next((s for s in _FILE_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise CrucibleError(f"LoRA file: key '{key}' is not a LoRA, DoRA, LoHa or LoKr weight Crucible can load "
                                f"into the {family.name} '{component}'")
        modules.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
    return modules


def _import_module(parts: dict[str, "Tensor"], layer: "nn.Module", *, name: str, family: "ModelFamily",
                   adapter_name: str) -> dict[str, "Tensor"]:
    """peft parameters of one module from its file tensors (inverse of :func:`_export_module`)."""
    kind = layer_kind(layer, adapter_name)
    file_kind = _file_kind(parts, name)
    if file_kind != kind.replace("dora", "lora"):
        raise CrucibleError(f"LoRA file: module '{name}' holds a {file_kind} adapter but this run trains {kind}; set "
                            "network_type to match the file")
    alpha = float(parts["alpha"].item()) if "alpha" in parts else None
    ratio = _comfy_scale(file_kind, parts, alpha) / layer.scaling[adapter_name]
    if file_kind == "lora":
        down_key, up_key = next(pair for pair in _FILE_DOWN_UP if pair[0] in parts)
        down, up = parts[down_key].float(), parts[up_key].float()
        params = {"lora_A.weight": down, "lora_B.weight": up * ratio}
        if kind == "dora":
            params["lora_magnitude_vector"] = _magnitude(parts.get("dora_scale"), down, up,
                                                         _comfy_scale("lora", parts, alpha), layer, name, family,
                                                         adapter_name)
        elif "dora_scale" in parts:
            raise CrucibleError(f"LoRA file: module '{name}' is DoRA but this run trains plain LoRA; set network_type "
                                "to dora")
        return params
    params = {p: t.float() for p, t in parts.items() if p != "alpha"}
    factor = "hada_w1_a" if file_kind == "loha" else ("lokr_w1" if "lokr_w1" in params else "lokr_w1_a")
    params[factor] = params[factor] * ratio
    return params


def _file_kind(parts: Mapping[str, "Tensor"], name: str) -> str:
    if any(pair[0] in parts and pair[1] in parts for pair in _FILE_DOWN_UP):
        return "lora"
    if all(p in parts for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return "loha"
    if any(p in parts for p in LOKR_PARAMS):
        return "lokr"
    raise CrucibleError(f"LoRA file: module '{name}' has no complete LoRA, LoHa or LoKr weights ({sorted(parts)})")


def _comfy_scale(kind: str, parts: Mapping[str, "Tensor"], alpha: float | None) -> float:
    """The factor ComfyUI 0.8.0 multiplies this module's product by (``comfy/weight_adapter``)."""
    if alpha is None:
        return 1.0
    if kind == "lora":
        down_key = next(pair[0] for pair in _FILE_DOWN_UP if pair[0] in parts)
        return alpha / parts[down_key].shape[0]
    if kind == "loha":
        return alpha / parts["hada_w1_b"].shape[0]
    rank = lokr_rank(parts)
    return 1.0 if rank is None else alpha / rank


def _magnitude(scale: "Tensor | None", down: "Tensor", up: "Tensor", comfy_scale: float, layer: "nn.Module",
               name: str, family: "ModelFamily", adapter_name: str) -> "Tensor":
    """peft's DoRA magnitude from a file's ``dora_scale`` (inverse of :func:`dora_scale`).

    Without ``dora_scale`` the file is a plain LoRA; the magnitude ``‖W + ΔW‖_row`` then reproduces it exactly.
    """
    weight = layer.get_base_layer().weight.detach().float()
    norm_new = row_norms(weight + comfy_scale * lora_delta(down, up, weight.shape))
    if scale is None:
        magnitude = norm_new
    else:
        scale = scale.float()
        if is_scale_shift_swapped(family, name, tuple(weight.shape)):
            scale = swap_halves(scale)
        magnitude = scale.reshape(weight.shape[0]) * norm_new / row_norms(weight)
    target_shape = layer.lora_magnitude_vector[adapter_name].weight.shape
    return magnitude.reshape(target_shape)
