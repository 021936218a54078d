"""The EMA of a sharded (FSDP2) run's weights, sharded like them: each rank keeps the moving average of its own
shards, so the EMA costs every rank 1/N of a copy (diffusers' ``EMAModel`` on the shard ``DTensor`` parameters, the
same decay schedule and arithmetic as an unsharded run's EMA).

Whole only where it is written: :meth:`ShardedEMA.gathered_state` (a collective: every rank calls it) returns the
resumable state with every shadow tensor whole on rank 0, and :meth:`ShardedEMA.load_state_dict` takes such a whole
state back, each rank keeping its shards. The checkpoint's EMA weights are gathered as the weights are
(:mod:`trainer.sharding`: ``copy_to`` puts the EMA into the shards first).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from diffusers.training_utils import EMAModel

from .errors import CrucibleError


def make_ema(parameters: Iterable[torch.nn.Parameter], decay: float, sharded: bool) -> EMAModel:
    """The run's EMA of ``parameters`` (read after ``prepare()``: a sharded run's are its shards)."""
    return (ShardedEMA if sharded else EMAModel)(list(parameters), decay=decay)


class ShardedEMA(EMAModel):
    """``EMAModel`` over ``DTensor`` shards; its shadow tensors are shards placed as the parameters are."""

    def __init__(self, parameters: list[torch.nn.Parameter], **kwargs):
        super().__init__(parameters, **kwargs)
        self._placements = [(p.device_mesh, p.placements) for p in parameters]

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """The weights kept aside while the EMA stands in for them (validation, samples, checkpoint): a copy of this
        rank's shards, kept where they are (``EMAModel`` moves them to the host, and a host ``DTensor`` copied back
        into a CUDA shard is a path nobody checked; a shard is 1/N of the weights)."""
        self.temp_stored_params = [p.detach().clone() for p in parameters]

    def gathered_state(self) -> dict[str, Any]:
        """The resumable EMA state, its shadow tensors whole in host memory on rank 0 (empty list elsewhere)."""
        state = self.state_dict()
        rank0 = torch.distributed.get_rank() == 0
        whole = []
        for shard in self.shadow_params:
            tensor = shard.full_tensor().cpu()  # a collective, one tensor at a time
            if rank0:
                whole.append(tensor)
        return {**state, "shadow_params": whole}

    def load_state_dict(self, state_dict: dict) -> None:
        """A whole saved state (:meth:`gathered_state`, read by every rank): each rank keeps its shards."""
        from torch.distributed.tensor import distribute_tensor

        super().load_state_dict(state_dict)
        if len(self.shadow_params) != len(self._placements):
            raise CrucibleError(f"the training state's EMA holds {len(self.shadow_params)} tensors but this sharded "
                                f"run trains {len(self._placements)}; resume it with the config it was saved with")
        self.shadow_params = [distribute_tensor(whole.to(mesh.device_type), mesh, placements)
                              for whole, (mesh, placements) in zip(self.shadow_params, self._placements)]
