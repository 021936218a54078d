"""The one parser for list inputs typed into node widgets: tags, prompts, seeds, LoRA strengths, per-block values.

A list is written one item per line and/or separated by commas (numbers also by ';'); blanks around items and
empty items are ignored. Errors name the node and the input and say what to type.
"""
from __future__ import annotations

import math
import re

from ..trainer import CrucibleError, shown

LINES = "\n"
LINES_AND_COMMAS = ",\n"
NUMBER_SEPARATORS = ",;\n"


def split_list(text: str, separators: str = LINES_AND_COMMAS) -> tuple[str, ...]:
    """The non-empty, stripped items of ``text`` split at any of ``separators`` (``\\r\\n`` counts as a newline)."""
    parts = re.split(f"[{re.escape(separators)}]", (text or "").replace("\r\n", "\n").replace("\r", "\n"))
    return tuple(p.strip() for p in parts if p.strip())


def lines(text: str) -> tuple[str, ...]:
    """One item per line (commas stay inside items: prompts, ``key=value`` pairs)."""
    return split_list(text, LINES)


def numbers(text: str, what: str, whole: bool = False, lo: float = -math.inf, hi: float = math.inf) -> tuple:
    """Numbers separated by commas, ';' or newlines; ``whole``: integers. ``what`` names the input in errors,
    e.g. ``"Crucible Checkpoint Sweep: 'seeds'"``. Values outside ``[lo, hi]`` (or not finite) are refused."""
    kind = "whole numbers" if whole else "numbers"
    values = []
    for item in split_list(text, NUMBER_SEPARATORS):
        try:
            value = float(item)
            if whole:
                if not value.is_integer():
                    raise ValueError(item)
                value = int(item) if re.fullmatch(r"[+-]?\d+", item) else int(value)  # big seeds stay exact
        except (ValueError, OverflowError):
            raise CrucibleError(f"{what} must be {kind} separated by commas, not {shown(text)}") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            bounds = f" between {_num(lo)} and {_num(hi)}" if math.isfinite(lo) or math.isfinite(hi) else ""
            raise CrucibleError(f"{what} must be finite {kind}{bounds}, not {shown(item)}")
        values.append(value)
    return tuple(values)


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"
