"""Export trained adapters as LoRA files that ComfyUI 0.8.0's stock LoraLoader loads with no key left over, and
read such files back into peft adapters (resume from a LoRA, tests).

Input is what peft gives: ``get_peft_model_state_dict(module)`` per component (``unet``/``transformer``,
``text_encoder``, ``text_encoder_2``, ``text_encoder_3``). Output is a flat ``{key: tensor}`` dict for
:func:`trainer.fileio.save_safetensors`, named as :mod:`trainer.lora_keys` describes.

Scale rules (see ``shared/comfyui/lora_formats.md`` and ``comfy/weight_adapter/*.py``):

* LoRA: ComfyUI applies ``(alpha / rank) · up @ down`` and uses 1.0 when ``.alpha`` is missing. Every module gets
  ``.alpha = peft scaling · rank`` – ``lora_alpha`` normally, per-module from ``alpha_pattern``/``rank_pattern``,
  ``lora_alpha · √r`` with rsLoRA.
* DoRA: ComfyUI computes ``W' = dora_scale · (W + ΔW) / ‖W‖_row`` with the norm of the *base* weight; peft divides by
  ``‖W + ΔW‖_row``. The exporter writes ``dora_scale = m · ‖W‖_row / ‖W + ΔW‖_row`` (shape ``(out, 1)``, or
  ``(out, 1, 1, 1)`` for convolutions), which needs the base weights.
* LoHa: ComfyUI scales ``(w1a @ w1b) * (w2a @ w2b)`` by ``alpha / rank`` like peft.
* LoKr: ComfyUI scales by ``alpha / rank`` only when a factor is low-rank (``lokr_w1_b``/``lokr_w2_b``); with two
  full Kronecker factors it uses 1.0, so the exporter folds peft's scale into ``lokr_w1``.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .defaults import resolve_mixed_precision
from .errors import CrucibleError
from .lora_keys import KeyStyle, is_scale_shift_swapped, key_style, swap_halves

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor, nn

    from .config import TrainConfig
    from .families.base import ModelFamily

# peft parameter names (the part after the module name) and the adapter kind they belong to.
_LORA_PARAMS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
_LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_KIND_OF_PARAM = {**dict.fromkeys(_LORA_PARAMS, "lora"), **dict.fromkeys(_LOHA_PARAMS, "loha"),
                  **dict.fromkeys(_LOKR_PARAMS, "lokr")}
# LoRA down/up suffix pairs read back from files (ComfyUI reads these and a few more).
_FILE_DOWN_UP = (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight"),
                 ("lora.down.weight", "lora.up.weight"))
_FILE_SUFFIXES = tuple(s for pair in _FILE_DOWN_UP for s in pair) + ("alpha", "dora_scale") + _LOHA_PARAMS + _LOKR_PARAMS
_PEFT_MODEL_PREFIX = "base_model.model."


# --- rank and alpha -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterSpec:
    """Rank and alpha of one component's adapter, resolved per module the way peft does it."""

    rank: int
    alpha: float
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    @classmethod
    def of(cls, config: Any) -> "AdapterSpec":
        """From a peft ``LoraConfig``/``LoHaConfig``/``LoKrConfig``, an ``AdapterSpec`` or a tuple
        ``(rank, alpha[, rank_pattern, alpha_pattern])``."""
        if isinstance(config, AdapterSpec):
            return config
        if isinstance(config, tuple):
            return cls(*config)
        alpha = getattr(config, "lora_alpha", None)
        if alpha is None:
            alpha = getattr(config, "alpha")
        return cls(rank=int(config.r), alpha=float(alpha), rank_pattern=dict(config.rank_pattern or {}),
                   alpha_pattern=dict(config.alpha_pattern or {}), use_rslora=bool(getattr(config, "use_rslora", False)))

    def module_rank(self, module_name: str) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module_name), self.rank)

    def scaling(self, module_name: str) -> float:
        """peft's scale for the module: ``alpha / r`` (``alpha / √r`` with rsLoRA)."""
        rank = self.module_rank(module_name)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_name), self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: Mapping[str, Any], module_name: str) -> str:
    if not patterns:
        return module_name
    from peft.utils.other import get_pattern_key

    return get_pattern_key(list(patterns), module_name)


# --- export ---------------------------------------------------------------------------------------------------------

