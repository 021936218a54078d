"""Tiny random SD3 and Flux models for tests, as a diffusers folder *and* as the split files ComfyUI users keep.
A test fixture: it lives under tests/ and is not part of the installed ``trainer`` package.

:func:`build_tiny_flow_model` writes, from one seeded random init:

* ``<base>/<family>/`` – a diffusers pipeline folder (transformer, VAE, text encoders, tokenizers, scheduler);
* ``<base>/ComfyUI/`` – a miniature ComfyUI tree: the transformer in ComfyUI/SAI/BFL naming in
  ``models/diffusion_models``, the text encoders in ``models/text_encoders`` (Hugging Face layout, T5 without the
  duplicate ``encoder.embed_tokens.weight``), the VAE in LDM layout in ``models/vae``, and the tokenizers where
  ComfyUI ships them (``comfy/sd1_tokenizer``, ``comfy/text_encoders/t5_tokenizer``).

The shapes follow the real architectures, only narrower: SD3 uses 64-wide heads (ComfyUI's SD3 detection needs
that), a 2-block MMDiT whose first block has SD3.5's second attention and whose attention has RMS q/k norms; Flux has
one double and one single block with 32-wide heads; CLIP-G is wider than CLIP-L (that is how split files are told
apart); the VAE has 16 latent channels and downsamples 8×.

:func:`sd3_to_original` and :func:`flux_to_original` write diffusers transformer weights in the original naming
(fused q/k/v, ``(shift, scale)`` modulation order). They are written independently of diffusers' converters, which
the loader uses for the opposite direction, so a round trip checks both.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from trainer.fileio import atomic_write_bytes, atomic_write_json, save_safetensors
from trainer.lora_keys import swap_halves
from trainer.tiny import _diffusers_version, _save_diffusers_model, build_tiny_tokenizer, tiny_text_config, \
    tiny_vae_config, tiny_vocab

FAMILIES = ("sd3", "flux")
CLIP_WIDTHS = {"clip_l": 32, "clip_g": 64}
CLIP_G_PROJECTION = 32
T5_SIZES = {"d_model": 96, "d_kv": 16, "num_heads": 2, "d_ff": 128, "num_layers": 2,
            "relative_attention_num_buckets": 8}
VAE_FACTORS = {"sd3": {"scaling_factor": 1.5305, "shift_factor": 0.0609},
               "flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159}}
ENCODERS = {"sd3": (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")),
            "flux": (("text_encoder", "clip_l"), ("text_encoder_2", "t5xxl"))}
PIPELINES = {"sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
             "flux": ("FluxPipeline", "FluxTransformer2DModel")}
_T5_WORDS = ("a", "an", "the", "of", "photo", "red", "blue", "green", "yellow", "black", "white", "grey", "circle",
             "square", "triangle", "background", "flat", "colour", "simple", "shape", "crucible", "cat", "dog")


# --- tokenizers and configs ----------------------------------------------------------------------------------------

def build_tiny_t5_tokenizer(folder: str | Path) -> Path:
    """Write a tiny T5 (SentencePiece-style Unigram) tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``▁``, single
    characters and a few whole words, as ``tokenizer.json`` + ``tokenizer_config.json``."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from tokenizers.decoders import Metaspace

    folder = Path(folder)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ",.-'"]
    pieces += [("▁" + w, -3.0) for w in _T5_WORDS]
    # Built with the tokenizers library (what transformers 5's T5TokenizerFast(vocab=...) builds), so that every
    # transformers version requirements.txt allows can write and read it.
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<pad>", "</s>", "<unk>")])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tokenizer.decoder = Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    atomic_write_bytes(folder / "tokenizer.json", tokenizer.to_str().encode("utf-8"))
    atomic_write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "extra_ids": 0, "additional_special_tokens": []})
    return folder


