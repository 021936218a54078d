"""The split files ComfyUI users keep for SD3 and Flux (``diffusion_models``, ``text_encoders``, ``vae``, or a full
checkpoint that bundles them): which tensors are which component, and the CLIP encoders and 16-channel VAE built
from them. T5 lives in :mod:`trainer.families.t5_text`; the transformer layouts are the families' facts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..errors import ModelLoadError
from .ldm_configs import _count, clip_config_from_state, vae_config_from_ldm
from .ldm_layout import vae_to_ldm
from .weights import Part, _derive, _materialize

if TYPE_CHECKING:  # pragma: no cover
    from .base import ModelFamily


DIFFUSION_PREFIX = "model.diffusion_model."


VAE_PREFIXES = ("first_stage_model.", "vae.")  # SD3 and Flux ComfyUI checkpoints


TEXT_ENCODER_PREFIX = "text_encoders.{kind}.transformer."  # kind: clip_l | clip_g | t5xxl


CLIP_G_MIN_WIDTH = 1024  # a lone CLIP file this wide is CLIP-G (1280), narrower is CLIP-L (768)


KIND_TITLES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}


Source = Any  # a Part (tensors in a file) or a Path (a diffusers model sub-folder)


def transformer_layout(keys: Iterable[str]) -> tuple[str, str] | None:
    """``(family, naming)`` of a transformer state dict: the flow family whose ``transformer_markers`` it carries,
    naming ``diffusers`` or ``original`` (ComfyUI / SAI / BFL), with or without ``model.diffusion_model.``;
    ``None`` when no family's."""
    from . import all_families

    keys = {k.removeprefix(DIFFUSION_PREFIX) for k in keys}
    for family in all_families():
        for naming, markers in getattr(family, "transformer_markers", {}).items():
            if all(m in keys for m in markers):
                return family.name, naming
    return None


def encoder_kind(shapes: Mapping[str, tuple]) -> str | None:
    """``"t5xxl"``, ``"clip"`` (Hugging Face layout, with or without ``text_model.``) or ``None``."""
    names = {k.removeprefix("text_model.") for k in shapes}
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in names:
        return "t5xxl"
    if "encoder.layers.0.self_attn.q_proj.weight" in names and "embeddings.token_embedding.weight" in names:
        return "clip"
    return None


def clip_size(shapes: Mapping[str, tuple]) -> tuple[int, int]:
    """(width, layers) of a CLIP text encoder, the order CLIP-L < CLIP-G."""
    names = {k.removeprefix("text_model."): s for k, s in shapes.items()}
    return int(names["embeddings.token_embedding.weight"][1]), _count(names, r"encoder\.layers\.(\d+)\.")


def load_clip(part: Part, kind: str, dtype=None, *, projection: bool, identity_projection: bool = False):
    """A CLIP text encoder from a file: ``CLIPTextModelWithProjection`` when ``projection`` (with an identity
    projection when ``identity_projection`` or when the file has none), else ``CLIPTextModel``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = part.read(dtype)
    title = f"{KIND_TITLES[kind]} text encoder"
    config = _derive(title, part.describe(), clip_config_from_state, sd, kind)
    if projection and (identity_projection or "text_projection.weight" not in sd):
        sd["text_projection.weight"] = torch.eye(config["hidden_size"])
        config["projection_dim"] = config["hidden_size"]
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _materialize(lambda: cls(CLIPTextConfig(**config)), sd, title, part.describe(), dtype)


def load_vae(part: Part, family: "ModelFamily", dtype=None):
    """A 16-channel ``AutoencoderKL`` from LDM-layout (``ae.safetensors``) or diffusers-layout tensors (sample size
    and scaling/shift factor from the family's ``vae_factors``)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = part.read(dtype)
    ldm = vae_to_ldm(sd) if any(k.startswith("encoder.down_blocks.") for k in sd) else sd
    config = _derive("VAE", part.describe(), vae_config_from_ldm, ldm, family)
    if config["latent_channels"] != 16:
        raise ModelLoadError(f"the VAE '{part.describe()}' has {config['latent_channels']} latent channels; SD3 and "
                             "Flux use a 16-channel VAE (SD3: the one in the checkpoint, Flux: ae.safetensors)")
    weights = convert_ldm_vae_checkpoint(ldm, config)
    return _materialize(lambda: AutoencoderKL(**config), weights, "VAE", part.describe(), dtype)
