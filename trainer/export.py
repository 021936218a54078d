"""Export trained adapters as LoRA files that ComfyUI 0.8.0's stock LoraLoader loads with no key left over. Reading
them back is :mod:`trainer.lora_import`; their metadata :mod:`trainer.lora_metadata`. The family (an object or its
name) gives the key names (``ModelFamily.key_styles``) and which DoRA scales ComfyUI stores swapped.

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

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from .errors import CrucibleError
from .lora_keys import KeyStyle, is_scale_shift_swapped, key_style, swap_halves

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor, nn

    from .families.base import ModelFamily

# peft parameter names (the part after the module name) and the adapter kind they belong to.
LORA_PARAMS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_KIND_OF_PARAM = {**dict.fromkeys(LORA_PARAMS, "lora"), **dict.fromkeys(LOHA_PARAMS, "loha"),
                  **dict.fromkeys(LOKR_PARAMS, "lokr")}
PEFT_MODEL_PREFIX = "base_model.model."


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
                        dtype: "torch.dtype | None" = None,
                        states: "Mapping[str, Mapping[str, Tensor]] | None" = None,
                        dora_bases: "Mapping[str, Mapping[str, Tensor]] | None" = None) -> dict[str, "Tensor"]:
    """:func:`export_lora` straight from peft-wrapped modules (state, config and DoRA base weights read from them).
    ``states`` / ``dora_bases``: each module's adapter state / DoRA base weights gathered already (a sharded run,
    whose modules hold shards: :mod:`trainer.sharding`)."""
    from peft import get_peft_model_state_dict

    given, states, configs, bases = states, {}, {}, {}
    for component, module in modules.items():
        states[component] = dict(given[component]) if given is not None else \
            get_peft_model_state_dict(module, adapter_name=adapter_name, save_embedding_layers=False)
        configs[component] = module.peft_config[adapter_name]
        bases[component] = dict(dora_bases[component]) if dora_bases is not None else \
            {name: layer.get_base_layer().weight for name, layer in adapter_layers(module, adapter_name).items()
             if layer_kind(layer, adapter_name) == "dora"}
    return export_lora(family, states, configs=configs, base_weights=bases, dtype=dtype)


def _group_peft_state(state: Mapping[str, "Tensor"], component: str) -> dict[str, dict[str, "Tensor"]]:
    """``{module_name: {peft_param: tensor}}`` from a flat peft state dict."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix(PEFT_MODEL_PREFIX)
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
    factor_rank = lokr_rank(out)
    if factor_rank is None:  # two full Kronecker factors: ComfyUI's scale is 1.0, so fold peft's into w1
        out["lokr_w1"] = out["lokr_w1"] * scaling
    return {p: _cast(t, dtype) for p, t in out.items()}, factor_rank


def dora_scale(magnitude: "Tensor", down: "Tensor", up: "Tensor", scaling: float, weight: "Tensor") -> "Tensor":
    """ComfyUI ``dora_scale`` reproducing peft's DoRA: ``m · ‖W‖_row / ‖W + scaling · up @ down‖_row``.

    Rows are output channels (norms over every other dim, so convolutions work too). The result has shape
    ``(out, 1, …)`` with as many dims as ``weight``; ``(out, 1)`` for a linear layer.
    """
    w = weight.detach().float().to(down.device)
    norm_base, norm_new = row_norms(w), row_norms(w + scaling * lora_delta(down, up, w.shape))
    scale = magnitude.detach().float().reshape(w.shape[0]) * norm_base / norm_new
    return scale.reshape(w.shape[0], *([1] * (w.dim() - 1)))


def lora_delta(down: "Tensor", up: "Tensor", shape) -> "Tensor":
    """``up @ down`` in the weight's shape (convolutions flattened over everything but the output channel)."""
    return (up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1)).reshape(shape)


def row_norms(weight: "Tensor") -> "Tensor":
    """L2 norm of each output row (over every other dim)."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1)


def lokr_rank(params: Mapping[str, "Tensor"]) -> int | None:
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


# --- peft layers -------------------------------------------------------------------------------------------------------

def adapter_layers(module: "nn.Module", adapter_name: str = "default") -> dict[str, "nn.Module"]:
    """The peft layers of ``module`` holding ``adapter_name``, by module name (``base_model.model.`` removed)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name.removeprefix(PEFT_MODEL_PREFIX): layer for name, layer in module.named_modules()
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




