"""Caption processing: tag operations on plain strings (no torch, no I/O).

A caption is a list of *tags* separated by ``CaptionConfig.separator`` (a comma by default), by line breaks, and
when ``split_on_period`` is on *and* shuffle, ``keep_tokens`` or tag dropout needs tags, by a period that ends a
sentence (followed by a space, a separator or the end; not the one in ``"1.5"``).

With no tag operation enabled (no trigger word, keep_tokens, shuffle, tag dropout, tag removal/replacement or
keep-tokens separator) the caption text reaches the text encoder unchanged, as in kohya and SimpleTuner: only the
ends are stripped and weight syntax is parsed or stripped. Otherwise :func:`process_caption` turns a raw caption
into what the text encoder sees for one training sample, in this order:

1. ``caption_dropout_every_n_epochs`` / ``caption_dropout_rate``: the whole caption becomes ``""``.
2. Split: text before a ``keep_tokens_separator`` (e.g. ``"|||"``) is the *fixed* part; a second separator starts a
   fixed *suffix* (kohya). Weight syntax is parsed (``weighted_captions``) or stripped; whitespace is normalised and
   empty tags dropped.
3. ``remove_tags`` (exact, case-insensitive), then ``remove_tags_regex`` (full match, case-insensitive), then
   ``replace_tags`` (``"old=new"``; an empty ``new`` deletes the tag).
4. Trigger words (``trigger_word``, comma-separated) go first. A tag equal to a trigger is moved to the front
   instead of being repeated; so is a first tag that starts with the trigger (``"ohwx man"`` for ``"ohwx"``).
5. The first ``keep_tokens`` caption tags (triggers not counted, like kohya's ``caption_prefix``) stay in place;
   the text before a ``keep_tokens_separator`` replaces that count when the caption has one.
6. ``caption_tag_dropout_rate`` drops each remaining tag, then ``shuffle_caption`` shuffles them.

Randomness comes from a private :class:`random.Random` seeded with a stable hash of ``(seed, epoch, item, repeat)``
and the purpose of the draw, never from global state: the same sample always gets the same caption, whatever the
call order, which makes resumed runs exact and lets a preview show precisely what training will see.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from .config import CaptionConfig
from .errors import ConfigError

Chunk = tuple[str, float]  # (text, weight)

_EMPHASIS = 1.1  # A1111 / kohya: "(x)" multiplies by 1.1, "[x]" divides by 1.1


@dataclass(frozen=True)
class ProcessedCaption:
    """One sample's caption.

    ``text`` is the caption string. ``tags`` are its tags in order. ``weights`` is ``None`` unless
    ``weighted_captions`` is on; then it is ``(text, weight)`` pieces whose texts concatenate to exactly ``text``
    (separators included, adjacent pieces of equal weight merged), ready for per-token weighting.
    """

    text: str
    tags: tuple[str, ...] = ()
    weights: tuple[Chunk, ...] | None = None
    dropped: bool = False  # the whole caption was dropped (caption dropout)


@dataclass(frozen=True)
class _Tag:
    text: str
    chunks: tuple[Chunk, ...]

    @property
    def weight(self) -> float:
        """The tag's weight when uniform, else 1.0 (used when a replacement takes over the tag)."""
        weights = {w for _, w in self.chunks}
        return weights.pop() if len(weights) == 1 else 1.0


# --- randomness ----------------------------------------------------------------------------------------------------

def sample_rng(seed: int, epoch: int, item: int | str, repeat: int, purpose: str) -> random.Random:
    """A private RNG for one draw of one sample, from a stable hash (the same on every machine and Python run)."""
    key = f"{seed}|{epoch}|{item}|{repeat}|{purpose}".encode("utf-8", "surrogatepass")
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))


# --- weight syntax -------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\\[\\()\[\]]|\\|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:")
_EXPLICIT_WEIGHT = re.compile(r"(?<!\\)\(([^()]*?):\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*\)")
_ESCAPE = re.compile(r"\\([\\()\[\]])")


