"""The ComfyUI / LDM single-file layout: its key prefixes, and diffusers components written in it (our own
mapping, the reverse of diffusers' ``single_file_utils`` converters), for tests that need single files and for a
full-checkpoint export ComfyUI's *Load Checkpoint* reads.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

from ..errors import CrucibleError, ModelLoadError
from .ldm_configs import _count

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .base import Components, ModelFamily

StateDict = Mapping[str, "torch.Tensor"]
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"


Renames = tuple[tuple[str, str], ...]


_NONE: Renames = ()


_UNET_RESNET: Renames = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                         ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                         ("conv_shortcut", "skip_connection"))


_VAE_RESNET: Renames = (("conv_shortcut", "nin_shortcut"),)


_VAE_ATTN: Renames = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


Pairs = list[tuple[str, str, Renames]]  # (diffusers prefix, LDM prefix, renames inside that block)


def _unet_prefix_map(keys) -> Pairs:
    """Where every block of a diffusers UNet state dict goes in the LDM layout."""
    keys = list(keys)
    n_down = _count(keys, r"down_blocks\.(\d+)\.")
    n_up = _count(keys, r"up_blocks\.(\d+)\.")
    per_down = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    per_up = _count(keys, r"up_blocks\.0\.resnets\.(\d+)\.")
    pairs: Pairs = [
        ("time_embedding.linear_1.", "time_embed.0.", _NONE), ("time_embedding.linear_2.", "time_embed.2.", _NONE),
        ("add_embedding.linear_1.", "label_emb.0.0.", _NONE), ("add_embedding.linear_2.", "label_emb.0.2.", _NONE),
        ("conv_in.", "input_blocks.0.0.", _NONE), ("conv_norm_out.", "out.0.", _NONE), ("conv_out.", "out.2.", _NONE),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", _NONE),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    for i in range(n_down):
        for j in range(per_down):
            block = 1 + i * (per_down + 1) + j
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", _UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", _NONE)]
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per_down + 1)}.0.op.", _NONE))
    for i in range(n_up):
        has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys)
        for j in range(per_up):
            block = i * per_up + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", _UNET_RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", _NONE)]
        last = i * per_up + per_up - 1
        pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{last}.{2 if has_attn else 1}.", _NONE))
    return pairs


def _vae_prefix_map(keys) -> Pairs:
    """Where every block of a diffusers VAE state dict goes in the LDM layout (decoder levels run backwards)."""
    levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    pairs: Pairs = [("quant_conv.", "quant_conv.", _NONE), ("post_quant_conv.", "post_quant_conv.", _NONE)]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in.", f"{part}.conv_in.", _NONE), (f"{part}.conv_out.", f"{part}.conv_out.", _NONE),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.", _NONE),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTN)]
    for i in range(levels):
        up = levels - 1 - i
        pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", _NONE),
                  (f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{up}.upsample.conv.", _NONE)]
        for j in range(_count(keys, rf"encoder\.down_blocks\.{i}\.resnets\.(\d+)\.")):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET))
        for j in range(_count(keys, rf"decoder\.up_blocks\.{i}\.resnets\.(\d+)\.")):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", _VAE_RESNET))
    return pairs


def _rename(sd: StateDict, pairs: Pairs, what: str) -> dict[str, "torch.Tensor"]:
    """Apply ``pairs`` to every key; a key no pair claims is an error (the model is not of this layout)."""
    out = {}
    for key, value in sd.items():
        for src, dst, inner in pairs:
            if key.startswith(src):
                rest = key[len(src):]
                for old, new in inner:
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                out[dst + rest] = value
                break
        else:
            raise ModelLoadError(f"the {what} weight '{key}' has no place in the single-file layout; "
                                 "this is not an SD1.5/SDXL-style model")
    return out


def unet_to_ldm(sd: StateDict) -> dict[str, "torch.Tensor"]:
    """A diffusers ``UNet2DConditionModel`` state dict in LDM names (without ``model.diffusion_model.``)."""
    return _rename(sd, _unet_prefix_map(sd), "UNet")


def vae_to_ldm(sd: StateDict) -> dict[str, "torch.Tensor"]:
    """A diffusers ``AutoencoderKL`` state dict in LDM names (without ``first_stage_model.``); the mid-block
    attention becomes 1×1 convolutions as in the original VAE."""
    out = {}
    for key, value in _rename(sd, _vae_prefix_map(list(sd)), "VAE").items():
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[key] = value
    return out


def clip_l_to_ldm(sd: StateDict, prefix: str) -> dict[str, "torch.Tensor"]:
    """A ``CLIPTextModel`` state dict under ``<prefix>text_model.`` (the Hugging Face layout LDM files keep)."""
    return {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in sd.items()}


_OPEN_CLIP = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
              ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))


def clip_g_to_ldm(sd: StateDict, prefix: str) -> dict[str, "torch.Tensor"]:
    """A ``CLIPTextModelWithProjection`` state dict in OpenCLIP names under ``prefix`` (q/k/v fused into
    ``in_proj``, ``text_projection`` transposed)."""
    import torch

    flat = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {}
    qkv: dict[str, dict[str, "torch.Tensor"]] = {}
    for key, value in flat.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.split(".")[-1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            qkv.setdefault(f"transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(3)}", {})[m.group(2)] = value
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)$", key):
            rest = m.group(2)
            for old, new in _OPEN_CLIP:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[f"transformer.resblocks.{m.group(1)}.{rest}"] = value
        else:
            raise ModelLoadError(f"the CLIP-G weight '{key}' has no place in the OpenCLIP layout")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return {prefix + k: v for k, v in out.items()}


def diffusers_to_single_file(components: "Components",
                             family: "str | ModelFamily | None" = None) -> dict[str, "torch.Tensor"]:
    """All components as one ComfyUI/LDM single-file state dict (what *Load Checkpoint* reads).

    Writes the ``v_pred`` / ``ztsnr`` markers ComfyUI uses when the components' noise scheduler says so. ``family``
    defaults to ``components.extras["family"]``.
    """
    import torch

    from . import get_family

    unet = getattr(components.denoiser, "module", components.denoiser)
    modules = [unet, components.vae, *components.text_encoders]
    if any(".base_layer." in k or ".lora_" in k for m in modules for k in m.state_dict()):
        raise CrucibleError("these components carry LoRA adapter layers; merge or remove the adapter before "
                            "writing a full single-file checkpoint")
    family = family or components.extras.get("family")
    if not family:
        raise CrucibleError("diffusers_to_single_file: name the model family (the components do not say theirs)")
    family = get_family(family)
    kinds = {spec.component: spec.kind for spec in family.encoders}
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict()).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(components.vae.state_dict()).items()})
    for name, encoder in zip(components.text_encoder_names, components.text_encoders):
        encoder = getattr(encoder, "module", encoder)
        prefix = family.single_file_prefixes[name]
        convert = clip_g_to_ldm if kinds[name] == "clip_g" else clip_l_to_ldm
        out.update(convert(encoder.state_dict(), prefix))
    config = getattr(components.noise_scheduler, "config", {})
    if config.get("prediction_type") == "v_prediction":
        out[V_PRED_KEY] = torch.tensor([])
    if config.get("rescale_betas_zero_snr"):
        out[ZTSNR_KEY] = torch.tensor([])
    return out
