"""Full fine-tunes under DeepSpeed ZeRO stage 2 (``accelerate launch --config_file docs/accelerate/deepspeed_zero2.yaml``).

ZeRO-2 keeps the weights whole on every rank and shards what the optimizer holds: each rank owns one slice of a
flat fp32 copy of the trained weights (the master weights under bf16), of their optimizer state and of their
gradients. DeepSpeed's engine runs the step itself (``accelerator.backward`` backpropagates, reduces the gradients
into their owners, clips with the config file's ``gradient_clipping``, steps and zeroes), so the trainer's own
``optimizer.step()`` and ``zero_grad()`` are accelerate's no-ops there.

What this module adds to a ZeRO-2 run (the trainer calls it on every rank, rank 0 writes):

* :func:`check_deepspeed_run`: what such a run cannot honour, refused by name before any model loads;
* :func:`configure_deepspeed`: the per-GPU batch DeepSpeed needs before ``prepare()`` (the trainer has no
  dataloader for accelerate to read it from);
* :func:`master_weights` / :func:`deepspeed_training_state`: the whole fp32 master weights and optimizer state,
  gathered from the slices by parameter name (``state.pt``'s ``optimizer_keys: "names"``, the format a sharded FSDP2
  run writes): each rank takes its slices from whole tensors, so the number of ranks may change (by construction;
  tested on the same 2);
* :func:`load_deepspeed_state`: each rank takes its slices of such a state back.

Tested on 2 CPU processes (gloo, ``tests/deepspeed_cpu_shim.py``: accelerate turns DeepSpeed on for GPUs only) in
fp32 and bf16 (``tests/test_deepspeed_zero2.py``); GPUs (NCCL) and CPU offload were checked on paper only
(docs/multi_gpu.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError, CrucibleError

if TYPE_CHECKING:  # pragma: no cover
    from .config import TrainConfig

# Optimizers whose state is elementwise (a slice of the flat copy is the state of that slice of the weights), so a
# ZeRO-2 run steps exactly as one process does. Adafactor (factored moments), AdamW 8-bit (blockwise) and the
# learning-rate-free ones (sums over every weight) would each see only their rank's slice.
ELEMENTWISE_OPTIMIZERS = ("adamw", "lion", "sgd", "sgdnesterov")


def uses_deepspeed(acc) -> bool:
    """Whether this run's accelerator hands the trained module to DeepSpeed."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def check_deepspeed_run(cfg: "TrainConfig", ds_config: dict[str, Any]) -> None:
    """The settings a ZeRO-2 run cannot honour, each refused by name. ``ds_config``: the DeepSpeed config accelerate
    built from the launch's config file."""
    net, tr = cfg.network, cfg.training
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if stage != 2:
        raise ConfigError(f"the accelerate config asks for DeepSpeed ZeRO stage {stage}; Crucible trains with stage 2 "
                          "(zero_stage: 2, docs/accelerate/deepspeed_zero2.yaml), or FSDP2 to shard the weights too "
                          "(docs/accelerate/fsdp2_full_finetune.yaml)")
    why = {
        "network.network_type": (net.network_type != "full",
                                 f"is '{net.network_type}': DeepSpeed ZeRO-2 is for full fine-tunes (an adapter's "
                                 "optimizer state is small); train adapters with accelerate launch --multi_gpu, or "
                                 "with FSDP2 where the frozen base does not fit one card"),
        "network.train_text_encoder": (net.train_text_encoder, "is on: accelerate hands DeepSpeed one trained "
                                                               "module, the denoiser; turn it off"),
        "model.fp8_base": (cfg.model.fp8_base, "is on: an fp8 base is for adapters; turn it off"),
        "training.full_bf16": (tr.full_bf16, "is on: DeepSpeed keeps fp32 master weights itself under "
                                             "mixed_precision: bf16; turn full_bf16 off"),
        "training.ema": (tr.ema, "is on: Crucible keeps an EMA under FSDP2, not under DeepSpeed; use "
                                 "docs/accelerate/fsdp2_full_finetune.yaml, or turn ema off"),
        "optim.optimizer": (cfg.optim.optimizer.lower() not in ELEMENTWISE_OPTIMIZERS,
                            f"is '{cfg.optim.optimizer}': under ZeRO-2 each rank steps its slice of the weights "
                            f"alone, which only {', '.join(ELEMENTWISE_OPTIMIZERS)} step exactly as one process "
                            "does; choose one of them, or FSDP2"),
    }
    for field, (refused, reason) in why.items():
        if refused:
            raise ConfigError(f"{field} {reason} (the accelerate config runs DeepSpeed; see docs/multi_gpu.md)")
    accumulation = ds_config.get("gradient_accumulation_steps")
    if accumulation not in (None, "auto") and int(accumulation) != tr.gradient_accumulation_steps:
        raise ConfigError(f"the accelerate config's gradient_accumulation_steps is {accumulation} but the run's "
                          f"training.gradient_accumulation_steps is {tr.gradient_accumulation_steps}; make them equal")
    clipping = ds_config.get("gradient_clipping")
    if clipping not in (None, "auto") and float(clipping) != float(cfg.optim.max_grad_norm):
        raise ConfigError(f"the accelerate config's gradient_clipping is {clipping} but the run's optim.max_grad_norm "
                          f"is {cfg.optim.max_grad_norm} (DeepSpeed clips with the file's value); make them equal")


