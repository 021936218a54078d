"""The pack's custom socket types, and the one check every node runs on its inputs before doing anything.

A ``/prompt`` request can put a literal JSON value where a workflow would connect a node: ComfyUI 0.8.0 passes a
dict (or ``{"__value__": [...]}``, a list) straight to a ``CRUCIBLE_*`` input. Such a value must never be mistaken
for a node's output: it would carry any path past the checks the producing node makes. So :func:`guard` wraps every
node's FUNCTION:

* each custom-typed input must be an instance of the type its producing node returns (a config dataclass, a
  :class:`RunRecord`), else a :class:`CrucibleError` says which input and which node to connect;
* each STRING input must be text that can be encoded (no lone surrogates): it is refused up front, before it can
  reach a path, a log line or ComfyUI's console;
* the body runs under the trainer's read policy (``_comfy.node_read_policy()``), so every file the trainer opens is
  checked against ComfyUI's folders and the configured ones where it is used;
* an unexpected exception whose message is not console-safe is re-raised as a console-safe
  :class:`CrucibleError`: ComfyUI logs every error, and one that its console cannot print kills its prompt worker.
"""
from __future__ import annotations

import functools
import unicodedata
from typing import Any

from ..trainer import (CaptionConfig, CrucibleError, DatasetConfig, ModelConfig, NetworkConfig, OptimConfig,
                       TrainingConfig, console_safe, read_policy)

from . import _comfy

MODEL = "CRUCIBLE_MODEL"
DATASET = "CRUCIBLE_DATASET"
CAPTIONS = "CRUCIBLE_CAPTIONS"
NETWORK = "CRUCIBLE_NETWORK"
OPTIM = "CRUCIBLE_OPTIM"
TRAINING = "CRUCIBLE_TRAINING"
RUN = "CRUCIBLE_RUN"


class RunRecord(dict):
    """Crucible Train's ``run`` output: the run's :class:`trainer.run_record.RunRecord` in its dict form (what
    ``run.json`` holds: run_dir, work_dir, family, kind, status, the checkpoints with path, step, epoch, loss,
    val_loss, ...), each checkpoint also ``name``d as ComfyUI's loader lists it. A dict (so workflows and scripts
    read it as before), but its own type: a plain dict from a ``/prompt`` request is not a run."""

    @classmethod
    def of(cls, record: Any, names: list[str]) -> "RunRecord":
        """The socket value of a finished run: ``record.to_dict()`` with the loader names of its checkpoints."""
        data = record.to_dict()
        if len(names) != len(data["checkpoints"]):
            raise ValueError("RunRecord.of: one loader name per checkpoint")
        for entry, name in zip(data["checkpoints"], names):
            entry["name"] = name
        return cls(data)


def _dataset_ok(value: Any) -> bool:
    return isinstance(value, tuple) and bool(value) and all(isinstance(d, DatasetConfig) for d in value)


# socket type -> (is this value genuine?, which node makes it)
SOCKETS = {
    MODEL: (lambda v: isinstance(v, ModelConfig), "Crucible Model (or Crucible Split Model)"),
    DATASET: (_dataset_ok, "Crucible Dataset"),
    CAPTIONS: (lambda v: isinstance(v, CaptionConfig), "Crucible Caption Options"),
    NETWORK: (lambda v: isinstance(v, NetworkConfig), "Crucible Network Options"),
    OPTIM: (lambda v: isinstance(v, OptimConfig), "Crucible Optimizer Options"),
    TRAINING: (lambda v: isinstance(v, TrainingConfig), "Crucible Training Options"),
    RUN: (lambda v: isinstance(v, RunRecord), "Crucible Train (its run output)"),
}


def check_socket(title: str, name: str, socket: str, value: Any) -> None:
    """Refuse ``value`` for input ``name`` unless it is what ``socket``'s producing node returns."""
    genuine, maker = SOCKETS[socket]
    if not genuine(value):
        raise CrucibleError(f"{title}: input '{name}' is not a {maker.split(' (')[0]} output (got "
                            f"{type(value).__name__}); connect a {maker} node")


def check_text(title: str, name: str, value: Any) -> None:
    """Refuse a STRING input that cannot be encoded (NUL bytes are the path checks' business: a run name with one
    is cleaned by ``safe_name``, a dataset path with one is refused)."""
    if not isinstance(value, str):
        return  # ComfyUI converts STRING widgets with str(); a linked STRING output is the other node's business
    if any(unicodedata.category(c) == "Cs" for c in value):
        raise CrucibleError(f"{title}: input '{name}' contains characters that cannot be encoded (a lone "
                            f"surrogate such as \\udcff): {console_safe(value[:80])!s}; type it again")


def _input_kinds(cls) -> dict[str, tuple[str, bool]]:
    """``{input name: (socket type, required)}`` for the custom-typed and STRING inputs (cached per class)."""
    cached = cls.__dict__.get("_crucible_input_kinds")
    if cached is None:
        spec = cls.INPUT_TYPES()
        cached = {}
        for group in ("required", "optional"):
            for name, entry in (spec.get(group) or {}).items():
                kind = entry[0] if isinstance(entry, tuple) and entry else None
                lazy = isinstance(entry, tuple) and len(entry) > 1 and isinstance(entry[1], dict) and entry[1].get("lazy")
                if isinstance(kind, str) and (kind in SOCKETS or kind == "STRING"):
                    cached[name] = (kind, group == "required" and not lazy)
        cls._crucible_input_kinds = cached
    return cached


def check_inputs(cls, title: str, inputs: dict) -> None:
    """The checks :func:`guard` runs at the top of a node's FUNCTION (see the module docstring)."""
    as_lists = bool(getattr(cls, "INPUT_IS_LIST", False))
    kinds = sorted(_input_kinds(cls).items(), key=lambda item: item[1][0] != "STRING")  # text first: it is cheap
    for name, (kind, required) in kinds:
        value = inputs.get(name)
        values = value if as_lists and isinstance(value, list) else [value]
        for item in values:
            if item is None:
                if required and kind in SOCKETS:
                    check_socket(title, name, kind, item)
                continue
            if kind == "STRING":
                check_text(title, name, item)
            else:
                check_socket(title, name, kind, item)


def guard(cls, title: str):
    """Wrap ``cls``'s FUNCTION with :func:`check_inputs`, the read policy and console-safe errors (once)."""
    function = getattr(cls, cls.FUNCTION)
    if getattr(function, "_crucible_guarded", False):
        return cls

    @functools.wraps(function)
    def guarded(self, *args, **inputs):
        check_inputs(cls, title, inputs)
        try:
            with read_policy(_comfy.node_read_policy()):
                return function(self, *args, **inputs)
        except CrucibleError:
            raise
        except Exception as exc:  # noqa: BLE001 - only re-raised when its text could break ComfyUI's logging
            text = str(exc)
            if console_safe(text) == text and len(text) <= 2000:
                raise
            raise CrucibleError(f"{title}: {type(exc).__name__}: {text[:500]}") from None

    guarded._crucible_guarded = True
    setattr(cls, cls.FUNCTION, guarded)
    return cls
