"""Weighted captions (kohya ``weighted_captions``): ``(tag:1.2)`` scales that tag's token embeddings.

The caption pipeline hands each caption over as ``(text, weight)`` pieces that join to the caption text. Here they
become one weight per CLIP token position (BOS/EOS/padding stay 1.0), laid out in the same 75-token windows as the
token ids, and the encoder's hidden states are multiplied by them and rescaled so each caption keeps its original
mean (the A1111/kohya rule, which keeps the overall magnitude the UNet was trained on); a mean that is ~0
relative to the values is left alone.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover - imported lazily, so the family classes load without torch
    import torch

log = logging.getLogger("crucible")
WINDOW = 75
Pieces = Sequence[tuple[str, float]]


def token_weights(tokenizer, pieces_per_caption: Sequence[Pieces], max_token_length: int) -> "torch.Tensor":
    """``[B, windows*77]`` weights aligned with :func:`~trainer.families.sd15.chunked_token_ids`'s layout."""
    import torch

    windows = max_token_length // WINDOW
    rows = []
    for pieces in pieces_per_caption:
        per_token: list[float] = []
        for text, weight in pieces:
            count = len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids) if text.strip() else 0
            per_token.extend([float(weight)] * count)
        joined = "".join(t for t, _ in pieces)
        expected = len(tokenizer(joined, add_special_tokens=False, verbose=False).input_ids)
        if len(per_token) != expected:  # a piece boundary fell inside a word: weights cannot be placed exactly
            log.debug("weighted caption %r: pieces tokenize to %d tokens, the caption to %d; weights ignored",
                      joined, len(per_token), expected)
            per_token = [1.0] * expected
        per_token = per_token[:max_token_length]
        row = []
        for w in range(windows):
            part = per_token[w * WINDOW:(w + 1) * WINDOW]
            row.extend([1.0, *part, 1.0] + [1.0] * (WINDOW - len(part)))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def apply_token_weights(hidden: "torch.Tensor", weights: "torch.Tensor") -> "torch.Tensor":
    """Scale ``hidden`` ``[B, L, D]`` by ``weights`` ``[B, L]``, keeping each caption's mean."""
    import torch

    weights = weights.to(hidden.device, hidden.dtype)
    before = hidden.mean(dim=(1, 2), keepdim=True)
    scaled = hidden * weights.unsqueeze(-1)
    after = scaled.mean(dim=(1, 2), keepdim=True)
    # A mean that is ~0 relative to the values (layer-normed states without bias) carries no magnitude to keep.
    floor = 1e-3 * hidden.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    usable = (before.abs() > floor) & (after.abs() > floor)
    return scaled * torch.where(usable, before / torch.where(usable, after, torch.ones_like(after)),
                                torch.ones_like(after))
