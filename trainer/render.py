"""Labelled strip / grid compositor for checkpoint sweeps.

Pure PIL + numpy (no torch import): used by the ComfyUI "image strip/grid" node, the headless sweep and the
``/prompt`` client. The caller decides what the axes mean (usually columns = checkpoints, rows = prompts ×
strengths); the compositor only takes the images and the row/column labels.

* Cells of different sizes are letterboxed into the largest cell (aspect kept, centred, background fill).
* A missing cell (``None``) becomes an empty placeholder.
* Text uses Pillow's built-in scalable font (no font files needed on any OS), falling back to the bitmap default
  font on builds without FreeType; it is wrapped by measured width and truncated with an ellipsis.
* Every tile is pasted straight into one preallocated canvas; a tile is only resized when its size differs.

The returned :class:`Composite` carries a JSON-able ``layout`` (cell boxes, labels, sizes) which :func:`save_png`
stores in the PNG's ``crucible_layout`` text chunk.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .errors import CrucibleError
from .fileio import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

LAYOUT_KEY = "crucible_layout"
LAYOUT_VERSION = 1
# A column label containing this is the recommended checkpoint (lowest validation loss, see trainer/sweep.py): its
# label is drawn in ``GridStyle.highlight_color`` and its cells framed in that colour. ASCII/Latin-1 on purpose:
# Pillow's built-in font has no star glyph.
BEST_MARK = "»best«"  # one word, so label wrapping never splits it


@dataclass(frozen=True)
class GridStyle:
    """Look of a composite. Sizes are in pixels; colours are anything PIL's ``ImageColor`` understands."""

    padding: int = 8
    background: str = "#1e1e1e"
    text_color: str = "#e6e6e6"
    placeholder_color: str = "#2e2e2e"  # fill of a missing (None) cell
    font_size: int = 20  # column and row labels
    title_font_size: int | None = None  # None = 1.4 × font_size
    caption_font_size: int | None = None  # None = 0.8 × font_size
    label_max_chars: int = 48  # labels and captions are cut to this many characters (ellipsis added)
    label_max_lines: int = 3  # column labels wrap onto at most this many lines
    title_max_lines: int = 2
    row_label_max_width: int = 320  # the row-label column never gets wider than this
    empty_cell_size: tuple[int, int] = (256, 256)  # cell size when every cell is None
    highlight_color: str = "#ffb000"  # the recommended column (label containing BEST_MARK)

    @classmethod
    def light(cls, **overrides: Any) -> "GridStyle":
        """White background, dark text."""
        values = {"background": "#ffffff", "text_color": "#202020", "placeholder_color": "#ececec"}
        return cls(**{**values, **overrides})

    @property
    def resolved_title_size(self) -> int:
        return self.title_font_size or max(1, round(self.font_size * 1.4))

    @property
    def resolved_caption_size(self) -> int:
        return self.caption_font_size or max(1, round(self.font_size * 0.8))


@dataclass(frozen=True)
class Composite:
    """A composed image and its layout (cell boxes, labels, sizes; JSON-able)."""

    image: "Image.Image"
    layout: dict


# --------------------------------------------------------------------------------------------------- conversion

