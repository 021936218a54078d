"""Caption processing: splitting, edits, trigger words, keep/shuffle/dropout, weights, determinism."""
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.captions import (caption_dropped, clean_tags, parse_weighted, process_caption, strip_weights,
                              tag_frequency, trigger_words)
from trainer.config import CaptionConfig
from trainer.errors import ConfigError

TAGS = [f"tag{i}" for i in range(12)]
RAW = ", ".join(TAGS)


def run(raw, seed=0, epoch=1, item=0, repeat=0, **cfg):
    return process_caption(raw, CaptionConfig(**cfg), seed=seed, epoch=epoch, item=item, repeat=repeat)


# --- splitting and normalising -------------------------------------------------------------------------------------

def test_split_strips_whitespace_and_drops_empty_tags():
    raw = "  1girl ,,  red \t  hair , ,\nsmile  "
    out = run(raw, keep_tokens=1)  # a tag operation: the caption is rebuilt from its tags
    assert out.tags == ("1girl", "red hair", "smile")
    assert out.text == "1girl, red hair, smile"
    assert run(raw).text == raw.strip()  # no tag operation: as written


@pytest.mark.parametrize("raw", ["", "   ", ", , ,", ",,\n,", "\ufeff , "])
def test_caption_of_only_separators_is_empty(raw):
    out = run(raw)
    assert out.text == "" and out.tags == () and not out.dropped
    assert run(raw, trigger_word="ohwx").text == "ohwx"


def test_custom_separator():
    assert run("a; b c; d", separator=";").tags == ("a", "b c", "d")
    assert run("a; b c; d", separator=";").text == "a; b c; d"
    assert run("a, b", separator=";").tags == ("a, b",)


def test_split_on_period_only_at_sentence_ends():
    out = run("A woman. She smiles, version 1.5.", split_on_period=True, keep_tokens=1)
    assert out.tags == ("A woman", "She smiles", "version 1.5")
    assert run("A woman. She smiles", split_on_period=False, keep_tokens=1).tags == ("A woman. She smiles",)


def test_line_breaks_separate_tags():
    assert run("red hair\r\nblue eyes\n\nsmile").tags == ("red hair", "blue eyes", "smile")


# --- edits ---------------------------------------------------------------------------------------------------------

def test_remove_tags_exact_and_case_insensitive():
    out = run("1girl, Solo, solo focus, watermark", remove_tags=("solo", " WATERMARK "))
    assert out.tags == ("1girl", "solo focus")


def test_remove_tags_regex_full_match():
    out = run("red hair, hair clip, long  hair, smile", remove_tags_regex=r".*hair")
    assert out.tags == ("hair clip", "smile")  # full match: "hair clip" survives
    assert run("Red Hair, smile", remove_tags_regex=r"red hair").tags == ("smile",)


def test_invalid_regex_names_the_field():
    with pytest.raises(ConfigError, match="remove_tags_regex"):
        run("a", remove_tags_regex="(unclosed")


def test_replace_tags():
    out = run("1girl, Solo, smile", replace_tags=("1GIRL=woman", "solo=", "smile=smiling, happy"))
    assert out.tags == ("woman", "smiling", "happy")
    with pytest.raises(ConfigError, match="old=new"):
        run("a", replace_tags=("nonsense",))


def test_remove_happens_before_replace():
    assert run("a, b", remove_tags=("a",), replace_tags=("b=a",)).tags == ("a",)


# --- trigger words -------------------------------------------------------------------------------------------------

def test_trigger_word_prepended():
    assert run("1girl, smile", trigger_word="ohwx").text == "ohwx, 1girl, smile"
    assert trigger_words(CaptionConfig(trigger_word=" ohwx , sks style ")) == ["ohwx", "sks style"]
    assert trigger_words(CaptionConfig(trigger_word="a, b, A, c")) == ["a", "b", "c"]
    assert run("1girl", trigger_word="ohwx, sks style").tags == ("ohwx", "sks style", "1girl")


def test_trigger_word_not_duplicated():
    assert run("ohwx, 1girl", trigger_word="ohwx").tags == ("ohwx", "1girl")
    assert run("OHWX, 1girl", trigger_word="ohwx").tags == ("OHWX", "1girl")
    assert run("1girl, ohwx, smile", trigger_word="ohwx").tags == ("ohwx", "1girl", "smile")  # moved to the front
    assert run("ohwx man, smile", trigger_word="ohwx").tags == ("ohwx man", "smile")
    assert run("smile, ohwxman", trigger_word="ohwx").tags == ("ohwx", "smile", "ohwxman")


def test_trigger_never_shuffled_or_dropped():
    cfg = dict(trigger_word="ohwx, sks", shuffle_caption=True, caption_tag_dropout_rate=1.0)
    for item in range(50):
        assert run(RAW, item=item, **cfg).tags == ("ohwx", "sks")
    for item in range(50):
        assert run(RAW, item=item, trigger_word="ohwx", shuffle_caption=True).tags[0] == "ohwx"


