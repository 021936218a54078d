"""What sharding the denoiser over N processes (FSDP2, :mod:`trainer.sharding`) changes in the memory estimate of
:mod:`trainer.memory`, per rank.

accelerate wraps every module whose class the denoiser names in ``_no_split_modules`` (a nested one is a unit of its
own) and the denoiser itself (the root unit: what no wrapped module holds). Each rank stores 1/N of every unit. For a
forward or backward pass a unit is gathered whole, one at a time, with the next one prefetched; the root stays
gathered from the first forward to the last backward (FSDP2 does not reshard the root after forward). So, per rank:

=====================  ==============================================================================================
part                   bytes
=====================  ==============================================================================================
denoiser weights       stored / N + (root + the two largest units) whole, in the dtype they are gathered in (the
                       compute dtype under ``mixed_precision``, else the stored one)
gradients, optimizer   a full fine-tune: gradients and states / N, plus the largest unit's whole gradient while it is
                       reduce-scattered; a LoRA's adapters are sharded with their blocks: / N
text encoders, VAE     whole on every rank (not sharded), as on one device
activations            as on one device: each rank runs its own batch
loading (rank 0)       rank 0 alone reads the denoiser whole (:func:`trainer.sharding.rank0_loading`) into host
                       memory, then ``prepare()`` broadcasts it tensor by tensor, each rank keeping its shard on its
                       device: the whole denoiser in host memory on a GPU machine (``Estimate.loading_gib``); on the
                       CPU the device is host memory, so rank 0 holds whole + whole / N there at that moment
=====================  ==============================================================================================
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def fsdp_unit_params(family: str) -> tuple[int, tuple[int, ...]]:
    """(parameters the root unit holds, parameters each wrapped unit holds, largest first) of the full-size denoiser."""
    from .full_size import ARCHITECTURES, build_meta

    model = build_meta(family, ARCHITECTURES[family][0][0])
    wrapped = set(getattr(model, "_no_split_modules", None) or ())
    units = [name for name, module in model.named_modules() if name and type(module).__name__ in wrapped]
    held = dict.fromkeys(units, 0)
    root = 0
    for name, param in model.named_parameters():
        owner = max((u for u in units if name.startswith(u + ".")), key=len, default=None)  # the innermost unit
        if owner is None:
            root += param.numel()
        else:
            held[owner] += param.numel()
    return root, tuple(sorted(held.values(), reverse=True))


def sharded_denoiser_bytes(family: str, stored: int, shards: int, gather_bytes: int) -> int:
    """Per rank: ``stored`` bytes of the whole denoiser sharded ``shards`` ways, plus the root and the two largest
    units gathered whole at ``gather_bytes`` per parameter (the gathered copies live beside the shards)."""
    root, units = fsdp_unit_params(family)
    return stored // shards + (root + sum(units[:2])) * gather_bytes


def largest_unit_params(family: str) -> int:
    _, units = fsdp_unit_params(family)
    return units[0] if units else 0
