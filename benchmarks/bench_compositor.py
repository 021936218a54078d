"""Benchmark: compose an 8×8 labelled grid of 512² tiles with trainer.render vs. a naive compositor.

The naive version is what a first attempt usually looks like: a new canvas per tile, every tile resized even when
it already has the cell size, and a fresh ImageDraw for every label. Both run in the same process on the same
tiles; the script prints both times (median of the repeats) and the speed-up, and fails if the compositor
needs a second or more. Pillow turns a same-size resize into a plain copy, so the gap is modest (about 1-1.5x on
2 CPU cores); the absolute time is the figure that matters.

    python benchmarks/bench_compositor.py            # 5 repeats
    python benchmarks/bench_compositor.py --quick    # 1 repeat (used by `make bench`)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.render import GridStyle, compose_grid, load_font  # noqa: E402

GRID = 8
TILE = 512


def make_tiles(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)) for _ in range(GRID * GRID)]


def labels() -> tuple[list[str], list[str]]:
    cols = [f"step {250 * (i + 1)}" for i in range(GRID)]
    rows = [f"a photo of sks dog, variation {i}, strength 1.0" for i in range(GRID)]
    return cols, rows


def crucible(tiles: list[Image.Image]) -> Image.Image:
    cols, rows = labels()
    cells = [tiles[r * GRID:(r + 1) * GRID] for r in range(GRID)]
    return compose_grid(cells, col_labels=cols, row_labels=rows, title="benchmark").image


def naive(tiles: list[Image.Image]) -> Image.Image:
    """A per-tile canvas, an unconditional resize and a fresh ImageDraw per label."""
    style = GridStyle()
    font = load_font(style.font_size).font
    cols, rows = labels()
    pad, band, left = style.padding, 40, 320
    step = TILE + band + pad
    out = Image.new("RGB", (left + GRID * (TILE + pad) + pad, band + GRID * step + pad), style.background)
    ImageDraw.Draw(out).text((pad, pad), "benchmark", font=font, fill=style.text_color)
    for index, tile in enumerate(tiles):
        row, col = divmod(index, GRID)
        canvas = Image.new("RGB", (TILE, TILE + band), style.background)
        canvas.paste(tile.resize((TILE, TILE), Image.Resampling.LANCZOS), (0, band))
        ImageDraw.Draw(canvas).text((4, 4), cols[col], font=font, fill=style.text_color)
        out.paste(canvas, (left + col * (TILE + pad), band + row * step))
        if col == 0:
            ImageDraw.Draw(out).text((pad, band + row * step + TILE // 2), rows[row][:32], font=font,
                                     fill=style.text_color)
    return out


def timed(fn, tiles, repeats: int) -> float:
    fn(tiles)  # warm-up: font loading, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(tiles)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of five")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)

    tiles = make_tiles()
    fast = timed(crucible, tiles, repeats)
    slow = timed(naive, tiles, repeats)
    print(f"{GRID}x{GRID} grid of {TILE}x{TILE} tiles, median of {repeats}")
    print(f"  trainer.render.compose_grid : {fast * 1000:8.1f} ms")
    print(f"  naive per-tile compositor   : {slow * 1000:8.1f} ms")
    print(f"  speed-up                    : {slow / fast:8.1f}x")
    if fast >= 1.0:
        print("FAIL: composing 64 tiles of 512x512 must take well under a second", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
