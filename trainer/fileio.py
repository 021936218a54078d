"""Atomic file writes and safe names.

Every file Crucible writes (LoRA, model, training state, PNG, cache, JSON) goes through :func:`atomic_write`: the
bytes go to a temporary file in the destination folder, are fsynced, and the temp file is renamed over the final
name. A crash or a kill mid-save leaves either the old file or the new one, never a partial one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CrucibleError, UnsafePathError

_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
MAX_NAME = 120


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and rename it to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CrucibleError(f"cannot write '{path}': {exc.strerror or exc}. Check the folder exists, is writable and has free space") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise CrucibleError(f"cannot write '{path}': {exc.strerror or exc}. Check free space and permissions; earlier files are untouched") from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Atomically save a safetensors file (tensors made contiguous, metadata values stringified)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=meta))


def safe_name(name: str, what: str = "name") -> str:
    """Normalise a user-given run or file name into one safe path component.

    Separators, drive letters, control characters and reserved device names are refused or replaced so the
    result can never leave the folder it is joined to.
    """
    if not isinstance(name, str) or not name.strip():
        raise CrucibleError(f"{what} is empty: give it a name")
    cleaned = re.sub(r"[\x00-\x1f<>:\"/\\|?*]", "_", name.strip())
    cleaned = cleaned.strip(" .")
    if not cleaned or set(cleaned) <= {"_", "."}:
        raise CrucibleError(f"{what} {name!r} has no usable characters; use letters, digits, '-' or '_'")
    if cleaned.split(".")[0].lower() in _RESERVED:
        cleaned = "_" + cleaned
    return cleaned[:MAX_NAME]


def ensure_inside(path: str | Path, roots: list[str | Path], what: str = "path") -> Path:
    """Resolve ``path`` (following symlinks) and refuse it unless it lies inside one of ``roots``."""
    resolved = Path(path).expanduser().resolve()
    for root in roots:
        root = Path(root).expanduser().resolve()
        if resolved == root or root in resolved.parents:
            return resolved
    allowed = ", ".join(str(r) for r in roots) or "(none configured)"
    raise UnsafePathError(f"{what} '{path}' is outside the allowed folders ({allowed}). "
                          "Move it into ComfyUI's input folder or add its folder to CRUCIBLE_ALLOWED_DIRS")
