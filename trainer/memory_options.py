"""The memory options of a run (``training.blocks_to_swap``, ``fused_backward_pass``, ``full_bf16``): which
combinations work, the dtypes they put the weights in, and the AdamW implementation they choose.

The mechanisms live in :mod:`trainer.block_swap`, :mod:`trainer.param_step` and :mod:`trainer.stochastic_rounding`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config import TrainConfig


def memory_lean(cfg: "TrainConfig") -> bool:
    """Runs that are set up to save memory: full fine-tunes and any of the memory options."""
    t = cfg.training
    return cfg.network.network_type == "full" or t.full_bf16 or t.fused_backward_pass or t.blocks_to_swap > 0


def check_memory_options(cfg: "TrainConfig") -> None:
    """Combinations refused before any model loads; each error names the field and what to do."""
    from .param_step import FUSED_OPTIMIZERS

    t, full = cfg.training, cfg.network.network_type == "full"
    if t.blocks_to_swap < 0:
        raise ConfigError(f"training.blocks_to_swap is {t.blocks_to_swap}; it must be 0 (off) or more")
    if t.blocks_to_swap and full:
        raise ConfigError("training.blocks_to_swap streams the frozen base weights of a LoRA run; a full "
                          "fine-tune trains those weights: set blocks_to_swap to 0, or train a LoRA")
    if t.full_bf16 and not full:
        raise ConfigError("training.full_bf16 stores trained full weights in bf16; a LoRA run already keeps its "
                          "base in the compute dtype and its small adapter in fp32: turn full_bf16 off, or set "
                          "network.network_type to 'full'")
    if t.fused_backward_pass:
        if cfg.optim.optimizer not in FUSED_OPTIMIZERS:
            raise ConfigError(f"training.fused_backward_pass works with optim.optimizer "
                              f"{' or '.join(FUSED_OPTIMIZERS)}, not {cfg.optim.optimizer!r}: choose one of them or "
                              "turn fused_backward_pass off")
        if t.gradient_accumulation_steps > 1:
            raise ConfigError("training.fused_backward_pass steps each weight as soon as its gradient is ready, so "
                              "it cannot accumulate gradients: set training.gradient_accumulation_steps to 1 (got "
                              f"{t.gradient_accumulation_steps}) or turn fused_backward_pass off")


def check_run_memory_options(cfg: "TrainConfig", mixed_precision: str, num_processes: int) -> None:
    """Combinations that depend on the resolved precision and the number of processes (checked at set-up)."""
    t = cfg.training
    if t.full_bf16 and mixed_precision != "bf16":
        raise ConfigError(f"training.full_bf16 needs bf16 compute, but mixed_precision resolved to "
                          f"{mixed_precision!r}: set training.mixed_precision to 'bf16' (a GPU with bf16 support)")
    if t.fused_backward_pass and mixed_precision == "fp16":
        raise ConfigError("training.fused_backward_pass does not work with fp16's gradient scaler: set "
                          "training.mixed_precision to 'bf16' (or 'no')")
    if t.fused_backward_pass and num_processes > 1:
        raise ConfigError("training.fused_backward_pass steps each weight before the processes have averaged its "
                          "gradient: use it on one GPU, or turn it off for multi-GPU training")
    if t.blocks_to_swap and num_processes > 1:
        raise ConfigError("training.blocks_to_swap is for one GPU: set it to 0 for multi-GPU training")


def trained_weight_dtype(cfg: "TrainConfig"):
    """The dtype the fully trained modules are stored in: bf16 with ``full_bf16``, else float32."""
    import torch

    return torch.bfloat16 if cfg.training.full_bf16 else torch.float32


def adamw_memory_args(groups: list[dict], lean: bool) -> dict[str, Any]:
    """AdamW's implementation, chosen for memory (the user's optimizer_args win over this):

    - every parameter on CUDA: ``fused=True`` — one kernel per step, and none of the per-step copies of the whole
      parameter list that the ``foreach`` implementation makes;
    - otherwise, on a memory-lean run: ``foreach=False`` (the per-tensor loop: slower, no whole-list temporaries);
    - otherwise: torch's default."""
    params = [p for g in groups for p in g["params"]]
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": False} if lean else {}
