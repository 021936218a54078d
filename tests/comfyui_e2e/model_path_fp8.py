"""fp8 weights through the MODEL path in ComfyUI's own process (a subprocess of ``checks_model_path_fp8.py``).

Case ``fp8``: the tiny SD3 file that ``model_path_files.py`` wrote, loaded as *Load Diffusion Model* with
``weight_dtype`` ``fp8_e4m3fn`` loads it (``comfy.sd.load_diffusion_model`` with ``dtype=float8_e4m3fn``, under
``torch.inference_mode()`` as the server runs nodes), with ComfyUI's CLIP-L (``sd3`` type) and VAE from the same
folder; the library's loop trains a LoRA through ComfyModelFamily for 4 steps on 4 demo images (too few for a
trend; the server check shows the loss falling): every loss is finite, every ``lora_up`` of the saved LoRA is
non-zero, and the MODEL's Linear weights are float8 and byte-identical after the run (the run did not upcast it).

Case ``scaled``: the same weights as a ComfyUI *scaled fp8* file in ComfyUI's key layout (``scaled_fp8_files.py``),
loaded as *Load Diffusion Model* loads it (``weight_dtype`` default): ComfyUI's mixed-precision ops, each Linear
weight a ``QuantizedTensor`` (fp8 data + scale).
* the file, its checkpoint layout (``model.diffusion_model.`` prefix) and what ComfyUI's own save path writes of
  the loaded model (``comfy.sd.save_checkpoint``: ``.comfy_quant`` + ``.weight_scale``) each load as quantized ops,
  and ComfyUI's forward is finite and within fp8 error of the fp32 file's (relative error < :data:`FP8_LEVEL`);
* on ComfyUI's fp8-compute path (what it takes on a GPU with fp8 matmuls; its eager kernels run it on the CPU) a
  forward gives no input gradient, so the run's layers (``nodes/comfy_weights.py``) take the dequantizing path:
  the input gradient then equals the full-precision path's;
* the run trains as in case ``fp8``, the weights stay quantized and byte-identical, every layer has its own
  class and setting back; ComfyUI's stock loader (``comfy.sd.load_lora_for_models``) patches one weight per
  trained module of the scaled MODEL with no ``lora key not loaded``, and the render changes
  (``model_path_training.lora_checks``).
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

CASES = ("fp8", "scaled")
STEPS = 4
FP8_LEVEL = 5e-2  # relative error of a forward with per-tensor scaled e4m3 weights (3 mantissa bits)
DEMO = Path()  # the pack's demo data, set by main


def weight_storage(model) -> dict[str, str]:
    """How each 2-D ``.weight`` of the diffusion model is stored: its dtype, or ``QuantizedTensor <fp8 dtype>``."""
    out = {}
    for name, module in model.model.diffusion_model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and len(weight.shape) == 2:
            data = getattr(weight, "_qdata", None)
            out[name] = f"QuantizedTensor {data.dtype}" if data is not None else str(weight.dtype)
    return out


def load_objects(models: Path, case: str):
    import torch

    import comfy.sd
    import comfy.utils
    from model_path_files import SD3_FILES
    from scaled_fp8_files import write_scaled_file

    paths = {role: models / sub / name for role, (sub, name) in SD3_FILES.items()}
    with torch.inference_mode():  # the server runs its loader nodes so
        if case == "fp8":
            model = comfy.sd.load_diffusion_model(str(paths["unet"]), model_options={"dtype": torch.float8_e4m3fn})
        else:
            model = comfy.sd.load_diffusion_model(str(write_scaled_file(paths["unet"])))
        clip = comfy.sd.load_clip(ckpt_paths=[str(paths["clip"])], clip_type=comfy.sd.CLIPType.SD3)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(paths["vae"])))
    return model, clip, vae


def probe():
    """One fixed input of the tiny SD3: (x, σ, conditioning)."""
    import torch

    g = torch.Generator().manual_seed(5)
    return (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6]),
            {"c_crossattn": torch.randn(1, 8, 4096, generator=g), "y": torch.randn(1, 2048, generator=g)})


def forward(model, x=None):
    x0, sigma, conds = probe()
    return model.model.apply_model(x0 if x is None else x, sigma, **conds)


def relative(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check_layouts(models: Path, tmp: Path) -> None:
    """Each scaled layout loads as ComfyUI's quantized ops; its forward is finite and near the fp32 file's."""
    import torch
    from safetensors.torch import load_file, save_file

    import comfy.sd
    from model_path_files import SD3_FILES
    from scaled_fp8_files import CHECKPOINT_PREFIX, SCALED_NAME

    fp32_file = models / SD3_FILES["unet"][0] / SD3_FILES["unet"][1]
    with torch.no_grad():
        reference = forward(comfy.sd.load_diffusion_model(str(fp32_file)))
        scaled = comfy.sd.load_diffusion_model(str(fp32_file.with_name(SCALED_NAME)))
        saved = tmp / "comfyui_saved.safetensors"
        # what ComfyUI's save path holds of it (``state_dict_for_saving``); 0.8.0's own save_checkpoint hands the
        # QuantizedTensor to safetensors, which fails ("Bad address"), so its fp8 data is written here
        state = {k: getattr(v, "_qdata", v).contiguous() for k, v in scaled.model.state_dict_for_saving().items()}
        save_file(state, str(saved))
        layouts = {
            "diffusion-model file (.scale_weight + scaled_fp8)": lambda: scaled,
            "checkpoint layout (model.diffusion_model. prefix)": lambda: comfy.sd.load_diffusion_model_state_dict(
                {CHECKPOINT_PREFIX + k: v for k, v in load_file(str(fp32_file.with_name(SCALED_NAME))).items()}),
            "ComfyUI's save layout (.comfy_quant + .weight_scale)": lambda: comfy.sd.load_diffusion_model(str(saved)),
        }
        saved_keys = load_file(str(saved)).keys()
        for label, load in layouts.items():
            model = load()
            storage = weight_storage(model)
            quantized = sum(v.startswith("QuantizedTensor") and "float8" in v for v in storage.values())
            out = forward(model)
            error = relative(out, reference)
            ok = quantized == len(storage) > 0 and bool(torch.isfinite(out).all()) and error < FP8_LEVEL
            extra = (f"; {sum(k.endswith('.comfy_quant') for k in saved_keys)} .comfy_quant keys"
                     if "save layout" in label else "")
            report("pass" if ok else "fail", f"scaled fp8 {label}: quantized ops, forward within fp8 error of fp32",
                   f"{quantized} of {len(storage)} Linear weights QuantizedTensor fp8; relative error {error:.2e} "
                   f"(limit {FP8_LEVEL:g}){extra}")


def check_fp8_compute_gradient(module, model) -> None:
    """ComfyUI's fp8-compute path cuts the input gradient; the run's view takes the dequantizing path."""
    import torch

    views = sys.modules[module.__name__.rsplit(".", 1)[0] + ".comfy_weights"]
    layers = [m for m in model.model.diffusion_model.modules() if getattr(m, "layout_type", None)]

    def input_grad():
        x = probe()[0].clone().requires_grad_(True)
        try:
            forward(model, x).square().sum().backward()
        except RuntimeError:  # nothing in the graph needs a gradient
            return None
        return x.grad

    with torch.inference_mode(False):
        views.usable_by_autograd(model.model.diffusion_model)  # as the run's load does (inference-mode loader)
    reference = input_grad()  # the CPU's full-precision path (no fp8 compute here)
    saved = [vars(m).get("_full_precision_mm") for m in layers]
    for m in layers:
        m._full_precision_mm = False  # as ComfyUI sets it where the device computes in fp8
    try:
        raw = input_grad()
        view = views.QuantizedLinearViews(model.model.diffusion_model)
        try:
            viewed = input_grad()
        finally:
            view.undo()
        restored = all(vars(m).get("_full_precision_mm") is False for m in layers)
    finally:
        for m, value in zip(layers, saved):
            m._full_precision_mm = value
    lost = raw is None or relative(raw, reference) > 1e-3
    same = viewed is not None and reference is not None and relative(viewed, reference) < 1e-6
    report("pass" if lost and same and restored and len(view) == 0 else "fail",
           "scaled fp8: on ComfyUI's fp8-compute path the run's layers dequantize, so gradients flow",
           f"{len(layers)} quantized layers; fp8-compute input gradient: "
           f"{'none' if raw is None else f'off by {relative(raw, reference):.2e}'}; with the run's view: "
           f"{'none' if viewed is None else f'{relative(viewed, reference):.1e} from full precision'}; "
           f"setting restored: {restored}")


def train_case(pack, module, objects, out: Path, label: str):
    """STEPS steps through ComfyModelFamily and the library's loop; the checks of the module doc. Returns the
    final LoRA's path."""
    import math

    import torch
    from safetensors.torch import load_file

    from model_path_text_encoders import small_dataset
    from model_path_training import CaseSettings, run_config, weight_digests

    model, clip, vae = objects
    before, digests = weight_storage(model), weight_digests(model.model.diffusion_model)
    classes = {n: type(m) for n, m in model.model.diffusion_model.named_modules()}
    fp8 = [k for k, v in before.items() if "float8" in v]
    report("pass" if fp8 else "fail", f"{label}: ComfyUI stores the Linear weights in float8",
           f"{len(fp8)} of {len(before)} 2-D weights float8 ({sorted(set(before.values()))})")
    started = time.perf_counter()
    family = module.ComfyModelFamily(model, clip, vae)
    try:
        with pack.families.hosted_family(family):
            config = run_config(pack, CaseSettings(2, 1e-2, 5.0), small_dataset(out), out, "fp8")
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
    after = weight_storage(model)
    changed = [k for k, v in weight_digests(model.model.diffusion_model).items() if digests.get(k) != v]
    recast = [n for n, m in model.model.diffusion_model.named_modules() if classes.get(n) is not type(m)]
    report("pass" if after == before and not changed and not recast else "fail",
           f"{label}: the MODEL is still float8, byte-identical and of ComfyUI's own classes after the run",
           f"{sum('float8' in v for v in after.values())} of {len(after)} float8; {len(changed)} tensors changed "
           f"{changed[:3]}; {len(recast)} modules of another class {recast[:3]}")
    return final[-1] if final else None


