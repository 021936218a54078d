"""Small builders for V1 input specs, so every input carries a tooltip and a sane range."""
from __future__ import annotations

from typing import Any, Sequence


def INT(default: int, lo: int, hi: int, tooltip: str, step: int = 1) -> tuple:
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


def SEED(default: int, tooltip: str) -> tuple:
    """A seed. ComfyUI's frontend gives every INT input named ``seed`` a control_after_generate widget (default
    "randomize"); start it at "fixed" so a preview matches the run and a re-queue repeats it."""
    return ("INT", {"default": default, "min": 0, "max": 2**31 - 1, "step": 1, "control_after_generate": "fixed",
                    "tooltip": tooltip})


def FLOAT(default: float, lo: float, hi: float, step: float, tooltip: str) -> tuple:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tooltip})


def STRING(default: str, tooltip: str, multiline: bool = False) -> tuple:
    return ("STRING", {"default": default, "multiline": multiline, "tooltip": tooltip})


def BOOL(default: bool, tooltip: str) -> tuple:
    return ("BOOLEAN", {"default": default, "tooltip": tooltip})


def combo(choices: Sequence[str], default: str, tooltip: str) -> tuple:
    return (list(choices), {"default": default, "tooltip": tooltip})


def text_result(text: str, result: tuple) -> dict[str, Any]:
    """An output node's return: the text shown under the node plus the normal outputs."""
    return {"ui": {"text": [text]}, "result": result}
