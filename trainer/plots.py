"""A loss-curve image drawn with PIL alone (no matplotlib): raw training loss in grey, its moving average in orange,
and the validation loss at each checkpoint in cyan (dots joined by a line, the lowest one ringed)."""
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


def loss_curve(losses: Sequence[float], width: int = 512, height: int = 256, title: str = "loss",
               val: Sequence[tuple[int, float]] = ()):
    """``losses[i]`` is step ``i + 1``'s training loss; ``val`` holds ``(step, validation loss)`` per checkpoint."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 48, 10, 22, 20
    pw, ph = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + pw, top + ph], outline=(90, 90, 100))
    values = [v for v in losses if _finite(v)]
    points = [(s, v) for s, v in val if v is not None and _finite(v)]
    head = f"{title}  steps {len(losses)}" + (f"  last {values[-1]:.4f}" if values else "")
    if points:
        best = min(points, key=lambda p: p[1])
        head += f"  val best {best[1]:.4f} @ step {best[0]}"
    draw.text((left, 4), head, fill=(230, 230, 230), font=font)
    if len(values) < 2:
        return img
    everything = values + [v for _, v in points]
    lo, hi = min(everything), max(everything)
    span = (hi - lo) or 1.0
    last_step = max(len(values), max((s for s, _ in points), default=1))

    def xy(step: float, v: float) -> tuple[float, float]:  # step is 1-based
        return left + pw * (step - 1) / max(1, last_step - 1), top + ph * (1 - (v - lo) / span)

    draw.line([xy(i + 1, v) for i, v in enumerate(values)], fill=(110, 110, 120), width=1)
    smooth = moving_average(values, max(1, len(values) // 20))
    draw.line([xy(i + 1, v) for i, v in enumerate(smooth)], fill=(255, 170, 40), width=2)
    if points:
        cyan = (80, 200, 255)
        if len(points) > 1:
            draw.line([xy(s, v) for s, v in points], fill=cyan, width=2)
        for s, v in points:
            x, y = xy(s, v)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=cyan)
        x, y = xy(*best)
        draw.ellipse([x - 6, y - 6, x + 6, y + 6], outline=(255, 255, 255), width=2)
    draw.text((4, top - 2), f"{hi:.3f}", fill=(200, 200, 200), font=font)
    draw.text((4, top + ph - 10), f"{lo:.3f}", fill=(200, 200, 200), font=font)
    draw.text((left, top + ph + 4), "1", fill=(200, 200, 200), font=font)
    draw.text((left + pw - 30, top + ph + 4), str(last_step), fill=(200, 200, 200), font=font)
    legend = "train (avg)" + ("   val" if points else "")
    draw.text((left + pw // 2 - 30, top + ph + 4), legend, fill=(200, 200, 200), font=font)
    return img


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def save_loss_curve(path, losses: Sequence[float], checkpoints: Sequence = ()) -> None:
    """Write the run's ``loss_curve.png`` (training loss and each checkpoint's validation loss)."""
    from .fileio import atomic_write

    image = loss_curve(losses, width=768, height=320, val=[(c.step, c.val_loss) for c in checkpoints])
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