def tiny_transformer_config(family: str) -> dict[str, Any]:
    """Transformer kwargs: SD3 (2 blocks, 2 heads × 64, SD3.5's dual attention and q/k norm) or Flux dev (1 + 1
    blocks, 2 heads × 32, guidance embedding)."""
    from trainer.families.flux import flux_rope_axes

    if family == "sd3":
        return dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                    num_attention_heads=2, joint_attention_dim=T5_SIZES["d_model"], caption_projection_dim=128,
                    pooled_projection_dim=CLIP_WIDTHS["clip_l"] + CLIP_G_PROJECTION, out_channels=16,
                    pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")
    if family == "flux":
        return dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
                    num_attention_heads=2, joint_attention_dim=T5_SIZES["d_model"],
                    pooled_projection_dim=CLIP_WIDTHS["clip_l"], guidance_embeds=True,
                    axes_dims_rope=flux_rope_axes(32))
    raise ValueError(f"tiny flow models exist for {FAMILIES}, not {family!r}")


def tiny_clip_config(kind: str, vocab_size: int) -> dict[str, Any]:
    """CLIPTextConfig kwargs: CLIP-L 32 wide (quick-GELU), CLIP-G 64 wide (GELU, projection 32)."""
    width = CLIP_WIDTHS[kind]
    return dict(tiny_text_config(kind, vocab_size), hidden_size=width, intermediate_size=2 * width,
                num_attention_heads=max(1, width // 64),
                projection_dim=CLIP_G_PROJECTION if kind == "clip_g" else width)


def tiny_t5_config(vocab_size: int) -> dict[str, Any]:
    """T5Config kwargs of a two-layer gated-GELU T5 encoder (the T5 v1.1 / XXL layout)."""
    return dict(vocab_size=vocab_size, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                **T5_SIZES)


def tiny_flow_vae_config(family: str) -> dict[str, Any]:
    """AutoencoderKL kwargs: 8× downsampling, 16 latent channels, no quant convs, the family's scale and shift."""
    return dict(tiny_vae_config("sdxl"), latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                **VAE_FACTORS[family])


# --- models --------------------------------------------------------------------------------------------------------

def build_tiny_flow_modules(family: str, seed: int = 0, t5_vocab_size: int = 64) -> dict[str, Any]:
    """The random modules by pipeline component name (``transformer``, ``vae``, ``text_encoder``…), in eval mode.

    SD3's CLIP-L has an identity projection, as the real one.
    """
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    transformer_cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    clip_vocab = len(tiny_vocab()[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules: dict[str, Any] = {"transformer": transformer_cls(**tiny_transformer_config(family)),
                                   "vae": AutoencoderKL(**tiny_flow_vae_config(family))}
        for name, kind in ENCODERS[family]:
            if kind == "t5xxl":
                modules[name] = T5EncoderModel(T5Config(**tiny_t5_config(t5_vocab_size)))
                continue
            config = CLIPTextConfig(**tiny_clip_config(kind, clip_vocab))
            with_projection = family == "sd3"
            modules[name] = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
            if family == "sd3" and kind == "clip_l":
                with torch.no_grad():
                    modules[name].text_projection.weight.copy_(torch.eye(config.hidden_size))
    return {name: module.eval() for name, module in modules.items()}


@dataclass(frozen=True)
class TinyFlowModel:
    """Where :func:`build_tiny_flow_model` put one tiny model."""

    family: str
    folder: Path  # diffusers pipeline folder
    comfy_root: Path  # miniature ComfyUI tree (models/…, comfy/… tokenizers)
    transformer_file: Path  # original (ComfyUI/SAI/BFL) naming
    text_encoder_files: tuple[Path, ...]
    vae_file: Path

    def file_config(self, **changes: Any):
        """A ``ModelConfig`` for the split files (the tokenizers are found in the ComfyUI tree)."""
        from trainer.config import ModelConfig

        return ModelConfig(**{"family": self.family, "path": str(self.transformer_file),
                              "text_encoder_paths": tuple(map(str, self.text_encoder_files)),
                              "vae_path": str(self.vae_file), **changes})

    def folder_config(self, **changes: Any):
        from trainer.config import ModelConfig

        return ModelConfig(**{"family": self.family, "path": str(self.folder), **changes})


def build_tiny_flow_model(base: str | Path, family: str = "sd3", seed: int = 0) -> TinyFlowModel:
    """Write a tiny ``family`` model under ``base`` as a diffusers folder and as ComfyUI split files."""
    from trainer.families.t5_text import load_t5_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"tiny flow models exist for {FAMILIES}, not {family!r}")
    base = Path(base)
    root = base / "ComfyUI"
    build_tiny_tokenizer(root / "comfy" / "sd1_tokenizer")
    t5_tokenizer = build_tiny_t5_tokenizer(root / "comfy" / "text_encoders" / "t5_tokenizer")
    t5_vocab = -(-len(load_t5_tokenizer(t5_tokenizer)) // 8) * 8  # rounded up, as T5-XXL's 32128 for 32100 tokens
    modules = build_tiny_flow_modules(family, seed, t5_vocab)
    folder = save_flow_folder(modules, base / family, family)
    files = save_split_files(modules, root, family)
    return TinyFlowModel(family, folder, root, **files)


def save_flow_folder(modules: Mapping[str, Any], folder: str | Path, family: str) -> Path:
    """Write the modules as a diffusers pipeline folder with tokenizers and the family's scheduler config."""
    from trainer.families import get_family

    folder = Path(folder)
    pipeline, transformer_class = PIPELINES[family]
    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": _diffusers_version(),
                             "transformer": ["diffusers", transformer_class], "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    _save_diffusers_model(modules["transformer"], folder / "transformer")
    _save_diffusers_model(modules["vae"], folder / "vae")
    for name, kind in ENCODERS[family]:
        tokenizer = name.replace("text_encoder", "tokenizer")
        _save_text_encoder(modules[name], folder / name)
        if kind == "t5xxl":
            build_tiny_t5_tokenizer(folder / tokenizer)
        else:
            build_tiny_tokenizer(folder / tokenizer, pad_token="!" if kind == "clip_g" else "<|endoftext|>")
        index[name] = ["transformers", type(modules[name]).__name__]
        index[tokenizer] = ["transformers", "T5TokenizerFast" if kind == "t5xxl" else "CLIPTokenizer"]
    scheduler = get_family(family).scheduler_config(modules["transformer"].config)
    atomic_write_json(folder / "scheduler" / "scheduler_config.json",
                      {"_class_name": "FlowMatchEulerDiscreteScheduler", **scheduler})
    atomic_write_json(folder / "model_index.json", index)
    return folder


def _save_text_encoder(encoder, folder: Path) -> None:
    """A transformers text encoder as ``save_pretrained`` writes it (T5's tied embedding stored once)."""
    import json

    state = {k: v for k, v in encoder.state_dict().items()
             if not (k == "encoder.embed_tokens.weight" and "shared.weight" in encoder.state_dict())}
    save_safetensors(folder / "model.safetensors", state, metadata={"format": "pt"})
    config = json.loads(encoder.config.to_json_string(use_diff=False))
    atomic_write_json(folder / "config.json", {**config, "architectures": [type(encoder).__name__]})


def save_split_files(modules: Mapping[str, Any], root: str | Path, family: str) -> dict[str, Any]:
    """Write the modules the way a ComfyUI install holds them; returns the :class:`TinyFlowModel` file fields."""
    from trainer.families.ldm_layout import vae_to_ldm

    root = Path(root) / "models"
    to_original = sd3_to_original if family == "sd3" else flux_to_original
    transformer = save_safetensors(root / "diffusion_models" / f"tiny-{family}.safetensors",
                                   to_original(modules["transformer"].state_dict()))
    encoders = tuple(save_safetensors(root / "text_encoders" / f"tiny-{family}-{kind}.safetensors",
                                      text_encoder_file_state(modules[name]))
                     for name, kind in ENCODERS[family])
    vae = save_safetensors(root / "vae" / f"tiny-{family}-vae.safetensors", vae_to_ldm(modules["vae"].state_dict()))
    return {"transformer_file": transformer, "text_encoder_files": encoders, "vae_file": vae}


def text_encoder_file_state(encoder) -> dict[str, Any]:
    """A text encoder's weights as ComfyUI's text_encoders files hold them: CLIP under ``text_model.``, T5 with
    ``shared.weight`` only."""
    sd = encoder.state_dict()
    if "shared.weight" in sd:
        return {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in sd.items()}


# --- diffusers -> original naming ----------------------------------------------------------------------------------

_P = r"(weight|bias)"
Renames = tuple[tuple[str, str], ...]  # (diffusers key regex, original key template)
Fused = tuple[tuple[str, str, tuple[str, ...]], ...]  # (regex with a ``part`` group, template, part order)

_SD3_RENAMES: Renames = (
    (r"pos_embed\.pos_embed", "pos_embed"),
    (rf"pos_embed\.proj\.{_P}", r"x_embedder.proj.\1"),
    (rf"time_text_embed\.timestep_embedder\.linear_1\.{_P}", r"t_embedder.mlp.0.\1"),
    (rf"time_text_embed\.timestep_embedder\.linear_2\.{_P}", r"t_embedder.mlp.2.\1"),
    (rf"time_text_embed\.text_embedder\.linear_1\.{_P}", r"y_embedder.mlp.0.\1"),
    (rf"time_text_embed\.text_embedder\.linear_2\.{_P}", r"y_embedder.mlp.2.\1"),
    (rf"context_embedder\.{_P}", r"context_embedder.\1"),
    (rf"proj_out\.{_P}", r"final_layer.linear.\1"),
    (rf"norm_out\.linear\.{_P}", r"final_layer.adaLN_modulation.1.\1"),
    (rf"transformer_blocks\.(\d+)\.norm1\.linear\.{_P}", r"joint_blocks.\1.x_block.adaLN_modulation.1.\2"),
    (rf"transformer_blocks\.(\d+)\.norm1_context\.linear\.{_P}",
     r"joint_blocks.\1.context_block.adaLN_modulation.1.\2"),
    (rf"transformer_blocks\.(\d+)\.attn\.to_out\.0\.{_P}", r"joint_blocks.\1.x_block.attn.proj.\2"),
    (rf"transformer_blocks\.(\d+)\.attn\.to_add_out\.{_P}", r"joint_blocks.\1.context_block.attn.proj.\2"),
    (rf"transformer_blocks\.(\d+)\.attn2\.to_out\.0\.{_P}", r"joint_blocks.\1.x_block.attn2.proj.\2"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"joint_blocks.\1.x_block.attn.ln_q.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"joint_blocks.\1.x_block.attn.ln_k.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"joint_blocks.\1.context_block.attn.ln_q.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"joint_blocks.\1.context_block.attn.ln_k.weight"),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_q\.weight", r"joint_blocks.\1.x_block.attn2.ln_q.weight"),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_k\.weight", r"joint_blocks.\1.x_block.attn2.ln_k.weight"),
    (rf"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.{_P}", r"joint_blocks.\1.x_block.mlp.fc1.\2"),
    (rf"transformer_blocks\.(\d+)\.ff\.net\.2\.{_P}", r"joint_blocks.\1.x_block.mlp.fc2.\2"),
    (rf"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.{_P}", r"joint_blocks.\1.context_block.mlp.fc1.\2"),
    (rf"transformer_blocks\.(\d+)\.ff_context\.net\.2\.{_P}", r"joint_blocks.\1.context_block.mlp.fc2.\2"),
)
_SD3_FUSED: Fused = (
    (rf"transformer_blocks\.(\d+)\.attn\.to_(?P<part>[qkv])\.{_P}", r"joint_blocks.\1.x_block.attn.qkv.\3",
     tuple("qkv")),
    (rf"transformer_blocks\.(\d+)\.attn\.add_(?P<part>[qkv])_proj\.{_P}", r"joint_blocks.\1.context_block.attn.qkv.\3",
     tuple("qkv")),
    (rf"transformer_blocks\.(\d+)\.attn2\.to_(?P<part>[qkv])\.{_P}", r"joint_blocks.\1.x_block.attn2.qkv.\3",
     tuple("qkv")),
)
_FLUX_RENAMES: Renames = (
    (rf"time_text_embed\.timestep_embedder\.linear_1\.{_P}", r"time_in.in_layer.\1"),
    (rf"time_text_embed\.timestep_embedder\.linear_2\.{_P}", r"time_in.out_layer.\1"),
    (rf"time_text_embed\.text_embedder\.linear_1\.{_P}", r"vector_in.in_layer.\1"),
    (rf"time_text_embed\.text_embedder\.linear_2\.{_P}", r"vector_in.out_layer.\1"),
    (rf"time_text_embed\.guidance_embedder\.linear_1\.{_P}", r"guidance_in.in_layer.\1"),
    (rf"time_text_embed\.guidance_embedder\.linear_2\.{_P}", r"guidance_in.out_layer.\1"),
    (rf"context_embedder\.{_P}", r"txt_in.\1"),
    (rf"x_embedder\.{_P}", r"img_in.\1"),
    (rf"proj_out\.{_P}", r"final_layer.linear.\1"),
    (rf"norm_out\.linear\.{_P}", r"final_layer.adaLN_modulation.1.\1"),
    (rf"transformer_blocks\.(\d+)\.norm1\.linear\.{_P}", r"double_blocks.\1.img_mod.lin.\2"),
    (rf"transformer_blocks\.(\d+)\.norm1_context\.linear\.{_P}", r"double_blocks.\1.txt_mod.lin.\2"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (rf"transformer_blocks\.(\d+)\.attn\.to_out\.0\.{_P}", r"double_blocks.\1.img_attn.proj.\2"),
    (rf"transformer_blocks\.(\d+)\.attn\.to_add_out\.{_P}", r"double_blocks.\1.txt_attn.proj.\2"),
    (rf"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.{_P}", r"double_blocks.\1.img_mlp.0.\2"),
    (rf"transformer_blocks\.(\d+)\.ff\.net\.2\.{_P}", r"double_blocks.\1.img_mlp.2.\2"),
    (rf"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.{_P}", r"double_blocks.\1.txt_mlp.0.\2"),
    (rf"transformer_blocks\.(\d+)\.ff_context\.net\.2\.{_P}", r"double_blocks.\1.txt_mlp.2.\2"),
    (rf"single_transformer_blocks\.(\d+)\.norm\.linear\.{_P}", r"single_blocks.\1.modulation.lin.\2"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
    (rf"single_transformer_blocks\.(\d+)\.proj_out\.{_P}", r"single_blocks.\1.linear2.\2"),
)
_FLUX_FUSED: Fused = (
    (rf"transformer_blocks\.(\d+)\.attn\.to_(?P<part>[qkv])\.{_P}", r"double_blocks.\1.img_attn.qkv.\3", tuple("qkv")),
    (rf"transformer_blocks\.(\d+)\.attn\.add_(?P<part>[qkv])_proj\.{_P}", r"double_blocks.\1.txt_attn.qkv.\3",
     tuple("qkv")),
    (rf"single_transformer_blocks\.(\d+)\.(?P<part>attn\.to_[qkv]|proj_mlp)\.{_P}", r"single_blocks.\1.linear1.\3",
     ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
)


def sd3_to_original(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ``SD3Transformer2DModel`` state dict in SAI/ComfyUI names (``joint_blocks.N.x_block…``).

    ``norm_out`` and the last block's ``norm1_context`` (the ``AdaLayerNormContinuous`` layers) go back to
    ``(shift, scale)`` order.
    """
    last = max(int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    swapped = re.compile(rf"norm_out\.linear\..*|transformer_blocks\.{last}\.norm1_context\.linear\..*")
    return _to_original(sd, _SD3_RENAMES, _SD3_FUSED, swapped)


def flux_to_original(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ``FluxTransformer2DModel`` state dict in BFL/ComfyUI names (``double_blocks.N.img_attn…``)."""
    return _to_original(sd, _FLUX_RENAMES, _FLUX_FUSED, re.compile(r"norm_out\.linear\..*"))


def _to_original(sd: Mapping[str, Any], renames: Renames, fused: Fused, swapped: re.Pattern) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    groups: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {}
    for key, value in sd.items():
        for pattern, template, order in fused:
            if match := re.fullmatch(pattern, key):
                groups.setdefault(match.expand(template), (order, {}))[1][match.group("part")] = value
                break
        else:
            for pattern, template in renames:
                if match := re.fullmatch(pattern, key):
                    out[match.expand(template)] = swap_halves(value) if swapped.fullmatch(key) else value
                    break
            else:
                raise ValueError(f"the transformer weight '{key}' has no name in the original layout")
    for key, (order, parts) in groups.items():
        out[key] = torch.cat([parts[p] for p in order], dim=0)
    return out