def parse_weighted(text: str) -> list[Chunk]:
    """Parse A1111/kohya attention syntax into ``(text, weight)`` chunks.

    ``(x)`` ×1.1, ``[x]`` ÷1.1, ``(x:1.3)`` sets 1.3 (nesting multiplies), ``\\(`` ``\\)`` ``\\[`` ``\\]`` are
    literal brackets. An unclosed bracket applies to the rest of the text; a stray closer is literal text.
    """
    chunks: list[list] = []  # [text, weight] pairs, mutated as brackets close
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for chunk in chunks[start:]:
            chunk[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            chunks.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(chunks))
        elif token == "[":
            square_open.append(len(chunks))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), _EMPHASIS)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / _EMPHASIS)
        else:
            chunks.append([token, 1.0])
    for start in round_open:
        scale(start, _EMPHASIS)
    for start in square_open:
        scale(start, 1 / _EMPHASIS)
    return _merge((t, round(w, 6)) for t, w in chunks)


def strip_weights(text: str) -> str:
    """Remove explicit ``(text:1.2)`` weights and unescape ``\\(`` … ``\\]``; plain brackets such as danbooru's
    ``"miku (vocaloid)"`` are kept as written."""
    previous = None
    while previous != text:  # nested "((a:1.2):0.9)"
        previous, text = text, _EXPLICIT_WEIGHT.sub(r"\1", text)
    return _ESCAPE.sub(r"\1", text)


def _merge(chunks: Iterable[Chunk]) -> list[Chunk]:
    merged: list[Chunk] = []
    for text, weight in chunks:
        if not text:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


# --- splitting into tags -------------------------------------------------------------------------------------------

@lru_cache(maxsize=32)
def _splitter(separator: str, split_on_period: bool) -> re.Pattern:
    sep = re.escape(separator or ",")
    parts = [sep, r"[\r\n]+"]
    if split_on_period:  # a period ending a sentence, not one inside "1.5" or "e.g.x"
        parts.append(rf"\.(?=\s|$|{sep})")
    return re.compile("|".join(parts))


def _reorders_tags(cfg: CaptionConfig) -> bool:
    """Whether shuffle, keep_tokens or tag dropout need the caption as tags (then periods may split tags too)."""
    return cfg.shuffle_caption or cfg.keep_tokens > 0 or cfg.caption_tag_dropout_rate > 0


def _edits_tags(cfg: CaptionConfig) -> bool:
    """Whether any caption option works on tags; without one the caption text is used as written."""
    return bool(_reorders_tags(cfg) or cfg.trigger_word.strip() or cfg.remove_tags or cfg.remove_tags_regex
                or cfg.replace_tags)


def _split_tags(text: str, cfg: CaptionConfig) -> list[_Tag]:
    """Split one caption section into normalised, non-empty tags (weights parsed or stripped)."""
    chunks = parse_weighted(text) if cfg.weighted_captions else [(strip_weights(text), 1.0)]
    splitter = _splitter(cfg.separator, cfg.split_on_period and _reorders_tags(cfg))
    tags: list[_Tag] = []
    current: list[tuple[str, float]] = []  # (character, weight) of the tag being built
    for chunk_text, weight in chunks:
        pieces = splitter.split(chunk_text)
        for i, piece in enumerate(pieces):
            if i:
                tags.extend(_finish_tag(current))
                current = []
            current.extend((ch, weight) for ch in piece)
    tags.extend(_finish_tag(current))
    return tags


def _finish_tag(chars: list[tuple[str, float]]) -> list[_Tag]:
    """Collapse whitespace runs to one space, strip the ends; ``[]`` when nothing is left."""
    out: list[tuple[str, float]] = []
    for ch, weight in chars:
        if ch.isspace():
            if out and out[-1][0] != " ":
                out.append((" ", weight))
        else:
            out.append((ch, weight))
    while out and out[-1][0] == " ":
        out.pop()
    if not out:
        return []
    chunks = tuple(_merge(out))
    return [_Tag("".join(t for t, _ in chunks), chunks)]


def _plain_tag(text: str, weight: float = 1.0) -> list[_Tag]:
    return _finish_tag([(ch, weight) for ch in text])


