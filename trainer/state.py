"""Resumable training state — kept apart from the exported, ComfyUI-loadable checkpoints.

A state folder holds ``state.pt`` (trainable weights, optimizer, scheduler, EMA: only tensors and plain Python
values, read back with ``torch.load(weights_only=True)``) and ``state.json`` (step, epoch, config and dataset
hashes, written last). Both are written atomically; ``state.json`` names the step that ``state.pt`` must hold, so
a mismatched pair is detected instead of silently mixing two saves.

Data order, captions, crops and noise are all keyed by ``(seed, epoch, index)``, so weights + optimizer + scheduler
+ position are all a resumed run needs to continue bit-for-bit.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .errors import CrucibleError
from .fileio import atomic_write, atomic_write_json

STATE_FORMAT = 1
# Sections that may change between a stop and a resume without invalidating the run.
_RESUMABLE_CHANGES = ("save", "sample")


def config_hash(cfg: TrainConfig) -> str:
    data = cfg.to_dict()
    for key in _RESUMABLE_CHANGES:
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SavedState:
    step: int
    epoch: int
    payload: dict[str, Any]
    meta: dict[str, Any]


def save_state(folder: Path, *, step: int, epoch: int, payload: dict[str, Any], cfg: TrainConfig,
               data_fingerprint: str, extra: dict[str, Any] | None = None) -> Path:
    folder = Path(folder)
    blob = dict(payload, step=step, epoch=epoch, format=STATE_FORMAT)
    atomic_write(folder / "state.pt", lambda tmp: torch.save(blob, tmp))
    meta = {"format": STATE_FORMAT, "step": step, "epoch": epoch, "config_hash": config_hash(cfg),
            "data_fingerprint": data_fingerprint, "config": cfg.to_dict(), **(extra or {})}
    atomic_write_json(folder / "state.json", meta)
    return folder


def load_state(folder: Path, cfg: TrainConfig, data_fingerprint: str, *, force: bool = False) -> SavedState:
    """Load a state folder, refusing a changed config or dataset unless ``force``."""
    folder = Path(folder)
    meta_path, blob_path = folder / "state.json", folder / "state.pt"
    if not meta_path.is_file() or not blob_path.is_file():
        raise CrucibleError(f"no training state in '{folder}' (expected state.json and state.pt); "
                            "resume needs a folder written by a previous run with save_state on")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != STATE_FORMAT:
        raise CrucibleError(f"training state '{folder}' has format {meta.get('format')}, this Crucible reads {STATE_FORMAT}")
    problems = []
    if meta.get("config_hash") != config_hash(cfg):
        problems.append("the training config changed")
    if meta.get("data_fingerprint") != data_fingerprint:
        problems.append("the dataset files changed")
    if problems and not force:
        raise CrucibleError(f"cannot resume from '{folder}': {' and '.join(problems)} since it was saved. "
                            "Restore them, or resume with force (resume_force / --force-resume) to continue anyway")
    try:
        blob = torch.load(blob_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CrucibleError(f"training state '{blob_path}' cannot be read ({exc}); it may be damaged") from exc
    if blob.get("step") != meta.get("step"):
        raise CrucibleError(f"training state in '{folder}' is inconsistent (state.pt step {blob.get('step')}, "
                            f"state.json step {meta.get('step')}); resume from an earlier state")
    return SavedState(step=int(meta["step"]), epoch=int(meta["epoch"]), payload=blob, meta=meta)
