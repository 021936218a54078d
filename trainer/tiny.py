"""Tiny random models with the real SD1.5 / SDXL architectures, for tests and ``make demo``.

Nothing here is downloaded: :func:`build_tiny_tokenizer` writes a small but valid CLIP BPE tokenizer (the 256
byte-level characters, their word-final forms, a few dozen English merges and CLIP's two special tokens) and
:func:`build_tiny_pipeline` writes a complete diffusers folder (UNet, VAE, CLIP text encoder(s), tokenizer(s),
scheduler) whose weights come from a seeded random init, plus optionally the same model as a ComfyUI/LDM
single-file checkpoint ``<folder>.safetensors``.

The shapes follow the families' real layouts, only narrower: the VAE still downsamples 8×, the SD1.5 UNet has
cross-attention in its first level and none in its last, the SDXL UNet the other way round with a two-deep
transformer and the ``text_time`` added conditioning, CLIP-L uses quick-GELU and CLIP-G GELU with a projection.
Every size obeys the rules :mod:`trainer.families.single_file` uses to derive configs from tensor shapes, so the
single file loads back to the identical model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .fileio import atomic_write_bytes, atomic_write_json, save_safetensors

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77

# Common English letter pairs, then a few whole words; "</w>" marks the end of a word as in CLIP's merges.txt.
_MERGES = (
    "t h", "i n", "a n", "e r", "o n", "r e", "a t", "e n", "o r", "s t", "a r", "a l", "o u", "i t", "e s",
    "l e", "h e", "i s", "e d", "o f</w>", "th e</w>", "in g</w>", "an d</w>", "e d</w>", "e r</w>", "o n</w>",
    "a t</w>", "e s</w>", "c at</w>", "d o", "do g</w>", "p h", "ph o", "pho t", "phot o</w>", "r ed</w>",
    "b l", "bl u", "blu e</w>", "s k", "sk y</w>", "o g", "l o", "lo g", "t o</w>", "i n</w>", "a n</w>",
)

# Sizes shared by both families (see the module docstring for why each is what it is).
_UNET_CHANNELS = (32, 64)
_VAE_CHANNELS = (32, 32, 64, 64)  # four levels: an 8x downsampling VAE like the real ones
_TEXT_HIDDEN = 32
_TEXT_LAYERS = 3  # enough for clip_skip 2 on SDXL (penultimate minus one)
_SDXL_TIME_EMBED = 8


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table (the base alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """The tiny tokenizer's vocabulary and merges, in CLIP's order (bytes, word-final bytes, merges, specials)."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    known = set(tokens)
    for merge in _MERGES:
        left, right = merge.split(" ")
        if left not in known or right not in known:  # a typo in _MERGES must fail loudly, not build a broken BPE
            raise AssertionError(f"tiny tokenizer merge {merge!r} uses a token that does not exist yet")
        tokens.append(left + right)
        known.add(left + right)
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, list(_MERGES)


