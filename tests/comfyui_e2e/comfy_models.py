"""The smallest model of each family that ComfyUI loads, built twice from the same random weights: as Crucible's
diffusers components (what Crucible trains and exports LoRAs from) and as ComfyUI's own ``ModelPatcher`` (what
``LoraLoader`` patches). Used by the Python-level checks (``checks_lora_load.py``); runs inside the ComfyUI venv.

How ComfyUI gets each model, and what it recognises:
- ``sd15``: ``comfy_sd15_components`` from ``tests/comfy_sd15.py`` (two 320-channel UNet levels, full CLIP-L) as
  one single-file state dict through ``comfy.sd.load_state_dict_guess_config``: detected as ``SD15``, with its
  CLIP (text-encoder LoRA keys are checked too).
- ``sdxl``: ``trainer.tiny.build_tiny_components("sdxl")``. ComfyUI's SDXL presets fix the transformer depths (the
  smallest, Segmind Vega, is 745M weights), so no preset matches a tiny UNet; its config is read from the weights by
  ``comfy.model_detection.detect_unet_config`` and ``comfy.supported_models.SDXL`` is chosen explicitly.
- ``sd3``: ``tests/tiny_flow.py``'s SD3 (SD3.5 layout) through ``comfy.sd.load_diffusion_model_state_dict``: detected
  as ``SD3``.
- ``flux``: ComfyUI's Flux detection fixes 24 heads of 128 channels, so the smallest Flux it loads is 3072 wide: one
  double and one single block (about 0.5 G weights, 2 GB in float32), detected as ``Flux``.
Text encoders of SDXL/SD3/Flux are not built for ComfyUI (its CLIP-G/T5 configs are full size); their LoRAs are
checked on the denoiser.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = ("sd15", "sdxl", "sd3", "flux")
CONFIG_CLASS = {"sd15": "SD15", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}  # comfy.supported_models


@dataclass
class ComfyCase:
    family: str
    comps: Any  # trainer.families.base.Components (float32, eval)
    model: Any  # comfy.model_patcher.ModelPatcher
    clip: Any  # comfy.sd.CLIP or None
    how: str  # how ComfyUI recognised it, for the report


def supported(family: str) -> bool:
    import comfy.supported_models

    return hasattr(comfy.supported_models, CONFIG_CLASS[family])


def supports_dora() -> bool:
    """Whether this ComfyUI applies DoRA files (``dora_scale``; added to ComfyUI in spring 2024)."""
    import inspect

    import comfy.lora

    return "dora_scale" in inspect.getsource(comfy.lora)


def build(family: str, seed: int = 0) -> ComfyCase:
    return {"sd15": _sd15, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}[family](seed)


def _fp32() -> dict:
    import torch

    return {"dtype": torch.float32}


def _cloned(state: dict) -> dict:
    """A copy to hand to ComfyUI: converting diffusers SD3/Flux weights, it swaps scale/shift halves in place (and
    pops keys), which would change the diffusers module the state dict came from."""
    return {k: v.detach().clone() for k, v in state.items()}


def _detected(family: str, model: Any, how: str) -> str:
    got = type(model.model.model_config).__name__
    if got != CONFIG_CLASS[family]:
        raise AssertionError(f"ComfyUI recognised the {family} model as {got}, not {CONFIG_CLASS[family]}")
    return how


def _sd15(seed: int) -> ComfyCase:
    import comfy.sd

    from trainer.families.single_file import diffusers_to_single_file
    from comfy_sd15 import comfy_sd15_components

    comps = comfy_sd15_components(seed)
    state = diffusers_to_single_file(comps, "sd15")
    how = "single file -> comfy.sd.load_state_dict_guess_config: SD15 + CLIP"
    if hasattr(comfy.sd, "load_state_dict_guess_config"):
        model, clip, _vae, _ = comfy.sd.load_state_dict_guess_config(state, output_vae=False, output_clip=True,
                                                                     model_options=_fp32(), te_model_options=_fp32())
    else:  # the 2024 tree loads checkpoints from files only (float32 on the CPU)
        from trainer.fileio import save_safetensors

        how = "single file -> comfy.sd.load_checkpoint_guess_config: SD15 + CLIP"

        with tempfile.TemporaryDirectory(prefix="crucible-sd15-") as tmp:
            path = save_safetensors(Path(tmp) / "sd15.safetensors", state)
            model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False,
                                                                         output_clip=True)
    del state
    comps.vae = None
    return ComfyCase("sd15", comps, model, clip, _detected("sd15", model, how))


def _sdxl(seed: int) -> ComfyCase:
    from trainer.tiny import build_tiny_components

    return sdxl_case(build_tiny_components("sdxl", seed))


def sdxl_case(comps) -> ComfyCase:
    """ComfyUI's SDXL model around the weights of ``comps.denoiser`` (a diffusers SDXL UNet of any size)."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    from trainer.families.single_file import diffusers_to_single_file

    prefix = "model.diffusion_model."
    unet = {k[len(prefix):]: v for k, v in diffusers_to_single_file(comps, "sdxl").items() if k.startswith(prefix)}
    if comfy.model_detection.model_config_from_unet(unet, "") is not None:
        how = "a ComfyUI SDXL preset matched"
    else:
        how = "UNet config read by comfy.model_detection.detect_unet_config, SDXL class chosen explicitly"
    config = comfy.supported_models.SDXL(comfy.model_detection.detect_unet_config(unet, ""))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(unet, "")
    model.load_model_weights(unet, "")
    device = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    comps.vae = None
    return ComfyCase("sdxl", comps, patcher, None, _detected("sdxl", patcher, how))


def _sd3(seed: int) -> ComfyCase:
    import comfy.sd

    from trainer.families import get_family
    from tiny_flow import build_tiny_flow_model

    family = get_family("sd3")
    with tempfile.TemporaryDirectory(prefix="crucible-sd3-") as tmp:
        comps = family.load(build_tiny_flow_model(tmp, "sd3", seed=seed).folder_config())
    state = _cloned(family.full_export_state_dict(comps))
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options=_fp32())
    if model is None:
        raise AssertionError("comfy.sd.load_diffusion_model_state_dict did not recognise the tiny SD3")
    comps.vae = None
    return ComfyCase("sd3", comps, model, None,
                     _detected("sd3", model, "diffusers transformer -> load_diffusion_model_state_dict: SD3"))


def comfy_flux_transformer(seed: int = 0):
    """The smallest Flux dev transformer ComfyUI 0.8.0 detects (see the module doc), random, float32, eval."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=64,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return model.eval()


def _flux(seed: int) -> ComfyCase:
    import comfy.sd

    from trainer.families import get_family
    from trainer.families.base import Components

    transformer = comfy_flux_transformer(seed)
    comps = Components(denoiser=transformer, vae=None, text_encoders=[], tokenizers=[], noise_scheduler=None,
                       denoiser_name="transformer", text_encoder_names=(), extras={"family": "flux"})
    state = get_family("flux").full_export_state_dict(comps)
    model = comfy.sd.load_diffusion_model_state_dict(_cloned(state), model_options=_fp32())
    del state
    if model is None:
        raise AssertionError("comfy.sd.load_diffusion_model_state_dict did not recognise the 3072-wide Flux")
    return ComfyCase("flux", comps, model, None,
                     _detected("flux", model, "diffusers transformer -> load_diffusion_model_state_dict: Flux"))