# --- keep / shuffle / dropout --------------------------------------------------------------------------------------

def test_keep_tokens_preserved_and_shuffle_is_a_permutation():
    orders = set()
    for item in range(200):
        out = run(RAW, item=item, keep_tokens=3, shuffle_caption=True)
        assert out.tags[:3] == tuple(TAGS[:3])
        assert sorted(out.tags) == sorted(TAGS)
        orders.add(out.tags)
    assert len(orders) > 150  # really shuffled


def test_keep_tokens_counts_caption_tags_not_triggers():
    out = run(RAW, trigger_word="ohwx", keep_tokens=2, shuffle_caption=True, item=3)
    assert out.tags[:3] == ("ohwx", "tag0", "tag1")


def test_no_shuffle_keeps_order():
    assert run(RAW, item=5).tags == tuple(TAGS)


def test_tag_dropout_never_drops_kept_tags():
    kept_counts = []
    for item in range(300):
        out = run(RAW, item=item, keep_tokens=2, caption_tag_dropout_rate=0.5, trigger_word="ohwx")
        assert out.tags[:3] == ("ohwx", "tag0", "tag1")
        assert set(out.tags[3:]) <= set(TAGS[2:])
        kept_counts.append(len(out.tags) - 3)
    n = 300 * 10
    kept = sum(kept_counts)
    assert abs(kept - n / 2) < 5 * math.sqrt(n * 0.25)  # binomial, 5 sigma
    assert run(RAW, keep_tokens=2, caption_tag_dropout_rate=1.0).tags == ("tag0", "tag1")


def test_keep_tokens_separator_fixed_prefix_and_suffix():
    raw = "ohwx, a woman ||| t1, t2, t3, t4 ||| best quality"
    for item in range(30):
        out = run(raw, item=item, keep_tokens_separator="|||", keep_tokens=5, shuffle_caption=True,
                  caption_tag_dropout_rate=0.5)
        assert out.tags[:2] == ("ohwx", "a woman")
        assert out.tags[-1] == "best quality"
        assert set(out.tags[2:-1]) <= {"t1", "t2", "t3", "t4"}
    # without the separator in the caption, keep_tokens applies
    assert run("a, b, c", keep_tokens_separator="|||", keep_tokens=1).tags == ("a", "b", "c")


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_caption_dropout_rate_is_statistically_right(rate):
    n = 3000
    dropped = sum(run("a, b", item=i, caption_dropout_rate=rate).dropped for i in range(n))
    assert abs(dropped - n * rate) < 5 * math.sqrt(n * rate * (1 - rate))


def test_caption_dropout_makes_everything_empty():
    out = run("a, b", trigger_word="ohwx", caption_dropout_rate=1.0)
    assert out.text == "" and out.tags == () and out.dropped
    assert run("(a:1.2)", caption_dropout_rate=1.0, weighted_captions=True).weights == ()
    assert not run("a", caption_dropout_rate=0.0).dropped


def test_caption_dropout_every_n_epochs():
    cfg = CaptionConfig(caption_dropout_every_n_epochs=3)
    dropped = [caption_dropped(cfg, seed=1, epoch=e, item=0) for e in range(1, 10)]
    assert dropped == [False, False, True, False, False, True, False, False, True]
    assert run("a", epoch=3, caption_dropout_every_n_epochs=3).text == ""


# --- determinism ---------------------------------------------------------------------------------------------------

def test_deterministic_and_independent_of_call_order():
    cfg = dict(shuffle_caption=True, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.2, keep_tokens=1)
    keys = [(s, e, i, r) for s in (0, 7) for e in (1, 2, 3) for i in range(5) for r in (0, 1)]
    first = {k: run(RAW, seed=k[0], epoch=k[1], item=k[2], repeat=k[3], **cfg) for k in keys}
    random.Random(1).shuffle(keys)
    for k in keys:
        assert run(RAW, seed=k[0], epoch=k[1], item=k[2], repeat=k[3], **cfg) == first[k]


def test_global_random_state_untouched():
    random.seed(123)
    state = random.getstate()
    run(RAW, shuffle_caption=True, caption_tag_dropout_rate=0.5, caption_dropout_rate=0.5)
    assert random.getstate() == state


def test_epochs_items_repeats_and_seeds_differ():
    cfg = dict(shuffle_caption=True)
    by_epoch = {run(RAW, epoch=e, **cfg).tags for e in range(1, 6)}
    by_repeat = {run(RAW, repeat=r, **cfg).tags for r in range(5)}
    by_item = {run(RAW, item=i, **cfg).tags for i in range(5)}
    by_seed = {run(RAW, seed=s, **cfg).tags for s in range(5)}
    assert min(len(by_epoch), len(by_repeat), len(by_item), len(by_seed)) >= 4


