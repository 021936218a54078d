"""Model families behind one interface (see :mod:`trainer.families.base`)."""
from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import Components, Conditioning, ModelFamily

_MODULES = {"sd15": "sd15", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
_cache: dict[str, ModelFamily] = {}


def get_family(name: str) -> ModelFamily:
    """The family adapter for ``name`` (imported lazily, so a missing family never breaks start-up)."""
    if name not in _MODULES:
        raise ConfigError(f"unknown model family '{name}'; choose one of: {', '.join(_MODULES)}")
    if name not in _cache:
        module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
        _cache[name] = module.FAMILY
    return _cache[name]


__all__ = ["Components", "Conditioning", "ModelFamily", "get_family"]
