"""ComfyUI / LDM single-file checkpoints of the UNet families → diffusers components.

ComfyUI keeps SD1.5 and SDXL models as one ``.safetensors`` file in the original (LDM/SGM) layout:

============================  ========================================================================
``model.diffusion_model.…``    UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``)
``first_stage_model.…``        VAE (``encoder.down.N.block.M`` …, conv 1×1 attention)
``cond_stage_model.transformer.text_model.…``   SD1.5 CLIP-L (Hugging Face layout)
``conditioner.embedders.0.transformer.text_model.…``  SDXL CLIP-L
``conditioner.embedders.1.model.…``   SDXL CLIP-G (OpenCLIP layout: ``resblocks``, fused ``in_proj``)
``v_pred`` / ``ztsnr``         empty marker tensors ComfyUI writes for v-prediction / zero-terminal-SNR models
============================  ========================================================================

The text encoders' prefixes are the families' facts (``ModelFamily.single_file_prefixes``), as is telling which
family a file holds (``matches_single_file``). Configs are derived from tensor shapes (:mod:`.ldm_configs`); the
weights are converted by diffusers' own ``diffusers.loaders.single_file_utils``. The reverse direction (diffusers
components → this layout) is :mod:`.ldm_layout`.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import ModelLoadError
from .ldm_configs import clip_config_from_ldm, strip_prefix, unet_config_from_ldm, vae_config_from_ldm
from .ldm_layout import UNET_PREFIX, V_PRED_KEY, VAE_PREFIX, ZTSNR_KEY, diffusers_to_single_file, vae_to_ldm
from .weights import _derive, _materialize, check_safetensors_path, checkpoint_keys, read_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .base import ModelFamily

# Single-file layouts Crucible recognises but does not train (named in errors): (name, key prefix that marks it)
OTHER_LAYOUTS = (("sdxl_refiner", "conditioner.embedders."), ("sd2", "cond_stage_model.model."))

StateDict = Mapping[str, "torch.Tensor"]


def detect_family(keys) -> str | None:
    """The family a single file's key layout belongs to (each family's ``matches_single_file``), else the name of
    another known layout (``sdxl_refiner``, ``sd2``), else ``None``."""
    from . import find_family

    keys = list(keys)
    family = find_family(lambda f: f.matches_single_file(keys))
    if family is not None:
        return family.name
    return next((name for name, prefix in OTHER_LAYOUTS if any(k.startswith(prefix) for k in keys)), None)


def check_family(sd: StateDict, family: "str | ModelFamily", path: str | Path) -> None:
    """Raise a :class:`ModelLoadError` when ``sd`` is not a complete ``family`` checkpoint (and say what it is)."""
    from . import FAMILY_NAMES, get_family

    family = get_family(family)
    found = detect_family(sd)
    if found != family.name:
        what = f"looks like a {found} checkpoint" if found else "is not an SD1.5/SDXL checkpoint"
        hint = f"; set model.family to '{found}'" if found in FAMILY_NAMES else ""
        raise ModelLoadError(f"model.path '{path}' {what}, but model.family is '{family.name}'{hint}")
    named = {"UNet": UNET_PREFIX, "VAE": VAE_PREFIX, **family.single_file_prefixes}
    missing = [name for name, prefix in named.items() if not any(k.startswith(prefix) for k in sd)]
    if missing:
        raise ModelLoadError(f"model.path '{path}' has no {' / '.join(missing)} weights; Crucible needs a full "
                             "checkpoint (UNet, VAE and text encoders) as ComfyUI's models/checkpoints holds them")


def load_unet(sd: StateDict, family: "str | ModelFamily", path: Any, dtype=None, pooled_dim: int | None = None):
    """The diffusers UNet of a single file."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = _derive("UNet", path, unet_config_from_ldm, strip_prefix(sd, UNET_PREFIX), family, pooled_dim)
    weights = convert_ldm_unet_checkpoint(sd, config)
    return _materialize(lambda: UNet2DConditionModel(**config), weights, "UNet", path, dtype)


def load_vae(sd: StateDict, family: "str | ModelFamily", path: Any, dtype=None):
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