def configure_deepspeed(acc, cfg: "TrainConfig") -> None:
    """Before ``prepare()``: the per-GPU batch and the accumulation DeepSpeed sizes its step by (accelerate reads
    them from dataloaders, which the trainer does not hand it), and clipping where the file leaves it to the run."""
    config = acc.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = cfg.training.batch_size
    config["gradient_accumulation_steps"] = cfg.training.gradient_accumulation_steps
    config["train_batch_size"] = (cfg.training.batch_size * cfg.training.gradient_accumulation_steps
                                  * acc.num_processes)
    if config.get("gradient_clipping") in (None, "auto"):
        config["gradient_clipping"] = float(cfg.optim.max_grad_norm)


def zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimizer behind accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _trained(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def master_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state with each trained weight taken from DeepSpeed's fp32 master copy, on rank 0 ({} on
    the others): what a checkpoint exports (the module's own copy is the bf16 one under mixed precision). Every rank
    calls it (one all-reduce per trained tensor)."""
    from deepspeed.utils import safe_get_full_fp32_param

    rank0 = torch.distributed.get_rank() == 0
    masters = {}
    for name, p in _trained(module):
        whole = safe_get_full_fp32_param(p)
        if rank0:
            masters[name] = whole.detach().cpu()
    if not rank0:
        return {}
    return {k: masters.get(k, v.detach().cpu()) for k, v in module.state_dict().items()}


def _flat_state(optimizer) -> tuple[Any, dict[str, Any]]:
    """The torch optimizer DeepSpeed steps, and the state of its first flat slice (every slice has the same keys)."""
    zero = zero_optimizer(optimizer)
    base = zero.optimizer
    flats = zero.single_partition_of_fp32_groups
    return base, (base.state.get(flats[0], {}) if flats else {})


def full_optimizer_state(module: torch.nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter name, on rank 0 ({} on the others), in the layout torch's
    full optimizer state dict has (``{"state": {name: {...}}, "param_groups": [...]}``). Every rank calls it."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base, first = _flat_state(optimizer)
    flat_shape = zero_optimizer(optimizer).single_partition_of_fp32_groups[0].shape
    elementwise = [k for k, v in first.items() if torch.is_tensor(v) and v.shape == flat_shape]
    scalars = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
               for k, v in first.items() if k not in elementwise}
    rank0 = torch.distributed.get_rank() == 0
    state: dict[str, dict[str, Any]] = {}
    trained = _trained(module)
    for name, p in trained:
        entry = {key: safe_get_full_optimizer_state(p, key) for key in elementwise}  # collectives
        if rank0:
            state[name] = {**{k: v.detach().cpu() for k, v in entry.items()}, **scalars}
    if not rank0:
        return {}
    names = {id(p): n for n, p in trained}
    groups = []
    for group, params in zip(base.param_groups, zero_optimizer(optimizer).bit16_groups):
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in params if id(p) in names]})
    return {"state": state, "param_groups": groups}


def deepspeed_training_state(trainer) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict]:
    """The network (fp32 master weights) and optimizer parts of a resumable state, whole, on rank 0. Every rank
    calls it."""
    (name, module), = trainer.net.modules.items()
    network = {name: master_weights(module)}
    return network, full_optimizer_state(module, trainer.optimizer), {}


def load_deepspeed_state(trainer, network: dict[str, dict[str, torch.Tensor]], optimizer_state: dict[str, Any],
                         folder) -> None:
    """Each rank takes its slices of a whole saved state (every rank has read the same file): the module's weights,
    the fp32 master weights and the optimizer state. Written for a state saved by ZeRO-2 on any number of ranks
    (tested: the same 2); a state saved by FSDP2 has the same layout, but loading one here is untested."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    (name, module), = trainer.net.modules.items()
    weights, saved = network.get(name, {}), optimizer_state.get("state", {})
    trained = _trained(module)
    missing = [n for n, _ in trained if n not in weights or (saved and n not in saved)]
    if missing or not set(weights) <= set(module.state_dict()):
        odd = sorted(missing or (set(weights) - set(module.state_dict())))[0]
        raise CrucibleError(f"the training state '{folder}' does not match this run's network ('{odd}'); resume it "
                            "with the network settings it was saved with")
    zero = zero_optimizer(trainer.optimizer)
    base = zero.optimizer
    groups = optimizer_state.get("param_groups", [])
    if len(groups) != len(base.param_groups):
        raise CrucibleError(f"the training state '{folder}' has {len(groups)} optimizer parameter groups, this run "
                            f"{len(base.param_groups)}; resume it with the optimizer settings it was saved with")
    for group, saved_group in zip(base.param_groups, groups):  # the learning rate the scheduler had set, and the rest
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    example = saved[trained[0][0]] if saved and trained else {}
    elementwise = [k for k, v in example.items() if torch.is_tensor(v) and v.dim() > 0]
    with torch.no_grad():
        for flat in zero.single_partition_of_fp32_groups:  # the state the first step would create, then filled
            base.state[flat] = {**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in example.items()
                                   if k not in elementwise},
                                **{k: torch.zeros_like(flat) for k in elementwise}}
        if example:
            zero._lazy_init_hp_params_optimizer_state()  # links each weight to its slice of the new state
        own = module.state_dict()
        for key, value in weights.items():
            own[key].copy_(value.to(own[key].dtype))
        for n, p in trained:
            safe_set_full_fp32_param(p, weights[n].to(p.device, torch.float32))
            for key in elementwise:
                safe_set_full_optimizer_state(p, saved[n][key].to(p.device, torch.float32), key)
