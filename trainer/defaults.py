"""Settings that depend on the hardware or the model family, resolved in one place.

* ``training.mixed_precision = "auto"`` (the default): ``bf16`` on a CUDA GPU that supports it (Ampere and newer)
  and on the CPU; ``fp16`` with accelerate's gradient scaler on older CUDA GPUs (Turing, Volta, Pascal).
* ``training.gradient_checkpointing = None`` (the default, written ``"auto"`` in config files): the family's
  :attr:`~trainer.families.base.ModelFamily.gradient_checkpointing_default` — on for SDXL, SD3 and Flux, whose
  activations at 1024 px are the largest part of a LoRA run's memory; off for SD1.5 (fast, fits anyway).

The training loop, the step plan and the memory estimate all call these functions, and ``run.json`` records what
they chose, so a run never depends on a default it does not show.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """What the precision choice needs to know about the training device."""

    cuda: bool
    bf16: bool  # the device computes in bfloat16 at full speed


def current_device() -> Device:
    import torch

    if torch.cuda.is_available():
        return Device(cuda=True, bf16=bool(torch.cuda.is_bf16_supported()))
    return Device(cuda=False, bf16=True)  # CPU autocast supports bfloat16


def resolve_mixed_precision(requested: str, device: Device | None = None) -> str:
    """``no`` | ``fp16`` | ``bf16`` for ``requested`` (``auto`` resolved for ``device``, default: this machine)."""
    if requested != "auto":
        return requested
    device = device or current_device()
    if device.cuda and not device.bf16:
        return "fp16"  # with a gradient scaler (accelerate); overflow steps are skipped, see trainer.numerics
    return "bf16"


def resolve_gradient_checkpointing(requested: bool | None, family) -> bool:
    """``requested`` when set, else the family default (``family`` is a ModelFamily or its name)."""
    if requested is not None:
        return bool(requested)
    if isinstance(family, str):
        from .families import get_family

        family = get_family(family)
    return bool(family.gradient_checkpointing_default)


def resolved_settings(cfg, device: Device | None = None) -> dict:
    """What ``auto``/unset memory settings became for ``cfg``: recorded in run.json and shown by the plan."""
    tr = cfg.training
    return {"mixed_precision": resolve_mixed_precision(tr.mixed_precision, device),
            "mixed_precision_requested": tr.mixed_precision,
            "gradient_checkpointing": resolve_gradient_checkpointing(tr.gradient_checkpointing, cfg.model.family)}
