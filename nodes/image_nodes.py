"""Image grid/strip node: list of IMAGEs (+ labels, column/row indices from the sweep) → one labelled IMAGE."""
from __future__ import annotations

import time

from ..trainer import CrucibleError, safe_name

from . import _comfy
from .widgets import BOOL, INT, STRING


class CrucibleImageGrid:
    CATEGORY = "Crucible/image"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "compose"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True
    DESCRIPTION = "Lays sweep renders side by side: columns = checkpoints, rows = prompts × seeds × strengths."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The decoded images (a list: one per sweep item)."}),
            "title": STRING("", "Optional title above the grid."),
            "font_size": INT(20, 8, 96, "Label font size (a built-in font that works on every OS)."),
            "padding": INT(8, 0, 128, "Space between cells, in pixels."),
            "background": STRING("#1e1e1e", "Background colour."),
            "save": BOOL(True, "Also save the grid as a PNG (layout stored in its metadata) in ComfyUI/output."),
            "filename_prefix": STRING("crucible/sweep", "File name prefix inside ComfyUI/output."),
        }, "optional": {
            "labels": ("STRING", {"forceInput": True, "tooltip": "Column labels from the sweep (one per image)."}),
            "columns": ("INT", {"forceInput": True, "tooltip": "Column index per image (from the sweep)."}),
            "rows": ("INT", {"forceInput": True, "tooltip": "Row index per image (from the sweep)."}),
            "row_labels": ("STRING", {"forceInput": True, "tooltip": "Row label per image (from the sweep)."}),
        }}

    def compose(self, images, title, font_size, padding, background, save, filename_prefix,
                labels=None, columns=None, rows=None, row_labels=None):
        from ..trainer import GridStyle, arrange, compose_grid, save_png

        one = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731 - scalar widgets arrive as 1-item lists
        pils = [im for batch in images for im in _comfy.image_to_pil(batch)]
        if not pils:
            raise CrucibleError("Crucible Image Grid: no images arrived; connect VAE Decode's IMAGE output")
        n = len(pils)
        cols = list(columns) if columns else list(range(n))
        rws = list(rows) if rows else [0] * n
        if len(cols) != n or len(rws) != n:
            raise CrucibleError(f"Crucible Image Grid: {n} images but {len(cols)} column and {len(rws)} row indices; "
                                "connect the sweep's column/row outputs, or neither")
        col_labels = _by_index(labels, cols)
        rlabels = _by_index(row_labels, rws)
        style = GridStyle(font_size=one(font_size), padding=one(padding), background=one(background))
        composite = compose_grid(arrange(pils, cols, rws), col_labels=col_labels,
                                 row_labels=rlabels if row_labels else (), title=one(title), style=style)
        ui = {}
        if one(save):
            prefix = "/".join(safe_name(p, "filename_prefix") for p in one(filename_prefix).split("/") if p.strip())
            name = f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}_{id(composite) % 10000:04d}.png"
            out = _comfy.output_dir() / name
            save_png(composite, out)
            rel = out.relative_to(_comfy.output_dir())
            ui = {"images": [{"filename": rel.name, "subfolder": rel.parent.as_posix() if rel.parent.as_posix() != "." else "",
                              "type": "output"}]}
        return {"ui": ui, "result": (_comfy.pil_to_image([composite.image]),)}


def _by_index(values, indices) -> list[str]:
    """One label per distinct index, taken from the first item that has it."""
    if not values:
        return []
    out: dict[int, str] = {}
    for value, idx in zip(values, indices):
        out.setdefault(idx, str(value))
    return [out.get(i, "") for i in range(max(indices) + 1)]


NODES = {"CrucibleImageGrid": CrucibleImageGrid}
NAMES = {"CrucibleImageGrid": "Crucible Image Grid"}
