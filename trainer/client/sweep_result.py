"""What a sweep through a running ComfyUI produced (:func:`trainer.client.sweep.run_sweep`). Its own module, so the
client (:mod:`trainer.client.server`) can name the type without importing the sweep, which uses the client."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..run_record import CheckpointRecord
from .workflow import LoaderRef

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..render import Composite


@dataclass
class SweepResult:
    """What :func:`run_sweep` produced: the composite and, per checkpoint, its prompt id and images."""

    composite: "Composite"
    checkpoints: list[CheckpointRecord]
    prompt_ids: list[str]
    images: list[list["Image.Image"]]
    loader: LoaderRef

    @property
    def best(self) -> CheckpointRecord | None:
        """The checkpoint with the lowest validation loss (its metadata's ``crucible_val_loss``), if any has one."""
        from ..sweep import best_index

        index = best_index([c.val_loss for c in self.checkpoints])
        return None if index is None else self.checkpoints[index]

    def metadata(self, name_prefix: str = "") -> dict:
        """JSON-able description for the PNG's text chunks."""
        best = self.best
        return {"loader": {"node_id": self.loader.node_id, "input": self.loader.input_name},
                "checkpoints": [{"file": c.path.name, "step": c.step, "value": c.value(name_prefix), "prompt_id": p,
                                 "val_loss": c.val_loss} for c, p in zip(self.checkpoints, self.prompt_ids)],
                "best": best.path.name if best is not None else None}
