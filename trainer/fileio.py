"""Atomic file writes and safe names.

Every file Crucible writes (LoRA, model, training state, PNG, cache, JSON) goes through :func:`atomic_write`: the
bytes go to a temporary file in the destination folder, are fsynced, and the temp file is renamed over the final
name. A crash or a kill mid-save leaves either the old file or the new one, never a partial one.

A kill can leave the temp file itself behind (``.<name>.<pid>.<random>.tmp``, hidden); the next process that writes
to that folder removes the ones whose writer process is gone, so repeated crashes never pile up multi-GB leftovers.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ConfigError, CrucibleError, UnsafePathError

# Windows device names (also with an extension, trailing spaces, or superscript digits: "CON .txt", "COM¹").
_RESERVED = {"con", "prn", "aux", "nul", "conin$", "conout$",
             *(f"{dev}{d}" for dev in ("com", "lpt") for d in "123456789\u00b9\u00b2\u00b3")}
MAX_NAME = 120  # characters
MAX_NAME_BYTES = 160  # UTF-8 bytes: leaves room for suffixes and temp-file decoration under the usual 255-byte limit
_STARTED = time.time()  # temp files older than this cannot belong to a writer in this process
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp$")  # what atomic_path's mkstemp call creates
_SWEPT: set[tuple[int, str]] = set()  # (process id, folder) pairs already swept for stale temp files


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and rename it to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files killed writers left in ``folder``; returns what was removed.

    A temp file ``.<name>.<pid>.<random>.tmp`` is stale when process ``pid`` no longer exists (POSIX), or, where that
    cannot be checked, when it is older than this process. Temp files of live writers are never touched. Each folder
    is swept once per process (the first time it is written to), so saving thousands of cache files stays linear.
    """
    key = (os.getpid(), str(folder))
    if key in _SWEPT:
        return []
    _SWEPT.add(key)
    removed = []
    try:
        with os.scandir(folder) as entries:
            temps = [(e, m) for e in entries if e.name.startswith(".") and (m := _TEMP_NAME.match(e.name))]
    except OSError:
        return removed
    for entry, match in temps:
        with contextlib.suppress(OSError):
            if _is_stale(int(match.group(1)), entry.stat(follow_symlinks=False).st_mtime):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _is_stale(pid: int, mtime: float) -> bool:
    if pid == os.getpid():
        return False  # another thread of this process may be writing it right now
    if os.name == "posix":
        try:
            os.kill(pid, 0)  # signal 0: existence check only (on Windows os.kill would terminate the process)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # exists, owned by someone else
        return False
    return mtime < _STARTED


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

    Separators, drive letters, control characters, lone surrogates and reserved device names are replaced, leading
    and trailing dots and spaces go, and the result is cut to :data:`MAX_NAME` characters / :data:`MAX_NAME_BYTES`
    UTF-8 bytes. So it never leaves the folder it is joined to, is never hidden, ``.`` or ``..``, and is a valid file
    name on Linux, macOS and Windows. ``safe_name(safe_name(x)) == safe_name(x)``.
    """
    if not isinstance(name, str) or not name.strip():
        raise CrucibleError(f"{what} is empty: give it a name")
    cleaned = _UNSAFE_CHARS.sub("_", _trim(name))
    cleaned = "".join("_" if unicodedata.category(c) == "Cs" else c for c in cleaned)  # lone surrogates
    cleaned = _truncate(_trim(cleaned))
    if not cleaned or set(cleaned) <= {"_", "."}:
        raise CrucibleError(f"{what} {name!r} has no usable characters; use letters, digits, '-' or '_'")
    if cleaned.split(".")[0].rstrip().lower() in _RESERVED:
        cleaned = _truncate("_" + cleaned)
    return cleaned


_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f<>:\"/\\|?*]")
_ENDS = re.compile(r"^[\s.]+|[\s.]+$")


def _trim(text: str) -> str:
    """Without leading/trailing whitespace and dots (Windows drops trailing ones; leading dots hide files)."""
    return _ENDS.sub("", text)


def _truncate(name: str) -> str:
    """At most :data:`MAX_NAME` characters and :data:`MAX_NAME_BYTES` UTF-8 bytes, still trimmed."""
    name = name[:MAX_NAME]
    while len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = name[:-1]
    return _trim(name)


def ensure_inside(path: str | Path, roots: list[str | Path], what: str = "path") -> Path:
    """Resolve ``path`` (following symlinks) and refuse it unless it lies inside one of ``roots``."""
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, symlink loop, unreadable component
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UnsafePathError(f"{what} {shown(str(path))} cannot be resolved ({reason}); give a plain folder path") from None
    for root in roots:
        root = Path(root).expanduser().resolve()
        if resolved == root or root in resolved.parents:
            return resolved
    allowed = ", ".join(str(r) for r in roots[:4]) or "(none configured)"
    allowed += f" and {len(roots) - 4} more" if len(roots) > 4 else ""
    raise UnsafePathError(f"{what} {shown(str(path))} is outside the allowed folders ({allowed}). "
                          "Move it into one of them, or add its folder to CRUCIBLE_ALLOWED_DIRS")


# --- user-given text that becomes a path ------------------------------------------------------------------------------
MAX_PATH_CHARS = 1024  # a dataset or model path typed into a node; real ones are far shorter
MAX_COMPONENT_BYTES = 255  # the usual file-name limit (ext4, APFS, NTFS)
_SUFFIX = re.compile(r"^\.[A-Za-z0-9_-]{1,16}(\.[A-Za-z0-9_-]{1,16})?$")


def shown(value: Any, limit: int = 160) -> str:
    """``value`` quoted for an error message: cut to ``limit`` characters (saying how long it was), so a 5,000
    character name cannot flood a dialog or a log line. Unprintable characters are escaped by
    :class:`~trainer.errors.CrucibleError` itself."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        return f"'{text[:limit]}…' ({len(text)} characters)"
    return f"'{text}'"


