"""ComfyUI *scaled fp8* files of the tiny SD3, written as the released ones are (a test fixture, ComfyUI's venv).

ComfyUI's scaled files (``flux1-dev-fp8-scaled``, ``t5xxl_fp8_e4m3fn_scaled``, SD3.5's ``…_fp8_scaled``) are in
ComfyUI's own key layout, never diffusers': each quantized Linear ``x.weight`` is float8_e4m3fn holding
``weight / scale``, beside it ``x.scale_weight`` (float32, one per tensor), and one marker tensor ``scaled_fp8``
(empty float8) at the model's prefix: no prefix in a diffusion-model-only file (*Load Diffusion Model*),
``model.diffusion_model.`` in a checkpoint. ComfyUI 0.8.0 (``comfy.utils.convert_old_quants``) turns that into its
current layout, which its own save path writes (``MixedPrecisionOps.Linear.state_dict``): ``x.weight_scale`` and a
``x.comfy_quant`` JSON tensor per layer. A file in diffusers names loses both on ComfyUI's diffusers→ComfyUI key
conversion (only weights and biases are mapped; q/k/v are fused by concatenation), so its layers load as plain
Linears holding ``weight / scale``: the NaN forward the stage used to report.
"""
from __future__ import annotations

from pathlib import Path

FP8_MAX = 448.0  # largest float8_e4m3fn
SCALED_NAME = "crucible_tiny_sd3_fp8_scaled.safetensors"  # beside the fp32 file in diffusion_models/
CHECKPOINT_PREFIX = "model.diffusion_model."


def scaled_fp8_state(state: dict, prefix: str = "") -> dict:
    """``state`` (ComfyUI's key layout) as a scaled-fp8 file: each 2-D ``.weight`` in float8_e4m3fn divided by its
    per-tensor scale (max |w| / 448) plus ``.scale_weight``; every other tensor as it is; the ``scaled_fp8`` marker.
    ``prefix``: ``""`` for a diffusion-model file, :data:`CHECKPOINT_PREFIX` for a checkpoint's layout."""
    import torch

    out = {}
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.detach().abs().amax().float().clamp(min=1e-12) / FP8_MAX
            out[prefix + key] = (tensor.detach().float() / scale).to(torch.float8_e4m3fn)
            out[prefix + key[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[prefix + key] = tensor.detach().clone()
    out[prefix + "scaled_fp8"] = torch.empty((0,), dtype=torch.float8_e4m3fn)
    return out


def comfy_layout(fp32_file: Path) -> dict:
    """The diffusion model's state dict in ComfyUI's key layout (ComfyUI loads the diffusers file and names it)."""
    import comfy.sd

    model = comfy.sd.load_diffusion_model(str(fp32_file))
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def write_scaled_file(fp32_file: Path) -> Path:
    """The scaled-fp8 diffusion-model file beside ``fp32_file`` (kept when present)."""
    from safetensors.torch import save_file

    target = fp32_file.with_name(SCALED_NAME)
    if not target.is_file():
        temp = target.with_suffix(".tmp")
        save_file(scaled_fp8_state(comfy_layout(fp32_file)), str(temp))
        temp.replace(target)
    return target