@given(st.lists(st.from_regex(r"[a-z0-9]{1,6}( [a-z]{1,6})?", fullmatch=True), min_size=1, max_size=15, unique=True),
       st.integers(0, 5), st.integers(0, 10 ** 6))
@settings(max_examples=150, deadline=None)
def test_property_keep_and_permutation(tags, keep, seed):
    out = run(", ".join(tags), seed=seed, keep_tokens=keep, shuffle_caption=True)
    assert out.tags[:keep] == tuple(tags[:keep])
    assert sorted(out.tags) == sorted(tags)


# --- weighted captions ---------------------------------------------------------------------------------------------

def test_parse_weighted_syntax():
    assert parse_weighted("a (b:1.5) c") == [("a ", 1.0), ("b", 1.5), (" c", 1.0)]
    assert parse_weighted("((b))") == [("b", pytest.approx(1.21))]
    assert parse_weighted("[b]") == [("b", pytest.approx(1 / 1.1, rel=1e-5))]
    assert parse_weighted("((b:2)) x") == [("b", pytest.approx(2.2)), (" x", 1.0)]
    assert parse_weighted(r"miku \(vocaloid\)") == [("miku (vocaloid)", 1.0)]
    assert parse_weighted("a:b, ratio 3:2") == [("a:b, ratio 3:2", 1.0)]
    assert parse_weighted("(open") == [("open", pytest.approx(1.1))]
    assert parse_weighted("stray) ]") == [("stray) ]", 1.0)]


def test_weighted_caption_pairs_cover_the_text():
    out = run("ohwx, (red hair:1.2), [[blurry]], smile", weighted_captions=True)
    assert out.text == "ohwx, red hair, blurry, smile"
    assert "".join(t for t, _ in out.weights) == out.text
    assert ("red hair", 1.2) in out.weights
    assert dict(out.weights)["blurry"] == pytest.approx(1 / 1.21, rel=1e-5)


def test_weight_group_spanning_tags_and_shuffle_keeps_weights():
    for item in range(20):
        out = run("(red hair, blue eyes:1.3), smile", item=item, weighted_captions=True, shuffle_caption=True,
                  trigger_word="ohwx")
        weights = dict(out.weights)
        assert weights.get("red hair") == 1.3 and weights.get("blue eyes") == 1.3
        assert "".join(t for t, _ in out.weights) == out.text


def test_weight_syntax_stripped_when_weighting_off():
    out = run("(red hair:1.2), miku \\(vocaloid\\), ((a:1.1):0.9), hatsune miku (vocaloid)")
    assert out.tags == ("red hair", "miku (vocaloid)", "a", "hatsune miku (vocaloid)")
    assert out.weights is None
    assert strip_weights("(x: 0.8 )") == "x"


def test_tag_frequency_shape_and_counts():
    freq = tag_frequency([("ohwx", "1girl, smile"), ("ohwx", "1girl, (hat:1.2)"), ("bg", "tree, tree")],
                         CaptionConfig(remove_tags=("smile",)))
    assert freq == {"ohwx": {"1girl": 2, "hat": 1}, "bg": {"tree": 1}}
    assert clean_tags("ohwx, a|||b", CaptionConfig(keep_tokens_separator="|||")) == ["ohwx", "a", "b"]


# --- no caption operation: the text reaches the model unchanged (kohya, SimpleTuner) ----------------------------------

@pytest.mark.parametrize("raw", [
    "A photo of a street. Two cars are parked in front of a shop.",
    "first line\nsecond line, with a comma",
    "tag one,tag two , tag three.",
])
def test_caption_unchanged_with_every_option_off(raw):
    assert run(raw).text == raw
    assert run(raw, split_on_period=True).text == raw  # the default: periods only split when tags are needed


def test_period_splitting_only_when_shuffle_or_keep_tokens_need_tags():
    raw = "street. Two cars, a shop"
    assert run(raw, trigger_word="ohwx").text == "ohwx, street. Two cars, a shop"
    assert run(raw, keep_tokens=1).tags == ("street", "Two cars", "a shop")
    assert set(run(raw, shuffle_caption=True).tags) == {"street", "Two cars", "a shop"}
    assert run(raw, keep_tokens=1, split_on_period=False).tags == ("street. Two cars", "a shop")


def test_caption_node_tooltip_says_when_periods_split():
    import comfy_stubs

    tip = comfy_stubs.load_pack().NODE_CLASS_MAPPINGS["CrucibleCaptionOptions"].INPUT_TYPES()["required"]["split_on_period"][1]["tooltip"]
    assert "shuffle" in tip and "keep_tokens" in tip
