"""Runs whose trained weights are sharded over the processes (accelerate's FSDP2: torch ``fully_shard``).

``accelerator.prepare()`` replaces every parameter of the trained module with a ``DTensor`` that holds this rank's
shard, in place. Everything that reads whole weights is then a collective that every rank must join, in the same
order: a forward pass (validation, preview samples), the full state dict of a checkpoint, the optimizer state of a
resumable state. This module holds those collectives; the trainer calls them on every rank and lets rank 0 write.

Every network type is sharded: a full fine-tune, or the frozen base with its peft adapters (LoRA, DoRA, LoHa, LoKr)
in the same FSDP units; an export gathers the adapters alone, and DoRA's base weights too
(:func:`dora_base_weights`). What a sharded run refuses (each named, before a model loads): training a text encoder
beside the denoiser (the recipe shards one trained module), ``fp8_base`` (fp8 storage is not sharded; an adapter on
an fp8 base often fits one card: data parallelism) and ``full_bf16`` (FSDP2 keeps fp32 master weights).
``blocks_to_swap`` and ``fused_backward_pass`` are refused for every multi-process run (:mod:`trainer.memory_options`).
The EMA is sharded like the weights (:mod:`trainer.sharded_ema`). Rank 0 alone reads the denoiser's weights
(:func:`rank0_loading`).
"""
from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterable

import torch

from .errors import ConfigError, CrucibleError

if TYPE_CHECKING:  # pragma: no cover
    from .config import TrainConfig

RAM_EFFICIENT_ENV = "FSDP_CPU_RAM_EFFICIENT_LOADING"  # accelerate's launcher sets it; transformers reads it
OPTIMIZER_BY_NAME = "names"  # state.pt's "optimizer_keys" for a full optimizer state keyed by parameter names


def shards_weights(acc) -> bool:
    """Whether ``accelerator.prepare()`` will shard the trained module (FSDP)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


@contextlib.contextmanager
def rank0_loading(acc):
    """The context a sharded run loads its model in: rank 0 reads the weights; every other rank builds the
    denoiser's shapes on the meta device and never holds it whole — from a model folder's ``config.json``, or from a
    single file's header (a ComfyUI checkpoint or diffusion-model file, fp16/bf16/fp8 alike: none of its denoiser
    tensors is read). ``prepare()`` then shards the empty module and broadcasts each tensor from rank 0, which keeps
    only its shard (accelerate's ``cpu_ram_efficient_loading``, switched on here whatever the config file says).

    The text encoders and VAE are not sharded, so every rank loads them whole (each then encodes its share of the
    caches, :mod:`trainer.cache_sharing`, and releases them): the config file's
    ``fsdp_cpu_ram_efficient_loading: true`` (environment ``FSDP_CPU_RAM_EFFICIENT_LOADING``) has transformers 4.x
    build its models empty on ranks > 0, so it is held off while loading."""
    from .families.weights import denoiser_shapes_only

    acc.state.fsdp_plugin.cpu_ram_efficient_loading = True
    saved = os.environ.get(RAM_EFFICIENT_ENV)
    os.environ[RAM_EFFICIENT_ENV] = "false"
    try:
        with denoiser_shapes_only(not acc.is_main_process):
            yield
    finally:
        if saved is None:
            os.environ.pop(RAM_EFFICIENT_ENV, None)
        else:
            os.environ[RAM_EFFICIENT_ENV] = saved


def check_sharded_run(cfg: "TrainConfig", fsdp2: bool = True) -> None:
    """The settings a sharded run cannot honour, refused before any model loads. ``fsdp2``: the accelerate config
    asks for FSDP version 2 (version 1 wraps the module in flat parameters, which this module does not gather)."""
    if not fsdp2:
        raise ConfigError("the accelerate config asks for FSDP version 1; Crucible shards with FSDP2: set "
                          "fsdp_version: 2 (docs/accelerate/fsdp2_full_finetune.yaml)")
    net, tr = cfg.network, cfg.training
    why = {
        "model.fp8_base": (cfg.model.fp8_base,
                           "is on: FSDP2 does not shard fp8-stored layers. An fp8 base is half the bf16 one "
                           "(Flux.1-dev: ~11 GiB) and often fits one card whole; then train the adapter with data "
                           "parallelism instead: accelerate launch --multi_gpu --num_processes N -m trainer train "
                           "<run file>; or turn fp8_base off and let FSDP2 shard the bf16 base"),
        "network.train_text_encoder": (net.train_text_encoder,
                                       "is on: a sharded run trains the denoiser only; turn it off"),
        "training.full_bf16": (tr.full_bf16, "is on: FSDP2 keeps fp32 master weights and computes in bf16 through "
                                             "mixed_precision; turn it off"),
    }
    for field, (refused, reason) in why.items():
        if refused:
            raise ConfigError(f"{field} {reason} (the accelerate config shards the weights with FSDP; "
                              "see docs/multi_gpu.md)")


def is_sharded(modules: Iterable[torch.nn.Module]) -> bool:
    """Whether any parameter of ``modules`` is a shard (``DTensor``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for m in modules for p in m.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank calls it), or ``tensor`` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state dict in host memory on rank 0 ({} on the others). Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def full_optimizer_state(module: torch.nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter name, on rank 0 ({} on the others). Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, _inner(optimizer), options=_options(cpu_offload=True))


def load_full_state(module: torch.nn.Module, optimizer, network: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any]) -> None:
    """Each rank takes its shards of a whole saved state (every rank has read the same file). ``network``: the whole
    module, or its adapters alone (a LoRA run: the frozen base stays as loaded); checked against the module here."""
    own = dict(module.named_parameters())
    trained = {n for n, p in own.items() if p.requires_grad}
    if not trained <= set(network) or not set(network) <= set(module.state_dict()):
        odd = sorted((trained - set(network)) or (set(network) - set(module.state_dict())))[0]
        raise CrucibleError(f"the training state does not match this run's network ('{odd}'); resume it with the "
                            "network settings it was saved with")
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(module, network, options=_options(strict=False))
    set_optimizer_state_dict(module, _inner(optimizer), optimizer_state, options=_options())


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer


