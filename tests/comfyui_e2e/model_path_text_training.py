"""Text-encoder training on the MODEL path (issue 18) in ComfyUI's own process, at a size CI can afford: the server
check (``checks_model_path_text.py``) trains SD1.5 through *Load Checkpoint* with ComfyUI's full-size CLIP-L, a few
seconds per caption on a CPU, so it runs two steps; the loss trend and Cancel → resume are checked here.

Runs inside the ComfyUI venv (a subprocess of ``checks_model_path_text.py``). The MODEL and CLIP are ComfyUI's own
objects from ``comfy.sd.load_state_dict_guess_config`` on the tiny SD1.5 single file (``comfy_models``), with the
CLIP cut to ``CLIP_LAYERS`` layers through ComfyUI's own ``clip_l_model_config`` option (a real ``comfy.sd.CLIP``:
``SD1ClipModel`` → ``SDClipModel`` and ComfyUI's shipped tokenizer); the VAE is ComfyUI's ``comfy.sd.VAE``. The
pack's :class:`ComfyModelFamily` wraps them with ``train_text_encoder`` on, as Crucible Train does, and the
library's ``train`` runs ``STEPS`` steps, a LoRA every ``SAVE_EVERY``:

* the loss falls (mean of the last five steps below the first five);
* the LoRA holds ``lora_unet_…`` keys and a ``lora_te_…`` key for every trained CLIP module, each one ComfyUI's
  ``comfy.lora.model_lora_keys_clip`` maps; ``comfy.sd.load_lora_for_models`` patches one CLIP weight per trained
  CLIP module with no ``lora key not loaded``;
* the user's MODEL and CLIP weights are unchanged after the run (``restore``);
* a run cancelled after step ``SAVE_EVERY`` and resumed equals the uninterrupted run (LoRA tensors and losses).
"""
from __future__ import annotations

import importlib
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: the model fixtures
from comfy_python import LogCapture, report, setup_comfy  # noqa: E402

STEPS, SAVE_EVERY, BATCH = 10, 5, 2
CLIP_LAYERS = 2  # of CLIP-L's 12 (hidden size stays 768: the UNet's cross-attention width)
CLIP_MODULES = 6  # q/k/v/out_proj + fc1/fc2 (target preset all_linear)
LEARNING_RATE, TEXT_ENCODER_LR = 1e-2, 1e-3
LOG_FORBIDS = ("lora key not loaded", "NOT LOADED")
LABEL = "SD1.5 MODEL path text encoder"


def case_objects():
    """(ComfyUI MODEL, ComfyUI CLIP with CLIP_LAYERS layers, ComfyUI VAE)."""
    import comfy.sd
    import torch

    from comfy_sd15 import comfy_sd15_components
    from model_path_training import comfy_vae
    from trainer.families.single_file import diffusers_to_single_file

    state = diffusers_to_single_file(comfy_sd15_components(0), "sd15")
    te_options = {"dtype": torch.float32, "clip_l_model_config": {"num_hidden_layers": CLIP_LAYERS}}
    model, clip, _vae, _ = comfy.sd.load_state_dict_guess_config(
        state, output_vae=False, output_clip=True, model_options={"dtype": torch.float32}, te_model_options=te_options)
    return model, clip, comfy_vae(4)


def run_config(pack, demo: Path, out: Path, run_name: str):
    return pack.config.TrainConfig.from_dict({
        "model": {"family": "comfy", "path": ""},
        "datasets": [{"path": str(demo), "resolution": 64, "repeats": 1}],
        "network": {"network_type": "lora", "network_dim": 4, "network_alpha": 4, "target_preset": "all_linear",
                    "train_text_encoder": True},
        "optim": {"learning_rate": LEARNING_RATE, "text_encoder_lr": TEXT_ENCODER_LR, "lr_scheduler": "constant"},
        "training": {"batch_size": BATCH, "epochs": 100, "max_train_steps": STEPS, "seed": 7,
                     "mixed_precision": "no", "cache_latents": True, "cache_text_embeddings": False,
                     "validation_split": 0.0},  # the held-out loss costs a dozen seconds at every save
        "save": {"output_dir": str(out / "loras"), "work_dir": str(out / "runs"), "run_name": run_name,
                 "save_every_n_steps": SAVE_EVERY, "save_every_n_epochs": 0, "save_precision": "fp32"}})


