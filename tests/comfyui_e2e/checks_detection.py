"""A full fine-tune's SD3 and Flux export is detected by ComfyUI's own *Load Diffusion Model* code.

Runs in the stage's ComfyUI venv (a subprocess, see ``comfy_python.py``): a tiny SD3 (SD3.5 layout: dual attention,
q/k norm; ``tests/tiny_flow.py``) and the smallest Flux dev ComfyUI detects (3072 wide, one double and one single
block; ``comfy_models.comfy_flux_transformer``) are exported with the family's ``full_export_state_dict`` (what
Crucible Train saves for a full fine-tune) and handed to ``comfy.sd.load_diffusion_model_state_dict``. Each must
come back as ComfyUI's ``SD3`` / ``Flux`` model config with no ``unet missing`` / ``unet unexpected`` warning, and
ComfyUI's weights must have the export's count and sum (ComfyUI renames, fuses and reorders tensors, which keeps
both; an uninitialised or dropped weight changes them).

A ComfyUI without the family (the 2024 tree has no SD3 or Flux) SKIPs it; on 0.8.0 that would be a FAIL.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: the model fixtures (tiny_flow, comfy_sd15)
from comfy_python import LogCapture, report, run_script, setup_comfy  # noqa: E402

CASES = {"sd3": "SD3", "flux": "Flux"}  # family -> ComfyUI's model config class (comfy.supported_models)
MUST_SUPPORT = {"0.8.0": set(CASES)}  # versions where a missing family is a failure, not a skip


async def run_checks(ctx) -> None:
    await run_script(ctx, Path(__file__), timeout=600)


def detect(family: str, config_name: str, comfy_version: str) -> None:
    import tempfile

    import comfy.sd
    import comfy.supported_models
    import torch

    from comfy_models import comfy_flux_transformer
    from trainer.families import get_family
    from trainer.families.base import Components
    from tiny_flow import build_tiny_flow_model

    name = f"{family} full export detected as {config_name}"
    if not hasattr(comfy.supported_models, config_name):
        status = "fail" if family in MUST_SUPPORT.get(comfy_version, ()) else "skip"
        report(status, name, f"this ComfyUI ({comfy_version}) has no comfy.supported_models.{config_name}")
        return
    fam = get_family(family)
    if family == "flux":  # ComfyUI's Flux detection fixes the width (24 heads of 128): no tiny Flux is detected
        comps = Components(denoiser=comfy_flux_transformer(), vae=None, text_encoders=[], tokenizers=[],
                           noise_scheduler=None, denoiser_name="transformer", text_encoder_names=())
    else:
        with tempfile.TemporaryDirectory(prefix=f"crucible-detect-{family}-") as tmp:
            comps = fam.load(build_tiny_flow_model(tmp, family).folder_config())
    state = fam.full_export_state_dict(comps)
    del comps
    with LogCapture() as warnings:
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(state), model_options={"dtype": torch.float32})
    if patcher is None:
        report("fail", name, "comfy.sd.load_diffusion_model_state_dict returned None (no model config matched)")
        return
    got = type(patcher.model.model_config).__name__
    problems = [] if got == config_name else [f"detected as {got}, not {config_name}"]
    problems += [f"ComfyUI warned: {m[:400]}" for m in warnings.messages if m.startswith(("unet missing",
                                                                                           "unet unexpected"))]
    # ComfyUI renames, fuses (q/k/v) and reorders (scale/shift) tensors, which keeps the count and the sum of the
    # weights: both equal means every exported weight landed somewhere and nothing stayed uninitialised.
    loaded = patcher.model.diffusion_model.state_dict()
    counts = sum(v.numel() for v in loaded.values()), sum(v.numel() for v in state.values())
    sums = (sum(float(v.double().sum()) for v in loaded.values()), sum(float(v.double().sum()) for v in state.values()))
    if counts[0] != counts[1]:
        problems.append(f"ComfyUI's model holds {counts[0]} weights, the export {counts[1]}")
    if abs(sums[0] - sums[1]) > 1e-6 * sum(float(v.double().abs().sum()) for v in state.values()):
        problems.append(f"the weights' sum differs: ComfyUI {sums[0]:.6g}, export {sums[1]:.6g}")
    report("fail" if problems else "pass", name, "\n".join(problems) or
           f"{len(state)} tensors, {counts[1]} weights, all loaded (count and sum equal)")


def main() -> None:
    args = setup_comfy()
    wanted = {n for n in args.only.split(",") if n} or set(CASES)
    for family, config_name in CASES.items():
        if family in wanted:
            try:
                detect(family, config_name, args.comfy_version)
            except Exception:  # noqa: BLE001 - one family crashing must not hide the other's result
                import traceback

                report("fail", f"{family} full export detected as {config_name}", traceback.format_exc()[-3000:])


if __name__ == "__main__":
    main()
