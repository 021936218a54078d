""":class:`DataSource`: every configured dataset, scanned and bucketed, with a deterministic list of batches per
epoch (indices only); :meth:`DataSource.load_batch` decodes one batch on a small thread pool. Epoch numbers are
1-based everywhere (the first epoch is epoch 1), matching :mod:`trainer.plan`.
"""
from __future__ import annotations

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, NamedTuple, Sequence

from ..buckets import Resolution
from ..captions import ProcessedCaption, process_caption, sample_rng
from ..config import DatasetConfig
from ..errors import ConfigError, DatasetError
from .images import ImageItem, image_geometry, load_image, parse_color
from .scan import dataset_fingerprint, scan_dataset

if TYPE_CHECKING:  # pragma: no cover
    import torch


# --- the data source -------------------------------------------------------------------------------------------------

class Sample(NamedTuple):
    """One entry of a batch plan: an image (index into :attr:`DataSource.items`) and which of its repeats."""

    item: int
    repeat: int


BatchPlan = tuple[Sample, ...]


@dataclass
class Batch:
    """A decoded batch. ``weights`` holds each caption's ``(text, weight)`` pieces when any dataset in the batch
    uses weighted captions, else ``None``."""

    pixels: "torch.Tensor"  # [B, 3, H, W] float32 in [-1, 1]
    captions: list[str]
    weights: list[tuple[tuple[str, float], ...]] | None
    items: list[int]
    repeats: list[int]
    is_reg: list[bool]
    resolution: Resolution  # (width, height)


@dataclass(frozen=True)
class CaptionPreviewRow:
    """What training sees for one sample: the raw caption and the processed one."""

    item: int
    epoch: int
    repeat: int
    file: str
    raw: str
    caption: str
    dropped: bool


def balance_reg_repeats(train_samples: int, reg_repeats: Sequence[int]) -> list[int]:
    """Repeats for regularization images so an epoch holds about ``train_samples`` of them (kohya's rule).

    First pass: each image in order with its folder repeats, until the target is reached (later images get 0).
    Further passes: one more repeat per image in order until the target is reached.
    """
    out = [0] * len(reg_repeats)
    total = 0
    for i, repeats in enumerate(reg_repeats):
        if total >= train_samples:
            return out
        out[i] = repeats
        total += repeats
    while out and total < train_samples:
        for i in range(len(out)):
            if total >= train_samples:
                break
            out[i] += 1
            total += 1
    return out