def export_lora(family: "str | ModelFamily", states: Mapping[str, Mapping[str, "Tensor"]], *, configs: Mapping[str, Any],
                base_weights: Mapping[str, Mapping[str, "Tensor"]] | None = None,
                dtype: "torch.dtype | None" = None) -> dict[str, "Tensor"]:
    """The tensors of a LoRA file for ComfyUI's LoraLoader.

    ``states`` maps a component name to its ``peft.get_peft_model_state_dict``; ``configs`` maps it to the peft
    config (or :class:`AdapterSpec`). ``base_weights[component][module_name]`` is the frozen weight of each DoRA
    module (only DoRA needs it). ``dtype`` casts the weights (``.alpha`` stays float32).
    """
    from .families import get_family

    family = get_family(family)
    tensors: dict[str, Tensor] = {}
    prefixes: set[str] = set()
    for component, state in states.items():
        style = key_style(family, component)
        if component not in configs:
            raise CrucibleError(f"LoRA export: no adapter config given for component '{component}'")
        spec = AdapterSpec.of(configs[component])
        bases = (base_weights or {}).get(component, {})
        for name, params in _group_peft_state(state, component).items():
            prefix = style.module_key(name)
            if prefix in prefixes:
                raise CrucibleError(f"LoRA export: two modules of '{component}' map to the key prefix '{prefix}'")
            prefixes.add(prefix)
            module = _export_module(params, name=name, style=style, spec=spec, family=family,
                                    base_weight=bases.get(name), dtype=dtype, component=component)
            tensors.update({f"{prefix}.{suffix}": value for suffix, value in module.items()})
    return dict(sorted(tensors.items()))


def export_peft_modules(family: "str | ModelFamily", modules: Mapping[str, "nn.Module"], *, adapter_name: str = "default",
                        dtype: "torch.dtype | None" = None) -> dict[str, "Tensor"]:
    """:func:`export_lora` straight from peft-wrapped modules (state, config and DoRA base weights read from them)."""
    from peft import get_peft_model_state_dict

    states, configs, bases = {}, {}, {}
    for component, module in modules.items():
        states[component] = get_peft_model_state_dict(module, adapter_name=adapter_name, save_embedding_layers=False)
        configs[component] = module.peft_config[adapter_name]
        bases[component] = {name: layer.get_base_layer().weight
                            for name, layer in adapter_layers(module, adapter_name).items()
                            if layer_kind(layer, adapter_name) == "dora"}
    return export_lora(family, states, configs=configs, base_weights=bases, dtype=dtype)


