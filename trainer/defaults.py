"""Settings that depend on the hardware or the model family, resolved in one place.

* ``training.mixed_precision = "auto"`` (the default): ``bf16`` on a CUDA GPU that supports it (Ampere and newer)
  and on the CPU; ``fp16`` with accelerate's gradient scaler on older CUDA GPUs (Turing, Volta, Pascal).
* ``training.gradient_checkpointing = None`` (the default, written ``"auto"`` in config files): on when the run's
  largest training resolution is above the family's
  :attr:`~trainer.families.base.ModelFamily.gradient_checkpointing_above_px` — always for SDXL, SD3 and Flux, whose
  activations at 1024 px are the largest part of a LoRA run's memory; above 512 px for SD1.5 (at its native 512 px
  a LoRA fits in 4 GiB without it and runs faster; at 1024 px its activations alone take 3.2 GiB).
* ``training.cache_latents`` / ``cache_text_embeddings = None`` (``"auto"``): the family's
  :attr:`~trainer.families.base.ModelFamily.caches_by_default` — on for SD3 and Flux, whose frozen T5-XXL would
  otherwise stay resident (~9 GiB in bf16): the caches fill before step 1 and the encoders leave the device. Where
  the run cannot use a cache, ``auto`` is off, never an error: latents with random augmentation (``flip_aug``,
  ``color_aug``, ``crop_style`` random: the pixels change every epoch), text embeddings while a text encoder trains.
  Caption shuffle and dropout keep working with the text cache (``caption_variants``). An explicit ``true`` that
  cannot work is refused as before (:class:`trainer.cache.LatentCache`).

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


def resolve_gradient_checkpointing(requested: bool | None, family, resolution: int = 1024) -> bool:
    """``requested`` when set, else the family default at the run's largest training ``resolution`` (``family`` is a
    ModelFamily or its name)."""
    if requested is not None:
        return bool(requested)
    above = _family(family).gradient_checkpointing_above_px
    return not above or resolution > above


def resolve_caches(requested_latents: bool | None, requested_text: bool | None, family, *,
                   random_augmentation: bool = False, trains_text_encoder: bool = False) -> dict:
    """``{"cache_latents": …, "cache_text_embeddings": …}``: each request when set, else the family default where the
    run allows the cache (see the module docstring)."""
    default = bool(_family(family).caches_by_default)
    return {"cache_latents": bool(requested_latents) if requested_latents is not None
            else default and not random_augmentation,
            "cache_text_embeddings": bool(requested_text) if requested_text is not None
            else default and not trains_text_encoder}


def training_resolution(cfg) -> int:
    """The run's largest training resolution: the side of the square with its largest image area (buckets keep
    their area within ``resolution²``, however long their sides, :mod:`trainer.buckets`); 1024 without datasets."""
    return max(d.resolution for d in cfg.datasets) if cfg.datasets else 1024


def _family(family):
    if isinstance(family, str):
        from .families import get_family

        return get_family(family)
    return family


def resolved_settings(cfg, device: Device | None = None) -> dict:
    """What ``auto``/unset memory settings became for ``cfg``: recorded in run.json and shown by the plan."""
    from .dataset.source import has_random_augmentation

    tr = cfg.training
    return {"mixed_precision": resolve_mixed_precision(tr.mixed_precision, device),
            "mixed_precision_requested": tr.mixed_precision,
            "gradient_checkpointing": resolve_gradient_checkpointing(tr.gradient_checkpointing, cfg.model.family,
                                                                     training_resolution(cfg)),
            **resolve_caches(tr.cache_latents, tr.cache_text_embeddings, cfg.model.family,
                             random_augmentation=has_random_augmentation(cfg.datasets),
                             trains_text_encoder=cfg.network.train_text_encoder)}
