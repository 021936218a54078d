"""The caption preview: exactly the captions training will use, for the Caption Preview node and
``python -m trainer preview`` (one code path for both).

Without the text cache each caption goes through the training caption path (:meth:`DataSource.caption_preview`).
With ``training.cache_text_embeddings`` on, training draws each sample's caption from ``caption_variants`` cached
variants (:class:`trainer.cache.TextCache`), so the preview shows the variant training will draw. Left at ``auto``
(``None``) the text cache is the family's default (:func:`trainer.defaults.resolve_caches`): with the family given
the preview follows it; without (the Caption Preview node has no model input) it shows the live captions and says
which families would cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .errors import CrucibleError
from .fileio import shown

if TYPE_CHECKING:
    from .config import DatasetConfig, TrainingConfig
    from .dataset import CaptionPreviewRow

DROPPED = "(caption dropped)"


@dataclass(frozen=True)
class CaptionPreview:
    rows: "list[CaptionPreviewRow]"
    text_cache_variants: int = 0  # > 0: the captions are the text cache's variants
    note: str = ""  # said above the captions (e.g. that the text cache is left to the family)

    def lines(self) -> str:
        """One line per image and epoch (the node's text), headed by a note when the text cache decides."""
        lines = [f"#{r.item} epoch {r.epoch}: {r.caption if not r.dropped else DROPPED}" for r in self.rows]
        if self.text_cache_variants:
            lines.insert(0, f"(text cache: {self.text_cache_variants} variants per image)")
        if self.note:
            lines.insert(0, f"({self.note})")
        return "\n".join(lines)

    def table(self) -> str:
        """An aligned table: file (folder/name), epoch, the caption training sees (the CLI's text)."""
        table = [("file", "epoch", "caption")] + [
            (f"{Path(r.file).parent.name}/{Path(r.file).name}", str(r.epoch), r.caption if not r.dropped else DROPPED)
            for r in self.rows]
        width = [max(len(row[i]) for row in table) for i in range(2)]
        lines = [f"{f:<{width[0]}}  {e:>{width[1]}}  {c}" for f, e, c in table]
        lines.insert(1, f"{'-' * width[0]}  {'-' * width[1]}  {'-' * 7}")
        if self.text_cache_variants:
            lines.append(f"(text cache: {self.text_cache_variants} variants per image)")
        if self.note:
            lines.append(f"({self.note})")
        return "\n".join(lines)


def caption_preview(datasets: "Sequence[DatasetConfig]", images: str | int, epochs: int, seed: int,
                    training: "TrainingConfig | None" = None, family: str | None = None) -> CaptionPreview:
    """The captions of the chosen images in epochs ``1..epochs`` of a run with ``seed`` and the Training Options
    ``training`` (``None``: the defaults) for the model ``family`` (decides a text cache left at ``auto``).
    ``images``: the first N images, or 0-based indices such as ``"0-3"`` or ``"0,5,9"`` (indices past the last image
    are left out)."""
    from .dataset import CaptionPreviewRow, DataSource

    source = DataSource(tuple(datasets), seed=seed)
    count = len(source.items)
    indices = list(range(min(images, count))) if isinstance(images, int) else image_indices(images, count)
    epoch_numbers = list(range(1, epochs + 1))
    from .config import TrainingConfig

    training = training or TrainingConfig()
    cached, note = training.cache_text_embeddings, ""
    if cached is None:
        cached, note = _auto_text_cache(family)
    if not cached:
        return CaptionPreview(source.caption_preview(indices, epoch_numbers), note=note)
    from .cache import TextCache

    cache = TextCache(source, training.caption_variants, encode=None)
    rows = []
    for item in indices:
        image = source.items[item]
        for epoch in epoch_numbers:
            dropped = cache.choice(item, epoch, 0) is None
            rows.append(CaptionPreviewRow(item, epoch, 0, str(image.path), image.caption_raw,
                                          cache.caption_for(item, epoch, 0), dropped))
    return CaptionPreview(rows, text_cache_variants=training.caption_variants)


def _auto_text_cache(family: str | None) -> tuple[bool, str]:
    """Whether a text cache left at ``auto`` is on for ``family``; without one, off with a note naming the families
    that cache by default."""
    from .defaults import resolve_caches
    from .families import all_families

    if family is not None:
        return resolve_caches(None, None, family)["cache_text_embeddings"], ""
    caching = [f.title for f in all_families() if f.caches_by_default]
    return False, (f"text cache left to the family: {' and '.join(caching)} runs cache caption variants and draw "
                   "from them; these are the live captions. Connect Training Options with cache_text_embeddings on "
                   "to preview the cached ones") if caching else ""


def image_indices(spec: str, count: int) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``, keeping only indices below ``count`` (so ``0-999999999`` is cheap)."""
    out: list[int] = []
    for part in (spec or "").replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if hi else lo)
        except ValueError:
            message = f"Caption preview: 'images' must be indices such as 0-3 or 0,5,9, not {shown(spec)}"
            raise CrucibleError(message) from None
        out.extend(range(max(first, 0), min(last, count - 1) + 1))
    return out