def build_tiny_tokenizer(folder: str | Path, pad_token: str = EOS) -> Path:
    """Write a tiny CLIP BPE tokenizer that ``transformers.CLIPTokenizer.from_pretrained(folder)`` loads.

    ``pad_token`` is ``<|endoftext|>`` for CLIP-L (SD1.5, SDXL ``tokenizer``) and ``"!"`` for SDXL's CLIP-G
    ``tokenizer_2``, as in the real diffusers repos.
    """
    folder = Path(folder)
    vocab, merges = tiny_vocab()
    atomic_write_bytes(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    atomic_write_bytes(folder / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    atomic_write_json(folder / "special_tokens_map.json", special)
    atomic_write_json(folder / "tokenizer_config.json", {
        **special, "tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_LENGTH,
        "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
    })
    return folder


# --- models ------------------------------------------------------------------------------------------------------

def _unet_family(family: str):
    """The family object of a UNet family (tiny UNet models exist for those; tiny flow models elsewhere)."""
    from .families import get_family

    fam = get_family(family)
    if fam.denoiser_name != "unet":
        raise ValueError(f"tiny UNet models exist for the UNet families (SD1.5, SDXL), not {family!r}")
    return fam


def tiny_unet_config(family: str) -> dict[str, Any]:
    """UNet2DConditionModel kwargs for a tiny SD1.5 or SDXL UNet (SDXL: the family with size/crop conditioning)."""
    common = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=_UNET_CHANNELS,
                  layers_per_block=1, norm_num_groups=32)
    fam = _unet_family(family)
    if fam.text_time_conditioning:
        pooled = _TEXT_HIDDEN  # CLIP-G projection width
        return dict(common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * _TEXT_HIDDEN,
                    attention_head_dim=[max(1, c // 64) for c in _UNET_CHANNELS], use_linear_projection=True,
                    transformer_layers_per_block=[1, 2], addition_embed_type="text_time",
                    addition_time_embed_dim=_SDXL_TIME_EMBED,
                    projection_class_embeddings_input_dim=pooled + 6 * _SDXL_TIME_EMBED)
    return dict(common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=_TEXT_HIDDEN,
                attention_head_dim=8)


def tiny_vae_config(family: str) -> dict[str, Any]:
    """AutoencoderKL kwargs: four levels (8x downsampling), 4 latent channels, the family's scaling factor."""
    from .families import get_family

    n = len(_VAE_CHANNELS)
    return dict(in_channels=3, out_channels=3, block_out_channels=_VAE_CHANNELS, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                latent_channels=4, norm_num_groups=32, sample_size=64,
                scaling_factor=get_family(family).vae_factors["scaling_factor"])


_CLIP_PAD = {"clip_l": EOS, "clip_g": "!"}  # the pad token of each CLIP tokenizer, as in the real diffusers repos


def tiny_text_config(which: str, vocab_size: int) -> dict[str, Any]:
    """CLIPTextConfig kwargs: CLIP-L (quick-GELU) or CLIP-G (GELU, with a projection)."""
    vocab = tiny_vocab()[0]
    return dict(vocab_size=vocab_size, hidden_size=_TEXT_HIDDEN, intermediate_size=2 * _TEXT_HIDDEN,
                num_hidden_layers=_TEXT_LAYERS, num_attention_heads=max(1, _TEXT_HIDDEN // 64),
                max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu" if which == "clip_g" else "quick_gelu",
                projection_dim=_TEXT_HIDDEN, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=1)


def build_tiny_components(family: str = "sd15", seed: int = 0, vocab_size: int | None = None,
                          tokenizer_dir: str | Path | None = None):
    """Tiny random :class:`~trainer.families.base.Components` (deterministic from ``seed``).

    Tokenizers are loaded from ``tokenizer_dir`` (written there by :func:`build_tiny_tokenizer` if missing).
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .families.base import Components
    from .families.sd15 import make_noise_scheduler
    from .families.tokenizers import load_clip_tokenizer

    fam = _unet_family(family)
    n_tokens = len(tiny_vocab()[0])
    vocab_size = vocab_size or n_tokens
    if vocab_size < n_tokens:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tiny tokenizer ({n_tokens} tokens)")
    with tempfile.TemporaryDirectory(prefix="crucible-tiny-tok-") as scratch:
        tok_dir = Path(tokenizer_dir) if tokenizer_dir else Path(scratch)
        if not (tok_dir / "vocab.json").is_file():
            build_tiny_tokenizer(tok_dir)
        tokenizers = [load_clip_tokenizer(tok_dir, spec.kind) for spec in fam.encoders]  # held in memory once loaded
    classes = {"clip_l": CLIPTextModel, "clip_g": CLIPTextModelWithProjection}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config(family))
        vae = AutoencoderKL(**tiny_vae_config(family))
        encoders = [classes[spec.kind](CLIPTextConfig(**tiny_text_config(spec.kind, vocab_size)))
                    for spec in fam.encoders]
    names = tuple(spec.component for spec in fam.encoders)
    for module in (unet, vae, *encoders):
        module.eval()
    return Components(denoiser=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                      noise_scheduler=make_noise_scheduler(), text_encoder_names=names,
                      source=f"tiny-{family}-seed{seed}", extras={"family": fam.name, "clip_skip": 1})


def single_file_path(folder: str | Path) -> Path:
    """Where :func:`build_tiny_pipeline` puts the single-file checkpoint for ``folder``: ``<folder>.safetensors``."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}.safetensors"


def build_tiny_pipeline(folder: str | Path, family: str = "sd15", seed: int = 0, vocab_size: int | None = None,
                        single_file: bool = False) -> Path:
    """Write a tiny random diffusers pipeline folder for ``family`` and return its path.

    With ``single_file=True`` the same weights are also written as a ComfyUI/LDM checkpoint
    ``<folder>.safetensors`` plus its tokenizer in ``<folder>_tokenizer/`` (where the loader looks for it).
    """
    from .families.single_file import diffusers_to_single_file

    folder = Path(folder)
    for spec in _unet_family(family).encoders:
        build_tiny_tokenizer(folder / spec.tokenizer_subfolder, pad_token=_CLIP_PAD[spec.kind])
    comps = build_tiny_components(family, seed, vocab_size, tokenizer_dir=folder / "tokenizer")
    save_diffusers_folder(comps, folder, family)
    if single_file:
        build_tiny_tokenizer(folder.parent / f"{folder.name}_tokenizer")
        save_safetensors(single_file_path(folder), diffusers_to_single_file(comps, family))
    return folder


def save_diffusers_folder(comps, folder: str | Path, family: str) -> Path:
    """Write components as a diffusers pipeline folder (configs + safetensors weights; tokenizers already there)."""
    fam = _unet_family(family)
    folder = Path(folder)
    index: dict[str, Any] = {"_class_name": fam.pipeline_class_name, "_diffusers_version": _diffusers_version(),
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", type(comps.noise_scheduler).__name__]}
    _save_diffusers_model(comps.denoiser, folder / "unet")
    _save_diffusers_model(comps.vae, folder / "vae")
    for name, encoder in zip(comps.text_encoder_names, comps.text_encoders):
        _save_transformers_model(encoder, folder / name)
        index[name] = ["transformers", type(encoder).__name__]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    index.update(fam.pipeline_index_extras)
    atomic_write_bytes(folder / "scheduler" / "scheduler_config.json",
                       comps.noise_scheduler.to_json_string().encode("utf-8"))
    atomic_write_json(folder / "model_index.json", index)
    return folder


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _save_diffusers_model(model, folder: Path) -> None:
    save_safetensors(folder / "diffusion_pytorch_model.safetensors", model.state_dict())
    atomic_write_bytes(folder / "config.json", model.to_json_string().encode("utf-8"))


def _save_transformers_model(model, folder: Path) -> None:
    save_safetensors(folder / "model.safetensors", model.state_dict(), metadata={"format": "pt"})
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["architectures"] = [type(model).__name__]
    atomic_write_json(folder / "config.json", config)
