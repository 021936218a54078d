"""ComfyUI / LDM single-file checkpoints ⇄ diffusers components, with configs derived from tensor shapes.

ComfyUI keeps SD1.5 and SDXL models as one ``.safetensors`` file in the original (LDM/SGM) layout:

============================  ========================================================================
``model.diffusion_model.…``    UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``)
``first_stage_model.…``        VAE (``encoder.down.N.block.M`` …, conv 1×1 attention)
``cond_stage_model.transformer.text_model.…``   SD1.5 CLIP-L (Hugging Face layout)
``conditioner.embedders.0.transformer.text_model.…``  SDXL CLIP-L
``conditioner.embedders.1.model.…``   SDXL CLIP-G (OpenCLIP layout: ``resblocks``, fused ``in_proj``)
``v_pred`` / ``ztsnr``         empty marker tensors ComfyUI writes for v-prediction / zero-terminal-SNR models
============================  ========================================================================

Loading never asks a model hub for a config: :func:`unet_config_from_ldm`, :func:`vae_config_from_ldm` and
:func:`clip_config_from_ldm` read block widths, depths, context size and vocabulary from the tensors themselves.
What shapes cannot tell is fixed per family: SD1.5 uses 8 attention heads everywhere, SDXL and CLIP use 64-wide heads
(``max(1, width // 64)`` heads, so tiny test models stay valid), group norms have 32 groups, CLIP-L uses quick-GELU
and CLIP-G GELU. The weights themselves are converted by diffusers' own ``diffusers.loaders.single_file_utils``.

:func:`diffusers_to_single_file` is the reverse mapping (our own code): it writes the layout above from loaded
components, for tests that need single files and for a full-checkpoint export ComfyUI's *Load Checkpoint* reads.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import CrucibleError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .base import Components

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {  # (family, encoder name) -> key prefix of that text encoder in a single file
    ("sd15", "text_encoder"): "cond_stage_model.transformer.",
    ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer.",
    ("sdxl", "text_encoder_2"): "conditioner.embedders.1.model.",
}
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
FAMILY_DEFAULTS = {  # what tensor shapes cannot tell (values of the released models)
    "sd15": {"unet_sample_size": 64, "vae_sample_size": 512, "vae_scaling_factor": 0.18215},
    "sdxl": {"unet_sample_size": 128, "vae_sample_size": 1024, "vae_scaling_factor": 0.13025},
}
NORM_GROUPS = 32
CLIP_HEAD_DIM = 64
SD15_HEADS = 8
SDXL_TIME_EMBED_DIM = 256

StateDict = Mapping[str, "torch.Tensor"]


# --- reading -------------------------------------------------------------------------------------------------------

def check_safetensors_path(path: str | Path, what: str = "model.path") -> Path:
    """Refuse missing files and pickle checkpoints (they can run code when loaded) with a message saying what to do."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{what} '{path}' is a pickle checkpoint ({path.suffix}); Crucible only loads "
                             ".safetensors files because pickles can run arbitrary code. Convert it to .safetensors "
                             "(e.g. with ComfyUI's 'Save Checkpoint' node or kohya's convert script) and use that file")
    if not path.is_file():
        raise ModelLoadError(f"{what} '{path}' does not exist; give a diffusers model folder or a .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{what} '{path}' is not a .safetensors file; convert it to .safetensors and use that")
    return path


def read_checkpoint(path: str | Path, what: str = "model.path", dtype=None) -> dict[str, "torch.Tensor"]:
    """All tensors of a ``.safetensors`` single file (after :func:`check_safetensors_path`)."""
    from ..fp8_files import read_file  # crucible #16: tensor by tensor into dtype; ComfyUI fp8 files

    path = check_safetensors_path(path, what)
    with _readable(path, what):
        return read_file(path, dtype)


def checkpoint_keys(path: str | Path, what: str = "model.path") -> list[str]:
    """The tensor names of a ``.safetensors`` file, read from its header only (cheap even for 7 GB files)."""
    from safetensors import safe_open

    path = check_safetensors_path(path, what)
    with _readable(path, what), safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


@contextlib.contextmanager
def _readable(path: Path, what: str):
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{what} '{path}' is not a readable safetensors file ({exc}); it may be truncated or "
                             "a renamed pickle. Re-download it or convert it to .safetensors") from exc


