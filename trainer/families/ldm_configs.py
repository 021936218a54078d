"""Model configs derived from tensor shapes, so loading never asks a model hub for a config.

:func:`unet_config_from_ldm`, :func:`vae_config_from_ldm` and :func:`clip_config_from_ldm` read block widths, depths,
context size and vocabulary from LDM-layout tensors (ComfyUI single files); :func:`clip_config_from_state` does the
same for Hugging Face-layout CLIP files. What shapes cannot tell is the family's fact (``unet_sample_size``,
``vae_factors``, ``text_time_conditioning``) or fixed here: SD1.5 uses 8 attention heads everywhere, SDXL and CLIP
use 64-wide heads (``max(1, width // 64)`` heads, so tiny test models stay valid), group norms have 32 groups,
CLIP-L uses quick-GELU and CLIP-G GELU.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .base import ModelFamily

StateDict = Mapping[str, "torch.Tensor"]


def strip_prefix(sd: StateDict, prefix: str) -> dict[str, "torch.Tensor"]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _indices(keys, pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over ``keys``."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _count(keys, pattern: str) -> int:
    found = _indices(keys, pattern)
    return found[-1] + 1 if found else 0


def _heads(width: int) -> int:
    return max(1, width // CLIP_HEAD_DIM)


NORM_GROUPS = 32


CLIP_HEAD_DIM = 64


SD15_HEADS = 8


SDXL_TIME_EMBED_DIM = 256


def unet_config_from_ldm(unet: StateDict, family: "str | ModelFamily", pooled_dim: int | None = None) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs from an LDM UNet state dict (keys without ``model.diffusion_model.``).

    ``pooled_dim`` is the width of SDXL's pooled text embedding (CLIP-G's projection); it splits the added
    conditioning input between text and the six size/crop time ids (released SDXL: 1280 + 6 × 256).
    """
    from . import get_family

    family = get_family(family)
    keys = list(unet)
    n_inputs = _count(keys, r"input_blocks\.(\d+)\.")
    downsamples = [i for i in range(n_inputs) if f"input_blocks.{i}.0.op.weight" in unet]
    levels = len(downsamples) + 1
    layers, rest = divmod(n_inputs - 1 - len(downsamples), levels)
    if n_inputs < 2 or rest:
        raise ModelLoadError(f"the UNet has {n_inputs} input blocks, which is no SD UNet layout")
    first = [1 + i * (layers + 1) for i in range(levels)]  # first input block of each level
    channels = [int(unet[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0]) for b in first]
    depths = [_count(keys, rf"input_blocks\.{b}\.1\.transformer_blocks\.(\d+)\.") for b in first]
    up_layers = layers + 1
    up_attn = [any(k.startswith(f"output_blocks.{j * up_layers}.1.transformer_blocks.") for k in keys)
               for j in range(levels)]
    mid_depth = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    attn_key = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in keys if k.endswith(".proj_in.weight")), None)
    if attn_key is None or proj_in is None:
        raise ModelLoadError("the UNet has no cross-attention layers, which is no SD1.5/SDXL UNet")
    # a level without attention takes the mid block's depth when it is the last one (diffusers builds the mid
    # block with transformer_layers_per_block[-1]), else 1 (unused).
    per_level = [d or (mid_depth if i == levels - 1 else 1) for i, d in enumerate(depths)]
    config: dict[str, Any] = {
        "sample_size": family.unet_sample_size,
        "in_channels": int(unet["input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(unet["out.2.weight"].shape[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": int(unet[attn_key].shape[1]),
        "use_linear_projection": unet[proj_in].ndim == 2,
        "transformer_layers_per_block": per_level[0] if len(set(per_level)) == 1 else per_level,
        "norm_num_groups": NORM_GROUPS,
    }
    if family.text_time_conditioning:  # SDXL: 64-wide heads, size/crop conditioning
        config["attention_head_dim"] = [_heads(c) for c in channels]
        if "label_emb.0.0.weight" not in unet:
            raise ModelLoadError("the SDXL UNet has no added size/crop conditioning (label_emb); "
                                 "it is not an SDXL base model")
        adm_in = int(unet["label_emb.0.0.weight"].shape[1])
        pooled = pooled_dim if pooled_dim is not None else adm_in - 6 * SDXL_TIME_EMBED_DIM
        time_dim, rest = divmod(adm_in - pooled, 6)
        if rest or time_dim <= 0:
            raise ModelLoadError(f"the SDXL UNet's added conditioning ({adm_in} inputs) does not fit a pooled text "
                                 f"embedding of {pooled}; the text encoders do not belong to this UNet")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                      projection_class_embeddings_input_dim=adm_in)
    else:
        config["attention_head_dim"] = SD15_HEADS
        if "label_emb.0.0.weight" in unet:
            raise ModelLoadError("this UNet has a class/size embedding, which SD1.5 does not; is it SDXL?")
    return config


def vae_config_from_ldm(vae: StateDict, family: "str | ModelFamily") -> dict[str, Any]:
    """``AutoencoderKL`` kwargs from an LDM VAE state dict (keys without ``first_stage_model.``); the family's
    ``vae_factors`` give what shapes cannot tell (sample size, scaling and shift factor)."""
    from . import get_family

    factors = get_family(family).vae_factors
    keys = list(vae)
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    if not levels or "encoder.conv_in.weight" not in vae:
        raise ModelLoadError("the VAE weights have no encoder.down blocks; they are not an SD VAE")
    channels = [int(vae[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)]
    return {
        "in_channels": int(vae["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(vae["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": _count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": int(vae["decoder.conv_in.weight"].shape[1]),
        "norm_num_groups": NORM_GROUPS,
        "use_quant_conv": "quant_conv.weight" in vae,
        "use_post_quant_conv": "post_quant_conv.weight" in vae,
        "mid_block_add_attention": any(k.startswith("encoder.mid.attn_1.") for k in keys),
        **factors,
    }


def clip_config_from_ldm(sd: StateDict, which: str) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs from one text encoder's weights with its single-file prefix removed.

    ``which="clip_l"``: Hugging Face layout (``text_model.`` optional); ``which="clip_g"``: OpenCLIP layout.
    """
    if which == "clip_g":
        vocab, hidden = sd["token_embedding.weight"].shape
        positions = sd["positional_embedding"].shape[0]
        layers = _count(sd, r"transformer\.resblocks\.(\d+)\.")
        intermediate = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        projection = sd["text_projection"].shape[1] if "text_projection" in sd else hidden
        act = "gelu"
    else:
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        vocab, hidden = sd["embeddings.token_embedding.weight"].shape
        positions = sd["embeddings.position_embedding.weight"].shape[0]
        layers = _count(sd, r"encoder\.layers\.(\d+)\.")
        intermediate = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection, act = hidden, "quick_gelu"
    vocab = int(vocab)
    return {"vocab_size": vocab, "hidden_size": int(hidden), "intermediate_size": int(intermediate),
            "num_hidden_layers": layers, "num_attention_heads": _heads(int(hidden)),
            "max_position_embeddings": int(positions), "hidden_act": act, "projection_dim": int(projection),
            "layer_norm_eps": 1e-5, "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": 1}


def clip_config_from_state(sd: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs of a Hugging Face-layout CLIP text encoder: CLIP-L uses quick-GELU, CLIP-G GELU."""
    config = clip_config_from_ldm(sd, "clip_l")  # the Hugging Face layout branch
    if kind == "clip_g":
        config["hidden_act"] = "gelu"
    if "text_projection.weight" in sd:
        config["projection_dim"] = int(sd["text_projection.weight"].shape[0])
    return config
