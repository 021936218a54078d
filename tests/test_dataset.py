"""Dataset scanning, reports, fingerprints, image loading and the per-epoch batch order (tiny images in tmp_path)."""
import io
import json
import logging
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import CaptionConfig, DatasetConfig
from trainer.dataset import (DataSource, ImageItem, UnusableImage, balance_reg_repeats, dataset_fingerprint,
                             load_image, load_pil, probe_image, read_caption, scan_dataset)
from trainer.errors import ConfigError, DatasetError


# --- helpers ---------------------------------------------------------------------------------------------------------

def img(path: Path, size=(32, 32), color=(200, 30, 30), mode="RGB", caption: str | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares a size but holds no pixel data (nothing large is ever allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def item_for(path: Path, width: int, height: int, **kw) -> ImageItem:
    fields = dict(caption_raw="", concept="c", repeats=1, is_reg=False, dataset_index=0)
    fields.update(kw)
    return ImageItem(path=path, width=width, height=height, **fields)


def pixel(tensor: torch.Tensor, x: int, y: int) -> tuple[int, int, int]:
    """RGB 0..255 of a [3,H,W] tensor in [-1,1]."""
    return tuple(int(round((float(v) + 1) * 127.5)) for v in tensor[:, y, x])


def close(a, b, tol=12):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.fixture
def two_concepts(tmp_path):
    root = tmp_path / "set"
    for i in range(3):
        img(root / "10_ohwx man" / f"{i}.png", caption=f"ohwx man, photo {i}, smile")
    for i in range(2):
        img(root / "3_woman" / f"w{i}.jpg", size=(48, 32), caption="woman, outdoors")
    img(root / "loose.png", size=(32, 48))  # root image without caption
    return root


# --- scanning --------------------------------------------------------------------------------------------------------

def test_repeats_and_class_tokens_from_folder_names(two_concepts):
    scan = scan_dataset(DatasetConfig(path=str(two_concepts)))
    by_concept = Counter((i.concept, i.repeats) for i in scan.items)
    assert by_concept == {("ohwx man", 10): 3, ("woman", 3): 2, ("set", 1): 1}
    assert scan.report.images_per_concept == {"set": 1, "ohwx man": 3, "woman": 2}
    assert scan.report.samples == 3 * 10 + 2 * 3 + 1
    loose = next(i for i in scan.items if i.path.name == "loose.png")
    assert loose.caption_raw == "set" and (loose.width, loose.height) == (32, 48)
    assert all(not i.is_reg and i.dataset_index == 0 for i in scan.items)
    assert scan.buckets == ((512, 512),) * 6


def test_repeats_override_and_root_prefix(tmp_path, two_concepts):
    scan = scan_dataset(DatasetConfig(path=str(two_concepts), repeats=2))
    assert {i.repeats for i in scan.items} == {2}
    root = tmp_path / "5_ohwx"
    img(root / "a.png", caption="x")
    item = scan_dataset(DatasetConfig(path=str(root))).items[0]
    assert (item.concept, item.repeats) == ("ohwx", 5)


def test_extensions_any_case_and_hidden_files_ignored(tmp_path):
    root = tmp_path / "d"
    img(root / "a.PNG")
    img(root / "b.JpEg", format="JPEG")
    img(root / "c.webp")
    img(root / "d.bmp")
    (root / "._a.png").write_bytes(b"\x00\x05\x16\x07 appledouble")
    (root / "notes.md").write_text("not an image")
    scan = scan_dataset(DatasetConfig(path=str(root)))
    assert sorted(i.path.name for i in scan.items) == ["a.PNG", "b.JpEg", "c.webp", "d.bmp"]
    assert scan.report.skipped == ()


def test_caption_encodings(tmp_path, caplog):
    root = tmp_path / "d"
    img(root / "bom.png").with_suffix(".txt").write_bytes("\ufeffcafé, naïve".encode("utf-8"))
    img(root / "win.png").with_suffix(".txt").write_bytes("café, naïve".encode("cp1252"))
    img(root / "u16.png").with_suffix(".txt").write_bytes("café, naïve".encode("utf-16"))
    img(root / "odd.png").with_suffix(".txt").write_bytes(b"caf\x81")  # not valid cp1252 either
    with caplog.at_level(logging.WARNING, logger="crucible"):
        scan = scan_dataset(DatasetConfig(path=str(root)))
    captions = {i.path.stem: i.caption_raw for i in scan.items}
    assert captions["bom"].lstrip("\ufeff") == captions["win"] == captions["u16"] == "café, naïve"
    assert captions["odd"] == "caf\x81"
    assert dict((Path(p).name, e) for p, e in scan.report.caption_fallbacks) == {"win.txt": "cp1252",
                                                                                  "odd.txt": "latin-1"}
    assert "win.txt" in caplog.text and "cp1252" in caplog.text


def test_caption_extension_setting(tmp_path):
    root = tmp_path / "d"
    img(root / "a.png").with_suffix(".caption").write_text("from caption file")
    assert scan_dataset(DatasetConfig(path=str(root), caption_extension="caption")).items[0].caption_raw == \
        "from caption file"
    assert read_caption(root / "a.png", ".txt") == (None, None)


@pytest.mark.parametrize("policy,expected", [("class_tokens", "ohwx"), ("empty", ""), ("skip", None)])
def test_missing_caption_policies(tmp_path, policy, expected):
    root = tmp_path / "2_ohwx"
    img(root / "with.png", caption="has caption")
    img(root / "without.png")
    img(root / "blank.png", caption="  \n ")
    scan = scan_dataset(DatasetConfig(path=str(root), missing_caption=policy))
    captions = {i.path.stem: i.caption_raw for i in scan.items}
    assert captions["with"] == "has caption"
    if expected is None:
        assert set(captions) == {"with"}
    else:
        assert captions["without"] == captions["blank"] == expected
    assert sorted(Path(p).name for p in scan.report.missing_captions) == ["blank.png", "without.png"]
    assert f"missing_caption={policy}" in scan.report.format()


def test_bad_files_are_skipped_and_reported_once(tmp_path, caplog):
    root = tmp_path / "d"
    img(root / "good.png", caption="ok")
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("definitely not a jpeg")
    (root / "bad_header.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    full = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(full, "PNG")
    (root / "cut.png").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(jpeg, "JPEG")
    (root / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "trailing.jpg").write_bytes(jpeg.getvalue() + b"appended data that is not JPEG" * 10)
    with caplog.at_level(logging.WARNING, logger="crucible"):
        scan = scan_dataset(DatasetConfig(path=str(root)))
    assert sorted(i.path.name for i in scan.items) == ["good.png", "trailing.jpg"]
    reasons = {Path(p).name: why for p, why in scan.report.skipped}
    assert set(reasons) == {"zero.png", "text.jpg", "bad_header.png", "cut.png", "cut.jpg"}
    assert "0 bytes" in reasons["zero.png"]
    assert "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["cut.png"] and "truncated" in reasons["cut.jpg"]
    records = [r for r in caplog.records if r.name == "crucible" and r.levelno == logging.WARNING]
    assert len(records) == 1
    for name in reasons:
        assert name in records[0].getMessage()
    assert "skipped 5 file(s)" in scan.report.format()


@pytest.mark.parametrize("size", [(15000, 15000), (20000, 20000), (200000, 1000)])
def test_decompression_bomb_refused_without_allocating(tmp_path, size):
    root = tmp_path / "d"
    img(root / "ok.png")
    bomb = png_header_only(root / "bomb.png", *size)
    scan = scan_dataset(DatasetConfig(path=str(root)))
    assert [i.path.name for i in scan.items] == ["ok.png"]
    reason = dict((Path(p).name, w) for p, w in scan.report.skipped)["bomb.png"]
    assert "decompression bomb" in reason
    with pytest.raises(UnusableImage, match="bomb.png"):
        probe_image(bomb)
    with pytest.raises(DatasetError, match="bomb.png"):
        load_image(item_for(bomb, *size), 64, 64, DatasetConfig(), seed=0, epoch=1, repeat=0)


def test_missing_empty_and_unusable_folders_raise(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=r"nope.*does not exist"):
        scan_dataset(DatasetConfig(path=str(missing)))
    empty = tmp_path / "empty"
    (empty / "10_sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"empty.*contains no images.*10_concept"):
        scan_dataset(DatasetConfig(path=str(empty)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"no usable image in dataset folder '.*broken'.*a.png: empty"):
        scan_dataset(DatasetConfig(path=str(broken)))
    zero = tmp_path / "zero"
    img(zero / "0_off" / "a.png")
    with pytest.raises(DatasetError, match="repeats prefix is 0"):
        scan_dataset(DatasetConfig(path=str(zero)))
    only_uncaptioned = tmp_path / "nocap"
    img(only_uncaptioned / "a.png")
    with pytest.raises(DatasetError, match="missing_caption is 'skip'"):
        scan_dataset(DatasetConfig(path=str(only_uncaptioned), missing_caption="skip"))
    a_file = img(tmp_path / "file.png")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        scan_dataset(DatasetConfig(path=str(a_file)))
    with pytest.raises(DatasetError, match=r"datasets\[2\].path is empty"):
        scan_dataset(DatasetConfig(path=" "), 2)


def test_zero_repeat_folder_is_reported(tmp_path):
    root = tmp_path / "d"
    img(root / "0_off" / "a.png")
    img(root / "1_on" / "b.png")
    scan = scan_dataset(DatasetConfig(path=str(root)))
    assert [i.path.name for i in scan.items] == ["b.png"]
    assert "repeats prefix is 0" in scan.report.skipped[0][1]


def test_report_contents_and_json(two_concepts):
    cfg = DatasetConfig(path=str(two_concepts), crop_aspect="preserve", resolution=256, min_bucket_reso=128)
    report = scan_dataset(cfg).report
    text = report.format()
    for needle in ("10_ohwx man: 3 images x 10 repeats = 30 samples", "3_woman: 2 images", "total: 6 images",
                   "buckets:", "top tags:", "tags per caption"):
        assert needle in text
    assert dict(report.top_tags)["smile"] == 3
    assert report.tag_frequency["ohwx man"]["ohwx man"] == 3
    assert sum(n for _, n in report.bucket_counts) == 6
    assert report.caption_stats.max_tags == 3 and report.caption_stats.min_tags == 1
    json.dumps(report.to_dict())


def test_exif_orientation_in_scan_and_load(tmp_path):
    base = Image.new("RGB", (40, 20), (255, 0, 0))
    base.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90° clockwise: the left half ends up on top
    for name, kwargs in (("r.jpg", dict(quality=95)), ("r.png", {})):
        path = tmp_path / name
        base.save(path, exif=exif, **kwargs)
        assert probe_image(path) == (20, 40)
        tensor = load_image(item_for(path, 20, 40), 20, 40, DatasetConfig(), seed=0, epoch=1, repeat=0)
        assert tensor.shape == (3, 40, 20)
        assert close(pixel(tensor, 10, 5), (255, 0, 0), 40) and close(pixel(tensor, 10, 35), (0, 0, 255), 40)


def test_transparency_composited_on_background(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    rgba.save(tmp_path / "a.png")
    cfg = DatasetConfig(background_color="#00ff00")
    t = load_image(item_for(tmp_path / "a.png", 8, 8), 8, 8, cfg, seed=0, epoch=1, repeat=0)
    assert pixel(t, 0, 0) == (255, 0, 0)
    assert close(pixel(t, 1, 0), (128, 127, 0), 2)
    assert pixel(t, 5, 5) == (0, 255, 0)
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    t = load_image(item_for(tmp_path / "la.png", 8, 8), 8, 8, DatasetConfig(background_color="white"), seed=0,
                   epoch=1, repeat=0)
    assert pixel(t, 3, 3) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.save(tmp_path / "p.png", transparency=0)
    t = load_image(item_for(tmp_path / "p.png", 8, 8), 8, 8, DatasetConfig(background_color="#0000ff"), seed=0,
                   epoch=1, repeat=0)
    assert pixel(t, 3, 3) == (0, 0, 255)


def test_greyscale_and_16_bit_become_rgb(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "g.png")
    t = load_image(item_for(tmp_path / "g.png", 8, 8), 8, 8, DatasetConfig(), seed=0, epoch=1, repeat=0)
    assert t.dtype == torch.float32 and pixel(t, 2, 2) == (100, 100, 100)
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "g16.png")
    t = load_image(item_for(tmp_path / "g16.png", 8, 8), 8, 8, DatasetConfig(), seed=0, epoch=1, repeat=0)
    assert pixel(t, 2, 2) == (255, 255, 255)
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0


def test_bad_background_color_names_the_field(tmp_path):
    img(tmp_path / "d" / "a.png")
    with pytest.raises(ConfigError, match=r"datasets\[0\].background_color"):
        DataSource([DatasetConfig(path=str(tmp_path / "d"), background_color="not-a-colour")], seed=0)


@pytest.fixture
def stripes(tmp_path):
    """90x30: red | green | blue thirds."""
    im = Image.new("RGB", (90, 30), (255, 0, 0))
    im.paste((0, 255, 0), (30, 0, 60, 30))
    im.paste((0, 0, 255), (60, 0, 90, 30))
    im.save(tmp_path / "s.png")
    return item_for(tmp_path / "s.png", 90, 30)


def test_crop_styles(stripes):
    def load(style, **kw):
        return load_image(stripes, 30, 30, DatasetConfig(crop_style=style), seed=0, repeat=0, **kw)

    center, corner = load("center", epoch=1), load("corner", epoch=1)
    assert pixel(center, 15, 15) == (0, 255, 0) and pixel(center, 0, 0) == (0, 255, 0)
    assert pixel(corner, 15, 15) == (255, 0, 0) and pixel(corner, 29, 29) == (255, 0, 0)
    randoms = [load("random", epoch=e) for e in range(1, 9)]
    assert torch.equal(randoms[0], load("random", epoch=1))  # seeded
    assert len({tuple(r[:, 15, 15].tolist()) for r in randoms}) > 1  # varies with the epoch


def test_resize_covers_then_crops(stripes):
    t = load_image(stripes, 60, 20, DatasetConfig(), seed=0, epoch=1, repeat=0)  # same aspect: all 3 stripes
    assert t.shape == (3, 20, 60)
    assert [pixel(t, x, 10) for x in (5, 30, 55)] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    up = load_image(stripes, 90, 90, DatasetConfig(), seed=0, epoch=1, repeat=0)  # upscale x3 then crop
    assert up.shape == (3, 90, 90) and pixel(up, 45, 45) == (0, 255, 0)


def test_jpeg_draft_used_and_matches_full_decode(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    photo = Image.effect_noise((64, 48), 60).convert("RGB").resize((1024, 768), Image.Resampling.BICUBIC)
    photo.save(tmp_path / "big.jpg", quality=95)
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or original(self, mode, size))
    item = item_for(tmp_path / "big.jpg", 1024, 768)
    fast = load_pil(item, 256, 192, DatasetConfig(), seed=0, epoch=1, repeat=0)
    assert drafts == [(256, 192)]  # decoded at 1/4 scale
    load_pil(item, 640, 480, DatasetConfig(), seed=0, epoch=1, repeat=0)
    assert len(drafts) == 1  # less than 2x larger: full decode
    with Image.open(tmp_path / "big.jpg") as full:
        reference = full.convert("RGB").resize((256, 192), Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(fast, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert fast.size == (256, 192) and diff.mean() < 2
    exif = Image.Exif()
    exif[0x0112] = 8  # rotated: the draft size is asked in the file's own orientation
    photo.save(tmp_path / "rot.jpg", quality=95, exif=exif)
    rotated = load_pil(item_for(tmp_path / "rot.jpg", 768, 1024), 192, 256, DatasetConfig(), seed=0, epoch=1,
                       repeat=0)
    assert drafts[-1] == (256, 192) and rotated.size == (192, 256)
    expected = reference.transpose(Image.Transpose.ROTATE_90)
    assert np.abs(np.asarray(rotated, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).mean() < 2


def test_flip_and_color_aug_are_seeded(stripes):
    cfg = DatasetConfig(flip_aug=True)
    flips = [pixel(load_image(stripes, 90, 30, cfg, seed=0, epoch=1, repeat=r), 5, 5) for r in range(40)]
    assert set(flips) == {(255, 0, 0), (0, 0, 255)}
    assert 8 <= flips.count((0, 0, 255)) <= 32
    assert flips == [pixel(load_image(stripes, 90, 30, cfg, seed=0, epoch=1, repeat=r), 5, 5) for r in range(40)]
    jitter = DatasetConfig(color_aug=True)
    plain = load_image(stripes, 90, 30, DatasetConfig(), seed=0, epoch=1, repeat=0)
    a = load_image(stripes, 90, 30, jitter, seed=0, epoch=1, repeat=0)
    assert torch.equal(a, load_image(stripes, 90, 30, jitter, seed=0, epoch=1, repeat=0))
    assert not torch.equal(a, load_image(stripes, 90, 30, jitter, seed=0, epoch=2, repeat=0))
    assert 0 < float((a - plain).abs().max()) < 0.5  # mild
    assert float(a.min()) >= -1 and float(a.max()) <= 1


# --- the data source -------------------------------------------------------------------------------------------------

@pytest.fixture
def bucketed(tmp_path):
    root = tmp_path / "b"
    for i in range(5):
        img(root / "4_wide" / f"w{i}.png", size=(96, 48), caption=f"wide {i}, a, b, c")
    for i in range(3):
        img(root / "3_tall" / f"t{i}.png", size=(48, 96), caption=f"tall {i}, a, b, c")
    img(root / "2_sq" / "s.png", size=(64, 64), caption="square")
    cfg = DatasetConfig(path=str(root), resolution=128, crop_aspect="preserve", min_bucket_reso=64,
                        max_bucket_reso=256, bucket_reso_steps=32,
                        captions=CaptionConfig(shuffle_caption=True, trigger_word="ohwx"))
    with DataSource([cfg], seed=3) as source:
        yield source


@pytest.mark.parametrize("batch_size,drop_last", [(1, False), (3, False), (3, True), (7, False), (50, False)])
def test_epoch_batches_cover_every_sample_once(bucketed, batch_size, drop_last):
    batches = bucketed.epoch_batches(1, batch_size, drop_last)
    samples = [s for b in batches for s in b]
    assert len(samples) == len(set(samples))
    expected = {(i, r) for i, reps in enumerate(bucketed.repeats) for r in range(reps)}
    if drop_last:
        assert set(samples) <= expected and all(len(b) == batch_size for b in batches)
    else:
        assert set(samples) == expected
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert len({bucketed.buckets[s.item] for s in batch}) == 1


def test_epoch_batches_deterministic_per_epoch(bucketed):
    assert bucketed.epoch_batches(2, 3) == bucketed.epoch_batches(2, 3)
    assert bucketed.epoch_batches(1, 3) != bucketed.epoch_batches(2, 3)
    with pytest.raises(ValueError, match="start at 1"):
        bucketed.epoch_batches(0, 3)


def test_bucket_counts_include_repeats(bucketed):
    counts = bucketed.bucket_counts()
    assert sum(counts.values()) == bucketed.samples_per_epoch == 5 * 4 + 3 * 3 + 2
    assert len(counts) == 3
    assert {(w, h) for w, h in counts} == set(bucketed.buckets)
    assert all(w % 32 == 0 and h % 32 == 0 and w * h <= 128 * 128 for w, h in counts)


def test_load_batch(bucketed):
    plan = next(b for b in bucketed.epoch_batches(1, 3) if len(b) == 3)
    batch = bucketed.load_batch(plan, 1)
    width, height = batch.resolution
    assert batch.pixels.shape == (3, 3, height, width) and batch.pixels.dtype == torch.float32
    assert -1 <= float(batch.pixels.min()) and float(batch.pixels.max()) <= 1
    assert batch.items == [s.item for s in plan] and batch.repeats == [s.repeat for s in plan]
    assert batch.weights is None and batch.is_reg == [False] * 3
    assert all(c.startswith("ohwx, ") for c in batch.captions)
    preview = bucketed.caption_preview(batch.items, [1], [0])
    for caption, sample in zip(batch.captions, plan):
        assert caption == bucketed.caption_preview([sample.item], [1], [sample.repeat])[0].caption
    assert len(preview) == 3
    with pytest.raises(ValueError, match="share a bucket"):
        mixed = [next(iter(b)) for b in bucketed.epoch_batches(1, 1)]
        bucketed.load_batch(mixed, 1)


def test_caption_preview_matches_training_path(bucketed):
    wide = [i for i, item in enumerate(bucketed.items) if item.concept == "wide"][:2]
    rows = bucketed.caption_preview(wide, [1, 2, 3], [0, 1])
    assert len(rows) == 12
    for row in rows:
        assert row.caption == bucketed.caption(row.item, row.epoch, row.repeat).text
        assert row.raw == bucketed.items[row.item].caption_raw and row.file.endswith(".png")
    assert len({r.caption for r in rows if r.item == wide[0]}) > 1  # shuffled per epoch / repeat


def test_multiple_datasets_keep_their_own_options(tmp_path):
    img(tmp_path / "a" / "1_x" / "a.png", size=(64, 64), caption="b, c")
    img(tmp_path / "b" / "1_y" / "b.png", size=(64, 64), caption="(d:1.5), e")
    first = DatasetConfig(path=str(tmp_path / "a"), resolution=64, captions=CaptionConfig(trigger_word="one"))
    second = DatasetConfig(path=str(tmp_path / "b"), resolution=128, repeats=3,
                           captions=CaptionConfig(weighted_captions=True))
    source = DataSource([first, second], seed=0)
    assert source.buckets == ((64, 64), (128, 128)) and source.repeats == (1, 3)
    assert [i.dataset_index for i in source.items] == [0, 1]
    assert source.caption(0, 1).text == "one, b, c"
    batch = source.load_batch([(1, 2)], 1)
    assert batch.pixels.shape == (1, 3, 128, 128)
    assert batch.captions == ["d, e"] and batch.weights == [(("d", 1.5), (", e", 1.0))]
    assert "Dataset 2" in source.report_text()
    source.close()


def test_balance_reg_repeats():
    assert balance_reg_repeats(10, [1, 1, 1]) == [4, 3, 3]
    assert balance_reg_repeats(4, [2, 2, 2, 2]) == [2, 2, 0, 0]  # only the first images are needed
    assert balance_reg_repeats(5, [3, 3]) == [3, 3]  # first pass may overshoot by less than one folder repeat
    assert balance_reg_repeats(0, [1]) == [0] and balance_reg_repeats(5, []) == []


def test_regularization_dataset_is_balanced(tmp_path):
    for i in range(2):
        img(tmp_path / "train" / "5_ohwx" / f"{i}.png", caption="ohwx man")
    for i in range(3):
        img(tmp_path / "reg" / "1_man" / f"{i}.png", caption="man")
    source = DataSource([DatasetConfig(path=str(tmp_path / "train"), resolution=64),
                         DatasetConfig(path=str(tmp_path / "reg"), resolution=64, is_reg=True)], seed=0)
    train = sum(r for r, i in zip(source.repeats, source.items) if not i.is_reg)
    reg = sum(r for r, i in zip(source.repeats, source.items) if i.is_reg)
    assert train == reg == 10
    batch = source.load_batch(source.epoch_batches(1, 20)[0], 1)
    assert sorted(batch.is_reg) == [False] * 10 + [True] * 10
    with pytest.raises(DatasetError, match="only regularization"):
        DataSource([DatasetConfig(path=str(tmp_path / "reg"), is_reg=True)], seed=0)
    with pytest.raises(DatasetError, match="no dataset configured"):
        DataSource([], seed=0)


def test_fingerprint_tracks_files(tmp_path, two_concepts):
    cfg = DatasetConfig(path=str(two_concepts))
    first = dataset_fingerprint([cfg])
    assert first == dataset_fingerprint(cfg) == dataset_fingerprint([cfg])
    (two_concepts / "unrelated.json").write_text("{}")
    assert dataset_fingerprint(cfg) == first
    caption = two_concepts / "10_ohwx man" / "0.txt"
    caption.write_text("changed caption!")
    second = dataset_fingerprint(cfg)
    assert second != first
    os.utime(caption, ns=(1, 1))
    assert dataset_fingerprint(cfg) != second
    img(two_concepts / "new.png")
    assert dataset_fingerprint(cfg) not in (first, second)
    assert len(dataset_fingerprint(DatasetConfig(path=str(tmp_path / "missing")))) == 64  # never raises
    assert dataset_fingerprint([cfg, cfg]) != dataset_fingerprint(cfg)
