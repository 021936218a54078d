"""Resumable training state — kept apart from the exported, ComfyUI-loadable checkpoints.

A state folder holds ``state.pt`` (trainable weights, optimizer, scheduler, EMA: only tensors and plain Python
values, read back with ``torch.load(weights_only=True)``) and ``state.json`` (step, epoch, config and dataset
hashes, written last, for people and for a quick check). Both are written atomically, and ``state.pt`` carries its
own copy of that record: a crash or a full disk between the two writes leaves a new ``state.pt`` beside the previous
``state.json``, and resuming then trusts ``state.pt``'s record, so the pair is never mixed and never unusable.

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


def base_patches_digest(cfg: TrainConfig) -> str:
    """The digest of what was patched into the base before training (``ModelFamily.base_patches``; the MODEL path's
    upstream LoRAs and ModelSampling* patches), "" when nothing: a resumed run must train on the same base."""
    from .errors import ConfigError
    from .families import get_family

    try:
        return str(get_family(cfg.model.family).base_patches.get("digest", ""))
    except ConfigError:  # a hosted family no longer registered: nothing to compare
        return ""


@dataclass(frozen=True)
class SavedState:
    step: int
    epoch: int
    payload: dict[str, Any]
    meta: dict[str, Any]


def save_state(folder: Path, *, step: int, epoch: int, payload: dict[str, Any], cfg: TrainConfig,
               data_fingerprint: str, extra: dict[str, Any] | None = None) -> Path:
    folder = Path(folder)
    meta = {"format": STATE_FORMAT, "step": step, "epoch": epoch, "config_hash": config_hash(cfg),
            "data_fingerprint": data_fingerprint, "config": cfg.to_dict(), **(extra or {})}
    base = base_patches_digest(cfg)
    if base:  # the MODEL path trained on top of upstream patches: a resume needs the same
        meta["base_patches_digest"] = base
    blob = dict(payload, step=step, epoch=epoch, format=STATE_FORMAT, meta=meta)
    atomic_write(folder / "state.pt", lambda tmp: torch.save(blob, tmp))
    atomic_write_json(folder / "state.json", meta)
    return folder


def check_state(folder: Path, cfg: TrainConfig, data_fingerprint: str, *, force: bool = False) -> None:
    """Everything :func:`load_state` refuses (a missing, damaged, crafted or inconsistent state, or one saved with
    another config or dataset unless ``force``), checked with the weights mapped from the file, not read: a run
    checks its resume this way before it fills its caches, and loads the state after its denoiser is read."""
    _read_state(Path(folder), cfg, data_fingerprint, force, mmap=True)


def load_state(folder: Path, cfg: TrainConfig, data_fingerprint: str, *, force: bool = False) -> SavedState:
    """Load a state folder, refusing a changed config or dataset unless ``force``."""
    return _read_state(Path(folder), cfg, data_fingerprint, force, mmap=False)


def _read_state(folder: Path, cfg: TrainConfig, data_fingerprint: str, force: bool, mmap: bool) -> SavedState:
    meta_path, blob_path = folder / "state.json", folder / "state.pt"
    if not meta_path.is_file() or not blob_path.is_file():
        raise CrucibleError(f"no training state in '{folder}' (expected state.json and state.pt); "
                            "resume needs a folder written by a previous run with save_state on")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CrucibleError(f"training state '{meta_path}' cannot be read ({exc}); it may be damaged") from exc
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CrucibleError(f"training state '{folder}' has format {found}, this Crucible reads {STATE_FORMAT}")
    _check_unchanged(folder, meta, cfg, data_fingerprint, force)  # before reading a possibly large file
    blob = _load_blob(blob_path, mmap)
    if not isinstance(blob, dict):
        raise CrucibleError(f"training state '{blob_path}' is not a Crucible training state")
    own = blob.get("meta")
    if isinstance(own, dict) and own.get("step") == blob.get("step") != meta.get("step"):
        # Interrupted between writing state.pt and state.json: state.pt is newer and complete, and says what it is.
        meta = own
        _check_unchanged(folder, meta, cfg, data_fingerprint, force)
    if blob.get("step") != meta.get("step"):
        raise CrucibleError(f"training state in '{folder}' is inconsistent (state.pt step {blob.get('step')}, "
                            f"state.json step {meta.get('step')}); resume from an earlier state")
    return SavedState(step=int(meta["step"]), epoch=int(meta["epoch"]), payload=blob, meta=meta)


def _load_blob(path: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain values only, so a crafted pickle cannot run code.
    ``mmap``: the tensors are mapped from the file, not read (a check); only torch's zip format can be mapped, so
    any other file (never one Crucible wrote) is read whole and refused or found damaged as it is."""
    import pickle
    import zipfile

    try:
        mapped = mmap and zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as exc:
        raise CrucibleError(f"training state '{path}' was refused: it holds Python objects other than tensors and "
                            "plain values, which could run code when loaded. Crucible did not write it; delete the "
                            "state folder (or restore it from a backup) and train again") from exc
    except Exception as exc:  # noqa: BLE001 - a truncated zip, a wrong file: unusable either way
        raise CrucibleError(f"training state '{path}' cannot be read ({type(exc).__name__}); it is damaged. "
                            "Delete the state folder, or restore it from a backup") from exc


def _check_unchanged(folder: Path, meta: dict[str, Any], cfg: TrainConfig, data_fingerprint: str,
                     force: bool) -> None:
    problems = []
    if meta.get("config_hash") != config_hash(cfg):
        problems.append("the training config changed")
    if meta.get("data_fingerprint") != data_fingerprint:
        problems.append("the dataset files changed")
    if meta.get("base_patches_digest", "") != base_patches_digest(cfg):
        problems.append("the patches applied to the MODEL before Crucible Train (LoRAs, ModelSampling*) changed")
    if problems and not force:
        raise CrucibleError(f"cannot resume from '{folder}': {' and '.join(problems)} since it was saved. "
                            "Restore them, or resume with force (resume_force / --force-resume) to continue anyway")