def detect_family(keys) -> str | None:
    """The family a single file's key layout belongs to: ``sd15``, ``sdxl``, ``sdxl_refiner``, ``sd2``, ``sd3``,
    ``flux``, or ``None``."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl_refiner"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(".joint_blocks." in k for k in keys):
        return "sd3"
    if any(".double_blocks." in k or k.startswith("double_blocks.") for k in keys):
        return "flux"
    if any(k.startswith(UNET_PREFIX + "input_blocks.") for k in keys):
        return "sd15"
    return None


def check_family(sd: StateDict, family: str, path: str | Path) -> None:
    """Raise a :class:`ModelLoadError` when ``sd`` is not a complete ``family`` checkpoint (and say what it is)."""
    found = detect_family(sd)
    if found != family:
        what = f"looks like a {found} checkpoint" if found else "is not an SD1.5/SDXL checkpoint"
        hint = f"; set model.family to '{found}'" if found in ("sd15", "sdxl", "sd3", "flux") else ""
        raise ModelLoadError(f"model.path '{path}' {what}, but model.family is '{family}'{hint}")
    missing = [name for name, prefix in _expected_prefixes(family).items() if not any(k.startswith(prefix) for k in sd)]
    if missing:
        raise ModelLoadError(f"model.path '{path}' has no {' / '.join(missing)} weights; Crucible needs a full "
                             "checkpoint (UNet, VAE and text encoders) as ComfyUI's models/checkpoints holds them")


def _expected_prefixes(family: str) -> dict[str, str]:
    named = {"UNet": UNET_PREFIX, "VAE": VAE_PREFIX}
    for (fam, name), prefix in CLIP_PREFIXES.items():
        if fam == family:
            named[name] = prefix
    return named


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


# --- config derivation ---------------------------------------------------------------------------------------------

def unet_config_from_ldm(unet: StateDict, family: str, pooled_dim: int | None = None) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs from an LDM UNet state dict (keys without ``model.diffusion_model.``).

    ``pooled_dim`` is the width of SDXL's pooled text embedding (CLIP-G's projection); it splits the added
    conditioning input between text and the six size/crop time ids (released SDXL: 1280 + 6 × 256).
    """
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
        "sample_size": FAMILY_DEFAULTS[family]["unet_sample_size"],
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
    if family == "sdxl":
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


def vae_config_from_ldm(vae: StateDict, family: str) -> dict[str, Any]:
    """``AutoencoderKL`` kwargs from an LDM VAE state dict (keys without ``first_stage_model.``)."""
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
        "sample_size": FAMILY_DEFAULTS[family]["vae_sample_size"],
        "scaling_factor": FAMILY_DEFAULTS[family]["vae_scaling_factor"],
        "use_quant_conv": "quant_conv.weight" in vae,
        "use_post_quant_conv": "post_quant_conv.weight" in vae,
        "mid_block_add_attention": any(k.startswith("encoder.mid.attn_1.") for k in keys),
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


# --- single file -> diffusers --------------------------------------------------------------------------------------

def _derive(what: str, path: Any, derive: Callable[..., dict], *args) -> dict:
    """Run a config derivation; a missing or odd tensor becomes a :class:`ModelLoadError` naming the file."""
    try:
        return derive(*args)
    except ModelLoadError as exc:
        raise ModelLoadError(f"'{path}': {exc}") from exc
    except (KeyError, IndexError, ValueError) as exc:
        raise ModelLoadError(f"'{path}': the {what} weights are incomplete or not in the SD layout (no {exc}); the "
                             "file is damaged or not a checkpoint of this model family") from exc


def _materialize(factory: Callable[[], Any], weights: dict, what: str, path: Any, dtype) -> Any:
    """Build a module without allocating random weights, then assign ``weights`` (all of them must fit)."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = factory()
    expected = module.state_dict()
    given, weights = weights, {_matching_key(k, expected): v for k, v in weights.items()}  # crucible #16: given
    missing = sorted(set(expected) - set(weights))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(expected[k].shape) != tuple(weights[k].shape))
    if missing or wrong:
        key = (missing or wrong)[0]
        problem = f"{len(missing)} tensors missing" if missing else f"{len(wrong)} tensors with unexpected shapes"
        raise ModelLoadError(f"'{path}': the {what} weights do not form a valid model ({problem}, e.g. '{key}'); "
                             "the file is damaged or not a checkpoint of this model family")
    # crucible #16: one tensor at a time (fp8 base, T5 wo in fp32 under fp16); the caller's dict lets go too
    from ..quantized import assign_weights

    given.clear()
    assign_weights(module, weights, list(expected), dtype or torch.float32)
    return module.eval()


def _matching_key(key: str, expected: Mapping) -> str:
    """transformers 5 flattened ``CLIPTextModel`` (no ``text_model.`` level) while ``CLIPTextModelWithProjection``
    keeps it: add or drop that level so ``key`` matches the module at hand."""
    if key in expected:
        return key
    other = key.removeprefix("text_model.") if key.startswith("text_model.") else f"text_model.{key}"
    return other if other in expected else key


def load_unet(sd: StateDict, family: str, path: Any, dtype=None, pooled_dim: int | None = None):
    """The diffusers UNet of a single file."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = _derive("UNet", path, unet_config_from_ldm, strip_prefix(sd, UNET_PREFIX), family, pooled_dim)
    weights = convert_ldm_unet_checkpoint(sd, config)
    return _materialize(lambda: UNet2DConditionModel(**config), weights, "UNet", path, dtype)


