"""Memory presets (issue 16): what ``default``, ``low`` and ``lowest`` switch on for each family, in one place.

The benchmark (``benchmarks/bench_memory.py``), the estimate (:func:`trainer.memory.estimate_case`) and the
documentation read this table. A preset names config fields, not their sections: :func:`option_path` finds the
section that holds a field (a preset naming a field no section has is a ValueError: every option exists).

=============  ===================================================================================================
preset         switches
=============  ===================================================================================================
default        the config defaults (``auto`` precision, the family's gradient checkpointing and caches:
               trainer.defaults)
low            + gradient checkpointing, latent and text caches (the VAE and text encoders leave the device);
               Flux also stores its frozen transformer (and T5) in fp8 (``fp8_base``); the SD3 full fine-tune trains
               in bf16 (``full_bf16``)
lowest         low + fp8 base weights and AdamW 8-bit for SDXL; Flux swaps 16 blocks (``blocks_to_swap``, CUDA) with
               AdamW 8-bit (kohya's 12 GB recipe); SD3: a fused backward pass with Adafactor (kohya's recipe)
=============  ===================================================================================================

Budgets are the issue's, in GiB at 1024 px and batch 1 on a GPU (CPU rows run smaller and say so).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

LOW = {"gradient_checkpointing": True, "cache_latents": True, "cache_text_embeddings": True}
CUDA_ONLY = {"blocks_to_swap": "block swap streams blocks from pinned host memory to a CUDA device; on the CPU the "
                               "host is the device, nothing to swap"}
CPU_SUBSTITUTES = {("optimizer", "adamw8bit"): "adamw"}  # bitsandbytes' 8-bit states need CUDA


@dataclass(frozen=True)
class Case:
    family: str
    kind: str  # lora | full
    preset: str  # default | low | lowest
    budget_gib: float
    settings: dict = field(default_factory=dict)  # config field name -> value

    @property
    def name(self) -> str:
        return f"{self.family}-{self.kind}-{self.preset}"


def _case(name: str, budget_gib: float, settings: dict) -> Case:
    family, kind, preset = name.split("-")
    return Case(family, kind, preset, budget_gib, settings)


# the benchmark cases, by case name (``<family>-<kind>-<preset>``), with their budgets
CASES = [_case(*row) for row in [
    ("sd15-lora-default", 4.0, {}),
    ("sd15-lora-low", 4.0, LOW),
    ("sdxl-lora-default", 10.0, {}),
    ("sdxl-lora-low", 8.0, LOW),
    ("sdxl-lora-lowest", 6.0, {**LOW, "fp8_base": True, "optimizer": "adamw8bit"}),
    ("flux-lora-default", 24.0, {}),
    ("flux-lora-low", 16.0, {**LOW, "fp8_base": True}),
    ("flux-lora-lowest", 12.0, {**LOW, "fp8_base": True, "blocks_to_swap": 16, "optimizer": "adamw8bit"}),
    ("sd3-full-low", 24.0, {**LOW, "full_bf16": True}),
    ("sd3-full-lowest", 16.0, {**LOW, "full_bf16": True, "fused_backward_pass": True, "optimizer": "adafactor"}),
]]
CASES_BY_NAME = {c.name: c for c in CASES}


def get_case(name_or_key) -> Case:
    name = name_or_key if isinstance(name_or_key, str) else "-".join(name_or_key)
    try:
        return CASES_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown memory case {name!r}; known: {', '.join(CASES_BY_NAME)}") from None


def option_path(name: str) -> str | None:
    """``section.field`` of the config field ``name`` (e.g. ``training.cache_latents``), or None when this
    version of the config has no such field."""
    from .config import TrainConfig

    for section in dataclasses.fields(TrainConfig):
        kind = section.type if isinstance(section.type, type) else None
        if kind is None:  # postponed annotations: take the class from a default instance
            default = section.default_factory() if section.default_factory is not dataclasses.MISSING else None
            kind = type(default) if dataclasses.is_dataclass(default) else None
        if kind is not None and name in {f.name for f in dataclasses.fields(kind)}:
            return f"{section.name}.{name}"
    return None


@dataclass(frozen=True)
class Resolved:
    """A case made concrete for one device: the config overrides, what was substituted, why it cannot run here."""

    case: Case
    overrides: dict  # "section" -> {field: value}
    settings: dict  # field -> value on this device (after substitutions; what the estimate uses)
    substituted: list  # "optimizer adamw for adamw8bit (…)"
    cuda_only: list  # reasons it cannot run on this device

    @property
    def skip_reason(self) -> str | None:
        if self.cuda_only:
            return "CUDA only: " + "; ".join(self.cuda_only)
        return None


def resolve_case(case: Case, device: str) -> Resolved:
    """The config overrides of ``case`` on ``device`` (``cuda`` | ``cpu``)."""
    overrides: dict = {}
    settings, substituted, cuda_only = {}, [], []
    for name, value in case.settings.items():
        if device != "cuda" and (name, value) in CPU_SUBSTITUTES:
            new = CPU_SUBSTITUTES[(name, value)]
            substituted.append(f"{name} {new} for {value} (CUDA only)")
            value = new
        if device != "cuda" and name in CUDA_ONLY and value:
            cuda_only.append(f"{name}: {CUDA_ONLY[name]}")
        settings[name] = value
        path = option_path(name)
        if path is None:
            raise ValueError(f"memory case {case.name} sets {name!r}, which no config section has")
        section, key = path.split(".")
        overrides.setdefault(section, {})[key] = value
    return Resolved(case, overrides, settings, substituted, cuda_only)
