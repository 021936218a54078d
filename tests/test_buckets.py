"""Aspect-ratio bucketing: generated lists, closest-AR assignment, no-upscale and square mode."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.buckets import (assign_bucket, check_bucket_config, closest_bucket, make_buckets, no_upscale_bucket,
                             uses_buckets)
from trainer.config import DatasetConfig
from trainer.errors import ConfigError

sizes = st.integers(min_value=1, max_value=6000)
resolutions = st.sampled_from([256, 512, 768, 1024])


def _log_ar(w, h):
    return math.log(w / h)


@pytest.mark.parametrize("res", [256, 512, 768, 1024])
def test_buckets_are_on_the_grid_and_within_budget(res):
    buckets = make_buckets(res, 256, max(1024, res), 64)
    assert (res, res) in buckets
    assert len(set(buckets)) == len(buckets) and list(buckets) == sorted(buckets)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= res * res
        assert 256 <= w <= max(1024, res) and 256 <= h <= max(1024, res)
        assert (h, w) in buckets  # symmetric


def test_512_bucket_list_matches_kohya():
    # kohya sd-scripts make_bucket_resolutions((512, 512), 256, 1024, 64)
    wide = {(512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
            (1024, 256)}
    assert set(make_buckets(512, 256, 1024, 64)) == wide | {(h, w) for w, h in wide}


def test_each_bucket_is_the_largest_for_one_of_its_sides():
    res = 768
    buckets = make_buckets(res, 256, 1024, 64)

    def tallest(side):
        return min(1024, res * res // side // 64 * 64)

    for w, h in buckets:
        assert h == tallest(w) or w == tallest(h)


@given(sizes, sizes, resolutions)
@settings(max_examples=300, deadline=None)
def test_closest_bucket_minimises_aspect_error(w, h, res):
    buckets = make_buckets(res, 256, 1024, 64)
    chosen = closest_bucket(w, h, buckets)
    assert chosen in buckets
    best = min(abs(_log_ar(*b) - _log_ar(w, h)) for b in buckets)
    assert abs(_log_ar(*chosen) - _log_ar(w, h)) == pytest.approx(best)


def test_closest_bucket_examples():
    buckets = make_buckets(512, 256, 1024, 64)
    assert closest_bucket(1000, 1000, buckets) == (512, 512)
    assert closest_bucket(1920, 1080, buckets) == (640, 384)
    assert closest_bucket(1080, 1920, buckets) == (384, 640)
    assert closest_bucket(5000, 100, buckets) == (1024, 256)  # extreme: the widest bucket
    assert closest_bucket(448, 576, reversed(buckets)) == (448, 576)  # input order is irrelevant


def test_closest_bucket_rejects_bad_sizes():
    with pytest.raises(ValueError):
        closest_bucket(0, 10, [(512, 512)])


@given(sizes, sizes, resolutions)
@settings(max_examples=300, deadline=None)
def test_no_upscale_never_enlarges_and_fits(w, h, res):
    bw, bh = no_upscale_bucket(w, h, res, 64)
    assert bw % 64 == 0 and bh % 64 == 0 and bw >= 64 and bh >= 64
    assert bw * bh <= res * res
    if w >= 64 and h >= 64:  # only images thinner than one step have to be enlarged on that side
        assert bw <= w and bh <= h


def test_no_upscale_examples():
    assert no_upscale_bucket(300, 200, 512, 64) == (256, 192)  # small: own size rounded down
    assert no_upscale_bucket(512, 512, 512, 64) == (512, 512)
    assert no_upscale_bucket(2048, 1024, 512, 64) == (704, 320)  # shrunk to the area then rounded down
    assert no_upscale_bucket(10000, 10, 512, 64) == (4096, 64)  # clamped: the area budget still holds


def test_assign_bucket_modes():
    square = DatasetConfig(resolution=512)
    assert not uses_buckets(square)
    assert assign_bucket(1920, 1080, square) == (512, 512)
    preserve = DatasetConfig(resolution=512, crop_aspect="preserve")
    assert uses_buckets(preserve) and uses_buckets(DatasetConfig(enable_bucket=True))
    assert assign_bucket(1920, 1080, preserve) == (640, 384)
    no_up = DatasetConfig(resolution=512, enable_bucket=True, bucket_no_upscale=True)
    assert assign_bucket(300, 200, no_up) == (256, 192)
    assert assign_bucket(300, 200, preserve) == (640, 384)  # bucketing alone may upscale


def test_square_mode_keeps_a_non_step_resolution():
    assert assign_bucket(100, 300, DatasetConfig(resolution=520)) == (520, 520)


def test_bucket_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"datasets\[1\].*max_bucket_reso"):
        check_bucket_config(DatasetConfig(resolution=2048, enable_bucket=True), "datasets[1]")
    with pytest.raises(ConfigError, match="min_bucket_reso"):
        check_bucket_config(DatasetConfig(resolution=128, enable_bucket=True), "datasets[0]")
    check_bucket_config(DatasetConfig(resolution=2048), "datasets[0]")  # square mode ignores bucket limits