def load_vae(sd: StateDict, family: str, path: Any, dtype=None):
    """The diffusers VAE of a single file, or of a VAE-only file (LDM keys with or without ``first_stage_model.``,
    or diffusers keys)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if any(k.startswith(VAE_PREFIX) for k in sd):
        ldm = strip_prefix(sd, VAE_PREFIX)
    elif any(k.startswith("encoder.down_blocks.") for k in sd):  # a diffusers-format VAE file
        ldm = vae_to_ldm(sd)
    else:
        ldm = dict(sd)
    config = _derive("VAE", path, vae_config_from_ldm, ldm, family)
    weights = convert_ldm_vae_checkpoint(ldm, config)
    return _materialize(lambda: AutoencoderKL(**config), weights, "VAE", path, dtype)


def load_clip_l(sd: StateDict, prefix: str, path: Any, dtype=None):
    """CLIP-L (``CLIPTextModel``) from the Hugging Face-layout keys under ``prefix``."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**_derive("CLIP-L", path, clip_config_from_ldm, strip_prefix(sd, prefix), "clip_l"))
    own = {k: v for k, v in sd.items() if k.startswith(prefix)}
    weights = convert_ldm_clip_checkpoint(own, remove_prefix=prefix)
    return _materialize(lambda: CLIPTextModel(config), weights, "CLIP-L text encoder", path, dtype)


def load_clip_g(sd: StateDict, prefix: str, path: Any, dtype=None):
    """CLIP-G (``CLIPTextModelWithProjection``) from the OpenCLIP-layout keys under ``prefix``."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(**_derive("CLIP-G", path, clip_config_from_ldm, strip_prefix(sd, prefix), "clip_g"))
    # diffusers reads the model only for its width when the file has no text_projection
    weights = convert_open_clip_checkpoint(SimpleNamespace(config=config), sd, prefix=prefix)
    return _materialize(lambda: CLIPTextModelWithProjection(config), weights, "CLIP-G text encoder", path, dtype)


def load_single_file(path: str | Path, family: str, dtype=None, sd: StateDict | None = None) -> dict[str, Any]:
    """Every component of a ComfyUI single-file ``family`` checkpoint, as diffusers/transformers modules.

    Returns ``{"unet", "vae", "text_encoder"[, "text_encoder_2"], "v_pred": bool, "ztsnr": bool}``. Each
    component's tensors are taken out of the file's dict before it is built, so the file's copy of a component
    is freed as soon as that component exists (an SDXL file does not sit in memory twice).
    """
    sd = dict(read_checkpoint(path, dtype=dtype) if sd is None else sd)  # crucible #16: dtype
    check_family(sd, family, path)

    def take(prefix: str) -> dict[str, "torch.Tensor"]:
        return {k: sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]}

    out: dict[str, Any] = {"v_pred": V_PRED_KEY in sd, "ztsnr": ZTSNR_KEY in sd}
    prefix_l = CLIP_PREFIXES[(family, "text_encoder")]
    out["text_encoder"] = load_clip_l(take(prefix_l), prefix_l, path, dtype)
    pooled = None
    if family == "sdxl":
        prefix_g = CLIP_PREFIXES[("sdxl", "text_encoder_2")]
        out["text_encoder_2"] = load_clip_g(take(prefix_g), prefix_g, path, dtype)
        pooled = int(out["text_encoder_2"].config.projection_dim)
    out["unet"] = load_unet(take(UNET_PREFIX), family, path, dtype, pooled_dim=pooled)
    out["vae"] = load_vae(take(VAE_PREFIX), family, path, dtype)
    return out


# --- diffusers -> single file (our own mapping) --------------------------------------------------------------------

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


def diffusers_to_single_file(components: "Components", family: str | None = None) -> dict[str, "torch.Tensor"]:
    """All components as one ComfyUI/LDM single-file state dict (what *Load Checkpoint* reads).

    Writes the ``v_pred`` / ``ztsnr`` markers ComfyUI uses when the components' noise scheduler says so.
    """
    import torch

    unet = getattr(components.denoiser, "module", components.denoiser)
    modules = [unet, components.vae, *components.text_encoders]
    if any(".base_layer." in k or ".lora_" in k for m in modules for k in m.state_dict()):
        raise CrucibleError("these components carry LoRA adapter layers; merge or remove the adapter before "
                            "writing a full single-file checkpoint")
    if family is None:
        family = components.extras.get("family") or (
            "sdxl" if getattr(unet.config, "addition_embed_type", None) == "text_time" else "sd15")
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict()).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(components.vae.state_dict()).items()})
    for name, encoder in zip(components.text_encoder_names, components.text_encoders):
        encoder = getattr(encoder, "module", encoder)
        prefix = CLIP_PREFIXES[(family, name)]
        convert = clip_g_to_ldm if name == "text_encoder_2" else clip_l_to_ldm
        out.update(convert(encoder.state_dict(), prefix))
    config = getattr(components.noise_scheduler, "config", {})
    if config.get("prediction_type") == "v_prediction":
        out[V_PRED_KEY] = torch.tensor([])
    if config.get("rescale_betas_zero_snr"):
        out[ZTSNR_KEY] = torch.tensor([])
    return out
