"""fp8 weights through the MODEL path in ComfyUI's own process (a subprocess of ``checks_model_path_fp8.py``).

The tiny SD3 file that ``model_path_files.py`` wrote is loaded as *Load Diffusion Model* with ``weight_dtype``
``fp8_e4m3fn`` loads it (``comfy.sd.load_diffusion_model`` with ``dtype=float8_e4m3fn``), with ComfyUI's CLIP-L
(``sd3`` type) and VAE from the same folder, and the library's loop trains a LoRA through ComfyModelFamily for
4 steps (too few for a trend; the server check shows the loss falling): every loss is finite, every ``lora_up`` of
the saved LoRA is non-zero, and the MODEL's Linear weights are float8 and byte-identical after the run (the run did
not upcast the user's MODEL).
Case ``scaled`` (not in the stage, see :data:`SCALED_NOTE`): the same weights written as a ComfyUI *scaled fp8* file (float8 weights + ``scale_weight`` per
layer + the ``scaled_fp8`` marker), which 0.8.0 turns into its ``comfy_quant`` layers on load.
"""
from __future__ import annotations

import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: the model fixtures
from comfy_python import report, setup_comfy  # noqa: E402

CASES = ("fp8", "scaled")  # the stage runs "fp8"; "scaled" only when named in --only (see SCALED_NOTE)
DEFAULT_CASES = ("fp8",)
SCALED_NOTE = ("scaled fp8 not verified: ComfyUI 0.8.0's own forward (no Crucible) of the scaled file this test "
               "writes is NaN on the CPU (its Linear layers load as plain fp32, the scales unapplied); "
               "model_path_fp8.py --only scaled reproduces it")
STEPS = 4
DEMO = Path()  # the pack's demo data, set by main


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


def train_case(pack, module, objects, out: Path, label: str) -> None:
    """STEPS steps through ComfyModelFamily and the library's loop; the checks of the module doc."""
    import math

    import torch
    from safetensors.torch import load_file

    from model_path_training import CaseSettings, run_config, weight_digests

    model, clip, vae = objects
    before, digests = float8_weights(model), weight_digests(model.model.diffusion_model)
    fp8 = [k for k, v in before.items() if "float8" in v]
    report("pass" if fp8 else "fail", f"{label}: ComfyUI stores the Linear weights in float8",
           f"{len(fp8)} of {len(before)} 2-D weights float8")
    started = time.perf_counter()
    family = module.ComfyModelFamily(model, clip, vae)
    try:
        with pack.families.hosted_family(family):
            config = run_config(pack, CaseSettings(2, 1e-2, 5.0), DEMO, out, "fp8")
            config = replace(config, training=replace(config.training, max_train_steps=STEPS),
                             save=replace(config.save, save_every_n_steps=0))
            result = pack.loop.train(config)
    finally:
        family.restore()
    final = sorted(result.run_dir.glob("*.safetensors"))
    lora = load_file(str(final[-1])) if final else {}
    ups = [v for k, v in lora.items() if k.endswith(".lora_up.weight")]
    moved = sum(bool(torch.any(v != 0)) for v in ups)
    ok = len(result.losses) == STEPS and all(math.isfinite(x) for x in result.losses) and ups and moved == len(ups)
    report("pass" if ok else "fail", f"{label}: {STEPS} steps train (finite loss, every LoRA up-weight moved)",
           f"losses {[round(x, 4) for x in result.losses]}; {moved} of {len(ups)} lora_up non-zero "
           f"({time.perf_counter() - started:.0f}s)")
    after = float8_weights(model)
    changed = [k for k, v in weight_digests(model.model.diffusion_model).items() if digests.get(k) != v]
    report("pass" if after == before and not changed else "fail",
           f"{label}: the MODEL is still float8 and byte-identical after the run",
           f"{sum('float8' in v for v in after.values())} of {len(after)} float8; {len(changed)} tensors changed "
           f"{changed[:3]}")


def main() -> None:
    import importlib

    args = setup_comfy()
    from model_path_equivalence import PACK_ALIAS, comfy_family_module

    global DEMO
    DEMO = Path(args.pack_dir) / "trainer" / "demo_data"
    module = comfy_family_module(args.pack_dir)
    pack = type("Pack", (), {name: importlib.import_module(f"{PACK_ALIAS}.trainer.{name}")
                             for name in ("config", "loop", "families")})
    models = Path(args.comfy_root) / "models"
    wanted = {n for n in args.only.split(",") if n} or set(DEFAULT_CASES)
    for case in CASES:
        if case not in wanted:
            continue
        label = f"sd3 {case} MODEL path"
        try:
            with tempfile.TemporaryDirectory(prefix=f"crucible-mp-{case}-") as tmp:
                train_case(pack, module, load_objects(models, case), Path(tmp), label)
        except Exception:  # noqa: BLE001 - report and go on
            report("fail", label, traceback.format_exc()[-3000:])


if __name__ == "__main__":
    main()
