"""Image files: header probing (size, EXIF orientation, unusable files), decoding for training and the seeded
crop / flip / colour-jitter geometry.

Probing reads only the header (plus a cheap end-of-file check), so scanning stays fast; decoding applies EXIF
orientation, composites transparency, converts to 8-bit RGB and crops to the bucket. All randomness is seeded by
``(seed, epoch, file, repeat)`` (:func:`trainer.captions.sample_rng`), so any sample can be replayed exactly.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..captions import sample_rng
from ..config import DatasetConfig
from ..errors import ConfigError, DatasetError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
MAX_IMAGE_PIXELS = 178_956_970  # Pillow's default decompression-bomb limit (~ 13377 x 13377), fixed here
# What an image file may really be, whatever its extension (JPEG includes MPO, which Pillow detects through JPEG).
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "GIF", "TIFF")


@dataclass(frozen=True)
class ImageItem:
    """One usable image. ``width``/``height`` are after EXIF orientation; ``caption_raw`` is the caption file's
    text (or the missing-caption substitute), before any caption processing."""

    path: Path
    caption_raw: str
    concept: str
    repeats: int
    is_reg: bool
    dataset_index: int
    width: int
    height: int



class UnusableImage(DatasetError):
    """An image file that cannot be used; ``reason`` is the short explanation shown in reports."""

    def __init__(self, reason: str, path: Path | str = ""):
        super().__init__(f"image '{path}': {reason}" if path else reason)
        self.reason = reason
        self.path = str(path)



# --- probing --------------------------------------------------------------------------------------------------------

def _pil():
    """``PIL.Image`` with every format plugin registered (``Image.open(formats=...)`` needs them)."""
    from PIL import Image

    Image.init()
    return Image


def probe_image(path: Path) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, from the header only (plus a cheap end-of-file check).

    Raises :class:`UnusableImage` naming the file and the reason.
    """
    try:
        return _probe(Path(path))
    except UnusableImage as exc:
        raise UnusableImage(exc.reason, path) from None


