"""kohya sd-scripts' block layout for block-wise learning rates and ranks (``networks/lora.py``).

kohya numbers the UNet's blocks the way the original (SAI/CompVis) UNet does:

* **SD1.5** – 25 blocks: ``IN00``–``IN11`` (``input_blocks.0``–``11``; IN00 is ``conv_in``), ``MID``, ``OUT00``–``OUT11``
  (``output_blocks.0``–``11``). ``down_lr_weight`` / ``up_lr_weight`` take 12 values, ``mid_lr_weight`` one;
  ``block_dims`` / ``block_alphas`` / ``conv_block_dims`` / ``conv_block_alphas`` take 25.
* **SDXL** – 23 blocks: the embeddings, ``input_blocks.0``–``8``, ``middle_block.0``–``2``, ``output_blocks.0``–``8``
  and the output layers. ``down_lr_weight`` / ``up_lr_weight`` take 9 values (``mid_lr_weight`` applies to the three
  middle parts); the per-block lists take 23.

In diffusers names (what Crucible's modules are called) ``down_blocks.i.resnets|attentions.j`` is input block
``1 + 3i + j`` and ``down_blocks.i.downsamplers`` is ``3i + 3``; ``up_blocks.i.resnets|attentions.j`` is output block
``3i + j`` and ``up_blocks.i.upsamplers`` is ``3i + 2``.

``down_lr_weight`` / ``up_lr_weight`` also take kohya's presets: ``cosine``, ``sine``, ``linear``, ``reverse_linear``,
``zeros``, each optionally ``+number`` (added to every value).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import ConfigError

_DOWN_UP = re.compile(r"(?:^|\.)(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.|$)")
_MID = re.compile(r"(?:^|\.)mid_block\.(resnets|attentions)\.(\d+)(?:\.|$)")
_EMBED = re.compile(r"(?:^|\.)(time_embedding|add_embedding)(?:\.|$)")
_OUT = re.compile(r"(?:^|\.)(conv_norm_out|conv_out)(?:\.|$)")
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


@dataclass(frozen=True)
class BlockLayout:
    """kohya's block count of one UNet family: ``lead`` (SDXL's embeddings block) + ``down`` + ``mid`` + ``up`` +
    ``tail`` (SDXL's output block)."""

    name: str
    down: int
    mid: int
    up: int
    lead: int = 0
    tail: int = 0

    @property
    def total(self) -> int:
        return self.lead + self.down + self.mid + self.up + self.tail

    def index(self, module_name: str) -> int | None:
        """The kohya block index (0-based into ``block_dims``) of a diffusers UNet module, or None."""
        match = _DOWN_UP.search(module_name)
        if match:
            side, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
            if side == "down":
                k = 3 * i + 3 if kind == "downsamplers" else 1 + 3 * i + j
                return self.lead + k if k < self.down else None
            k = 3 * i + 2 if kind == "upsamplers" else 3 * i + j
            return self.lead + self.down + self.mid + k if k < self.up else None
        if module_name == "mid_block" or module_name.startswith("mid_block.") or ".mid_block." in module_name:
            if self.mid == 1:
                return self.lead + self.down
            mid = _MID.search(module_name)
            if mid is None:
                return None
            part = 2 * int(mid.group(2)) + (1 if mid.group(1) == "attentions" else 0)  # resnet, attention, resnet
            return self.lead + self.down + min(part, self.mid - 1)
        if re.search(r"(?:^|\.)conv_in(?:\.|$)", module_name):
            return self.lead  # input block 0
        if self.lead and _EMBED.search(module_name):
            return 0
        if self.tail and _OUT.search(module_name):
            return self.total - 1
        return None

    def lr_weights(self, down: str, mid: float, up: str) -> list[float] | None:
        """One LR multiplier per block (``total`` values; kohya's ``get_block_lr_weight``), or None when unset."""
        if not down.strip() and not up.strip() and mid == 1.0:
            return None
        downs = parse_weights(down, self.down, "network.down_lr_weight", self.name) or [1.0] * self.down
        ups = parse_weights(up, self.up, "network.up_lr_weight", self.name) or [1.0] * self.up
        return [1.0] * self.lead + downs + [float(mid)] * self.mid + ups + [1.0] * self.tail

    def per_block(self, values: tuple, field: str) -> list | None:
        """``block_dims``-style lists: exactly ``total`` values, or None when empty."""
        if not values:
            return None
        if len(values) != self.total:
            raise ConfigError(f"network.{field} has {len(values)} values; kohya's {self.name} layout needs "
                              f"{self.total} ({self._describe()})")
        return list(values)

    def _describe(self) -> str:
        parts = [f"{self.down} IN", f"{self.mid} MID", f"{self.up} OUT"]
        if self.lead:
            parts.insert(0, "1 embedding")
        if self.tail:
            parts.append("1 output")
        return ", ".join(parts)


SD15_BLOCKS = BlockLayout("sd15", down=12, mid=1, up=12)
SDXL_BLOCKS = BlockLayout("sdxl", down=9, mid=3, up=9, lead=1, tail=1)


def parse_weights(text: str, count: int, field: str, family: str) -> list[float] | None:
    """``"0,0,1,…"`` (exactly ``count`` numbers) or a kohya preset (``cosine+0.5`` …) → ``count`` floats;
    ``""`` → None."""
    text = (text or "").strip()
    if not text:
        return None
    name, _, offset = text.partition("+")
    if name.strip() in PRESETS:
        try:
            base = float(offset) if offset.strip() else 0.0
        except ValueError:
            raise ConfigError(f"{field} {text!r}: the part after '+' must be a number, e.g. cosine+0.5") from None
        return [v + base for v in _preset(name.strip(), count)]
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{field} {text!r} must be {count} numbers separated by commas or a preset "
                          f"({', '.join(PRESETS)}, optionally +number)") from None
    if len(values) != count:
        raise ConfigError(f"{field} has {len(values)} values; kohya's {family} layout needs {count} "
                          f"(one per block, shallow to deep for down, deep to shallow for up)")
    return values


def _preset(name: str, n: int) -> list[float]:
    ramp = [i / (n - 1) for i in range(n)]
    if name == "cosine":
        return [math.sin(math.pi * r / 2) for r in reversed(ramp)]
    if name == "sine":
        return [math.sin(math.pi * r / 2) for r in ramp]
    if name == "linear":
        return ramp
    if name == "reverse_linear":
        return list(reversed(ramp))
    return [0.0] * n  # zeros


__all__ = ["BlockLayout", "SD15_BLOCKS", "SDXL_BLOCKS", "PRESETS", "parse_weights"]
