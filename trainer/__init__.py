"""Crucible trainer: a plain Python package (no ComfyUI imports) that trains LoRAs and full fine-tunes of
diffusion models, exports ComfyUI-loadable checkpoints, and renders checkpoint sweeps.

The names below are its public API: the ComfyUI nodes (``nodes/``) use only these (``from ..trainer import x``;
tests/test_imports.py checks it). Configs, errors, file helpers and callbacks are imported here; everything else is
imported on first use (module ``__getattr__``), so ``import trainer`` stays cheap (no torch, diffusers or peft) and
never fails because an optional package is missing.
"""
from __future__ import annotations

import importlib

from .callbacks import Callbacks, CheckpointInfo, SampleInfo, StepInfo, format_seconds
from .config import (ATTENTION, CROP_ASPECTS, CROP_STYLES, FAMILIES, LOSS_WEIGHTING, MISSING_CAPTION, MIXED_PRECISION,
                     NETWORK_TYPES, OPTIMIZERS, PREDICTION_TYPES, SAVE_PRECISION, SCHEDULERS, TARGET_PRESETS,
                     TIMESTEP_SAMPLING, CaptionConfig, DatasetConfig, ModelConfig, NetworkConfig, OptimConfig,
                     SampleConfig, SaveConfig, TrainConfig, TrainingConfig)
from .config_checks import validate
from .errors import ConfigError, CrucibleError, DatasetError, UnsafePathError, console_safe
from .fileio import ALLOWED_DIRS_ENV, ReadPolicy, check_path_text, ensure_inside, read_policy, safe_name, shown
from .run_paths import RunPaths, run_paths

__version__ = "0.1.0"

# name -> the submodule that defines it, imported when the name is first used (these pull in torch, numpy or PIL)
_LAZY = {
    "train": "loop", "RunResult": "loop",
    "compute_plan": "plan", "StepPlan": "plan",
    "training_source": "validation",
    "scan_dataset": "dataset", "dataset_fingerprint": "dataset",
    "caption_preview": "preview_captions",
    "memory_report": "memory",
    # the MODEL path's estimate (nodes/comfy_memory.py) reuses the parts and the tracing of trainer/memory.py
    "Estimate": "memory", "MemoryOptions": "memory", "OPTIMIZER_STATE_BYTES": "memory",
    "traced_activation_bytes": "memory", "preview_terms": "memory", "attach_network": "network",
    "loss_curve": "plots",
    "forget_frames": "release",
    "write_captioned_images": "tagging",
    "GridStyle": "render", "arrange": "render", "compose_grid": "render", "save_png": "render",
    "SweepItem": "sweep", "plan_sweep": "sweep", "select_checkpoints": "sweep", "read_checkpoint_info": "sweep",
    "recommendation": "sweep",
    "is_tokenizer_dir": "families.tokenizers", "all_families": "families",
    # a family around models a host loaded (nodes/comfy_family.py: ComfyUI's MODEL / CLIP / VAE)
    "ModelFamily": "families", "Components": "families", "hosted_family": "families", "KeyStyle": "lora_keys",
    "TEXT_ENCODER_TARGETS": "lora_targets",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Callbacks", "CheckpointInfo", "SampleInfo", "StepInfo", "format_seconds",
    "ATTENTION", "CROP_ASPECTS", "CROP_STYLES", "FAMILIES", "LOSS_WEIGHTING", "MISSING_CAPTION", "MIXED_PRECISION",
    "NETWORK_TYPES", "OPTIMIZERS", "PREDICTION_TYPES", "SAVE_PRECISION", "SCHEDULERS", "TARGET_PRESETS",
    "TIMESTEP_SAMPLING", "CaptionConfig", "DatasetConfig", "ModelConfig", "NetworkConfig", "OptimConfig",
    "SampleConfig", "SaveConfig", "TrainConfig", "TrainingConfig", "validate",
    "ConfigError", "CrucibleError", "DatasetError", "UnsafePathError", "console_safe",
    "ALLOWED_DIRS_ENV", "ReadPolicy", "check_path_text", "ensure_inside", "read_policy", "safe_name", "shown",
    "RunPaths", "run_paths",
    *_LAZY,
]
