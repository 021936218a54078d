"""fp8 weights through the MODEL path in ComfyUI's own process (a subprocess of ``checks_model_path_fp8.py``).

The tiny SD3 file that ``model_path_files.py`` wrote is loaded as *Load Diffusion Model* with ``weight_dtype``
``fp8_e4m3fn`` loads it (``comfy.sd.load_diffusion_model`` with ``dtype=float8_e4m3fn``), with ComfyUI's CLIP-L
(``sd3`` type) and VAE from the same folder; ``model_path_training.train_family`` trains it through
ComfyModelFamily (12 steps: the loss falls, the MODEL is byte-identical after the run, ComfyUI's loader patches every
trained module and the render changes). On top: the MODEL's Linear weights are float8 before and after the run.
Case ``scaled``: the same weights written as a ComfyUI *scaled fp8* file (float8 weights + ``scale_weight`` per
layer + the ``scaled_fp8`` marker), which 0.8.0 turns into its ``comfy_quant`` layers on load.
"""
from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: the model fixtures
from comfy_python import report, setup_comfy  # noqa: E402

CASES = ("fp8", "scaled")


def float8_weights(model) -> dict[str, str]:
    """dtype by name of every 2-D ``.weight`` of the diffusion model (the Linear layers)."""
    return {k: str(v.dtype) for k, v in model.model.diffusion_model.state_dict().items()
            if k.endswith(".weight") and v.ndim == 2}


def scaled_fp8_state(path: Path) -> dict:
    """``path``'s weights as a ComfyUI scaled-fp8 file: each 2-D weight in float8 divided by its per-tensor scale."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(path))
    out = {}
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.abs().max().float().clamp(min=1e-12) / 448.0
            out[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            out[key[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = tensor
    out["scaled_fp8"] = torch.empty((), dtype=torch.float8_e4m3fn)
    return out


def load_objects(models: Path, case: str):
    import torch

    import comfy.sd
    import comfy.utils
    from model_path_files import SD3_FILES

    paths = {role: models / sub / name for role, (sub, name) in SD3_FILES.items()}
    if case == "fp8":
        model = comfy.sd.load_diffusion_model(str(paths["unet"]), model_options={"dtype": torch.float8_e4m3fn})
    else:
        model = comfy.sd.load_diffusion_model_state_dict(scaled_fp8_state(paths["unet"]))
    clip = comfy.sd.load_clip(ckpt_paths=[str(paths["clip"])], clip_type=comfy.sd.CLIPType.SD3)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(paths["vae"])))
    return model, clip, vae


def main() -> None:
    import importlib

    args = setup_comfy()
    from model_path_equivalence import PACK_ALIAS, comfy_family_module
    from model_path_training import CaseSettings, train_family

    module = comfy_family_module(args.pack_dir)
    pack = type("Pack", (), {name: importlib.import_module(f"{PACK_ALIAS}.trainer.{name}")
                             for name in ("config", "loop", "families")})
    pack.Callbacks = importlib.import_module(f"{PACK_ALIAS}.trainer").Callbacks
    models = Path(args.comfy_root) / "models"
    wanted = {n for n in args.only.split(",") if n} or set(CASES)
    for case in CASES:
        if case not in wanted:
            continue
        label = f"sd3 {case} MODEL path"
        try:
            objects = load_objects(models, case)
            before = float8_weights(objects[0])
            fp8 = [k for k, v in before.items() if "float8" in v]
            report("pass" if fp8 else "fail", f"{label}: ComfyUI stores the Linear weights in float8",
                   f"{len(fp8)} of {len(before)} 2-D weights float8")
            with tempfile.TemporaryDirectory(prefix=f"crucible-mp-{case}-") as tmp:
                train_family(args, pack, module, f"sd3_{case}", Path(tmp), objects=objects,
                             settings=CaseSettings(4, 1e-2, 5.0, resume=False))
            after = float8_weights(objects[0])
            report("pass" if after == before else "fail", f"{label}: the weights are still float8 after the run",
                   f"{sum('float8' in v for v in after.values())} of {len(after)} float8"
                   + ("" if after == before else f"; changed: {[k for k in before if after.get(k) != before[k]][:3]}"))
        except Exception:  # noqa: BLE001 - report and go on
            report("fail", label, traceback.format_exc()[-3000:])


if __name__ == "__main__":
    main()
