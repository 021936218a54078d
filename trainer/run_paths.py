"""Where a run's files go: the one place the run folder is computed (the loop, the Train node and the CLI use it).

``<save.output_dir>/<run>/`` holds the checkpoints; ``<save.work_dir>/<run>/`` (the same folder when ``work_dir`` is
empty) holds ``state/``, ``samples/``, ``logs/``, ``config.json`` and ``run.json``. ``<run>`` is
:func:`trainer.fileio.safe_name` of ``save.run_name``, so a run name never leaves the folder it is joined to.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .fileio import safe_name

if TYPE_CHECKING:
    from .config import SaveConfig


@dataclass(frozen=True)
class RunPaths:
    name: str  # the run's folder name (safe_name of save.run_name)
    run_dir: Path  # checkpoints
    work_dir: Path  # state, samples, logs, config.json, run.json

    @property
    def state_dir(self) -> Path:
        return self.work_dir / "state"

    @property
    def logs_dir(self) -> Path:
        return self.work_dir / "logs"


def run_paths(save: "SaveConfig", what: str = "save.run_name") -> RunPaths:
    """The folders of the run ``save`` describes; ``what`` names the run name in the error for an unusable one."""
    name = safe_name(save.run_name, what)
    run_dir = Path(save.output_dir) / name
    return RunPaths(name, run_dir, Path(save.work_dir) / name if save.work_dir else run_dir)
