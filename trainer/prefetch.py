"""Decoding the next optimizer step's images on a background thread while the current step computes."""
from __future__ import annotations

from typing import Any


class BatchPrefetcher:
    """Decodes the next optimizer step's batches on a background thread while the current step computes.

    ``DataSource.load_batch`` is deterministic in (batch plan, epoch), so a prefetched batch is the batch the step
    would have loaded itself; order and results do not depend on timing.
    """

    def __init__(self, source, enabled: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self.source = source
        self.enabled = enabled
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crucible-prefetch") if enabled else None
        self.pending: dict[Any, Any] = {}

    @staticmethod
    def _key(batch_plan, epoch: int):
        return epoch, tuple(tuple(s) for s in batch_plan)

    def request(self, group: list[Any], epoch: int) -> None:
        if not self.enabled:
            return
        for batch_plan in group:
            key = self._key(batch_plan, epoch)
            if key not in self.pending:
                self.pending[key] = self.pool.submit(self.source.load_batch, batch_plan, epoch)

    def get(self, batch_plan, epoch: int):
        future = self.pending.pop(self._key(batch_plan, epoch), None)
        return future.result() if future is not None else self.source.load_batch(batch_plan, epoch)

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending.values():
                future.cancel()
            self.pending.clear()
            self.pool.shutdown(wait=True)
