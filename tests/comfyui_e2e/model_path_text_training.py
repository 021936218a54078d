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
* a run cancelled after step ``SAVE_EVERY`` and resumed equals the uninterrupted run (LoRA tensors and losses);
* ``unload`` (:func:`check_unload`): ComfyUI's model management unloads / partly unloads the trained CLIP mid-run (what
  an 8-12 GB GPU does when the VAE or the MODEL loads), on a CLIP with an upstream LoRA (stock *LoraLoader*,
  strength_clip ≠ 0): the run goes on with the undisturbed run's losses and LoRA, every exported key loads, and
  after the run, a Cancel and an error the CLIP holds its patches and nothing of the training (weights
  byte-identical to the file's once ComfyUI unloads it).
``--only train,unload`` picks parts.
"""
from __future__ import annotations

import importlib
import math
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: the model fixtures
from comfy_python import LogCapture, report, setup_comfy  # noqa: E402
from model_path_training import (CaseSettings, cancel_resume_problems, comfy_vae, hosted_run,  # noqa: E402
                                 pack_modules, run_config, stop_after, weight_digests)

STEPS, SAVE_EVERY, BATCH = 10, 5, 2
CLIP_LAYERS = 2  # of CLIP-L's 12 (hidden size stays 768: the UNet's cross-attention width)
CLIP_MODULES = 6  # q/k/v/out_proj + fc1/fc2 (target preset all_linear)
LEARNING_RATE, TEXT_ENCODER_LR = 1e-2, 1e-3
LOG_FORBIDS = ("lora key not loaded", "NOT LOADED")
LABEL = "SD1.5 MODEL path text encoder"
UNLOAD_STEPS, CLIP_STRENGTH, SAME = 3, 0.8, 1e-5
UPSTREAM_LORA = "crucible_ci_clip_upstream.safetensors"
PROMPT = "crucible, a red circle"
SETTINGS = CaseSettings(BATCH, LEARNING_RATE, 1.0, network={"train_text_encoder": True},
                        optim={"text_encoder_lr": TEXT_ENCODER_LR}, steps=STEPS, save_every=SAVE_EVERY,
                        training={"cache_text_embeddings": False,  # a trained text encoder's outputs change every step
                                  "validation_split": 0.0})  # the held-out loss costs a dozen seconds at every save
# the unload check: per-step VAE encodes (no latent cache) disturb the CLIP; a preview after step 2
UNLOAD_SETTINGS = replace(SETTINGS, batch=1, steps=UNLOAD_STEPS, training={**SETTINGS.training, "cache_latents": False})


def case_objects():
    """(ComfyUI MODEL, ComfyUI CLIP with CLIP_LAYERS layers, ComfyUI VAE)."""
    import comfy.sd
    import torch

    from comfy_sd15 import comfy_sd15_components
    from trainer.families.single_file import diffusers_to_single_file

    state = diffusers_to_single_file(comfy_sd15_components(0), "sd15")
    te_options = {"dtype": torch.float32, "clip_l_model_config": {"num_hidden_layers": CLIP_LAYERS}}
    model, clip, _vae, _ = comfy.sd.load_state_dict_guess_config(
        state, output_vae=False, output_clip=True, model_options={"dtype": torch.float32}, te_model_options=te_options)
    return model, clip, comfy_vae(4)


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


def train(args, pack, module, out: Path, objects) -> None:
    started = time.perf_counter()
    model, clip, vae = objects
    demo = Path(args.pack_dir) / "trainer" / "demo_data"
    before = {"MODEL": weight_digests(model.model.diffusion_model), "CLIP": weight_digests(clip.cond_stage_model)}

    def run(run_name: str, callbacks=None, resume_from=None):
        return hosted_run(pack, module.ComfyModelFamily(model, clip, vae, train_text_encoder=True),
                          lambda: run_config(pack, SETTINGS, demo, out, run_name), callbacks, resume_from)

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
    problems, ours = cancel_resume_problems(pack, run, "te_parts", result, SAVE_EVERY)
    te_keys = sum(k.startswith("lora_te_") for k in ours)
    problems += [] if te_keys else ["no lora_te_ tensor to compare"]
    report("fail" if problems else "pass", f"{LABEL}: Cancel after step {SAVE_EVERY} → resume equals the whole run",
           "\n".join(problems) or f"{len(ours)} tensors ({te_keys} lora_te_) and {STEPS} losses equal "
                                  f"({time.perf_counter() - started:.0f}s)")


def write_clip_lora(clip, folder: Path) -> int:
    """A small random LoRA on the CLIP's first layer in kohya ``lora_te_`` keys (as civitai files name them), which
    the run trains too: the number of modules it patches."""
    import torch
    from safetensors.torch import save_file

    import comfy.lora

    state = clip.cond_stage_model.state_dict()
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    keys = sorted(k for k, w in key_map.items() if k.startswith("lora_te_text_model_encoder_layers_0_") and w in state)
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for key in keys:
        out_features, in_features = state[key_map[key]].shape
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, in_features, generator=generator) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, 4, generator=generator) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(folder / UPSTREAM_LORA))
    return len(keys)


def encode(clip):
    """ComfyUI's own encode of :data:`PROMPT` (it loads, and re-patches, the CLIP itself)."""
    import torch

    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(PROMPT), return_dict=True)["cond"].float()