def _group_peft_state(state: Mapping[str, "Tensor"], component: str) -> dict[str, dict[str, "Tensor"]]:
    """``{module_name: {peft_param: tensor}}`` from a flat peft state dict."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix(_PEFT_MODEL_PREFIX)
        param = next((p for p in _KIND_OF_PARAM if key.endswith("." + p)), None)
        if param is None:
            raise CrucibleError(f"LoRA export: '{component}' key '{key}' is no LoRA, DoRA, LoHa or LoKr weight that "
                                "ComfyUI's LoraLoader reads (LoRA biases, embeddings and modules_to_save cannot be "
                                "exported); train without them")
        modules.setdefault(key[: -len(param) - 1], {})[param] = value.detach()
    for name, params in modules.items():
        kinds = {_KIND_OF_PARAM[p] for p in params}
        if len(kinds) > 1:
            raise CrucibleError(f"LoRA export: module '{name}' of '{component}' mixes adapter types {sorted(kinds)}")
    return modules


def _export_module(params: dict[str, "Tensor"], *, name: str, style: KeyStyle, spec: AdapterSpec, family: "ModelFamily",
                   base_weight: "Tensor | None", dtype: "torch.dtype | None", component: str) -> dict[str, "Tensor"]:
    """File tensors (suffix → tensor, including ``alpha``) of one module."""
    import torch

    kind = _KIND_OF_PARAM[next(iter(params))]
    where = f"module '{name}' of '{component}'"
    scaling, rank = spec.scaling(name), spec.module_rank(name)
    if kind == "lora":
        out, factor_rank = _export_lora(params, style, scaling, base_weight, family, name, dtype, where)
    elif kind == "loha":
        out, factor_rank = {p: _cast(t, dtype) for p, t in params.items()}, int(params["hada_w1_b"].shape[0])
    else:
        out, factor_rank = _export_lokr(params, scaling, dtype)
    if factor_rank is None:  # ComfyUI applies scale 1 (the scale is folded into the weights); alpha/rank = 1 anyway
        file_alpha = float(rank)
    else:
        _check_rank(factor_rank, rank, where)
        file_alpha = scaling * rank
    out["alpha"] = torch.tensor(float(file_alpha), dtype=torch.float32)
    return out


def _export_lora(params: dict[str, "Tensor"], style: KeyStyle, scaling: float, base_weight: "Tensor | None",
                 family: "ModelFamily", name: str, dtype: "torch.dtype | None", where: str) -> tuple[dict, int]:
    """LoRA (and DoRA) tensors of one module and the rank ComfyUI divides alpha by."""
    if "lora_A.weight" not in params or "lora_B.weight" not in params:
        raise CrucibleError(f"LoRA export: {where} lacks lora_A or lora_B")
    down, up = _cast(params["lora_A.weight"], dtype), _cast(params["lora_B.weight"], dtype)
    out = {style.down_up[0]: down, style.down_up[1]: up}
    if "lora_magnitude_vector" in params:
        if base_weight is None:
            raise CrucibleError(f"LoRA export: DoRA {where} needs its base weight (pass base_weights)")
        scale = dora_scale(params["lora_magnitude_vector"], down, up, scaling, base_weight)
        swap = is_scale_shift_swapped(family, name, tuple(base_weight.shape))
        out["dora_scale"] = _cast(swap_halves(scale) if swap else scale, dtype)
    return out, int(down.shape[0])


def _export_lokr(params: dict[str, "Tensor"], scaling: float, dtype: "torch.dtype | None") -> tuple[dict, int | None]:
    """LoKr tensors of one module and the rank ComfyUI divides alpha by (None: it applies no scale)."""
    import torch

    out = {p: t.detach().float() for p, t in params.items()}
    if "lokr_t2" in out:
        # ComfyUI 0.8.0 cannot apply lokr_t2: torch.kron rejects the non-contiguous einsum result, so ComfyUI logs
        # an error and skips the module. Write the dense 4-D lokr_w2 instead (the same weight).
        out["lokr_w2"] = torch.einsum("i j k l, i p, j r -> p r k l",
                                      out.pop("lokr_t2"), out.pop("lokr_w2_a"), out.pop("lokr_w2_b"))
    factor_rank = _lokr_rank(out)
    if factor_rank is None:  # two full Kronecker factors: ComfyUI's scale is 1.0, so fold peft's into w1
        out["lokr_w1"] = out["lokr_w1"] * scaling
    return {p: _cast(t, dtype) for p, t in out.items()}, factor_rank


def dora_scale(magnitude: "Tensor", down: "Tensor", up: "Tensor", scaling: float, weight: "Tensor") -> "Tensor":
    """ComfyUI ``dora_scale`` reproducing peft's DoRA: ``m · ‖W‖_row / ‖W + scaling · up @ down‖_row``.

    Rows are output channels (norms over every other dim, so convolutions work too). The result has shape
    ``(out, 1, …)`` with as many dims as ``weight``; ``(out, 1)`` for a linear layer.
    """
    w = weight.detach().float().to(down.device)
    norm_base, norm_new = _row_norms(w), _row_norms(w + scaling * _lora_delta(down, up, w.shape))
    scale = magnitude.detach().float().reshape(w.shape[0]) * norm_base / norm_new
    return scale.reshape(w.shape[0], *([1] * (w.dim() - 1)))


def _lora_delta(down: "Tensor", up: "Tensor", shape) -> "Tensor":
    """``up @ down`` in the weight's shape (convolutions flattened over everything but the output channel)."""
    return (up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1)).reshape(shape)


def _row_norms(weight: "Tensor") -> "Tensor":
    """L2 norm of each output row (over every other dim)."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1)


def _lokr_rank(params: Mapping[str, "Tensor"]) -> int | None:
    """The rank ComfyUI divides alpha by for LoKr: that of ``w2_b`` or else ``w1_b``; None with two full factors."""
    for key in ("lokr_w2_b", "lokr_w1_b"):
        if key in params:
            return int(params[key].shape[0])
    return None


def _check_rank(actual: int, expected: int, where: str) -> None:
    if actual != expected:
        raise CrucibleError(f"LoRA export: {where} has rank {actual} but its adapter config says {expected}; "
                            "pass the config the adapter was built with")


def _cast(tensor: "Tensor", dtype: "torch.dtype | None") -> "Tensor":
    return tensor.detach() if dtype is None else tensor.detach().to(dtype)


# --- import (resume from a LoRA file) --------------------------------------------------------------------------------

def adapter_layers(module: "nn.Module", adapter_name: str = "default") -> dict[str, "nn.Module"]:
    """The peft layers of ``module`` holding ``adapter_name``, by module name (``base_model.model.`` removed)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name.removeprefix(_PEFT_MODEL_PREFIX): layer for name, layer in module.named_modules()
            if isinstance(layer, BaseTunerLayer) and adapter_name in getattr(layer, "scaling", {})}