class DataSource:
    """Every configured dataset, bucketed, with a deterministic batch order per epoch.

    * Each dataset keeps its own resolution, bucketing, repeats, augmentation and caption options; images of
      different datasets that land in the same bucket may share a batch.
    * Repeats are an index map: a :class:`Sample` is ``(item, repeat)``; nothing is copied.
    * Regularization datasets (``is_reg``) are mixed in as kohya does: their repeats are re-balanced with
      :func:`balance_reg_repeats` so an epoch holds as many regularization samples as training samples (an epoch is
      then twice as long) and they are shuffled together with training samples inside buckets. Each sample's
      :attr:`ImageItem.is_reg` (also in :attr:`Batch.is_reg`) marks it; the loop scales those samples' loss by
      ``training.prior_loss_weight``. Without training images, regularization images alone are an error.
    * All randomness (batch order, captions, crops, flips) comes from local RNGs seeded by ``(seed, epoch, …)``, so
      any epoch can be replayed exactly, in any order (exact resume).
    * ``validation_split`` holds images out for the validation loss (:func:`trainer.validation.holdout_items`): they
      stay in :attr:`items` (indices are stable) and are listed in :attr:`validation_items`, but get no repeats, so
      no epoch, bucket count or step plan includes them.
    """

    def __init__(self, datasets: Sequence[DatasetConfig], seed: int, validation_split: float = 0.0):
        if not datasets:
            raise DatasetError("no dataset configured: set datasets[0].path to a folder of images")
        self.datasets = tuple(datasets)
        self.seed = int(seed)
        for i, cfg in enumerate(self.datasets):
            parse_color(cfg.background_color, f"datasets[{i}].background_color")
        self.scans = tuple(scan_dataset(cfg, i) for i, cfg in enumerate(self.datasets))
        self.items: tuple[ImageItem, ...] = tuple(item for scan in self.scans for item in scan.items)
        from ..validation import holdout_items

        # Held-out validation images stay in ``items`` (indices are stable) but get no repeats: never trained on.
        self.validation_items, self.validation_note = holdout_items(self.items, validation_split, self.seed)
        self.buckets: tuple[Resolution, ...] = tuple(b for scan in self.scans for b in scan.buckets)
        self.repeats: tuple[int, ...] = self._effective_repeats()
        self._by_bucket = self._bucket_samples()
        self._pool: ThreadPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None

    # --- structure ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def _effective_repeats(self) -> tuple[int, ...]:
        held = set(self.validation_items)
        repeats = [0 if i in held else item.repeats for i, item in enumerate(self.items)]
        train = sum(r for r, item in zip(repeats, self.items) if not item.is_reg)
        reg_idx = [i for i, item in enumerate(self.items) if item.is_reg]
        if reg_idx and not train:
            raise DatasetError("only regularization datasets (is_reg) are configured; add a training dataset")
        for i, r in zip(reg_idx, balance_reg_repeats(train, [self.items[i].repeats for i in reg_idx])):
            repeats[i] = r
        return tuple(repeats)

    def _bucket_samples(self) -> dict[Resolution, list[Sample]]:
        by_bucket: dict[Resolution, list[Sample]] = {}
        for index, (bucket, repeats) in enumerate(zip(self.buckets, self.repeats)):
            by_bucket.setdefault(bucket, []).extend(Sample(index, r) for r in range(repeats))
        return {b: s for b, s in sorted(by_bucket.items()) if s}

    def bucket_counts(self) -> dict[Resolution, int]:
        """Samples (images × effective repeats) per bucket: the input of :func:`trainer.plan.plan_from_counts`."""
        return {bucket: len(samples) for bucket, samples in self._by_bucket.items()}

    @property
    def samples_per_epoch(self) -> int:
        return sum(self.repeats)

    @property
    def has_random_augmentation(self) -> bool:
        """True when an image's pixels differ between epochs/repeats (so cached latents would be stale)."""
        return has_random_augmentation(self.datasets)

    def fingerprint(self) -> str:
        return dataset_fingerprint(self.datasets)

    def report_text(self) -> str:
        text = "\n\n".join(scan.report.format() for scan in self.scans)
        return text + (f"\n{self.validation_note}" if self.validation_note else "")

    # --- per epoch ---------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, batch_size: int, drop_last: bool = False) -> list[BatchPlan]:
        """The batches of one (1-based) epoch: each a tuple of :class:`Sample` sharing one bucket.

        Samples are shuffled inside each bucket and cut into batches (a bucket's last partial batch is dropped
        when ``drop_last``), then the batch order is shuffled. Every ``(item, repeat)`` appears exactly once
        (unless dropped). Deterministic in ``(seed, epoch)``.
        """
        _check_epoch(epoch)
        if batch_size < 1:
            raise ConfigError(f"training.batch_size is {batch_size}; it must be at least 1")
        batches: list[BatchPlan] = []
        for (width, height), samples in self._by_bucket.items():
            order = list(samples)
            sample_rng(self.seed, epoch, f"bucket {width}x{height}", 0, "order").shuffle(order)
            for start in range(0, len(order), batch_size):
                chunk = tuple(order[start:start + batch_size])
                if drop_last and len(chunk) < batch_size:
                    break
                batches.append(chunk)
        sample_rng(self.seed, epoch, "batches", 0, "order").shuffle(batches)
        return batches

    def image_geometry(self, batch_plan: Sequence[Sample | tuple[int, int]], epoch: int) -> list[tuple[int, ...]]:
        """Per sample ``(original h, original w, crop top, crop left)`` (see :func:`image_geometry`)."""
        out = []
        for item, repeat in batch_plan:
            image = self.items[item]
            width, height = self.buckets[item]
            out.append(image_geometry(image, width, height, self.datasets[image.dataset_index], seed=self.seed,
                                      epoch=epoch, repeat=repeat))
        return out

    def caption(self, item: int, epoch: int, repeat: int = 0) -> ProcessedCaption:
        """The processed caption of one sample — the single caption path used by training and previews."""
        _check_epoch(epoch)
        image = self.items[item]
        cfg = self.datasets[image.dataset_index].captions
        return process_caption(image.caption_raw, cfg, seed=self.seed, epoch=epoch, item=item, repeat=repeat)

    def load_batch(self, batch_plan: Sequence[Sample | tuple[int, int]], epoch: int) -> Batch:
        """Decode a batch (images in parallel on a small thread pool) and process its captions."""
        import torch

        _check_epoch(epoch)
        plan = [Sample(*s) for s in batch_plan]
        if not plan:
            raise ValueError("load_batch got an empty batch plan")
        resolution = self.buckets[plan[0].item]
        if any(self.buckets[s.item] != resolution for s in plan):
            raise ValueError("load_batch: the samples of one batch must share a bucket resolution")
        width, height = resolution

        def decode(sample: Sample):
            image = self.items[sample.item]
            return load_image(image, width, height, self.datasets[image.dataset_index], seed=self.seed,
                              epoch=epoch, repeat=sample.repeat)

        pixels = torch.stack(list(self._executor().map(decode, plan)))
        captions = [self.caption(s.item, epoch, s.repeat) for s in plan]
        weighted = any(c.weights is not None for c in captions)
        weights = [c.weights if c.weights is not None else ((c.text, 1.0),) for c in captions] if weighted else None
        return Batch(pixels=pixels, captions=[c.text for c in captions], weights=weights,
                     items=[s.item for s in plan], repeats=[s.repeat for s in plan],
                     is_reg=[self.items[s.item].is_reg for s in plan], resolution=resolution)

    def caption_preview(self, indices: Iterable[int], epochs: Iterable[int],
                        repeats: Iterable[int] = (0,)) -> list[CaptionPreviewRow]:
        """Processed captions for chosen images/epochs/repeats, via exactly the training caption path."""
        rows = []
        epochs, repeats = list(epochs), list(repeats)
        for index in indices:
            image = self.items[index]
            for epoch in epochs:
                for repeat in repeats:
                    cap = self.caption(index, epoch, repeat)
                    rows.append(CaptionPreviewRow(index, epoch, repeat, str(image.path), image.caption_raw,
                                                  cap.text, cap.dropped))
        return rows

    # --- resources ---------------------------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="crucible-data")
            self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def close(self) -> None:
        """Stop the decode threads (also done automatically when the source is garbage collected)."""
        if self._finalizer is not None:
            self._finalizer()
        self._pool = None
        self._finalizer = None

    def __enter__(self) -> "DataSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_epoch(epoch: int) -> None:
    if epoch < 1:
        raise ValueError(f"epoch numbers start at 1, got {epoch}")



__all__ = ["Sample", "BatchPlan", "Batch", "CaptionPreviewRow", "balance_reg_repeats", "DataSource"]


def has_random_augmentation(datasets) -> bool:
    """Whether any of ``datasets`` (DatasetConfig) changes an image's pixels between epochs/repeats."""
    return any(c.flip_aug or c.color_aug or c.crop_style == "random" for c in datasets)