def load_single_file(path: str | Path, family: "str | ModelFamily", dtype=None, sd: StateDict | None = None,
                     unet: bool = True) -> dict[str, Any]:
    """Every component of a ComfyUI single-file ``family`` checkpoint, as diffusers/transformers modules.

    Returns ``{"unet", "vae", "text_encoder"[, "text_encoder_2"], "v_pred": bool, "ztsnr": bool}``. Each
    component's tensors are taken out of the file's dict before it is built, so the file's copy of a component
    is freed as soon as that component exists (an SDXL file does not sit in memory twice). ``unet=False``: the VAE
    and text encoders only, and only their tensors are read (the file was checked when the run first loaded it).
    Under :func:`~trainer.families.weights.denoiser_shapes_only` the UNet's tensors are not read: it is built on the
    meta device from the header's shapes.
    """
    from . import get_family
    from .base import PartDtypes
    from .weights import TensorFile, building_shapes_only

    family, dtypes = get_family(family), PartDtypes.of(dtype)
    shapes_only = unet and sd is None and building_shapes_only()
    # each part is read in its own dtype (a full fine-tune: the UNet in the trained dtype, the rest in the compute one)
    by_part = len({dtypes.denoiser, dtypes.text_encoders, dtypes.vae}) > 1
    if sd is None and (shapes_only or not unet or by_part):  # the encoders and VAE read first, each in its dtype;
        file = TensorFile(path, "model.path")  # the UNet then in its own, as meta tensors, or not at all
        part_dtype = {p: dtypes.text_encoders for p in family.single_file_prefixes.values()} | {VAE_PREFIX: dtypes.vae}
        sd = {p + k: v for p, d in part_dtype.items() for k, v in file.read(p, dtype=d).items()}
        if shapes_only:  # a sharded run's rank > 0: the UNet from the header's shapes (weights.denoiser_shapes_only)
            sd.update(file.read(exclude=tuple(part_dtype), dtype=dtypes.denoiser, shapes_only=True))
        elif unet:
            sd.update(file.read(exclude=tuple(part_dtype), dtype=dtypes.denoiser))
    if unet:
        sd = dict(read_checkpoint(path, dtype=dtypes.denoiser) if sd is None else sd)
        check_family(sd, family, path)

    def take(prefix: str) -> dict[str, "torch.Tensor"]:
        return {k: sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]}

    out: dict[str, Any] = {"v_pred": V_PRED_KEY in sd, "ztsnr": ZTSNR_KEY in sd}
    pooled = None
    for spec in family.encoders:
        prefix = family.single_file_prefixes[spec.component]
        load = load_clip_g if spec.kind == "clip_g" else load_clip_l
        out[spec.component] = load(take(prefix), prefix, path, dtypes.text_encoders)
        if spec.kind == "clip_g":  # SDXL's pooled text embedding is CLIP-G's projection
            pooled = int(out[spec.component].config.projection_dim)
    if unet:
        out["unet"] = load_unet(take(UNET_PREFIX), family, path, dtypes.denoiser, pooled_dim=pooled)
    out["vae"] = load_vae(take(VAE_PREFIX), family, path, dtypes.vae)
    return out


def load_single_file_unet(path: str | Path, family: "str | ModelFamily", dtype=None, pooled_dim: int | None = None):
    """The UNet of a single file alone (``pooled_dim`` as :func:`load_unet` takes it); only its tensors are read
    (their shapes alone under :func:`~trainer.families.weights.denoiser_shapes_only`)."""
    from . import get_family
    from .weights import TensorFile, building_shapes_only

    file = TensorFile(path, "model.path")
    tensors = file.read(UNET_PREFIX, dtype=dtype, shapes_only=building_shapes_only())
    return load_unet({UNET_PREFIX + k: v for k, v in tensors.items()}, get_family(family), path, dtype, pooled_dim)


__all__ = ["detect_family", "check_family", "load_unet", "load_vae", "load_clip_l", "load_clip_g", "load_single_file",
           "load_single_file_unet",
           "check_safetensors_path", "checkpoint_keys", "read_checkpoint", "diffusers_to_single_file", "vae_to_ldm",
           "UNET_PREFIX", "VAE_PREFIX", "OTHER_LAYOUTS"]
