"""The base of the option nodes (Caption / Network / Optimizer / Training Options): each returns one section of
the training config, and its ``INPUT_TYPES`` is derived from that config dataclass.

A node lists its widgets in saved-widget order (append only: saved workflows address widgets by position) as
:class:`Widget` entries, which say how a field shows (range, step, tooltip, choices) but not its default: the
default is the dataclass field's, so the node and ``python -m trainer`` can never disagree about it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from . import widgets

_FROM_CONFIG = object()  # Widget.default: take the config field's default


@dataclass(frozen=True)
class Widget:
    """How one config field shows as a widget. ``parse`` turns the widget's value into the field's value (a list
    typed as text, a combo's string into a number); ``default`` is set only where the widget's default is not the
    field's (say why where it is used)."""

    kind: str  # INT, FLOAT, STRING, BOOLEAN, SEED or COMBO
    tooltip: str
    lo: float | None = None
    hi: float | None = None
    step: float | None = None
    choices: Sequence[str] = ()
    multiline: bool = False
    parse: Callable[[Any], Any] | None = None
    default: Any = _FROM_CONFIG

    def spec(self, default: Any) -> tuple:
        if self.kind == "INT":
            return widgets.INT(default, self.lo, self.hi, self.tooltip, step=self.step or 1)
        if self.kind == "FLOAT":
            return widgets.FLOAT(default, self.lo, self.hi, self.step, self.tooltip)
        if self.kind == "SEED":
            return widgets.SEED(default, self.tooltip)
        if self.kind == "STRING":
            return widgets.STRING(default, self.tooltip, multiline=self.multiline)
        if self.kind == "BOOLEAN":
            return widgets.BOOL(default, self.tooltip)
        return widgets.combo(list(self.choices), default, self.tooltip)


def Int(lo: int, hi: int, tooltip: str, step: int = 1) -> Widget:
    return Widget("INT", tooltip, lo, hi, step)


def Float(lo: float, hi: float, step: float, tooltip: str) -> Widget:
    return Widget("FLOAT", tooltip, lo, hi, step)


def Seed(tooltip: str) -> Widget:
    return Widget("SEED", tooltip)


def Text(tooltip: str, multiline: bool = False, parse: Callable[[str], Any] | None = None) -> Widget:
    return Widget("STRING", tooltip, multiline=multiline, parse=parse)


def Flag(tooltip: str, default: Any = _FROM_CONFIG) -> Widget:
    return Widget("BOOLEAN", tooltip, default=default)


def Choice(choices: Sequence[str], tooltip: str, parse: Callable[[str], Any] | None = None,
           default: Any = _FROM_CONFIG) -> Widget:
    return Widget("COMBO", tooltip, choices=tuple(choices), parse=parse, default=default)


def widget_default(config: type, name: str, widget: Widget) -> Any:
    """The widget's default: the config field's default, as the widget shows it (a list as text, a number
    offered as a combo choice as its string)."""
    if widget.default is not _FROM_CONFIG:
        return widget.default
    field = next((f for f in dataclasses.fields(config) if f.name == name), None)
    assert field is not None, f"widget {name!r} is not a field of {config.__name__}"
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(value, tuple):
        return ("\n" if widget.multiline else ", ").join(str(v) for v in value)
    if widget.kind == "COMBO":
        return str(value)
    return value


class OptionNode:
    """A node that returns one config section built from its widgets (subclasses set CONFIG, RETURN_TYPES,
    RETURN_NAMES and WIDGETS; OPTIONAL_WIDGETS are appended optional inputs)."""

    CONFIG: type
    WIDGETS: dict[str, Widget] = {}
    OPTIONAL_WIDGETS: dict[str, Widget] = {}
    CATEGORY = "Crucible/train"
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        spec = {"required": {name: w.spec(widget_default(cls.CONFIG, name, w)) for name, w in cls.WIDGETS.items()}}
        if cls.OPTIONAL_WIDGETS:
            spec["optional"] = {name: w.spec(widget_default(cls.CONFIG, name, w))
                                for name, w in cls.OPTIONAL_WIDGETS.items()}
        return spec

    @classmethod
    def field_values(cls, values: dict) -> dict:
        """Widget values -> config field values (each widget's ``parse``)."""
        table = {**cls.WIDGETS, **cls.OPTIONAL_WIDGETS}
        return {name: table[name].parse(value) if name in table and table[name].parse else value
                for name, value in values.items()}

    def build(self, **values):
        return (self.CONFIG(**self.field_values(values)),)
