"""Small helpers shared by the training tests."""
from __future__ import annotations

from trainer.callbacks import Callbacks


class StopAt(Callbacks):
    """Presses Cancel after optimizer step ``step`` (what ComfyUI's Cancel button does)."""

    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def on_step(self, info):
        self.seen = info.step

    def should_stop(self):
        return self.seen >= self.step
