"""One record of a training run and its checkpoints, and the one reader of checkpoint metadata.

:class:`CheckpointRecord` is a saved checkpoint (what the loop reports to callbacks, what the sweep and the ComfyUI
client list); :class:`RunRecord` is a run (what ``run.json`` holds on disk, what :class:`trainer.loop.RunResult`
carries and what the ``CRUCIBLE_RUN`` socket hands to the sweep node as a dict). Both serialise to and from plain
dicts with :meth:`to_dict` / :meth:`from_dict`; ``from_dict`` also reads the ``run.json`` of older versions (missing
keys get their defaults, unknown keys are ignored).

A checkpoint file's training facts (step, epoch, losses) are read from its safetensors metadata, never from its file
name: :func:`read_safetensors_metadata` is the only place that opens a safetensors header for that.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import CrucibleError, ModelLoadError

RUN_FILE = "run.json"
STEP_KEYS = ("crucible_step", "ss_steps")  # Crucible's own key first, then kohya's
EPOCH_KEYS = ("crucible_epoch", "ss_epoch")


# --- checkpoint metadata ---------------------------------------------------------------------------------------------

def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (``{}`` when it has none), read from its header only.

    Raises :class:`ModelLoadError` naming the file when it cannot be read or is not a safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata()
    except OSError as exc:
        raise ModelLoadError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    except SafetensorError as exc:
        squashed = re.sub(r"[\s_]", "", str(exc)).lower()
        if any(k in squashed for k in ("toosmall", "toolarge", "headerlength", "incompletebuffer")):
            raise ModelLoadError(f"'{path}' is not a safetensors file (bad header size: {exc}); move it out of the "
                                 "folder") from None
        raise ModelLoadError(f"'{path}' has a corrupt safetensors header ({exc}); move it out of the folder") from None
    return {str(k): str(v) for k, v in (meta or {}).items()}


def checkpoint_step(metadata: Mapping[str, str]) -> int | None:
    """Training step stored in checkpoint metadata (``crucible_step``, else kohya's ``ss_steps``), or None."""
    return _number(metadata, STEP_KEYS, int)


def checkpoint_val_loss(metadata: Mapping[str, str]) -> float | None:
    """The validation loss Crucible stored in a checkpoint (``crucible_val_loss``), or None."""
    return _number(metadata, ("crucible_val_loss",), float)


def _number(metadata: Mapping[str, str], keys: Sequence[str], cast: type) -> Any:
    """The first of ``keys`` that holds a number (quotes allowed; a whole number for ``int``; never negative or
    NaN), else None."""
    for key in keys:
        raw = str(metadata.get(key, "")).strip().strip('"')
        try:
            value = float(raw)
        except ValueError:
            continue
        if value != value or value in (float("inf"), float("-inf")):
            continue
        if cast is int:
            if value < 0:
                continue
            return int(value)
        return value
    return None


# --- records ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointRecord:
    """One saved checkpoint. ``step``/``epoch`` are None only for a file that does not record them (a checkpoint
    from elsewhere listed by the sweep or the client). ``name`` is the file as ComfyUI's loader lists it (a
    ``models/loras`` sub-folder path), set where that is known (the ``CRUCIBLE_RUN`` socket)."""

    path: Path
    step: int | None = None
    epoch: int | None = None
    loss: float | None = None  # training loss of the last step before the save
    kind: str = "lora"  # lora | full
    final: bool = False  # the save at the end of training
    val_loss: float | None = None  # validation loss (trainer/validation.py); None = no validation set
    val_loss_t: dict[str, float] | None = None  # per fixed schedule point, {"0.25": …}
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def file(self) -> str:
        return self.path.name

    @property
    def summary(self) -> str:
        """What the progress reports print at each save."""
        val = f", val loss {self.val_loss:.4f}" if self.val_loss is not None else ""
        return f"saved {self.path} (step {self.step}, epoch {self.epoch}{val})"

    @property
    def label(self) -> str:
        """Column label of a sweep: ``step N``, else the file name."""
        return f"step {self.step}" if self.step is not None else self.path.name

    def value(self, name_prefix: str = "") -> str:
        """The file name as ComfyUI's loader lists it: ``name_prefix`` (a models sub-folder) + file name."""
        if name_prefix and not name_prefix.endswith(("/", "\\")):
            name_prefix += "/"
        return f"{name_prefix}{self.path.name}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``run.json``'s ``checkpoints`` entries, the ``CRUCIBLE_RUN`` socket's)."""
        data = {"file": self.file, "path": str(self.path), "step": self.step, "epoch": self.epoch, "loss": self.loss,
                "kind": self.kind, "val_loss": self.val_loss, "val_loss_t": self.val_loss_t}
        if self.name:
            data["name"] = self.name
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "checkpoint") -> "CheckpointRecord":
        """Read :meth:`to_dict`'s form (also older ``run.json`` entries: only ``path`` is required)."""
        if not isinstance(data, Mapping) or not data.get("path"):
            raise CrucibleError(f"{where} has no file path; it is not a checkpoint record")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_file(cls, path: str | Path, *, kind: str = "lora", name: str = "") -> "CheckpointRecord":
        """A checkpoint file's record, from its metadata (Crucible's keys, else kohya's)."""
        meta = read_safetensors_metadata(path)
        return cls(Path(path), checkpoint_step(meta), _number(meta, EPOCH_KEYS, int),
                   _number(meta, ("crucible_loss",), float), kind, val_loss=checkpoint_val_loss(meta), name=name)


