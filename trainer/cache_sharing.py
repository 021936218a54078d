"""Filling the latent / text caches with several processes (``accelerate launch``, DDP or FSDP2).

Every process trains on every Nth batch of an epoch's shuffled batches, so over the epochs each one needs the cached
latents and text embeddings of every image. Encoding them all on every process would run the VAE and the text
encoders N times over the dataset (and write each disk-cache file N times). Instead each process encodes (or reads
from the disk cache) its share — every Nth image — and the processes then swap what they made, a few images at a
time, so each ends with the whole cache while having run its encoders over 1/N of the images. The values are those
one process would make: each image is encoded alone, whichever process encodes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

SWAP_ITEMS = 16  # images a process sends per exchange round (bounds the pickled payload: Flux T5 rows are MiBs)


@dataclass(frozen=True)
class CacheShare:
    """Which of the images this process fills (``rank`` of ``world``), and the swap of the results."""

    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, acc) -> "CacheShare":
        return cls(acc.process_index, acc.num_processes)

    def mine(self, items: Sequence[int]) -> list[int]:
        """This process's share of ``items``: every ``world``-th one from ``rank`` (rank 0 has the first)."""
        return list(items)[self.rank::self.world]

    def spread(self, items: Sequence[int], get: Callable[[int], Any], put: Callable[[int, Any], None]) -> None:
        """Every process calls it after filling its share of ``items``: ``put`` receives each other process's
        entries (``get`` of their share), so every process ends with all of them."""
        if self.world == 1:
            return
        import torch.distributed as dist

        mine = self.mine(items)
        rounds = math.ceil(math.ceil(len(items) / self.world) / SWAP_ITEMS)
        for r in range(rounds):
            sent = {item: get(item) for item in mine[r * SWAP_ITEMS:(r + 1) * SWAP_ITEMS]}
            received: list[Any] = [None] * self.world
            dist.all_gather_object(received, sent)
            for rank, entries in enumerate(received):
                if rank != self.rank:
                    for item, entry in entries.items():
                        put(item, entry)


ONE_PROCESS = CacheShare()
