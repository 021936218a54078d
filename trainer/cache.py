"""Latent and text-embedding caches: speed without losing augmentation.

* :class:`LatentCache` keeps each image's VAE latents (in memory, optionally also on disk as safetensors). The key
  is the image file's content hash + its bucket size + crop style + the model's identity, so a changed file, crop
  or VAE never reuses a stale latent. Random pixel augmentation (flip, colour jitter, random crop) changes the
  latents per epoch, so it cannot be combined with latent caching — the run is refused with a message saying so.
* :class:`TextCache` keeps shuffle and dropout alive, unlike kohya (which turns shuffle off when caching): each
  image gets ``K`` pre-shuffled caption variants plus the empty caption; every step draws one variant per sample
  (seeded by seed/epoch/item/repeat, so resume stays exact) and caption dropout picks the empty one. When a text
  encoder is being trained the cache is not used (embeddings change every step).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .cache_sharing import ONE_PROCESS, CacheShare
from .captions import caption_dropped, process_caption, sample_rng
from .errors import ConfigError
from .fileio import save_safetensors

log = logging.getLogger("crucible")


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_identity(*paths: str) -> str:
    """A short id for the weights in use: paths plus their sizes and modification times."""
    parts = []
    for p in paths:
        if not p:
            continue
        path = Path(p)
        files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
        parts += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists()]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


class LatentCache:
    """Per-image latents keyed by content, bucket, crop and model."""

    def __init__(self, source, model_id: str, folder: Path | None = None):
        if source.has_random_augmentation:
            raise ConfigError("training.cache_latents cannot be combined with flip_aug, color_aug or "
                              "crop_style 'random' (the pixels change every epoch); turn caching or the "
                              "augmentation off")
        self.source = source
        self.model_id = model_id
        self.folder = Path(folder) if folder else None
        self.memory: dict[int, torch.Tensor] = {}
        self.hits = self.misses = 0
        self.encoded = 0  # images this process ran through the VAE

    def key(self, item: int) -> str:
        image = self.source.items[item]
        ds = self.source.datasets[image.dataset_index]
        w, h = self.source.buckets[item]
        raw = f"{file_digest(Path(image.path))}|{w}x{h}|{ds.crop_style}|{ds.crop_aspect}|{ds.background_color}|{self.model_id}"
        return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()

    def latents(self, samples: Sequence, epoch: int, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Latents for a batch plan; misses are decoded and encoded one image at a time (then kept)."""
        out = []
        for sample in samples:
            item = sample[0]
            if item not in self.memory:
                self.memory[item] = self._load_or_encode(item, epoch, encode)
                self.misses += 1
            else:
                self.hits += 1
            out.append(self.memory[item])
        return torch.stack(out)

    def fill(self, encode, report: Callable[[int, int], None] = lambda done, total: None,
             share: CacheShare = ONE_PROCESS) -> None:
        """Encode (or load from disk) every image now, before training starts, so the VAE can leave the device.
        ``share``: with several processes each encodes its share and receives the others' (:mod:`.cache_sharing`)."""
        items = trained_items(self.source)
        mine = share.mine(items)
        for done, item in enumerate(mine, 1):
            if item not in self.memory:
                self.memory[item] = self._load_or_encode(item, 1, encode)  # no random augmentation: any epoch
            report(done, len(mine))
        share.spread(items, self.memory.__getitem__, self.memory.__setitem__)
        if share.world > 1:
            log.info("rank %d cached latents of %d of %d images (%d encoded); the other ranks sent the rest",
                     share.rank, len(mine), len(items), self.encoded)

    def _load_or_encode(self, item: int, epoch: int, encode) -> torch.Tensor:
        path = self.folder / f"{self.key(item)}.safetensors" if self.folder else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            try:
                return load_file(str(path))["latents"]
            except Exception as exc:  # noqa: BLE001 - a damaged cache file is re-created, never trusted
                log.warning("latent cache file %s is unreadable (%s); re-encoding", path, exc)
        batch = self.source.load_batch([(item, 0)], epoch)
        latents = encode(batch.pixels)[0].detach().float().cpu()
        self.encoded += 1
        if not torch.isfinite(latents).all():  # never cached, never reused (kohya no_half_vae territory)
            raise ConfigError(f"the VAE returned NaN/inf latents for {self.source.items[item].path}; nothing was "
                              "cached. Run the VAE in float32 (mixed_precision 'no', or a VAE fixed for fp16)")
        if path is not None:
            save_safetensors(path, {"latents": latents}, {"crucible_latent_key": self.key(item)})
        return latents


