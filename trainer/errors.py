"""User-facing errors.

Every error a user can cause (bad path, bad option, unreadable file) is a :class:`CrucibleError`. Its message is
short enough for ComfyUI's error dialog, names the file or field at fault and says what to do about it.
"""
from __future__ import annotations


class CrucibleError(ValueError):
    """A problem the user can fix; the message says which input and how."""


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