def layer_kind(layer: "nn.Module", adapter_name: str = "default") -> str:
    """``lora``, ``dora``, ``loha`` or ``lokr`` for a peft layer."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    if isinstance(layer, LoraLayer):
        return "dora" if layer.use_dora.get(adapter_name, False) else "lora"
    if isinstance(layer, LoHaLayer):
        return "loha"
    if isinstance(layer, LoKrLayer):
        return "lokr"
    raise CrucibleError(f"peft layer type {type(layer).__name__} cannot be exported to ComfyUI")


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
    prefix = _PEFT_MODEL_PREFIX if any(k.startswith(_PEFT_MODEL_PREFIX) for k in expected) else ""
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
    if any(p in parts for p in _LOKR_PARAMS):
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
    rank = _lokr_rank(parts)
    return 1.0 if rank is None else alpha / rank


def _magnitude(scale: "Tensor | None", down: "Tensor", up: "Tensor", comfy_scale: float, layer: "nn.Module",
               name: str, family: "ModelFamily", adapter_name: str) -> "Tensor":
    """peft's DoRA magnitude from a file's ``dora_scale`` (inverse of :func:`dora_scale`).

    Without ``dora_scale`` the file is a plain LoRA; the magnitude ``‖W + ΔW‖_row`` then reproduces it exactly.
    """
    weight = layer.get_base_layer().weight.detach().float()
    norm_new = _row_norms(weight + comfy_scale * _lora_delta(down, up, weight.shape))
    if scale is None:
        magnitude = norm_new
    else:
        scale = scale.float()
        if is_scale_shift_swapped(family, name, tuple(weight.shape)):
            scale = swap_halves(scale)
        magnitude = scale.reshape(weight.shape[0]) * norm_new / _row_norms(weight)
    target_shape = layer.lora_magnitude_vector[adapter_name].weight.shape
    return magnitude.reshape(target_shape)


# --- metadata --------------------------------------------------------------------------------------------------------

def lora_metadata(cfg: "TrainConfig", *, step: int, epoch: int, started_at: float | None = None,
                  num_train_images: int = 0, tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
                  output_name: str | None = None, title: str | None = None) -> dict[str, str]:
    """safetensors metadata (all values strings): kohya ``ss_*`` keys A1111/Forge/civitai read, ``modelspec.*``
    basics and Crucible's own ``crucible_config``/``crucible_step``/``crucible_epoch``.

    ``tag_frequency`` is ``{dataset folder: {tag: count}}``; ``started_at`` a Unix time (default: now).
    """
    from . import __version__
    from .families import get_family

    family, net, optim = get_family(cfg.model.family), cfg.network, cfg.optim
    started_at = time.time() if started_at is None else started_at
    name = output_name or cfg.save.run_name
    resolution = cfg.datasets[0].resolution if cfg.datasets else 0
    algo = {"loha": "loha", "lokr": "lokr", "dora": "lora"}.get(net.network_type)
    network_args: dict[str, str] = {}
    if algo:
        network_args["algo"] = algo
    if net.network_type == "dora":
        network_args["dora_wd"] = "True"
    if net.target_preset == "all_linear_conv":
        network_args["conv_dim"] = str(net.conv_dim or net.network_dim)
        network_args["conv_alpha"] = str(net.conv_alpha or net.network_alpha)
    meta = {
        "ss_network_module": "lycoris.kohya" if algo else "networks.lora",
        "ss_network_dim": str(net.network_dim),
        "ss_network_alpha": _num(net.network_alpha),
        "ss_base_model_version": family.base_model_version,
        "ss_v2": "False",
        "ss_sd_model_name": os.path.basename(cfg.model.path.rstrip("/\\")),
        "ss_output_name": name,
        "ss_training_started_at": repr(float(started_at)),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_num_epochs": str(cfg.training.epochs),
        "ss_max_train_steps": str(cfg.training.max_train_steps),
        "ss_tag_frequency": json.dumps({k: dict(v) for k, v in (tag_frequency or {}).items()}, sort_keys=True),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(num_train_images),
        "ss_learning_rate": _num(optim.learning_rate),
        "ss_unet_lr": _num(optim.unet_lr or optim.learning_rate),
        "ss_text_encoder_lr": _num(optim.text_encoder_lr or optim.learning_rate),
        "ss_lr_scheduler": optim.lr_scheduler,
        "ss_optimizer": optim.optimizer,
        "ss_batch_size_per_device": str(cfg.training.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.training.gradient_accumulation_steps),
        "ss_mixed_precision": resolve_mixed_precision(cfg.training.mixed_precision),
        "ss_seed": str(cfg.training.seed),
        "ss_clip_skip": str(cfg.model.clip_skip),
        "ss_min_snr_gamma": _num(cfg.training.min_snr_gamma),
        "ss_noise_offset": _num(cfg.training.noise_offset),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": title or name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(started_at), tz=datetime.timezone.utc).isoformat(),
        "crucible_version": __version__,
        "crucible_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "crucible_step": str(step),
        "crucible_epoch": str(epoch),
    }
    if network_args:
        meta["ss_network_args"] = json.dumps(network_args, sort_keys=True)
    trigger = cfg.datasets[0].captions.trigger_word if cfg.datasets else ""
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    return meta


def _num(value: float) -> str:
    """A number as kohya writes it (``16`` not ``16.0`` for whole numbers, ``0.0001`` otherwise)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