class TextCache:
    """``K`` caption variants per image plus the empty caption, encoded once."""

    def __init__(self, source, variants: int, encode: Callable[..., dict[str, torch.Tensor]]):
        self.source = source
        self.variants = variants
        self.encode = encode
        self.entries: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.empty: dict[str, torch.Tensor] | None = None

    def variants_of(self, item: int):
        """The item's caption variants: the normal caption pipeline (shuffle, tag dropout, …) for epochs 1..K,
        with whole-caption dropout left to :meth:`choice`."""
        image = self.source.items[item]
        cfg = replace(self.source.datasets[image.dataset_index].captions, caption_dropout_rate=0.0,
                      caption_dropout_every_n_epochs=0)
        return [process_caption(image.caption_raw, cfg, seed=self.source.seed, epoch=v + 1, item=item)
                for v in range(self.variants)]

    def variant_texts(self, item: int) -> list[str]:
        return [c.text for c in self.variants_of(item)]

    def choice(self, item: int, epoch: int, repeat: int) -> int | None:
        """Which variant a sample uses (``None`` = the dropped, empty caption)."""
        image = self.source.items[item]
        cfg = self.source.datasets[image.dataset_index].captions
        if caption_dropped(cfg, seed=self.source.seed, epoch=epoch, item=item, repeat=repeat):
            return None
        return sample_rng(self.source.seed, epoch, item, repeat, "text_variant").randrange(self.variants)

    def caption_for(self, item: int, epoch: int, repeat: int) -> str:
        v = self.choice(item, epoch, repeat)
        return "" if v is None else self.variant_texts(item)[v]

    def conditioning(self, samples: Sequence, epoch: int) -> dict[str, torch.Tensor]:
        parts = []
        for sample in samples:
            item, repeat = sample[0], sample[1]
            v = self.choice(item, epoch, repeat)
            self._fill(item)
            parts.append(self.empty if v is None else self.entries[item][v])
        return {k: cat_rows([p[k] for p in parts]) for k in parts[0]}

    def fill(self, report: Callable[[int, int], None] = lambda done, total: None,
             share: CacheShare = ONE_PROCESS) -> None:
        """Encode every image's caption variants now, before training starts, so the text encoders can leave.
        ``share``: with several processes each encodes its share and receives the others' (:mod:`.cache_sharing`);
        the empty caption's embedding is the one encoded with the first image, on every process, as in one."""
        items = trained_items(self.source)
        mine = share.mine(items)
        for done, item in enumerate(mine, 1):
            self._fill(item)
            report(done, len(mine))
        first = items[0] if items else None

        def put(item: int, entry: tuple) -> None:
            self.entries[item] = entry[0]
            if entry[1] is not None:
                self.empty = entry[1]

        share.spread(items, lambda item: (self.entries[item], self.empty if item == first else None), put)
        if share.world > 1:
            log.info("rank %d cached text embeddings of %d of %d images; the other ranks sent the rest", share.rank,
                     len(mine), len(items))

    def _fill(self, item: int) -> None:
        if item in self.entries:
            return
        captions = self.variants_of(item)
        texts = [c.text for c in captions] + [""]
        if any(c.weights is not None for c in captions):  # weighted captions: the encoder scales those tokens
            cond = self.encode(texts, [c.weights or ((c.text, 1.0),) for c in captions] + [(("", 1.0),)])
        else:
            cond = self.encode(texts)
        n = len(texts)
        rows = [{k: _row(v, i, n) for k, v in cond.items()} for i in range(n)]
        self.entries[item] = rows[:-1]
        if self.empty is None:
            self.empty = rows[-1]


def cat_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cached conditioning rows as one batch. Rows whose token axis (dim 1) differs — a text encoder that does not
    pad, such as an LLM through ComfyUI's CLIP — are zero-padded to the longest; the family that made them records
    each caption's length itself (nodes/comfy_conds.py)."""
    longest = max(r.shape[1] for r in rows) if rows[0].ndim >= 2 else 0
    if rows[0].ndim < 2 or all(r.shape[1] == longest for r in rows):
        return torch.cat(list(rows))
    return torch.cat([torch.cat([r, r.new_zeros(r.shape[0], longest - r.shape[1], *r.shape[2:])], dim=1)
                      for r in rows])


def _row(value: torch.Tensor, i: int, n: int) -> torch.Tensor:
    if not value.ndim or value.shape[0] != n:
        raise ValueError(f"text conditioning tensors must be batch-first (got shape {tuple(value.shape)} for {n} captions)")
    return value.detach()[i:i + 1].cpu()


def trained_items(source) -> list[int]:
    """The indices of the images training reads: held-out validation images are never trained on, so never cached."""
    held = set(getattr(source, "validation_items", ()))
    return [i for i in range(len(source.items)) if i not in held]