def check_lora_loads(path, objects, label: str, base_image) -> None:
    from model_path_training import lora_checks

    if path is None:
        report("fail", f"{label}: LoRA saved", "no LoRA")
        return
    problems = lora_checks(path, *objects, 5.0, base_image)
    ok = len(problems) == 1 and problems[0][0].isdigit()
    report("pass" if ok else "fail", f"{label}: ComfyUI's stock loader patches every trained module; the render "
           "changes", "\n".join(problems))


def run_case(pack, module, models: Path, case: str, tmp: Path) -> None:
    from model_path_training import render

    label = f"sd3 {case} MODEL path"
    objects = load_objects(models, case)
    if case == "fp8":
        train_case(pack, module, objects, tmp, label)
        return
    check_layouts(models, tmp)
    check_fp8_compute_gradient(module, objects[0])
    base_image = render(*objects, 5.0)
    check_lora_loads(train_case(pack, module, objects, tmp, label), objects, label, base_image)


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
    wanted = {n for n in args.only.split(",") if n} or set(CASES)
    for case in CASES:
        if case not in wanted:
            continue
        try:
            with tempfile.TemporaryDirectory(prefix=f"crucible-mp-{case}-") as tmp:
                run_case(pack, module, models, case, Path(tmp))
        except Exception:  # noqa: BLE001 - report and go on
            report("fail", f"sd3 {case} MODEL path", traceback.format_exc()[-3000:])


if __name__ == "__main__":
    main()
