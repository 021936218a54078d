"""Model families behind one interface (see :mod:`trainer.families.base`).

This registry is the only place that lists the families: everything else (the config's choices, the node
dropdowns, the exporter's names, single-file detection) asks it. Adding a family is one module here that defines
``FAMILY`` (a :class:`ModelFamily` whose class attributes hold the family's facts) plus its name in
:mod:`trainer.families.registry`.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Callable, Iterator

from ..errors import ConfigError
from .base import Components, Conditioning, EncoderSpec, ModelFamily, PartDtypes
from .registry import FAMILY_NAMES

_cache: dict[str, ModelFamily] = {}
# Families a host builds at run time around models it loaded itself (nodes/comfy_family.py wraps ComfyUI's MODEL /
# CLIP / VAE): known by name only while :func:`hosted_family` holds them, never listed in menus.
_hosted: dict[str, ModelFamily] = {}


@contextmanager
def hosted_family(family: ModelFamily):
    """Make ``family`` (an object a host built) known under ``family.name`` while the block runs, so a config naming
    it validates and ``get_family`` returns it; the loop then uses it like any registered family."""
    if family.name in FAMILY_NAMES:
        raise ValueError(f"a hosted family cannot take the registered name '{family.name}'")
    previous = _hosted.get(family.name)
    _hosted[family.name] = family
    try:
        yield family
    finally:
        if previous is None:
            _hosted.pop(family.name, None)
        else:
            _hosted[family.name] = previous


def known_family_names() -> tuple[str, ...]:
    """The registered families' names plus the hosted ones in force (what ``model.family`` may name)."""
    return FAMILY_NAMES + tuple(_hosted)


def get_family(name: "str | ModelFamily") -> ModelFamily:
    """The family adapter for ``name`` (imported lazily, so a missing family never breaks start-up). A family
    object is returned as it is, so functions can take either."""
    if isinstance(name, ModelFamily):
        return name
    if name in _hosted:
        return _hosted[name]
    if name not in FAMILY_NAMES:
        raise ConfigError(f"model.family '{name}' is not a model family Crucible knows; choose one of: "
                          f"{', '.join(FAMILY_NAMES)}")
    if name not in _cache:
        module = importlib.import_module(f"{__name__}.{name}")
        _cache[name] = module.FAMILY
    return _cache[name]


def all_families() -> Iterator[ModelFamily]:
    """Every registered family, in :data:`FAMILY_NAMES` order."""
    return (get_family(name) for name in FAMILY_NAMES)


def find_family(test: Callable[[ModelFamily], bool]) -> ModelFamily | None:
    """The one family ``test`` accepts (families' detection rules are exclusive), or ``None``."""
    found = [family for family in all_families() if test(family)]
    if len(found) > 1:  # pragma: no cover - guarded by tests/test_family_contract.py
        raise AssertionError(f"families {[f.name for f in found]} all claim the same model")
    return found[0] if found else None


def family_of_pipeline(class_name: str) -> str | None:
    """The family a diffusers pipeline class (``model_index.json``'s ``_class_name``) belongs to, or ``None``."""
    family = find_family(lambda f: f.owns_pipeline_class(class_name))
    return family.name if family else None


__all__ = ["Components", "Conditioning", "EncoderSpec", "ModelFamily", "PartDtypes", "FAMILY_NAMES", "get_family", "all_families",
           "find_family", "family_of_pipeline", "hosted_family", "known_family_names"]