# --- tag edits -----------------------------------------------------------------------------------------------------

def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


@lru_cache(maxsize=32)
def _compiled_regex(pattern: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"captions.remove_tags_regex {pattern!r} is not a valid regular expression ({exc}); "
                          "fix or clear it") from None


@lru_cache(maxsize=32)
def _replacements(items: tuple[str, ...]) -> dict[str, str]:
    table = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"captions.replace_tags item '{item}' must look like old=new")
        old, new = item.split("=", 1)
        table[_norm(old)] = new.strip()
    return table


def _edit_tags(tags: list[_Tag], cfg: CaptionConfig) -> list[_Tag]:
    """Apply remove_tags, remove_tags_regex and replace_tags (in that order)."""
    removed = {_norm(t) for t in cfg.remove_tags}
    regex = _compiled_regex(cfg.remove_tags_regex)
    table = _replacements(tuple(cfg.replace_tags))
    out: list[_Tag] = []
    for tag in tags:
        key = _norm(tag.text)
        if key in removed or (regex is not None and regex.fullmatch(tag.text)):
            continue
        if key in table:
            for text in _splitter(cfg.separator, False).split(table[key]):
                out.extend(_plain_tag(text, tag.weight))
        else:
            out.append(tag)
    return out


def trigger_words(cfg: CaptionConfig) -> list[str]:
    """The trigger words of a caption config (``trigger_word`` split on its separator), without repeats."""
    if not cfg.trigger_word.strip():
        return []
    unique: dict[str, str] = {}
    for tag in _split_tags_plain(cfg.trigger_word, cfg):
        unique.setdefault(_norm(tag.text), tag.text)
    return list(unique.values())


def _split_tags_plain(text: str, cfg: CaptionConfig) -> list[_Tag]:
    return _split_tags(text, CaptionConfig(separator=cfg.separator, split_on_period=False))


def _hoist_triggers(triggers: list[str], sections: list[list[_Tag]]) -> list[_Tag]:
    """Remove the trigger words from the caption sections and return the trigger tags to put first.

    A tag equal to a trigger (case-insensitively) is moved, keeping its weight; if none is equal but the caption's
    first tag starts with the trigger and a space, that tag stands for the trigger.
    """
    front: list[_Tag] = []
    for trigger in triggers:
        key = _norm(trigger)
        found = _take_first(sections, lambda tag: _norm(tag.text) == key)
        if found is None:
            first = next((s for s in sections if s), None)
            if first is not None and _norm(first[0].text).startswith(key + " "):
                found = first.pop(0)
        front.append(found if found is not None else _plain_tag(trigger)[0])
    return front


def _take_first(sections: list[list[_Tag]], predicate) -> _Tag | None:
    """Remove every tag matching ``predicate`` from the sections; return the first one removed (or None)."""
    hits = [tag for section in sections for tag in section if predicate(tag)]
    for section in sections:
        section[:] = [tag for tag in section if not predicate(tag)]
    return hits[0] if hits else None


# --- the caption pipeline ------------------------------------------------------------------------------------------

def _sections(raw: str, cfg: CaptionConfig) -> tuple[list[_Tag], list[_Tag], list[_Tag], bool]:
    """(fixed, flexible, fixed suffix, has_separator) tags of a raw caption, after edits."""
    raw = raw.lstrip("\ufeff")
    sep = cfg.keep_tokens_separator
    if sep and sep in raw:
        fixed_text, rest = raw.split(sep, 1)
        flex_text, _, suffix_text = rest.partition(sep)
        parts = [fixed_text, flex_text, suffix_text.replace(sep, " ")]
    else:
        parts = ["", raw, ""]
    fixed, flex, suffix = (_edit_tags(_split_tags(p, cfg), cfg) for p in parts)
    return fixed, flex, suffix, bool(sep and sep in raw)


def clean_tags(raw: str, cfg: CaptionConfig) -> list[str]:
    """The caption's own tags after splitting, normalising and the remove/replace edits — no triggers, no
    randomness. Used for tag statistics and metadata."""
    fixed, flex, suffix, _ = _sections(raw, cfg)
    return [t.text for t in (*fixed, *flex, *suffix)]


