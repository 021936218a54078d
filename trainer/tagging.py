"""Writing a captioned dataset from images and tagger output (SeaArt's "crop / tagging" step, inside a graph).

Each image is saved as ``<prefix>_<NNNN>.png`` with a same-name ``.txt`` caption in the dataset folder. Captions get
the same trigger-word and tag-removal rules as training (:func:`trainer.captions.process_caption`, no randomness).
Files are written atomically (temporary file, then rename); an existing image or caption is never replaced unless
``overwrite`` is on — the pair is skipped and reported instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .captions import process_caption
from .config import CaptionConfig
from .errors import ConfigError
from .fileio import atomic_write, atomic_write_bytes, safe_name

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


@dataclass
class TaggingReport:
    folder: Path
    written: list[str] = field(default_factory=list)  # image file names written (with their captions)
    skipped: list[str] = field(default_factory=list)  # names that already existed (overwrite off)

    def format(self) -> str:
        lines = [f"{len(self.written)} image(s) with captions written to {self.folder}"]
        if self.skipped:
            lines.append(f"{len(self.skipped)} skipped because the file already exists (turn overwrite on to "
                         f"replace them): {', '.join(self.skipped[:10])}" + (" ..." if len(self.skipped) > 10 else ""))
        return "\n".join(lines)


def caption_text(raw: str, cfg: CaptionConfig) -> str:
    """The caption file's text: tagger output with the trigger word in front and removed tags gone."""
    return process_caption(raw, cfg, seed=0, epoch=1, item=0).text


def write_captioned_images(folder: str | Path, images: Sequence["Image.Image"], captions: Sequence[str], *,
                           prefix: str = "image", cfg: CaptionConfig = CaptionConfig(),
                           overwrite: bool = False) -> TaggingReport:
    """Save ``images[i]`` and ``captions[i]`` as ``<prefix>_<i>.png`` / ``.txt`` in ``folder`` (created)."""
    if len(images) != len(captions):
        raise ConfigError(f"{len(images)} image(s) but {len(captions)} caption(s): connect the tagger that captioned "
                          "exactly these images (one caption string per image)")
    if not images:
        raise ConfigError("no images to write: connect a batch or list of images")
    stem = safe_name(prefix, "name_prefix")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = TaggingReport(folder)
    for index, (image, raw) in enumerate(zip(images, captions)):
        name = f"{stem}_{index:04d}"
        png, txt = folder / f"{name}.png", folder / f"{name}.txt"
        if not overwrite and (png.exists() or txt.exists()):
            report.skipped.append(png.name)
            continue
        atomic_write(png, lambda tmp, im=image: im.save(tmp, format="PNG"))
        atomic_write_bytes(txt, caption_text(raw, cfg).encode("utf-8"))
        report.written.append(png.name)
    return report


__all__ = ["TaggingReport", "caption_text", "write_captioned_images"]
