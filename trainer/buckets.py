"""Aspect-ratio bucketing, kohya style. Pure functions, no image I/O.

Training batches must share one pixel size, yet squashing every image into a square throws away framing. Bucketing
gives each image the training size (its *bucket*) whose aspect ratio is closest to its own, with an area of at most
``resolution²``; the image is then resized to cover that bucket and the excess is cropped (see
:func:`trainer.dataset.load_image`).

* ``crop_aspect = "square"`` (and ``enable_bucket`` off): one bucket, ``resolution × resolution``.
* ``crop_aspect = "preserve"`` or ``enable_bucket``: the bucket list of :func:`make_buckets` — widths and heights
  are multiples of ``bucket_reso_steps`` between ``min_bucket_reso`` and ``max_bucket_reso`` (the same list kohya
  sd-scripts generates, so settings carry over).
* ``bucket_no_upscale``: an image is never enlarged. Its bucket is its own size (shrunk to ``resolution²`` area when
  larger), rounded *down* to the step, so the image is only ever downscaled and cropped by less than one step.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config import DatasetConfig

Resolution = tuple[int, int]  # (width, height) in pixels


def uses_buckets(cfg: "DatasetConfig") -> bool:
    """True when the dataset trains on aspect-ratio buckets rather than one square size."""
    return cfg.enable_bucket or cfg.crop_aspect == "preserve"


@lru_cache(maxsize=64)
def make_buckets(resolution: int, min_reso: int = 256, max_reso: int = 1024, step: int = 64) -> tuple[Resolution, ...]:
    """Every bucket for a training ``resolution``: sorted ``(w, h)`` pairs, each side a multiple of ``step`` within
    ``[min_reso, max_reso]``, each area ``<= resolution²``, plus the largest square that fits.

    For every width ``w`` on the step grid the tallest height that keeps the area budget is used (and its
    transpose), which yields kohya's bucket list.
    """
    _check_bucket_args(resolution, min_reso, max_reso, step)
    area = resolution * resolution
    side = resolution // step * step
    buckets = {(side, side)}
    for width in range(_ceil_to(min_reso, step), max_reso + 1, step):
        height = min(max_reso, area // width // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return tuple(sorted(buckets))


def closest_bucket(width: int, height: int, buckets: Iterable[Resolution]) -> Resolution:
    """The bucket whose aspect ratio is closest to ``width / height``.

    Distance is measured on ``log(w / h)`` so that 2:1 and 1:2 are equally far from 1:1. Ties go to the larger
    bucket (less upscaling), then to the wider one, so the choice never depends on input order.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], -b[0]))


def no_upscale_bucket(width: int, height: int, resolution: int, step: int = 64) -> Resolution:
    """The bucket of an image that must not be enlarged (kohya ``bucket_no_upscale``).

    The image is shrunk (aspect kept) to at most ``resolution²`` pixels, then each side is rounded down to a multiple
    of ``step``. Sides are at least one ``step`` (an image thinner than that is necessarily enlarged on that side);
    the other side is then reduced if needed so the area never exceeds ``resolution²``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    area = resolution * resolution
    scale = min(1.0, math.sqrt(area / (width * height)))
    bucket_w = max(step, int(width * scale) // step * step)
    bucket_h = max(step, int(height * scale) // step * step)
    if bucket_w * bucket_h > area:  # only for extreme aspect ratios clamped to one step above
        if bucket_w >= bucket_h:
            bucket_w = max(step, area // bucket_h // step * step)
        else:
            bucket_h = max(step, area // bucket_w // step * step)
    return bucket_w, bucket_h


def assign_bucket(width: int, height: int, cfg: "DatasetConfig") -> Resolution:
    """The training size for an image of ``width × height`` under a dataset's settings (see module docstring)."""
    if not uses_buckets(cfg):
        return cfg.resolution, cfg.resolution
    if cfg.bucket_no_upscale:
        return no_upscale_bucket(width, height, cfg.resolution, cfg.bucket_reso_steps)
    buckets = make_buckets(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
    return closest_bucket(width, height, buckets)


def check_bucket_config(cfg: "DatasetConfig", where: str = "datasets[0]") -> None:
    """Raise :class:`ConfigError` naming the field when a dataset's bucket settings cannot work."""
    if not uses_buckets(cfg):
        return
    try:
        _check_bucket_args(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_bucket_args(resolution: int, min_reso: int, max_reso: int, step: int) -> None:
    if step <= 0:
        raise ConfigError(f"bucket_reso_steps is {step}; it must be a positive multiple of 8 such as 64")
    if resolution < step:
        raise ConfigError(f"resolution {resolution} is smaller than bucket_reso_steps {step}; raise the resolution")
    if min_reso > resolution:
        raise ConfigError(f"min_bucket_reso ({min_reso}) is larger than resolution ({resolution}); "
                          "lower min_bucket_reso")
    if max_reso < resolution:
        raise ConfigError(f"max_bucket_reso ({max_reso}) is smaller than resolution ({resolution}); "
                          "raise max_bucket_reso")


def _ceil_to(value: int, step: int) -> int:
    return -(-value // step) * step


__all__ = ["Resolution", "uses_buckets", "make_buckets", "closest_bucket", "no_upscale_bucket", "assign_bucket",
           "check_bucket_config"]
