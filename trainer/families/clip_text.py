"""CLIP text encoding the way kohya, A1111 and ComfyUI do it, shared by every family with a CLIP text encoder.

* Captions longer than 75 tokens are split into 75-token windows, each wrapped in BOS … EOS and padded to 77, encoded
  separately and concatenated (``max_token_length`` 75 / 150 / 225 → 77 / 154 / 231 positions), which is what
  ComfyUI does at inference. The number of windows is fixed by ``max_token_length`` so batches and caches have one
  shape.
* ``clip_skip`` picks the hidden layer (each family says which one it starts from and whether the final layer norm
  applies).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ConfigError
from .weights import unwrap

if TYPE_CHECKING:  # pragma: no cover
    import torch


WINDOW = 75  # tokens per CLIP window, without BOS/EOS


def chunked_token_ids(tokenizer, captions: Sequence[str], max_token_length: int = WINDOW) -> "torch.Tensor":
    """Token ids ``[B, windows, 77]``: each caption cut to ``max_token_length`` tokens, split into 75-token windows,
    each wrapped in BOS/EOS and padded with the tokenizer's pad token."""
    import torch

    if max_token_length < WINDOW or max_token_length % WINDOW:
        raise ConfigError(f"max_token_length is {max_token_length}; use 75, 150 or 225 (a multiple of 75)")
    windows = max_token_length // WINDOW
    body = tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=max_token_length,
                     verbose=False).input_ids
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for ids in body:
        chunks = []
        for w in range(windows):
            part = list(ids[w * WINDOW:(w + 1) * WINDOW])
            chunks.append([bos, *part, eos] + [pad] * (WINDOW - len(part)))
        rows.append(chunks)
    return torch.tensor(rows, dtype=torch.long)


def windows_needed(tokenizer, texts: Sequence[str]) -> int:
    """How many 75-token windows the longest of ``texts`` needs (at least one)."""
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False).input_ids]
    return max(1, math.ceil(max(lengths, default=0) / WINDOW))


def encode_windows(encoder, ids: "torch.Tensor", layer: int, final_norm: bool) -> "tuple[torch.Tensor, Any]":
    """Run a CLIP text encoder over ``[B, windows, 77]`` ids; return the ``layer`` hidden states joined to
    ``[B, windows*77, D]`` (optionally through ``final_layer_norm``) and the raw model output."""
    inner = unwrap(encoder)
    b, n, length = ids.shape
    out = encoder(ids.reshape(b * n, length).to(inner.device), output_hidden_states=True)
    hidden = out.hidden_states[layer]
    if final_norm:
        norm = getattr(inner, "text_model", inner).final_layer_norm
        hidden = norm(hidden.to(norm.weight.dtype))  # CPU layer_norm refuses fp32 input with bf16 weights
    return hidden.reshape(b, n * length, hidden.shape[-1]), out


def use_tokenizer_eos(encoder, tokenizer) -> None:
    """CLIP pools at the first EOS token; make the encoder look for the tokenizer's EOS id (a config derived from a
    single file can only guess it, and old diffusers configs say 2)."""
    eos = tokenizer.eos_token_id
    encoder.config.eos_token_id = eos
    for module in encoder.modules():
        if isinstance(getattr(module, "eos_token_id", None), int):
            module.eos_token_id = eos


def check_clip_skip(encoder, clip_skip: int, extra: int = 0) -> None:
    layers = int(unwrap(encoder).config.num_hidden_layers)
    if not 1 <= clip_skip <= layers - extra:
        raise ConfigError(f"model.clip_skip is {clip_skip}; this text encoder has {layers} layers, so use 1 to "
                          f"{layers - extra}")
