"""Benchmark: the pack's image pipeline vs a naive single-threaded PIL loop.

Generates N synthetic 1024x1024 JPEGs in a temporary folder, then times, in the same run:

* **pack**: ``DataSource`` scanning the folder and loading every batch of one epoch at resolution 512 (bucketing
  on: header-only scan, JPEG draft decoding, one resampling per image, a decode thread pool);
* **naive**: for each file ``Image.open`` → ``convert("RGB")`` → resize to cover 512 → center crop → numpy
  array.

Not a test: it prints both times and the ratio. ``--n`` sets the image count (default 1000); ``--quick`` is a
small run for ``make bench``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402,F401  - imported up front, as in a training process, so no timing pays for it
from PIL import Image  # noqa: E402

from trainer.config import DatasetConfig  # noqa: E402
from trainer.dataset import DataSource  # noqa: E402

RESOLUTION = 512
SIZE = 1024


def make_images(folder: Path, n: int) -> None:
    """``n`` photo-like 1024² JPEGs (smooth colour fields plus noise) with captions, in a kohya sub-folder."""
    sub = folder / "1_synthetic"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        noise = Image.effect_noise((SIZE, SIZE), 12).convert("RGB")
        Image.blend(img, noise, 0.15).save(sub / f"{i:05d}.jpg", quality=90)
        (sub / f"{i:05d}.txt").write_text(f"synthetic image {i}, colour field, noise", encoding="utf-8")


def naive(folder: Path) -> float:
    """Single-threaded PIL: open, convert, resize to cover, center crop, to array."""
    start = time.perf_counter()
    for path in sorted(folder.rglob("*.jpg")):
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = RESOLUTION / min(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
            left, top = (im.width - RESOLUTION) // 2, (im.height - RESOLUTION) // 2
            im = im.crop((left, top, left + RESOLUTION, top + RESOLUTION))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
            assert arr.shape == (RESOLUTION, RESOLUTION, 3)
    return time.perf_counter() - start


def pack(folder: Path, batch_size: int) -> tuple[float, float, int]:
    """Scan + load every batch of epoch 1. Returns (scan seconds, load seconds, images loaded)."""
    cfg = DatasetConfig(path=str(folder), resolution=RESOLUTION, enable_bucket=True)
    start = time.perf_counter()
    source = DataSource([cfg], seed=0)
    scanned = time.perf_counter()
    loaded = 0
    with source:
        for plan in source.epoch_batches(1, batch_size):
            batch = source.load_batch(plan, 1)
            loaded += batch.pixels.shape[0]
    return scanned - start, time.perf_counter() - scanned, loaded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of synthetic images (default 1000)")
    parser.add_argument("--quick", action="store_true", help="small run (60 images)")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    n = 60 if args.quick else args.n
    with tempfile.TemporaryDirectory(prefix="crucible-bench-") as tmp:
        folder = Path(tmp) / "data"
        t0 = time.perf_counter()
        make_images(folder, n)
        print(f"generated {n} JPEGs of {SIZE}x{SIZE} in {time.perf_counter() - t0:.1f}s")
        naive_s = naive(folder)
        scan_s, load_s, loaded = pack(folder, args.batch_size)
        assert loaded == n, f"pack loaded {loaded} of {n} images"
        pack_s = scan_s + load_s
        print(f"naive PIL loop : {naive_s:7.2f}s  ({n / naive_s:6.1f} img/s)")
        print(f"pack pipeline  : {pack_s:7.2f}s  ({n / pack_s:6.1f} img/s; scan {scan_s:.2f}s + load {load_s:.2f}s)")
        print(f"speed-up       : {naive_s / pack_s:7.2f}x")


if __name__ == "__main__":
    main()
