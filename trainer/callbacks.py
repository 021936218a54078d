"""How the training loop talks to the outside world.

ComfyUI's progress bar, the CLI progress line and tests all implement :class:`Callbacks`; the loop never knows which.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .run_record import CheckpointRecord


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based optimizer step just finished
    total_steps: int
    epoch: int  # 1-based
    loss: float  # mean loss of this optimizer step
    lr: float
    seconds_per_step: float
    eta_seconds: float


CheckpointInfo = CheckpointRecord  # what on_checkpoint receives: the run record's checkpoint entry


@dataclass(frozen=True)
class SampleInfo:
    step: int
    epoch: int
    prompts: tuple[str, ...]
    images: tuple[Any, ...]  # PIL images
    paths: tuple[Path, ...] = ()


class Callbacks:
    """No-op base: override what you need."""

    def on_start(self, plan: Any) -> None: ...

    def on_step(self, info: StepInfo) -> None: ...

    def on_checkpoint(self, ckpt: CheckpointInfo) -> None: ...

    def on_sample(self, sample: SampleInfo) -> None: ...

    def on_prepare(self, done: int, total: int, what: str) -> None:
        """Progress of the work before step 1 (e.g. ``what="caching latents"``: ``done`` of ``total`` images)."""

    def should_stop(self) -> bool:
        return False


@dataclass
class MultiCallbacks(Callbacks):
    items: Sequence[Callbacks] = field(default_factory=list)

    def on_start(self, plan):
        for c in self.items:
            c.on_start(plan)

    def on_step(self, info):
        for c in self.items:
            c.on_step(info)

    def on_checkpoint(self, ckpt):
        for c in self.items:
            c.on_checkpoint(ckpt)

    def on_sample(self, sample):
        for c in self.items:
            c.on_sample(sample)

    def on_prepare(self, done, total, what):
        for c in self.items:
            c.on_prepare(done, total, what)

    def should_stop(self):
        return any(c.should_stop() for c in self.items)


class ConsoleProgress(Callbacks):
    """A one-line progress display for the CLI: step/total, loss, it/s, ETA."""

    def __init__(self, stream=None, every: int = 1):
        self.stream = stream or sys.stderr
        self.every = max(1, every)
        self._last = 0.0

    def on_step(self, info: StepInfo) -> None:
        now = time.monotonic()
        if info.step % self.every and info.step != info.total_steps and now - self._last < 2:
            return
        self._last = now
        rate = 1 / info.seconds_per_step if info.seconds_per_step > 0 else 0.0
        width = 24
        done = int(width * info.step / max(info.total_steps, 1))
        bar = "#" * done + "-" * (width - done)
        self.stream.write(f"\r[{bar}] {info.step}/{info.total_steps} epoch {info.epoch} loss {info.loss:.4f} "
                          f"lr {info.lr:.2e} {rate:.2f} it/s ETA {format_seconds(info.eta_seconds)}   ")
        if info.step == info.total_steps:
            self.stream.write("\n")
        self.stream.flush()

    def on_prepare(self, done: int, total: int, what: str) -> None:
        if done == total or done % 50 == 0:
            self.stream.write(f"\r{what}: {done}/{total}   " + ("\n" if done == total else ""))
            self.stream.flush()

    def on_checkpoint(self, ckpt: CheckpointInfo) -> None:
        self.stream.write(f"\n{ckpt.summary}\n")


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