class GatheredWeights:
    """A stand-in for a sharded module where an export reads its weights: ``state_dict()`` returns the gathered
    whole state (``dataclasses.replace(comps, denoiser=GatheredWeights(state))``)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._state)


def trained_state(module: torch.nn.Module, adapters_only: bool) -> dict[str, torch.Tensor]:
    """The trained weights of a sharded module, whole, on rank 0 (every rank calls it): the whole module, or its
    adapter parameters alone (module names, e.g. ``…to_q.lora_A.default.weight``) without the frozen base."""
    if not adapters_only:
        return full_state_dict(module)
    rank0 = torch.distributed.get_rank() == 0
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            tensor = full_tensor(p.detach()).cpu()  # a collective, one tensor at a time
            if rank0:
                out[name] = tensor
    return out


def adapter_export_states(modules: dict[str, torch.nn.Module], adapter_name: str) -> dict[str, dict]:
    """Each sharded module's peft adapter state (``get_peft_model_state_dict`` keys), whole, on rank 0 ({} per
    module elsewhere): what a LoRA export reads. Every rank calls it."""
    from peft import get_peft_model_state_dict

    rank0 = torch.distributed.get_rank() == 0
    states = {}
    for comp, module in modules.items():
        state = get_peft_model_state_dict(module, adapter_name=adapter_name, save_embedding_layers=False)
        states[comp] = {}
        for key, value in state.items():
            tensor = full_tensor(value.detach()).cpu()
            if rank0:
                states[comp][key] = tensor
    return states


def dora_base_weights(modules: dict[str, torch.nn.Module], adapter_name: str) -> dict[str, dict]:
    """The base weight of each DoRA layer (module name -> tensor), whole, on rank 0 ({} per module elsewhere): a
    DoRA export's ``dora_scale`` divides by the row norms of base + update, which a shard does not hold. Gathered one
    layer at a time (a collective: every rank calls it), kept in its stored dtype; {} per module without DoRA."""
    from .export import adapter_layers, layer_kind

    rank0 = torch.distributed.get_rank() == 0
    bases = {}
    for comp, module in modules.items():
        bases[comp] = {}
        for name, layer in adapter_layers(module, adapter_name).items():
            if layer_kind(layer, adapter_name) == "dora":
                tensor = full_tensor(layer.get_base_layer().weight.detach()).cpu()
                if rank0:
                    bases[comp][name] = tensor
    return bases


def training_state(trainer) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """The network, optimizer and EMA parts of a resumable state, whole, on rank 0. Every rank calls it."""
    (name, module), = trainer.net.modules.items()
    ema = trainer.ema.gathered_state() if trainer.ema is not None else {}
    network = {name: trained_state(module, adapters_only=not trainer.net.is_full)}
    return network, full_optimizer_state(module, trainer.optimizer), ema


def load_training_state(trainer, payload: dict[str, Any], folder) -> None:
    """Put a saved state's weights and optimizer state into the (possibly sharded) run."""
    by_name = payload.get("optimizer_keys") == OPTIMIZER_BY_NAME
    if trainer.deepspeed:  # a state gathered by name: from a ZeRO-2 or FSDP2 run, on any number of ranks
        if not by_name:
            raise CrucibleError(f"training state '{folder}' was saved by a run on one GPU or with --multi_gpu; resume "
                                "it the way it was trained")
        from .deepspeed_zero import load_deepspeed_state

        load_deepspeed_state(trainer, payload["network"], payload["optimizer"], folder)
        return
    if not trainer.sharded:
        if by_name:
            raise CrucibleError(f"training state '{folder}' was saved by a sharded (FSDP2) or DeepSpeed run; resume it "
                                "with the accelerate config file it was trained with")
        trainer.net.load_state_dicts(payload["network"])
        trainer.optimizer.load_state_dict(payload["optimizer"])
        return
    if not by_name:
        raise CrucibleError(f"training state '{folder}' was saved by an unsharded run; resume it without FSDP "
                            "(one GPU or --multi_gpu)")
    (name, module), = trainer.net.modules.items()
    load_full_state(module, trainer.optimizer, payload["network"][name], payload["optimizer"])