def relative(a, b) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


def clip_problems(upstream_mod, clip, state, reference, label: str) -> list[str]:
    """The user's CLIP after a run: the same patch objects, no adapter layer or hook left, ComfyUI's encode as before."""
    problems = [] if upstream_mod.patch_state(clip.patcher) == state else [f"{label}: the CLIP's patches changed"]
    modules = list(clip.cond_stage_model.named_modules())
    left = [n for n, _ in modules if n.endswith(("lora_A", "base_layer", "hada_w1_a", "lokr_w1"))]
    hooked = [n for n, m in modules if m._forward_hooks or m._forward_pre_hooks]
    problems += [f"{label}: adapter layers left in the CLIP: {left[:3]}"] if left else []
    problems += [f"{label}: forward hooks left on {hooked[:3]}"] if hooked else []
    error = relative(encode(clip), reference)
    return problems + ([f"{label}: ComfyUI's encode of the CLIP moved by {error:.1e}"] if error > SAME else [])


def check_unload(pack, module, objects, data: Path, out: Path) -> None:
    """ComfyUI unloads / partly unloads the trained CLIP mid-run (see the module doc). The CLIP carries an upstream
    LoRA (stock LoraLoader, strength_clip CLIP_STRENGTH); per-step VAE encodes (no latent cache) disturb it: before
    the 2nd encode part of the CLIP is unloaded (``LoadedModel.model_unload(memory_to_free)``, as ``free_memory``
    asks: ComfyUI's partial, low-VRAM unload), before the 3rd every model is unloaded, and the preview after step 2
    unloads every model before its decode. Then a Cancel after step 2 and an error raised inside the 2nd (disturbed)
    VAE encode."""
    import torch
    from safetensors.torch import load_file

    import comfy.model_management as mm
    import folder_paths
    import nodes

    from model_path_equivalence import PACK_ALIAS

    started = time.perf_counter()
    upstream_mod = importlib.import_module(f"{PACK_ALIAS}.nodes.comfy_upstream")
    model, base_clip, vae = objects
    mm.unload_all_models()
    loaded = weight_digests(base_clip.cond_stage_model)
    folder_paths.add_model_folder_path("loras", str(out))
    patched = write_clip_lora(base_clip, out)
    with torch.inference_mode():  # as ComfyUI runs a node
        _, clip = nodes.LoraLoader().load_lora(model, base_clip, UPSTREAM_LORA, 0.0, CLIP_STRENGTH)
    reference = encode(clip)
    effect = relative(reference, encode(base_clip))
    state = upstream_mod.patch_state(clip.patcher)
    events: list[str] = []
    vae_encode, vae_decode = vae.encode, vae.decode

    def disturbing_encode(pixels):
        encodes = sum(1 for e in events if e.startswith("encode"))
        events.append(f"encode {encodes + 1}")
        if encodes + 1 == 2:  # the CLIP is loaded from step 1: free part of it (ComfyUI's partial unload)
            held = next(m for m in mm.current_loaded_models if m.model is clip.patcher)
            size = held.model.loaded_size()  # the smallest modules go first: an eighth is the layers, not the embedding
            held.model_unload(memory_to_free=size // 8)  # free_memory's call (on the CPU its share would vary)
            events.append(f"CLIP partly unloaded: {size} -> {held.model.loaded_size()} bytes loaded")
            if "error" in events:
                raise RuntimeError("an error inside ComfyUI's VAE encode")
        elif encodes + 1 == 3:
            mm.unload_all_models()
            events.append("unload_all_models")
        return vae_encode(pixels)

    def disturbing_decode(samples):
        events.append("preview decode after unload_all_models")
        mm.unload_all_models()
        return vae_decode(samples)

    def run(label: str, disturbed: bool, callbacks=None):
        events.clear()
        events.extend(["error"] if label == "error" else [])
        mm.unload_all_models()
        if disturbed:
            vae.encode, vae.decode = disturbing_encode, disturbing_decode
        def config_of():
            config = run_config(pack, UNLOAD_SETTINGS, data, out, f"unload_{label}")
            return replace(config, sample=replace(config.sample, prompts=(PROMPT,), steps=1, cfg=1.0, width=64,
                                                  height=64, sample_every_n_steps=2))
        try:
            return hosted_run(pack, module.ComfyModelFamily(model, clip, vae, train_text_encoder=True), config_of,
                              callbacks)
        finally:
            vae.encode, vae.decode = vae_encode, vae_decode

    quiet = run("undisturbed", False)
    moved = run("unloaded", True)
    moved_events = list(events)
    quiet_lora = load_file(str(sorted(quiet.run_dir.glob("*.safetensors"))[-1]))
    final = sorted(moved.run_dir.glob("*.safetensors"))[-1]
    moved_lora = load_file(str(final))
    problems = [] if len(moved.losses) == UNLOAD_STEPS and torch.allclose(
        torch.tensor(moved.losses), torch.tensor(quiet.losses), rtol=SAME, atol=0) else \
        [f"losses {moved.losses} != undisturbed {quiet.losses}"]
    diff = [k for k in quiet_lora if k not in moved_lora or not torch.allclose(moved_lora[k], quiet_lora[k], rtol=1e-4,
                                                                                atol=1e-7)]
    te = sum(k.startswith("lora_te_") for k in moved_lora)
    problems += [f"{len(diff)} LoRA tensors differ: {diff[:3]}"] if diff or moved_lora.keys() != quiet_lora.keys() else []
    problems += [] if te else ["no lora_te_ tensor in the LoRA"]
    problems += [f"the upstream CLIP LoRA changes ComfyUI's encode by only {effect:.1e}"] if effect < 1e-3 else []
    problems += key_checks(final, model, base_clip)
    problems += clip_problems(upstream_mod, clip, state, reference, "after the run")
    report("fail" if problems else "pass", f"{LABEL}: ComfyUI unloads / partly unloads the trained CLIP mid-run (upstream "
           "CLIP LoRA): the undisturbed run's losses and LoRA, every key loads, the CLIP as before",
           "\n".join(problems) or f"losses {[round(x, 5) for x in moved.losses]}; {len(moved_lora)} LoRA tensors "
           f"({te} lora_te_) equal; upstream LoRA on {patched} CLIP modules (effect {effect:.2f}); events {moved_events} "
           f"({time.perf_counter() - started:.0f}s)")

    problems = []
    cancelled = run("cancel", True, stop_after(pack, 2))
    problems += [] if cancelled.cancelled else ["the Cancel run was not cancelled"]
    problems += clip_problems(upstream_mod, clip, state, reference, "after Cancel")
    try:
        run("error", True)
        problems.append("the error inside the VAE encode did not reach the caller")
    except RuntimeError as exc:
        if "inside ComfyUI's VAE encode" not in str(exc):
            raise
    problems += clip_problems(upstream_mod, clip, state, reference, "after an error")
    mm.unload_all_models()  # ComfyUI takes the upstream LoRA back out: the file's weights again
    changed = [k for k, v in weight_digests(base_clip.cond_stage_model).items() if loaded.get(k) != v]
    problems += [f"{len(changed)} CLIP weights differ from the file's once unloaded: {changed[:3]}"] if changed else []
    report("fail" if problems else "pass", f"{LABEL}: after the disturbed run, a Cancel and an error the CLIP keeps "
           "its upstream LoRA and nothing of training (weights byte-identical once unloaded)",
           "\n".join(problems) or f"{len(loaded)} CLIP weights bit-identical; {len(state['patches'])} upstream patches "
           f"as before ({time.perf_counter() - started:.0f}s in all)")


def main() -> None:
    args = setup_comfy()
    module, pack = pack_modules(args.pack_dir)
    wanted = {n for n in args.only.split(",") if n} or {"train", "unload"}
    with tempfile.TemporaryDirectory(prefix="crucible-mp-te-") as tmp:
        objects = case_objects()
        demo = Path(args.pack_dir) / "trainer" / "demo_data"
        parts = {"train": lambda: train(args, pack, module, Path(tmp), objects),
                 "unload": lambda: check_unload(pack, module, objects, demo, Path(tmp))}
        for name in (n for n in parts if n in wanted):
            try:
                parts[name]()
            except Exception:  # noqa: BLE001 - one failed result, with the traceback
                report("fail", f"{LABEL} {name}", traceback.format_exc()[-3000:])


if __name__ == "__main__":
    main()
