"""The safetensors metadata of an exported LoRA: kohya ``ss_*`` keys A1111/Forge/civitai read, ``modelspec.*``
basics (names from the family: ``base_model_version``, ``modelspec_architecture``, ``modelspec_implementation``)
and Crucible's own ``crucible_*`` keys.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from typing import TYPE_CHECKING, Mapping

from .defaults import resolve_mixed_precision

if TYPE_CHECKING:  # pragma: no cover
    from .config import TrainConfig


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
    if family.base_patches:  # trained on top of other patches (the MODEL path): say so
        meta["crucible_base_patches"] = json.dumps(family.base_patches, sort_keys=True)
    trigger = cfg.datasets[0].captions.trigger_word if cfg.datasets else ""
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    return meta


def _num(value: float) -> str:
    """A number as kohya writes it (``16`` not ``16.0`` for whole numbers, ``0.0001`` otherwise)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