@dataclass
class RunRecord:
    """One training run: where it is, how it ended, its checkpoints and its curves. ``run.json`` is its on-disk
    form (:meth:`write` / :meth:`load`)."""

    run_name: str
    family: str
    kind: str  # lora | full
    status: str  # running | finished | cancelled
    run_dir: Path  # where the checkpoints are
    work_dir: Path | None = None  # state, samples, config.json, run.json (None: a run.json without the key)
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # mean loss per optimizer step (index 0 = step 1)
    plan: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)  # what "auto" settings became
    samples: list[dict[str, Any]] = field(default_factory=list)  # {"step", "paths"}
    base_patches: dict[str, Any] = field(default_factory=dict)  # ModelFamily.base_patches: trained on top of these

    def to_dict(self) -> dict[str, Any]:
        return {"run_name": self.run_name, "family": self.family, "kind": self.kind, "status": self.status,
                "run_dir": str(self.run_dir), "work_dir": None if self.work_dir is None else str(self.work_dir),
                "checkpoints": [c.to_dict() for c in self.checkpoints], "validation": self.validation,
                "losses": list(self.losses), "plan": self.plan, "resolved": self.resolved, "samples": self.samples,
                "base_patches": self.base_patches}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = RUN_FILE) -> "RunRecord":
        if not isinstance(data, Mapping):
            raise CrucibleError(f"{where} is not a run record (expected a JSON object)")
        kind = data.get("kind") or "lora"
        entries = data.get("checkpoints") or []
        if not isinstance(entries, list):
            raise CrucibleError(f"{where}: 'checkpoints' is not a list")
        checkpoints = [CheckpointRecord.from_dict({"kind": kind, **c} if isinstance(c, Mapping) else c,
                                                  where=f"{where}: checkpoint {i}") for i, c in enumerate(entries)]
        work_dir = data.get("work_dir")
        return cls(run_name=str(data.get("run_name") or ""), family=str(data.get("family") or ""), kind=kind,
                   status=str(data.get("status") or ""), run_dir=Path(data.get("run_dir") or "."),
                   work_dir=Path(work_dir) if work_dir else None, checkpoints=checkpoints,
                   validation=dict(data.get("validation") or {}), losses=list(data.get("losses") or []),
                   plan=dict(data.get("plan") or {}), resolved=dict(data.get("resolved") or {}),
                   samples=list(data.get("samples") or []), base_patches=dict(data.get("base_patches") or {}))

    def write(self, work_dir: str | Path | None = None) -> Path:
        """Write ``<work_dir>/run.json`` (atomically: a reader never sees half a file)."""
        from .fileio import atomic_write_json

        folder = Path(work_dir) if work_dir is not None else self.work_dir
        if folder is None:
            raise ValueError("RunRecord.write needs a work_dir")
        path = folder / RUN_FILE
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, work_dir: str | Path) -> "RunRecord":
        """Read ``<work_dir>/run.json`` (this version's or an older one's); a clear error naming the file when it is
        missing or unreadable."""
        path = Path(work_dir) / RUN_FILE
        if not path.is_file():
            raise CrucibleError(f"'{work_dir}' has no {RUN_FILE}; give the run's work folder (it holds config.json "
                                f"and {RUN_FILE})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CrucibleError(f"cannot read '{path}' ({exc}); it is damaged: restore it or train again") from exc
        record = cls.from_dict(data, where=str(path))
        if record.work_dir is None:
            record.work_dir = Path(work_dir)
        return record


# --- checkpoint folders ----------------------------------------------------------------------------------------------

def list_checkpoints(folder: str | Path, *, kind: str = "lora") -> list[CheckpointRecord]:
    """Every ``*.safetensors`` in ``folder``, in training-step order (from metadata), then by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"checkpoint folder '{folder}' does not exist; pass the run's output folder")
    found = [CheckpointRecord.from_file(p, kind=kind) for p in folder.iterdir()
             if p.suffix.lower() == ".safetensors" and p.is_file()]
    if not found:
        raise ModelLoadError(f"no .safetensors files in '{folder}'; pass the folder the training run saved into")
    return sorted(found, key=lambda c: (c.step is None, c.step or 0, natural_key(c.path.name)))


def natural_key(text: str) -> tuple:
    """Sort key that orders ``x2`` before ``x10``."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text))


__all__ = ["RUN_FILE", "CheckpointRecord", "RunRecord", "read_safetensors_metadata", "checkpoint_step",
           "checkpoint_val_loss", "list_checkpoints", "natural_key"]
