"""The ComfyUI 0.8.0 reference data vendored in ``tests/data/comfyui-0.8.0`` (provenance in its README).

Tests get it from the ``comfyui_reference`` fixture (``tests/conftest.py``); ``tests/workflow_builder.py`` (a script)
uses :data:`REFERENCE` directly. Nothing here reads ``../shared``.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "comfyui-0.8.0"
FAMILIES = ("sd15", "sdxl", "sd3", "flux")
REGENERATE = "tests/data/regenerate_comfyui_reference.py"


@dataclass(frozen=True)
class ComfyUIReference:
    root: Path = DATA
    version: str = "0.8.0"

    def object_info(self) -> dict[str, dict]:
        """``/object_info`` entries of the core nodes the pack's workflows, tests and code name (a fresh copy)."""
        return json.loads(self._read("object_info.json"))

    @lru_cache(maxsize=None)
    def core_node_names(self) -> frozenset[str]:
        """Every core node class of that ComfyUI, including those whose schema was trimmed away."""
        return frozenset(json.loads(self._read("core_nodes.json"))["names"])

    @lru_cache(maxsize=None)
    def keymap(self, family: str) -> dict:
        """``{"unet": {prefix: target}, "clip": {prefix: target}, ...}``: what ComfyUI's LoraLoader maps."""
        if family not in FAMILIES:
            raise KeyError(f"no ComfyUI key map for family {family!r} (have {', '.join(FAMILIES)})")
        return json.loads(gzip.decompress((self.root / "lora_keymaps" / f"{family}.json.gz").read_bytes()))

    def _read(self, name: str) -> str:
        path = self.root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: it is part of the repository (regenerate with {REGENERATE})")
        return path.read_text(encoding="utf-8")


REFERENCE = ComfyUIReference()
