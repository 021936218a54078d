"""Captions of different lengths on the MODEL path: batching ComfyUI's CLIP outputs for the loop, and feeding
them back to the model the way ComfyUI's sampler does.

CLIP-style encoders pad every caption to 77 tokens, but the LLM encoders of the newer families (Qwen3 for Z-Image,
Gemma 2 for Lumina 2, T5 for Chroma, Qwen2.5-VL for Qwen-Image) do not pad: each caption has its own length, and
their models give the true token count to attention (Lumina 2 / Z-Image read ``num_tokens``, a per-batch constant).
So a batch keeps each caption's features zero-padded to the longest, with its real length under :data:`TOKENS` and
its per-token outputs (attention masks) padded alike under :data:`PER_TOKEN`; before the model runs, each sample
gets its own unpadded conditioning back (:func:`sample_kwargs`), and samples run together only where ComfyUI's
sampler would batch them (``comfy.samplers.cond_equal_size``: equal lengths, equal constants), each group through
``comfy.samplers.cond_cat`` (:func:`apply_grouped`). Every sample is therefore computed exactly as ComfyUI computes
that caption alone, and a batch of equal lengths (every CLIP family) is one call, as before.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from ..trainer import CrucibleError

TOKENS = "comfy_tokens"  # [B] each caption's real token count
PER_TOKEN = "comfy_token:"  # per-token CLIP outputs ([1, L, …] per caption: attention masks), padded like the cond


def pad_tokens(value: torch.Tensor, length: int) -> torch.Tensor:
    """``value`` [1, L, …] zero-padded along the token axis to ``length``."""
    missing = length - value.shape[1]
    if missing <= 0:
        return value
    return torch.cat([value, value.new_zeros(value.shape[0], missing, *value.shape[2:])], dim=1)


def batch_clip_outputs(outs: Sequence[dict], cond_key: str, pooled_key: str, extra: str,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """One conditioning dict for the loop from ``clip.encode_from_tokens(…, return_dict=True)`` per caption:
    ``cond`` padded under ``cond_key`` with the lengths under :data:`TOKENS`; ``pooled_output`` under
    ``pooled_key``; per-token outputs under :data:`PER_TOKEN` + name; other tensors under ``extra`` + name (these
    must agree in shape). Non-tensor outputs are dropped (none on the families tested)."""
    conds = [o["cond"] for o in outs]
    lengths = [int(c.shape[1]) for c in conds]
    longest = max(lengths)
    result = {cond_key: torch.cat([pad_tokens(c, longest) for c in conds]).to(device),
              TOKENS: torch.tensor(lengths, dtype=torch.long, device=device)}
    for key in outs[0]:
        if key == "cond":
            continue
        values = [o.get(key) for o in outs]
        if not all(torch.is_tensor(v) for v in values):
            continue
        if all(v.ndim >= 2 and tuple(v.shape[:2]) == (1, n) for v, n in zip(values, lengths)):
            result[PER_TOKEN + key] = torch.cat([pad_tokens(v, longest) for v in values]).to(device)
        elif len({tuple(v.shape) for v in values}) > 1:
            raise CrucibleError(f"ComfyUI's CLIP output '{key}' differs in shape between captions; use batch_size 1")
        else:
            result[pooled_key if key == "pooled_output" else extra + key] = torch.cat(values).to(device)
    return result


def sample_kwargs(cond: Mapping[str, torch.Tensor], i: int, cond_key: str, pooled_key: str,
                  extra: str) -> dict[str, Any]:
    """``extra_conds`` keywords of sample ``i``: its cross-attention features and per-token outputs cut back to
    its real length (all of them where no lengths were recorded), its pooled output (or None) and other CLIP
    outputs."""
    features = cond[cond_key][i:i + 1]
    length = int(cond[TOKENS][i]) if TOKENS in cond else features.shape[1]
    # pooled_output is always passed, None where the encoder has none (T5, LLMs), as ComfyUI's conditioning does:
    # Flux-style models (Chroma) read the key unconditionally
    params: dict[str, Any] = {"cross_attn": features[:, :length],
                              "pooled_output": cond[pooled_key][i:i + 1] if pooled_key in cond else None}
    for key, value in cond.items():
        if key.startswith(PER_TOKEN):
            params[key[len(PER_TOKEN):]] = value[i:i + 1, :length]
        elif key.startswith(extra):
            params[key[len(extra):]] = value[i:i + 1]
    return params


def groups_comfy_batches(per_sample: Sequence[dict], can_batch: Callable[[dict, dict], bool]) -> list[list[int]]:
    """Sample indices grouped as ComfyUI's sampler groups conds: a sample joins the first group whose conds it can
    be concatenated with (``can_batch``: ``comfy.samplers.cond_equal_size``), else starts its own."""
    groups: list[list[int]] = []
    for i, conds in enumerate(per_sample):
        for group in groups:
            if can_batch(per_sample[group[0]], conds):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def apply_grouped(per_sample: Sequence[dict], x: torch.Tensor, sigma: torch.Tensor,
                  apply: Callable[..., torch.Tensor], can_batch: Callable[[dict, dict], bool],
                  cond_cat: Callable[[list], dict]) -> torch.Tensor:
    """``apply(x, σ, **conds)`` once per group of samples ComfyUI would batch, each group's conds joined by
    ``cond_cat`` (ComfyUI's ``comfy.samplers.cond_equal_size`` / ``cond_cat``, passed in: only comfy_family imports
    ComfyUI), the outputs back in the batch's order."""
    groups = groups_comfy_batches(per_sample, can_batch)
    if len(groups) == 1:
        return apply(x, sigma, **cond_cat(per_sample))
    outs, order = [], []
    for group in groups:
        index = torch.tensor(group, device=x.device)
        outs.append(apply(x.index_select(0, index), sigma.index_select(0, index),
                          **cond_cat([per_sample[i] for i in group])))
        order += group
    inverse = torch.empty(len(order), dtype=torch.long, device=x.device)
    inverse[torch.tensor(order, device=x.device)] = torch.arange(len(order), device=x.device)
    return torch.cat(outs).index_select(0, inverse)
