"""Writing checkpoints (ComfyUI-loadable exports) during a run, and loading a LoRA file back into an adapter.

File names carry epoch and step for people (``<run>-e0003-s000120.safetensors``); the step and epoch also live in
the metadata, which is what the sweep reads.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .callbacks import CheckpointInfo
from .fileio import save_safetensors

if TYPE_CHECKING:  # pragma: no cover
    from .config import SaveConfig, TrainConfig
    from .families import Components, ModelFamily
    from .network import Network
    from .validation import ValidationResult

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def checkpoint_name(run_name: str, step: int, epoch: int) -> str:
    return f"{run_name}-e{epoch:04d}-s{step:06d}.safetensors"


def checkpoint_metadata(cfg: "TrainConfig", source, *, run_name: str, step: int, epoch: int,
                        started_at: float | None, loss: float | None,
                        validation: "ValidationResult | None" = None) -> dict[str, str]:
    """The safetensors metadata of one checkpoint: kohya's ``ss_*`` keys for the run's data (``source``), the last
    step's loss as ``crucible_loss`` and ``validation`` (the loss of exactly these weights on the held-out set) as
    ``crucible_val_loss`` and ``crucible_val_loss_t`` (JSON ``{"0.25": …}``), where the sweep reads it."""
    from .lora_metadata import lora_metadata

    meta = lora_metadata(cfg, step=step, epoch=epoch, started_at=started_at or time.time(),
                         num_train_images=len(source.items), tag_frequency=dataset_tag_frequency(source),
                         output_name=run_name)
    if loss is not None:
        meta["crucible_loss"] = f"{loss:.6f}"
    if validation is not None:
        meta["crucible_val_loss"] = f"{validation.loss:.6f}"
        meta["crucible_val_loss_t"] = json.dumps({k: round(v, 6) for k, v in validation.per_point.items()})
    return meta


def write_checkpoint(family: "ModelFamily", comps: "Components", net: "Network", save: "SaveConfig",
                     run_dir: Path, run_name: str, step: int, epoch: int, meta: dict[str, str], *,
                     loss: float | None = None, final: bool = False,
                     validation: "ValidationResult | None" = None,
                     adapter_states: "dict | None" = None, dora_bases: "dict | None" = None) -> CheckpointInfo:
    """Export the current weights of ``net`` (on ``comps``) into ``run_dir`` and return what was written.
    ``adapter_states`` / ``dora_bases``: a sharded adapter run's adapter states / DoRA base weights, gathered whole
    (:mod:`trainer.sharding`).

    A LoRA/LyCORIS run writes its adapters in ComfyUI's key names; a full fine-tune writes the whole denoiser (and,
    with ``save.single_file_dir``, the whole model as one single-file checkpoint)."""
    from .export import export_peft_modules

    dtype = SAVE_DTYPES[save.save_precision]
    path = run_dir / checkpoint_name(run_name, step, epoch)
    if net.is_full:
        tensors = host_copies(family.full_export_state_dict(comps), dtype)
        meta = {k: v for k, v in meta.items() if not k.startswith("ss_network")}
        kind = "full"
    else:
        tensors = export_peft_modules(family, net.modules, dtype=dtype, states=adapter_states,
                                      dora_bases=dora_bases)
        kind = "lora"
    save_safetensors(path, tensors, meta)
    if net.is_full and save.single_file_dir:
        write_single_file(family, comps, Path(save.single_file_dir) / run_name / path.name, meta, dtype)
    return CheckpointInfo(path=path, step=step, epoch=epoch, loss=loss, kind=kind, final=final,
                          val_loss=validation.loss if validation else None,
                          val_loss_t=validation.to_json() if validation else None)


def write_single_file(family: "ModelFamily", comps: "Components", path: Path, meta: dict,
                      dtype: torch.dtype) -> Path:
    """The whole model (denoiser, VAE, text encoders) as one ComfyUI/A1111 single-file checkpoint at ``path``."""
    from .errors import ConfigError

    exporter = getattr(family, "single_file_state_dict", None)
    if exporter is None:
        raise ConfigError(f"save.single_file_dir: {family.name} has no single-file checkpoint layout; "
                          "leave it empty and load the denoiser with Load Diffusion Model")
    return save_safetensors(path, host_copies(exporter(comps), dtype), meta)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu")


def host_copies(tensors: dict[str, torch.Tensor], dtype: torch.dtype, move=to_host) -> dict[str, torch.Tensor]:
    """The export of a whole model in ``dtype``, cast on the host one tensor at a time.

    Casting on the training device (``v.to(dtype)`` there) would allocate a second copy of the model on the GPU at
    every save, out of memory for a model that only just fits; here each tensor is first copied to the CPU as it is
    and cast there, so the device holds nothing extra."""
    out = {}
    for key, value in tensors.items():
        host = move(value)
        out[key] = host.to(dtype) if host.is_floating_point() else host
    return out


def dataset_tag_frequency(source) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: ``{concept: {tag: count}}`` over every dataset of the run."""
    from .captions import tag_frequency

    merged: dict[str, dict[str, int]] = {}
    for index, ds in enumerate(source.datasets):
        pairs = ((item.concept, item.caption_raw) for item in source.items if item.dataset_index == index)
        for concept, tags in tag_frequency(pairs, ds.captions).items():
            bucket = merged.setdefault(concept, {})
            for tag, count in tags.items():
                bucket[tag] = bucket.get(tag, 0) + count
    return merged


def load_lora_file(net: "Network", path: str | Path | None, strength: float = 1.0) -> None:
    """Load a LoRA file (or, with ``path=None``, zeros = the base model) into ``net``'s adapters at ``strength``.

    Strength multiplies each adapter's delta: exactly ComfyUI's ``strength_model`` for LoRA, LoHa and LoKr; for
    DoRA it scales the low-rank part (peft's convention), which differs slightly from ComfyUI's blend.
    """
    from safetensors.torch import load_file

    from .lora_import import load_lora_into

    tensors = load_file(str(path)) if path is not None else None
    for component, module in net.modules.items():
        _enable_adapters(module, tensors is not None)
        if tensors is None:
            continue
        load_lora_into(net.family_name, component, module, tensors)
        _set_strength(module, strength)


def _enable_adapters(module: torch.nn.Module, enabled: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


def _set_strength(module: torch.nn.Module, strength: float) -> None:
    """Scale every adapter layer's delta (peft ``set_scale``: LoRA, DoRA's low-rank part, LoHa, LoKr)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .network import ADAPTER

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer) and hasattr(layer, "set_scale"):
            layer.set_scale(ADAPTER, strength)
