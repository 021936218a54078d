"""Latent and text-embedding caches."""
from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch

from trainer.cache import LatentCache, TextCache, model_identity
from trainer.config import CaptionConfig, DatasetConfig
from trainer.dataset import DataSource
from trainer.errors import ConfigError


def source(root, **captions):
    cfg = DatasetConfig(path=str(root), resolution=64, repeats=2,
                        captions=CaptionConfig(shuffle_caption=True, **captions))
    return DataSource([cfg], seed=5)


def fake_encode(texts):
    # a deterministic "text encoder": one row per caption, value depends on the text
    rows = [torch.full((1, 3, 4), float(sum(map(ord, t)) % 997)) for t in texts]
    return {"encoder_hidden_states": torch.cat(rows), "pooled": torch.cat([r[:, 0] for r in rows])}


def test_text_cache_keeps_shuffle_and_dropout_alive(demo_dataset):
    src = source(demo_dataset, caption_dropout_rate=0.2)
    cache = TextCache(src, variants=4, encode=fake_encode)
    texts = cache.variant_texts(0)
    assert len(texts) == 4 and len(set(texts)) > 1  # shuffled variants differ
    assert all(sorted(t.split(", ")) == sorted(texts[0].split(", ")) for t in texts)  # same tags, other order
    choices = Counter(cache.choice(i, e, r) for i in range(len(src.items)) for e in range(1, 40) for r in range(2))
    n = sum(choices.values())
    assert 0.15 < choices[None] / n < 0.25  # dropout → the empty caption at the configured rate
    assert all(choices[v] > n * 0.15 for v in range(4))  # every variant gets used
    assert cache.choice(3, 7, 1) == cache.choice(3, 7, 1)  # deterministic (exact resume)


def test_text_cache_conditioning_batches_and_encodes_each_item_once(demo_dataset):
    src = source(demo_dataset)
    calls = []

    def counting(texts):
        calls.append(list(texts))
        return fake_encode(texts)

    cache = TextCache(src, variants=3, encode=counting)
    plan = [(0, 0), (1, 1), (0, 1)]
    cond = cache.conditioning(plan, epoch=1)
    assert cond["encoder_hidden_states"].shape == (3, 3, 4) and cond["pooled"].shape == (3, 4)
    cache.conditioning(plan, epoch=2)
    assert len(calls) == 2 and all(len(c) == 4 and c[-1] == "" for c in calls)  # 3 variants + empty, per item
    expected = fake_encode([cache.caption_for(1, 1, 1)])["encoder_hidden_states"]
    assert torch.equal(cond["encoder_hidden_states"][1:2], expected)


def test_text_cache_requires_batch_first_tensors(demo_dataset):
    cache = TextCache(source(demo_dataset), 2, lambda texts: {"ids": torch.zeros(7, 3)})
    with pytest.raises(ValueError, match="batch-first"):
        cache.conditioning([(0, 0)], 1)


def test_latent_cache_memory_and_disk(demo_dataset, tmp_path):
    src = source(demo_dataset)
    encoded = []

    def encode(pixels):
        encoded.append(pixels.shape[0])
        return pixels[:, :1, ::8, ::8] * 2  # a stand-in VAE: [B,1,8,8]

    cache = LatentCache(src, "model-a", tmp_path / "lat")
    first = cache.latents([(0, 0), (1, 1)], 1, encode)
    again = cache.latents([(1, 0), (0, 1)], 2, encode)
    assert first.shape == (2, 1, 8, 8) and torch.equal(first[0], again[1])
    assert sum(encoded) == 2 and cache.hits == 2
    assert len(list((tmp_path / "lat").glob("*.safetensors"))) == 2
    fresh = LatentCache(src, "model-a", tmp_path / "lat")  # a new process: read from disk, no encoding
    assert torch.equal(fresh.latents([(0, 0)], 1, encode)[0], first[0]) and sum(encoded) == 2
    assert LatentCache(src, "model-b", tmp_path / "lat").key(0) != cache.key(0)  # other model, other key


def test_latent_key_follows_file_content(demo_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo_dataset, root)
    src = source(root)
    before = LatentCache(src, "m").key(0)
    from PIL import Image

    Image.new("RGB", (128, 128), (1, 2, 3)).save(src.items[0].path)
    assert LatentCache(source(root), "m").key(0) != before


def test_latent_cache_refuses_random_augmentation(demo_dataset):
    src = DataSource([DatasetConfig(path=str(demo_dataset), resolution=64, flip_aug=True)], seed=1)
    with pytest.raises(ConfigError, match="flip_aug"):
        LatentCache(src, "m")


def test_model_identity_changes_with_weights(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x" * 10)
    a = model_identity(str(f))
    f.write_bytes(b"x" * 11)
    assert model_identity(str(f)) != a
