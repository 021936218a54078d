"""User-facing errors.

Every error a user can cause (bad path, bad option, unreadable file) is a :class:`CrucibleError`. Its message is
short enough for ComfyUI's error dialog, names the file or field at fault and says what to do about it.
"""
from __future__ import annotations

import sys
import unicodedata

_KEEP = {"\n", "\t"}


def console_safe(text: str) -> str:
    """``text`` with every character that a console, a log file or ComfyUI's websocket could choke on spelled as a
    Python escape: lone surrogates (undecodable file names, or forged input such as ``"\\udcff"``), control
    characters other than newline and tab (NUL, escape sequences), and characters the current stdout/stderr
    encoding cannot write. ComfyUI logs every error it is given; one ``UnicodeEncodeError`` there kills its prompt
    worker and stops the queue, so user input never reaches a message unescaped."""
    encodings = {getattr(stream, "encoding", None) or "utf-8" for stream in (sys.stdout, sys.stderr)}
    out = []
    for ch in text:
        if ch in _KEEP or (unicodedata.category(ch) not in ("Cc", "Cs") and _encodable(ch, encodings)):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)


def _encodable(ch: str, encodings: set[str]) -> bool:
    if ch.isascii():
        return True
    try:
        for encoding in encodings:
            ch.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class CrucibleError(ValueError):
    """A problem the user can fix; the message says which input and how. The message is made console-safe
    (:func:`console_safe`) here, once, so no error path can echo raw user input."""

    def __init__(self, *args):
        super().__init__(*(console_safe(a) if isinstance(a, str) else a for a in args))


class ConfigError(CrucibleError):
    """An invalid or unknown configuration field."""


class DatasetError(CrucibleError):
    """A dataset folder, image or caption that cannot be used."""


class ModelLoadError(CrucibleError):
    """A model file or folder that cannot be loaded."""


class MissingDependencyError(CrucibleError, ImportError):
    """An optional package is not installed; the message names the pip package."""

    def __init__(self, package: str, feature: str):
        super().__init__(f"{feature} needs the optional package '{package}'. Install it with: pip install {package}")
        self.package = package


class TrainingDivergedError(CrucibleError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


class UnsafePathError(CrucibleError):
    """A path points outside the folders the pack may read or write."""


def require(module: str, package: str | None = None, feature: str | None = None):
    """Import an optional module lazily, or raise :class:`MissingDependencyError` naming the pip package."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(package or module, feature or module) from exc


def run_command(command, exit_codes: "tuple[tuple[type[BaseException], int], ...]" = ((CrucibleError, 2),)) -> int:
    """Run a command-line command and return its exit code. An error the user can act on prints ``error: …`` and
    returns the code of the first entry of ``exit_codes`` it matches (most specific first); Ctrl+C returns 130."""
    try:
        return command()
    except tuple(kind for kind, _ in exit_codes) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return next(code for kind, code in exit_codes if isinstance(exc, kind))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
