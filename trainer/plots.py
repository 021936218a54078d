"""A loss-curve image drawn with PIL alone (no matplotlib): raw loss in grey, a moving average on top."""
from __future__ import annotations

from typing import Sequence


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve(losses: Sequence[float], width: int = 512, height: int = 256, title: str = "loss"):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 48, 10, 22, 20
    pw, ph = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + pw, top + ph], outline=(90, 90, 100))
    values = [v for v in losses if v == v and abs(v) != float("inf")]
    draw.text((left, 4), f"{title}  steps {len(losses)}" + (f"  last {values[-1]:.4f}" if values else ""),
              fill=(230, 230, 230), font=font)
    if len(values) < 2:
        return img
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0

    def xy(i: int, v: float) -> tuple[float, float]:
        return left + pw * i / (len(values) - 1), top + ph * (1 - (v - lo) / span)

    draw.line([xy(i, v) for i, v in enumerate(values)], fill=(110, 110, 120), width=1)
    smooth = moving_average(values, max(1, len(values) // 20))
    draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(255, 170, 40), width=2)
    draw.text((4, top - 2), f"{hi:.3f}", fill=(200, 200, 200), font=font)
    draw.text((4, top + ph - 10), f"{lo:.3f}", fill=(200, 200, 200), font=font)
    draw.text((left, top + ph + 4), "1", fill=(200, 200, 200), font=font)
    draw.text((left + pw - 30, top + ph + 4), str(len(values)), fill=(200, 200, 200), font=font)
    return img