def check_path_text(path: Any, what: str) -> str:
    """``path`` as given in a node or config, refused up front when it cannot name a file: not text, a NUL byte,
    characters that have no UTF-8 encoding (lone surrogates), or longer than any file system allows."""
    if not isinstance(path, str):
        raise CrucibleError(f"{what} must be text, not {type(path).__name__}")
    if "\x00" in path:
        raise UnsafePathError(f"{what} {shown(path)} contains a NUL character; give a plain folder path")
    if any(unicodedata.category(c) == "Cs" for c in path):
        raise UnsafePathError(f"{what} {shown(path)} contains characters that cannot be encoded (a lone surrogate "
                              "such as \\udcff); type the name again or rename the folder")
    if len(path) > MAX_PATH_CHARS:
        raise UnsafePathError(f"{what} is too long ({len(path)} characters; at most {MAX_PATH_CHARS}): {shown(path)}")
    for part in re.split(r"[\\/]", path):
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(f"{what} has a name longer than {MAX_COMPONENT_BYTES} bytes ({shown(part)}); "
                                  "no file system accepts it, shorten it")
    return path


def caption_suffix(ext: Any, what: str = "caption_extension") -> str:
    """A caption file extension (kohya ``caption_extension``) as a plain suffix: ``.txt``, ``.caption``, ``txt``
    (a dot is added), ``.wd14.txt``. Anything with a separator, ``..`` or odd characters is refused: the caption
    file is always ``<image stem><suffix>`` in the image's own folder."""
    text = (ext if isinstance(ext, str) else "").strip() or ".txt"
    text = text if text.startswith(".") else "." + text
    if not isinstance(ext, (str, type(None))) or not _SUFFIX.match(text):
        raise ConfigError(f"{what} {shown(ext)} is not a file extension: use a plain suffix such as .txt or .caption "
                          "(letters, digits, '-' and '_' after the dot)")
    return text


# --- where user-named files may be read from ------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadPolicy:
    """The folders the trainer may read user-named files from: ``data`` for dataset folders (and every image and
    caption in them), ``models`` for model files, encoders, VAEs and tokenizers. ``None`` means anywhere.

    The trainer checks every path against the policy in force where it uses it (:func:`check_read`), so a
    configuration built by other code than the nodes cannot reach outside either. ComfyUI's nodes run under
    ComfyUI's folders plus the configured ones (``nodes/_comfy.py``); headless use (the CLI, scripts) is
    unrestricted unless ``CRUCIBLE_ALLOWED_DIRS`` is set, which then bounds both kinds.
    """

    data: tuple[Path, ...] | None = None
    models: tuple[Path, ...] | None = None

    @classmethod
    def from_env(cls) -> "ReadPolicy":
        dirs = tuple(Path(p) for p in os.environ.get(ALLOWED_DIRS_ENV, "").split(os.pathsep) if p.strip())
        return cls(dirs, dirs) if dirs else cls()


ALLOWED_DIRS_ENV = "CRUCIBLE_ALLOWED_DIRS"
_POLICY: contextvars.ContextVar[ReadPolicy | None] = contextvars.ContextVar("crucible_read_policy", default=None)


def current_read_policy() -> ReadPolicy:
    return _POLICY.get() or ReadPolicy.from_env()


@contextlib.contextmanager
def read_policy(policy: ReadPolicy) -> Iterator[ReadPolicy]:
    """Run the block (in this thread / task) under ``policy``."""
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def check_read(path: str | Path, kind: str, what: str, typed: bool = True) -> Path:
    """``path`` resolved (symlinks followed), refused with :class:`UnsafePathError` unless the policy in force
    allows reading it as ``kind`` (``"data"`` or ``"models"``). ``typed``: the path was given by a user (refuse
    text that cannot name a file, see :func:`check_path_text`); ``False`` for names found on disk, which may
    legitimately be undecodable bytes."""
    if typed:
        check_path_text(str(path), what)
    roots = getattr(current_read_policy(), kind)
    if roots is None:
        return Path(path).expanduser()
    return ensure_inside(path, list(roots), what)