def _probe(path: Path) -> tuple[int, int]:
    from PIL import UnidentifiedImageError

    Image = _pil()

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UnusableImage(f"cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise UnusableImage("empty file (0 bytes)")
    _check_declared_size(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=_PIL_FORMATS) as img:
                width, height = img.size
                _check_pixels(width, height)
                orientation = _orientation(img)
                fmt = img.format or ""
        except Image.DecompressionBombError:
            raise UnusableImage(f"declared size is larger than {MAX_IMAGE_PIXELS:,} pixels (refused as a possible "
                        "decompression bomb); downscale it") from None
        except UnidentifiedImageError:
            raise UnusableImage("not an image Pillow can read (wrong extension or corrupt header)") from None
        except UnusableImage:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder complaint about a header means "corrupt"
            raise UnusableImage(f"corrupt image header ({type(exc).__name__}: {exc})") from None
    if width <= 0 or height <= 0:
        raise UnusableImage(f"invalid size {width}x{height}")
    if _looks_truncated(path, fmt, size) and not _decodes(path):
        raise UnusableImage("truncated or corrupt image data; re-export or remove it")
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _check_declared_size(path: Path) -> None:
    """Refuse a bomb before Pillow opens it, for the one format whose *opening* allocates the whole canvas (WebP:
    libwebp's decoder is created in ``Image.open``). Pillow guards that only while its global ``MAX_IMAGE_PIXELS``
    is set, which any other ComfyUI node may have turned off; Crucible's own limit must hold regardless."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(30)
    except OSError:
        return  # Image.open reports it
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = (int.from_bytes(head[26:28], "little") & 0x3FFF,
                         int.from_bytes(head[28:30], "little") & 0x3FFF)
    elif chunk == b"VP8X":
        width, height = int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    elif chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:
        return
    _check_pixels(width, height)


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise UnusableImage(f"{width}x{height} is larger than {MAX_IMAGE_PIXELS:,} pixels (refused as a possible "
                    "decompression bomb); downscale it")


def _orientation(img: "Image.Image") -> int:
    """EXIF orientation (1..8) without decoding pixels (a PNG's late eXIf chunk is ignored here)."""
    from PIL import Image

    try:
        return int(Image.Image.getexif(img).get(0x0112, 1) or 1)  # base method: never triggers a PNG load()
    except Exception:  # noqa: BLE001 - a broken EXIF block just means "no rotation"
        return 1


def _looks_truncated(path: Path, fmt: str, size: int) -> bool:
    """Cheap end-of-file check per format; a suspect file is then fully decoded before it is rejected."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            fh.seek(max(0, size - 64))
            tail = fh.read()
    except OSError:
        return True
    if fmt == "PNG":
        return tail[-8:-4] != b"IEND"
    if fmt in ("JPEG", "MPO"):
        return not tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if fmt == "WEBP" and head[:4] == b"RIFF":
        return int.from_bytes(head[4:8], "little") + 8 > size
    if fmt in ("BMP", "DIB") and head[:2] == b"BM":
        return int.from_bytes(head[2:6], "little") > size
    return False


def _decodes(path: Path) -> bool:
    """Whether the whole image decodes (JPEGs at 1/8 scale, which still reads all the data)."""
    Image = _pil()

    try:
        with Image.open(path, formats=_PIL_FORMATS) as img:
            img.draft(None, (1, 1))
            img.load()
        return True
    except Exception:  # noqa: BLE001
        return False



def printable(text: str) -> str:
    """``text`` with lone surrogates (file names that are not valid UTF-8) spelled as ``\\xNN`` escapes, so it
    can be logged, shown and sent as UTF-8 anywhere."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that did not come from undecodable bytes
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")



# --- image loading ---------------------------------------------------------------------------------------------------

@lru_cache(maxsize=32)
def parse_color(value: str, where: str = "background_color") -> tuple[int, int, int]:
    """``"#ffffff"``, ``"white"``, ``"rgb(0,0,0)"`` → an RGB triple; :class:`ConfigError` naming ``where``."""
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(value.strip())
    except (ValueError, AttributeError):
        raise ConfigError(f"{where} {value!r} is not a colour; use a hex value such as '#ffffff' or a name such as "
                          "'white'") from None
    return tuple(rgb[:3])  # type: ignore[return-value]


def load_image(item: ImageItem, target_w: int, target_h: int, cfg: DatasetConfig, *, seed: int, epoch: int,
               repeat: int) -> "torch.Tensor":
    """Decode one image for training: a float32 tensor ``[3, target_h, target_w]`` in ``[-1, 1]``.

    EXIF orientation is applied; transparency is composited on ``cfg.background_color``; greyscale, palette,
    CMYK and 16-bit images become 8-bit RGB. The image is resized to *cover* the target (aspect kept) and cropped
    per ``cfg.crop_style``: ``center``, ``random`` (seeded per sample) or ``corner`` (top-left, which keeps the top
    of portraits). Large JPEGs are decoded at a reduced DCT scale (``draft``) when they are at least twice the
    needed size. ``flip_aug`` mirrors half the samples; ``color_aug`` applies a mild brightness / contrast /
    saturation jitter (±10 %). All randomness is seeded by ``(seed, epoch, file, repeat)``.
    """
    import numpy as np
    import torch

    pil = load_pil(item, target_w, target_h, cfg, seed=seed, epoch=epoch, repeat=repeat)
    # Transpose while still uint8, then do float math on a contiguous array: ~10x faster than on a permuted view.
    chw = np.ascontiguousarray(np.asarray(pil).transpose(2, 0, 1)).astype(np.float32)
    if cfg.color_aug:
        chw = _color_jitter(chw, sample_rng(seed, epoch, file_key(item), repeat, "color"))
    chw /= 127.5
    chw -= 1.0
    return torch.from_numpy(chw)


def load_pil(item: ImageItem, target_w: int, target_h: int, cfg: DatasetConfig, *, seed: int, epoch: int,
             repeat: int) -> "Image.Image":
    """The RGB PIL image :func:`load_image` uses (before colour jitter), exactly ``target_w × target_h``."""
    from PIL import Image

    key = file_key(item)
    img = _open_rgb(item.path, target_w, target_h, parse_color(cfg.background_color, "datasets[].background_color"))
    img = _cover_crop(img, target_w, target_h, cfg.crop_style, sample_rng(seed, epoch, key, repeat, "crop"))
    if cfg.flip_aug and sample_rng(seed, epoch, key, repeat, "flip").random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def file_key(item: ImageItem) -> str:
    """A stable per-image RNG key that survives moving the dataset folder. File names that are not valid UTF-8
    (kept by Python as surrogate escapes) are spelled with backslash escapes, so the key can always be hashed."""
    return printable(f"{item.dataset_index}/{item.path.parent.name}/{item.path.name}")


def _open_rgb(path: Path, target_w: int, target_h: int, background: tuple[int, int, int]) -> "Image.Image":
    """Open, draft-decode when worthwhile, load, orient and convert to RGB; errors become :class:`DatasetError`."""
    from PIL import ImageOps

    Image = _pil()

    try:
        _check_declared_size(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=_PIL_FORMATS) as img:
                _check_pixels(*img.size)
                orientation = _orientation(img)  # read before load(), exactly as the scan did
                if img.format in ("JPEG", "MPO"):
                    _draft(img, target_w, target_h, orientation)
                img.load()
                if orientation != 1:
                    img = ImageOps.exif_transpose(img)
                return _to_rgb(img, background)
    except FileNotFoundError:
        raise DatasetError(f"image '{path}' no longer exists; it was there when the dataset was scanned. "
                           "Restore it, or rescan the dataset") from None
    except UnusableImage as exc:
        raise UnusableImage(exc.reason, path) from None
    except Image.DecompressionBombError as exc:
        raise UnusableImage(f"refused as a possible decompression bomb ({exc})", path) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise DatasetError(f"cannot decode image '{path}' ({type(exc).__name__}: {exc}); it changed or is corrupt. "
                           "Replace or remove it and restart") from None


def _draft(img: "Image.Image", target_w: int, target_h: int, orientation: int) -> None:
    """Let libjpeg downscale by 2/4/8 while decoding, keeping the result at least the cover size."""
    width, height = img.size
    if orientation in (5, 6, 7, 8):
        target_w, target_h = target_h, target_w
    scale = max(target_w / width, target_h / height)
    if scale <= 0.5:
        img.draft(None, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))


def _to_rgb(img: "Image.Image", background: tuple[int, int, int]) -> "Image.Image":
    """8-bit RGB; transparent pixels composited on ``background``."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img).astype(np.float32)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def crop_box(width: float, height: float, target_w: int, target_h: int, style: str, rng) -> tuple[float, ...]:
    """``(scale, left, top, crop_w, crop_h)``: the image is scaled by ``scale`` to cover the target and the box
    ``(left, top, crop_w, crop_h)`` (in image pixels) is cut out per ``style``."""
    scale = max(target_w / width, target_h / height)
    crop_w, crop_h = min(width, target_w / scale), min(height, target_h / scale)
    free_x, free_y = width - crop_w, height - crop_h
    if style == "random":
        left, top = rng.uniform(0, free_x), rng.uniform(0, free_y)
    elif style == "corner":
        left, top = 0.0, 0.0
    else:
        left, top = free_x / 2, free_y / 2
    return scale, left, top, crop_w, crop_h


def _cover_crop(img: "Image.Image", target_w: int, target_h: int, style: str, rng) -> "Image.Image":
    """Scale to cover ``target`` (aspect kept), then crop; done as one resampling of the crop box."""
    from PIL import Image

    scale, left, top, crop_w, crop_h = crop_box(*img.size, target_w, target_h, style, rng)
    if abs(scale - 1.0) < 1e-9:  # same scale: a plain pixel crop, no resampling blur
        left, top = round(left), round(top)
        return img.crop((left, top, left + target_w, top + target_h))
    box = (left, top, left + crop_w, top + crop_h)
    return img.resize((target_w, target_h), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def image_geometry(item: ImageItem, target_w: int, target_h: int, cfg: DatasetConfig, *, seed: int, epoch: int,
                   repeat: int) -> tuple[int, int, int, int]:
    """``(original h, original w, crop top, crop left)`` of one training sample, as SDXL's micro-conditioning wants
    them (kohya, diffusers): the image's own size and where :func:`load_pil`'s crop starts in the image scaled to
    cover the target (mirrored when the sample is flipped). Computed from the header size and the same seeded
    draws as the pixels, without decoding."""
    key = file_key(item)
    scale, left, top, _, _ = crop_box(item.width, item.height, target_w, target_h, cfg.crop_style,
                                       sample_rng(seed, epoch, key, repeat, "crop"))
    left_px = left * scale
    if cfg.flip_aug and sample_rng(seed, epoch, key, repeat, "flip").random() < 0.5:
        left_px = item.width * scale - target_w - left_px
    return item.height, item.width, round(top * scale), max(0, round(left_px))


def _color_jitter(chw, rng):
    """Mild brightness, contrast and saturation jitter (each ×0.9…1.1) on a float ``[3, H, W]`` array in 0..255,
    modified in place."""
    import numpy as np

    brightness, contrast, saturation = (np.float32(rng.uniform(0.9, 1.1)) for _ in range(3))
    chw *= brightness
    mean = chw.mean(dtype=np.float32)
    chw -= mean
    chw *= contrast
    chw += mean
    grey = np.float32(0.299) * chw[0] + np.float32(0.587) * chw[1] + np.float32(0.114) * chw[2]
    chw -= grey
    chw *= saturation
    chw += grey
    return np.clip(chw, 0.0, 255.0, out=chw)



__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "ImageItem", "UnusableImage", "probe_image", "parse_color",
           "load_image", "load_pil", "image_geometry", "crop_box", "file_key", "printable"]