def caption_dropped(cfg: CaptionConfig, *, seed: int, epoch: int, item: int, repeat: int = 0) -> bool:
    """Whether this sample's whole caption is dropped (``caption_dropout_every_n_epochs`` counts epochs from 1,
    so ``N`` drops epochs N, 2N, …)."""
    every = cfg.caption_dropout_every_n_epochs
    if every > 0 and epoch % every == 0:
        return True
    rate = cfg.caption_dropout_rate
    return rate > 0 and sample_rng(seed, epoch, item, repeat, "caption_dropout").random() < rate


def process_caption(raw: str, cfg: CaptionConfig, *, seed: int, epoch: int, item: int,
                    repeat: int = 0) -> ProcessedCaption:
    """The caption one training sample sees (see the module docstring for the order of operations).

    ``epoch`` is 1-based like the training plan; ``item`` is the image's index in its data source and ``repeat``
    which of its repeats this is. Deterministic in all of ``(raw, cfg, seed, epoch, item, repeat)``.
    """
    if caption_dropped(cfg, seed=seed, epoch=epoch, item=item, repeat=repeat):
        return ProcessedCaption("", (), () if cfg.weighted_captions else None, dropped=True)
    fixed, flex, suffix, has_separator = _sections(raw, cfg)
    if not (has_separator or _edits_tags(cfg)):
        return _as_written(raw, cfg, (*fixed, *flex, *suffix))
    front = _hoist_triggers(trigger_words(cfg), [fixed, flex, suffix])
    if not has_separator:
        fixed, flex = flex[:cfg.keep_tokens], flex[cfg.keep_tokens:]
    rate = cfg.caption_tag_dropout_rate
    if rate > 0:
        rng = sample_rng(seed, epoch, item, repeat, "tag_dropout")
        flex = [tag for tag in flex if rng.random() >= rate]
    if cfg.shuffle_caption:
        sample_rng(seed, epoch, item, repeat, "shuffle").shuffle(flex)
    return _assemble([*front, *fixed, *flex, *suffix], cfg)


def _as_written(raw: str, cfg: CaptionConfig, tags: tuple[_Tag, ...]) -> ProcessedCaption:
    """The caption text as written (ends stripped; weight syntax parsed or stripped); ``""`` when it has no tags."""
    if not tags:
        return ProcessedCaption("", (), () if cfg.weighted_captions else None)
    text = raw.lstrip("\ufeff").strip()
    names = tuple(t.text for t in tags)
    if not cfg.weighted_captions:
        return ProcessedCaption(strip_weights(text), names)
    chunks = tuple(parse_weighted(text))
    return ProcessedCaption("".join(t for t, _ in chunks), names, chunks)


def _assemble(tags: list[_Tag], cfg: CaptionConfig) -> ProcessedCaption:
    joiner = (cfg.separator.strip() or ",") + " "
    text = joiner.join(t.text for t in tags)
    weights = None
    if cfg.weighted_captions:
        pieces: list[Chunk] = []
        for i, tag in enumerate(tags):
            if i:
                pieces.append((joiner, 1.0))
            pieces.extend(tag.chunks)
        weights = tuple(_merge(pieces))
    return ProcessedCaption(text, tuple(t.text for t in tags), weights)


def tag_frequency(captions: Iterable[tuple[str, str]], cfg: CaptionConfig) -> dict[str, dict[str, int]]:
    """Tag counts per concept in kohya's ``ss_tag_frequency`` shape, ``{concept: {tag: count}}``, from
    ``(concept, raw caption)`` pairs. A tag is counted once per caption."""
    counts: dict[str, Counter] = {}
    for concept, raw in captions:
        counts.setdefault(concept, Counter()).update(dict.fromkeys(clean_tags(raw, cfg), 1))
    return {concept: dict(counter.most_common()) for concept, counter in counts.items()}


__all__ = ["ProcessedCaption", "process_caption", "caption_dropped", "clean_tags", "tag_frequency",
           "parse_weighted", "strip_weights", "trigger_words", "sample_rng"]