def key_checks(path: Path, model, clip) -> list[str]:
    """Problems of the LoRA's keys against ComfyUI's own key map and loader (empty: all well)."""
    import comfy.lora
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    modules = {k.rsplit(".lora_down.weight", 1)[0] for k in lora if k.endswith(".lora_down.weight")}
    te = {m for m in modules if m.startswith("lora_te")}
    unet = {m for m in modules if m.startswith("lora_unet_")}
    clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    problems = [] if unet else ["no lora_unet_ key"]
    if len(te) != CLIP_LAYERS * CLIP_MODULES or not all(m.startswith("lora_te_text_model_encoder_layers_") for m in te):
        problems.append(f"{len(te)} lora_te_ modules (want {CLIP_LAYERS * CLIP_MODULES}): {sorted(te)[:3]}")
    problems += [f"ComfyUI's CLIP key map has no {m}" for m in sorted(te) if m not in clip_map][:5]
    problems += [f"neither a lora_unet_ nor a lora_te_ key: {m}" for m in sorted(modules - te - unet)][:5]
    with LogCapture() as log:
        patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    problems += log.matching(*LOG_FORBIDS)[:5]
    if len(patched_clip.patcher.patches) != len(te):
        problems.append(f"ComfyUI patched {len(patched_clip.patcher.patches)} CLIP weights for {len(te)} trained "
                        "CLIP modules")
    if len(patched_model.patches) != len(unet):
        problems.append(f"ComfyUI patched {len(patched_model.patches)} UNet weights for {len(unet)} trained modules")
    return problems


def train(args, pack, module, out: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from model_path_training import weight_digests

    started = time.perf_counter()
    model, clip, vae = case_objects()
    demo = Path(args.pack_dir) / "trainer" / "demo_data"
    before = {"MODEL": weight_digests(model.model.diffusion_model), "CLIP": weight_digests(clip.cond_stage_model)}

    def run(run_name: str, callbacks=None, resume_from=None):
        family = module.ComfyModelFamily(model, clip, vae, train_text_encoder=True)
        try:
            with pack.families.hosted_family(family):
                return pack.loop.train(run_config(pack, demo, out, run_name), callbacks, resume_from=resume_from)
        finally:
            family.restore()

    result = run("te_whole")
    losses = result.losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    ok = len(losses) == STEPS and all(math.isfinite(x) for x in losses) and last < first
    report("pass" if ok else "fail", f"{LABEL}: {STEPS} steps (batch {BATCH}, CLIP trains), the loss falls",
           f"mean of the first five steps {first:.4f} → the last five {last:.4f} ({time.perf_counter() - started:.0f}s)"
           + ("" if ok else f"; losses {[round(x, 4) for x in losses]}"))
    after = {"MODEL": weight_digests(model.model.diffusion_model), "CLIP": weight_digests(clip.cond_stage_model)}
    changed = [f"{part}.{k}" for part in before for k, v in before[part].items() if after[part].get(k) != v]
    report("fail" if changed else "pass", f"{LABEL}: the MODEL and CLIP are unchanged after the run",
           f"{len(changed)} weights changed: {changed[:3]}" if changed else
           f"{len(before['MODEL'])} UNet and {len(before['CLIP'])} CLIP weights as before")
    final = sorted(result.run_dir.glob("*.safetensors"))
    if not final:
        report("fail", f"{LABEL}: LoRA saved", f"no LoRA under {result.run_dir}")
        return
    problems = key_checks(final[-1], model, clip)
    report("fail" if problems else "pass",
           f"{LABEL}: lora_unet_ + lora_te_ keys, each in comfy.lora's key maps; ComfyUI's loader patches every one",
           "\n".join(problems) or f"{CLIP_LAYERS * CLIP_MODULES} CLIP modules")
    started = time.perf_counter()

    class StopAt(pack.Callbacks):
        seen = 0

        def on_step(self, info):
            self.seen = info.step

        def should_stop(self):
            return self.seen >= SAVE_EVERY

    first_part = run("te_parts", StopAt())
    resumed = run("te_parts", resume_from=first_part.state_dir)
    ours, theirs = load_file(str(final[-1])), load_file(str(sorted(resumed.run_dir.glob("*.safetensors"))[-1]))
    differ = [k for k in ours if k not in theirs or not torch.equal(ours[k], theirs[k])]
    te_keys = sum(k.startswith("lora_te_") for k in ours)
    problems = ([] if first_part.cancelled else ["the first part was not cancelled"]) + \
        ([] if te_keys else ["no lora_te_ tensor to compare"]) + \
        ([f"{len(differ)} of {len(ours)} LoRA tensors differ: {differ[:3]}"] if differ else []) + \
        ([f"losses differ: {resumed.losses} vs {losses}"] if resumed.losses != losses else [])
    report("fail" if problems else "pass", f"{LABEL}: Cancel after step {SAVE_EVERY} → resume equals the whole run",
           "\n".join(problems) or f"{len(ours)} tensors ({te_keys} lora_te_) and {STEPS} losses equal "
                                  f"({time.perf_counter() - started:.0f}s)")


def main() -> None:
    args = setup_comfy()
    from model_path_equivalence import PACK_ALIAS, comfy_family_module

    module = comfy_family_module(args.pack_dir)
    pack = type("Pack", (), {name: importlib.import_module(f"{PACK_ALIAS}.trainer.{name}")
                             for name in ("config", "loop", "families")})
    pack.Callbacks = importlib.import_module(f"{PACK_ALIAS}.trainer").Callbacks
    with tempfile.TemporaryDirectory(prefix="crucible-mp-te-") as tmp:
        try:
            train(args, pack, module, Path(tmp))
        except Exception:  # noqa: BLE001 - one failed result, with the traceback
            report("fail", f"{LABEL} training", traceback.format_exc()[-3000:])


if __name__ == "__main__":
    main()
