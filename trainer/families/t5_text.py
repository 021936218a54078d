"""T5-XXL, the text encoder SD3 and Flux share: its config from tensor shapes, loading from a file, finding its
tokenizer without the network, and encoding captions the way ComfyUI does (no attention mask, padded to a length).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import ModelLoadError
from .ldm_configs import _count
from .tokenizers import ENV_TOKENIZER_DIR
from .weights import Part, _derive, _materialize, unwrap

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..config import ModelConfig


T5_TOKENIZER_SUBDIR = Path("comfy") / "text_encoders" / "t5_tokenizer"


_ANCESTOR_LEVELS = 5


def t5_config_from_state(sd: Mapping[str, Any]) -> dict[str, Any]:
    """``T5Config`` kwargs of a T5 encoder (T5 v1.1 / XXL: gated GELU) from its tensor shapes."""
    attn = "encoder.block.0.layer.0.SelfAttention."
    vocab, d_model = sd["shared.weight"].shape
    buckets, heads = sd[attn + "relative_attention_bias.weight"].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    return {"vocab_size": int(vocab), "d_model": int(d_model),
            "d_kv": int(sd[attn + "q.weight"].shape[0]) // int(heads),
            "d_ff": int(sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"].shape[1]),
            "num_layers": _count(sd, r"encoder\.block\.(\d+)\."), "num_heads": int(heads),
            "relative_attention_num_buckets": int(buckets), "feed_forward_proj": "gated-gelu" if gated else "relu",
            "is_encoder_decoder": False, "use_cache": False}


def load_t5(part: Part, dtype=None):
    """A ``T5EncoderModel`` from a file (``shared.weight`` and ``encoder.embed_tokens.weight`` are one tensor)."""
    from transformers import T5Config, T5EncoderModel

    sd = part.read(dtype)  # ComfyUI's fp8 / scaled-fp8 T5 files are dequantized by the reader
    sd = {k: v for k, v in sd.items() if k == "shared.weight" or k.startswith("encoder.")}
    embed = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    if embed is not None:
        sd.setdefault("shared.weight", embed)
        sd.setdefault("encoder.embed_tokens.weight", embed)
    config = _derive("T5 text encoder", part.describe(), t5_config_from_state, sd)
    model = _materialize(lambda: T5EncoderModel(T5Config(**config)), sd, "T5 text encoder", part.describe(), dtype)
    model.tie_weights()
    return model


def is_t5_tokenizer_dir(folder: Path) -> bool:
    """A folder a T5 tokenizer loads from: ``spiece.model``, or ``tokenizer.json`` whose config names a T5 class."""
    if not folder.is_dir():
        return False
    if (folder / "spiece.model").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if not ((folder / "tokenizer.json").is_file() and config.is_file()):
        return False
    with contextlib.suppress(OSError, ValueError):
        return str(json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class", "")).startswith("T5")
    return False


def t5_tokenizer_candidates(cfg: "ModelConfig", subfolder: str, beside: Sequence[str | Path] = ()) -> list[Path]:
    """Every folder :func:`find_t5_tokenizer_dir` tries, in order.

    1. ``model.tokenizer_path``: its ``subfolder`` (``tokenizer_3`` SD3 / ``tokenizer_2`` Flux), ``t5_tokenizer/``,
       ``comfy/text_encoders/t5_tokenizer/``, the folder itself;
    2. a diffusers model folder's ``subfolder``;
    3. beside the model file and the T5 file (``beside``): ``<stem>_tokenizer/`` and ``t5_tokenizer/``;
    4. ``$CRUCIBLE_COMFY_TOKENIZER_DIR`` (a ComfyUI root or a tokenizer folder);
    5. ``comfy/text_encoders/t5_tokenizer`` under a ComfyUI root: the folders above the model and T5 files, the
       working directory and every ``sys.path`` entry (ComfyUI puts its root there).
    """
    found: list[Path] = []
    if cfg.tokenizer_path:
        given = Path(cfg.tokenizer_path).expanduser()
        found += [given / subfolder, given / "t5_tokenizer", given / T5_TOKENIZER_SUBDIR, given]
    model = Path(cfg.path).expanduser() if cfg.path else None
    files = [Path(p).expanduser() for p in beside]
    if model is not None and model.is_dir():
        found.append(model / subfolder)
    elif model is not None:
        files.insert(0, model)
    for file in files:
        found += [file.parent / f"{file.stem}_tokenizer", file.parent / "t5_tokenizer"]
    env = os.environ.get(ENV_TOKENIZER_DIR, "").strip()
    if env:
        hint = Path(env).expanduser()
        found += [hint, hint / T5_TOKENIZER_SUBDIR, hint.parent / "text_encoders" / "t5_tokenizer"]
    roots: list[Path] = []
    for file in ([model] if model is not None else []) + files:
        roots += list(file.resolve().parents)[:_ANCESTOR_LEVELS]
    roots += [Path.cwd(), *(Path(p) for p in sys.path if p)]
    found += [root / T5_TOKENIZER_SUBDIR for root in roots]
    return list(dict.fromkeys(found))


def find_t5_tokenizer_dir(cfg: "ModelConfig", subfolder: str, beside: Sequence[str | Path] = ()) -> Path:
    """The folder with the T5 tokenizer for ``cfg``'s model (search order: :func:`t5_tokenizer_candidates`)."""
    tried = t5_tokenizer_candidates(cfg, subfolder, beside)
    for folder in tried:
        if is_t5_tokenizer_dir(folder):
            return folder
    raise ModelLoadError(
        f"no T5 tokenizer found for model '{cfg.path}'. Tried: {'; '.join(map(str, tried))}. Provide one: set "
        f"model.tokenizer_path to a folder with tokenizer.json and tokenizer_config.json (ComfyUI ships one in "
        f"ComfyUI/comfy/text_encoders/t5_tokenizer; a diffusers model has {subfolder}/), or set the environment "
        f"variable {ENV_TOKENIZER_DIR} to your ComfyUI folder")


def load_t5_tokenizer(folder: str | Path) -> Any:
    """A fast T5 tokenizer from ``folder`` (pads with ``<pad>`` = 0 and ends with ``</s>`` = 1)."""
    from transformers import T5TokenizerFast

    try:
        return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"the T5 tokenizer in '{folder}' cannot be read ({exc}); replace it with a copy of "
                             "ComfyUI/comfy/text_encoders/t5_tokenizer") from exc


def t5_token_ids(tokenizer, captions: Sequence[str], length: int) -> "torch.Tensor":
    """T5 ids ``[B, length]``: the caption, ``</s>``, then ``<pad>`` up to ``length`` (cut to fit), as ComfyUI pads."""
    return tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                     add_special_tokens=True, return_tensors="pt").input_ids


def encode_t5(encoder, ids: "torch.Tensor") -> "torch.Tensor":
    """T5's last hidden state for ``ids`` (no attention mask: ComfyUI and diffusers attend to the padding too)."""
    return encoder(input_ids=ids.to(unwrap(encoder).device)).last_hidden_state