def to_pil(data: Any) -> "Image.Image":
    """Convert an ``[H, W, C]`` (or ``[1, H, W, C]`` / ``[H, W]``) array or tensor to a PIL image.

    Floats are taken as 0..1 and clipped; ``uint8`` is used as is. C = 1, 3 or 4 gives L, RGB or RGBA. A torch tensor
    is accepted without importing torch (anything with ``.detach().cpu().numpy()``). A PIL image is returned as is.
    """
    from PIL import Image

    if isinstance(data, Image.Image):
        return data
    if hasattr(data, "detach"):
        data = data.detach().cpu().numpy()
    array = np.asarray(data)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise CrucibleError(f"cannot make an image from an array of shape {tuple(array.shape)}: "
                            "expected [H, W, C] with C = 1, 3 or 4 (one image, not a batch)")
    if array.dtype != np.uint8:
        array = np.nan_to_num(array.astype(np.float32), nan=0.0)  # a NaN (diverged) image shows black
        array = np.clip(array * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def to_array(image: "Image.Image") -> np.ndarray:
    """Convert a PIL image to a float32 ``[H, W, 3]`` array in 0..1 (transparency composited onto black)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


# -------------------------------------------------------------------------------------------------------- fonts

@dataclass(frozen=True)
class _Font:
    """A PIL font plus what layout needs: line height, ellipsis and a text cleaner for bitmap fonts."""

    font: Any
    line_height: int
    scalable: bool

    @property
    def ellipsis(self) -> str:
        return "\u2026" if self.scalable else "..."

    def clean(self, text: str) -> str:
        """Collapse whitespace; the bitmap fallback font can only draw Latin-1, so replace the rest with '?'."""
        text = " ".join(str(text).split())
        return text if self.scalable else text.encode("latin-1", "replace").decode("latin-1")

    def width(self, text: str) -> float:
        return float(self.font.getlength(text))


@lru_cache(maxsize=32)
def load_font(size: int) -> _Font:
    """Pillow's built-in scalable font at ``size`` px, or the fixed bitmap default when FreeType is missing."""
    from PIL import ImageFont

    try:
        font = ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return _Font(font, ascent + descent + max(1, size // 8), True)
    return _Font(font, font.getbbox("Ag")[3] + 2, False)


def _fit_prefix(text: str, font: _Font, max_width: float) -> int:
    """Length of the longest prefix of ``text`` that fits ``max_width`` (at least 1)."""
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.width(text[:mid]) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _ellipsize(line: str, font: _Font, max_width: float) -> str:
    """``line`` shortened until ``line + ellipsis`` fits."""
    ell = font.ellipsis
    while line and font.width(line.rstrip() + ell) > max_width:
        line = line[:-1]
    return line.rstrip() + ell


def truncate(text: str, max_chars: int, font: _Font) -> str:
    """Cut ``text`` to at most ``max_chars`` characters, ending with the font's ellipsis when cut."""
    text = font.clean(text)
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    ell = font.ellipsis
    return text[: max(1, max_chars - len(ell))].rstrip() + ell


def wrap_text(text: str, font: _Font, max_width: float, max_lines: int) -> list[str]:
    """Greedy word wrap by measured width; over-long words are split; overflow ends in an ellipsis."""
    text = font.clean(text)
    if not text:
        return []
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if font.width(candidate) <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while len(word) > 1 and font.width(word) > max_width:
            cut = _fit_prefix(word, font, max_width)
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    lines.append(current)
    max_lines = max(1, max_lines)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _ellipsize(lines[-1], font, max_width)
    return lines


# ------------------------------------------------------------------------------------------------------- layout

def arrange(images: Sequence[Any], col_keys: Sequence[int], row_keys: Sequence[int]) -> list[list[Any]]:
    """Place a flat list into ``cells[row][col]`` by each image's (column index, row index).

    The grid is ``max(col)+1`` wide and ``max(row)+1`` tall; positions nobody fills are ``None``.
    """
    if not len(images) == len(col_keys) == len(row_keys):
        raise CrucibleError(f"arrange: {len(images)} images but {len(col_keys)} column and {len(row_keys)} row "
                            "indices; give one column and one row index per image")
    if not images:
        return []
    for name, keys in (("column", col_keys), ("row", row_keys)):
        bad = [k for k in keys if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0]
        if bad:
            raise CrucibleError(f"arrange: {name} index {bad[0]!r} is not a non-negative integer")
    cells: list[list[Any]] = [[None] * (max(col_keys) + 1) for _ in range(max(row_keys) + 1)]
    taken: set[tuple[int, int]] = set()
    for i, (image, col, row) in enumerate(zip(images, col_keys, row_keys)):
        if (row, col) in taken:
            raise CrucibleError(f"arrange: image {i} goes to column {col}, row {row}, which is already filled; "
                                "each (column, row) pair must be unique")
        taken.add((row, col))
        cells[row][col] = image
    return cells


def _normalise(cells: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Rows padded with None to equal length; arrays/tensors converted to PIL."""
    width = max((len(row) for row in cells), default=0)
    return [[None if cell is None else to_pil(cell) for cell in row] + [None] * (width - len(row)) for row in cells]


def _check_count(labels: Sequence[Any], expected: int, what: str, noun: str) -> list[str]:
    labels = ["" if label is None else str(label) for label in labels]
    if labels and len(labels) != expected:
        raise CrucibleError(f"{what}: {len(labels)} labels for {expected} {noun}s; "
                            f"give exactly one label per {noun} (or none)")
    return labels


def _cell_size(grid: list[list[Any]], style: GridStyle) -> tuple[int, int]:
    sizes = [cell.size for row in grid for cell in row if cell is not None]
    if not sizes:
        return style.empty_cell_size
    return max(w for w, _ in sizes), max(h for _, h in sizes)


def _fit(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """Largest size with the aspect of ``size`` inside ``box``."""
    (w, h), (bw, bh) = size, box
    scale = min(bw / w, bh / h)
    return max(1, min(bw, round(w * scale))), max(1, min(bh, round(h * scale)))


@dataclass(frozen=True)
class _Plan:
    """Every position and text line of a composite, computed before any pixel is drawn."""

    size: tuple[int, int]
    cell: tuple[int, int]
    origin: tuple[int, int]  # top-left of cell (0, 0)
    step: tuple[int, int]  # offset between neighbouring cells
    title_lines: list[str]
    col_lines: list[list[str]]
    row_lines: list[list[str]]
    row_label_width: int
    captions: list[list[str]]
    caption_height: int

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        x = self.origin[0] + col * self.step[0]
        y = self.origin[1] + row * self.step[1]
        return x, y, x + self.cell[0], y + self.cell[1]


def _plan(grid, col_labels, row_labels, title, captions, style: GridStyle) -> _Plan:
    pad = max(0, style.padding)
    gap = max(2, pad // 2)
    nrows, ncols = len(grid), len(grid[0]) if grid else 0
    cw, ch = _cell_size(grid, style)
    label_font, caption_font = load_font(style.font_size), load_font(style.resolved_caption_size)
    title_font = load_font(style.resolved_title_size)

    col_lines = [wrap_text(truncate(t, style.label_max_chars, label_font), label_font, cw, style.label_max_lines)
                 for t in col_labels]
    col_band = max((len(lines) for lines in col_lines), default=0) * label_font.line_height

    row_texts = [truncate(t, style.label_max_chars, label_font) for t in row_labels]
    natural = max((label_font.width(t) for t in row_texts), default=0.0)
    row_w = math.ceil(min(natural, style.row_label_max_width)) if natural else 0
    row_max_lines = max(1, ch // label_font.line_height)
    row_lines = [wrap_text(t, label_font, row_w, row_max_lines) for t in row_texts]

    caption_lines = [[wrap_text(truncate(t, style.label_max_chars, caption_font), caption_font, cw, 1)
                      for t in row] for row in captions]
    caption_h = caption_font.line_height + gap if any(lines for row in caption_lines for lines in row) else 0

    left = pad + (row_w + pad if row_w else 0)
    width = left + ncols * cw + max(0, ncols - 1) * pad + pad
    title_lines = wrap_text(title, title_font, max(1, width - 2 * pad), style.title_max_lines) if title else []
    top = pad + (len(title_lines) * title_font.line_height + pad if title_lines else 0)
    top += col_band + gap if col_band else 0
    step_y = ch + caption_h + pad
    height = top + nrows * (ch + caption_h) + max(0, nrows - 1) * pad + pad
    return _Plan((width, height), (cw, ch), (left, top), (cw + pad, step_y), title_lines, col_lines, row_lines,
                 row_w, caption_lines, caption_h)


# ------------------------------------------------------------------------------------------------------ drawing

def _paste(canvas: "Image.Image", image: "Image.Image", box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Paste ``image`` letterboxed into ``box``; return where it landed. Resizes only when the size differs."""
    from PIL import Image

    x0, y0, x1, y1 = box
    cell = (x1 - x0, y1 - y0)
    size = image.size if image.size == cell else _fit(image.size, cell)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        image = image.convert("RGBA")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    x = x0 + (cell[0] - size[0]) // 2
    y = y0 + (cell[1] - size[1]) // 2
    canvas.paste(image, (x, y), image if has_alpha else None)
    return x, y, x + size[0], y + size[1]


def _draw_lines(draw, lines: list[str], font: _Font, x0: int, y0: int, width: int, fill: str,
                align: str = "center") -> None:
    for i, line in enumerate(lines):
        x = x0 + (width - font.width(line)) / 2 if align == "center" else x0
        draw.text((round(x), y0 + i * font.line_height), line, font=font.font, fill=fill)


def _draw_text(draw, plan: _Plan, style: GridStyle, highlighted: frozenset[int] = frozenset()) -> None:
    pad, gap = max(0, style.padding), max(2, style.padding // 2)
    label_font, caption_font = load_font(style.font_size), load_font(style.resolved_caption_size)
    title_font = load_font(style.resolved_title_size)
    width = plan.size[0]
    _draw_lines(draw, plan.title_lines, title_font, pad, pad, width - 2 * pad, style.text_color)
    for col, lines in enumerate(plan.col_lines):
        x0, y0, _, _ = plan.cell_box(0, col)
        top = y0 - gap - len(lines) * label_font.line_height
        color = style.highlight_color if col in highlighted else style.text_color
        _draw_lines(draw, lines, label_font, x0, top, plan.cell[0], color)
    for row, lines in enumerate(plan.row_lines):
        _, y0, _, y1 = plan.cell_box(row, 0)
        top = y0 + (y1 - y0 - len(lines) * label_font.line_height) // 2
        _draw_lines(draw, lines, label_font, pad, top, plan.row_label_width, style.text_color, align="left")
    for row, row_captions in enumerate(plan.captions):
        for col, lines in enumerate(row_captions):
            x0, _, _, y1 = plan.cell_box(row, col)
            _draw_lines(draw, lines, caption_font, x0, y1 + gap // 2, plan.cell[0], style.text_color)


def _draw_placeholder(draw, box: tuple[int, int, int, int], style: GridStyle) -> None:
    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=style.placeholder_color)
    font = load_font(style.resolved_caption_size)
    text = "no image"
    if font.width(text) <= box[2] - box[0]:
        x = box[0] + (box[2] - box[0] - font.width(text)) / 2
        y = box[1] + (box[3] - box[1] - font.line_height) / 2
        draw.text((round(x), round(y)), text, font=font.font, fill=style.text_color)


# ------------------------------------------------------------------------------------------------------- public

def compose_grid(cells: Sequence[Sequence[Any]], *, col_labels: Sequence[str] = (), row_labels: Sequence[str] = (),
                 title: str = "", cell_captions: Sequence[Sequence[str | None]] | None = None,
                 style: GridStyle = GridStyle()) -> Composite:
    """Compose ``cells[row][col]`` (PIL images, arrays, or None) into one labelled image.

    ``col_labels`` go above the columns, ``row_labels`` to the left of the rows (wrapped and truncated), ``title``
    on top and ``cell_captions[row][col]`` (e.g. ``"loss 0.0831"``) under each cell. Label lists must be empty or
    have exactly one entry per column/row.
    """
    from PIL import Image, ImageDraw

    grid = _normalise(cells)
    if not grid or not grid[0]:
        raise CrucibleError("compose_grid: no cells to compose; give at least one image (or None placeholder)")
    nrows, ncols = len(grid), len(grid[0])
    cols = _check_count(col_labels, ncols, "col_labels", "column")
    rows = _check_count(row_labels, nrows, "row_labels", "row")
    captions = _captions(cell_captions, nrows, ncols)
    plan = _plan(grid, cols, rows, title, captions, style)

    canvas = Image.new("RGB", plan.size, style.background)
    draw = ImageDraw.Draw(canvas)
    cell_layout = []
    for r, row in enumerate(grid):
        for c, image in enumerate(row):
            box = plan.cell_box(r, c)
            if image is None:
                _draw_placeholder(draw, box, style)
                placed = None
            else:
                placed = _paste(canvas, image, box)
            cell_layout.append({"row": r, "col": c, "box": list(box), "image_box": list(placed) if placed else None,
                                "source_size": list(image.size) if image is not None else None,
                                "caption": captions[r][c] if captions else ""})
    highlighted = frozenset(c for c, label in enumerate(cols) if BEST_MARK in label)
    for c in highlighted:  # a frame around the recommended column's cells
        x0, y0, _, _ = plan.cell_box(0, c)
        _, _, x1, y1 = plan.cell_box(nrows - 1, c)
        width = max(2, style.padding // 3)
        draw.rectangle((x0 - width, y0 - width, x1 + width - 1, y1 + width - 1), outline=style.highlight_color,
                       width=width)
    _draw_text(draw, plan, style, highlighted)
    layout = {"version": LAYOUT_VERSION, "size": list(plan.size), "cell_size": list(plan.cell), "rows": nrows,
              "cols": ncols, "title": title, "col_labels": cols, "row_labels": rows, "cells": cell_layout}
    return Composite(canvas, layout)


def _captions(cell_captions, nrows: int, ncols: int) -> list[list[str]]:
    if cell_captions is None:
        return []
    captions = [["" if t is None else str(t) for t in row] for row in cell_captions]
    if len(captions) > nrows or any(len(row) > ncols for row in captions):
        raise CrucibleError(f"cell_captions is larger than the {nrows}×{ncols} grid; give at most one caption per cell")
    captions += [[] for _ in range(nrows - len(captions))]
    return [row + [""] * (ncols - len(row)) for row in captions]


def compose_strip(images: Sequence[Any], labels: Sequence[str] = (), title: str = "",
                  captions: Sequence[str | None] | None = None, style: GridStyle = GridStyle()) -> Composite:
    """One labelled row: ``images[i]`` under ``labels[i]``, optional ``captions[i]`` below it."""
    return compose_grid([list(images)], col_labels=labels, title=title,
                        cell_captions=[list(captions)] if captions is not None else None, style=style)


def save_png(composite: Composite, path: str | Path, extra_metadata: Mapping[str, Any] | None = None,
             compress_level: int = 6) -> Path:
    """Atomically write the composite as PNG; the layout goes into the ``crucible_layout`` tEXt chunk.

    ``extra_metadata`` adds more text chunks (non-string values are JSON-encoded), e.g. ComfyUI's ``prompt``.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(LAYOUT_KEY, json.dumps(composite.layout, ensure_ascii=True))
    for key, value in (extra_metadata or {}).items():
        if str(key) == LAYOUT_KEY:
            raise CrucibleError(f"extra_metadata may not use the reserved key '{LAYOUT_KEY}'")
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value, ensure_ascii=True))
    return atomic_write(path, lambda tmp: composite.image.save(tmp, format="PNG", pnginfo=info,
                                                               compress_level=compress_level))


def read_layout(path: str | Path) -> dict:
    """The layout stored by :func:`save_png` in a PNG file."""
    from PIL import Image

    with Image.open(path) as image:
        text = getattr(image, "text", {}).get(LAYOUT_KEY)
    if text is None:
        raise CrucibleError(f"'{path}' has no '{LAYOUT_KEY}' metadata; it was not written by Crucible's compositor")
    return json.loads(text)
