"""Patches applied upstream of Crucible Train's ``comfy_model`` (issue 18), on ComfyUI 0.8.0 itself, in-process.

On the tiny SD1.5 that ComfyUI detects (``model_path_run.comfy_sd15``, as Load Checkpoint returns it, loaded under
``torch.inference_mode`` as a node runs), a tiny LoRA file (ComfyUI's kohya keys: the first attention block's
projections and one 3×3 convolution, which the ``all_linear`` run does not train) goes through the stock
``LoraLoaderModelOnly`` at strength 0.8; then:

1. **Training sees the patched weights**: with the new adapter attached (still zero), ``apply_model`` of the training
   forward equals ComfyUI's own forward of the LoRA-patched MODEL, after a normal load and after a low-VRAM load
   (every layer patched per forward by ComfyUI's ``LowVramPatch``), and differs from the base MODEL's; a backward
   pass through it gives the adapter finite, non-zero gradients.
2. **A 4-step run** on that MODEL plus a ``set_model_unet_function_wrapper`` that raises if it is ever called (a
   sampling hook the training forward must not run): the loss is finite; run.json's ``base_patches`` and the LoRA's
   ``crucible_base_patches`` name the upstream LoRA (kind, strength, weight count) and the hook; the exported file
   holds exactly the trained modules (no key of the upstream-only convolution).
3. **The user's MODEL after the run, a Cancel and an error**: its patches, object patches and options are the same
   objects as before, no adapter layer is left, its forward equals the patched forward before the run, and once
   ComfyUI unloads it the base weights are bit-identical to the loaded file's.
4. **ModelSamplingDiscrete (v_prediction) upstream**: the family trains v on the patched σ table.
Only on ComfyUI 0.8.0. The script prints its time; ``--only forward,runs,sampling`` picks parts.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: comfy_sd15
from comfy_python import report, run_script, setup_comfy  # noqa: E402

STEPS = 4
STRENGTH = 0.8
LORA_NAME = "crucible_ci_upstream.safetensors"
SAME = 1e-5  # max relative difference of two forwards that must agree
PROMPT = "crucible, a red circle"


async def run_checks(ctx) -> None:
    if ctx.comfy_version != "0.8.0":
        ctx.results.skip("MODEL path upstream", f"runs on ComfyUI 0.8.0 only (this is {ctx.comfy_version})")
        return
    started = time.perf_counter()
    await run_script(ctx, Path(__file__), timeout=900)
    ctx.results.ok("MODEL path upstream: script time", f"{time.perf_counter() - started:.0f}s")


def write_upstream_lora(model, folder: Path) -> tuple[set[str], str]:
    """A tiny random LoRA in ComfyUI's kohya keys: (the patched weight names, the upstream-only conv's LoRA key)."""
    import torch
    from safetensors.torch import save_file

    import comfy.lora

    state = model.model.state_dict()
    kohya = {k: w for k, w in comfy.lora.model_lora_keys_unet(model.model, {}).items()
             if k.startswith("lora_unet_") and isinstance(w, str) and w in state}
    linear = sorted(k for k in kohya if "_transformer_blocks_0_attn" in k and k.endswith(("_to_q", "_to_v"))
                    and state[kohya[k]].ndim == 2)[:4]
    conv = next(k for k in sorted(kohya) if state[kohya[k]].ndim == 4 and state[kohya[k]].shape[-1] == 3)
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for key in linear + [conv]:
        weight = state[kohya[key]]
        out, rest = weight.shape[0], weight.shape[1:]
        down_shape = (4, *rest) if weight.ndim == 2 else (4, rest[0], *weight.shape[2:])
        tensors[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn((out, 4) + (1, 1) * (weight.ndim == 4), generator=generator) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(folder / LORA_NAME))
    return {kohya[k] for k in linear + [conv]}, conv


def small_dataset(folder: Path) -> Path:
    """Two of the demo images (one batch per step): the caches fill in a sixth of the time."""
    import shutil

    from model_path_run import DEMO_DATA

    (folder / "1_shapes").mkdir(parents=True)
    for image in sorted(DEMO_DATA.glob("*/*.png"))[:2]:
        for path in (image, image.with_suffix(".txt")):
            shutil.copy(path, folder / "1_shapes" / path.name)
    return folder


def probe(patcher, clip, grad: bool = False):
    """apply_model on one fixed input with the weights as they are now (load the patcher first); with ``grad``, the
    output keeps its graph (as the training forward runs)."""
    import torch

    base = patcher.model
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = base.model_sampling.sigma(torch.tensor([500.0]))
    with torch.no_grad():
        cond = clip.encode_from_tokens(clip.tokenize(PROMPT), return_dict=True)["cond"]
    with torch.enable_grad() if grad else torch.no_grad():
        return base.apply_model(x, sigma, c_crossattn=cond, transformer_options={}).float()


def relative(a, b) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


def digests(module) -> dict[str, str]:
    import hashlib

    import torch

    return {n: hashlib.blake2b(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
                               digest_size=16).hexdigest() for n, t in module.state_dict().items()}


def check_forward(comfy_family, upstream, clip, vae, reference, base_probe) -> None:
    """1: the training forward (adapter attached) equals ComfyUI's forward of the patched MODEL, normal + low VRAM."""
    import torch

    import comfy.model_management as mm

    from trainer.config import ModelConfig, NetworkConfig
    from trainer.network import attach_network

    network = NetworkConfig(network_type="lora", network_dim=4, network_alpha=4.0, target_preset="all_linear")
    for mode in ("normal", "low-VRAM"):
        mm.unload_all_models()
        family = comfy_family.ComfyModelFamily(upstream, clip, vae)
        load = mm.load_models_gpu
        if mode == "low-VRAM":  # ComfyUI's partial load: no layer fits, every patched layer gets a LowVramPatch
            mm.load_models_gpu = lambda models, **kw: [m.patch_model(torch.device("cpu"), lowvram_model_memory=1)
                                                       for m in models]
        try:
            comps = family.load(ModelConfig(family="comfy"))
            net = attach_network(family, comps, network)
            seen = probe(upstream, clip)
            lowvram = (bool(getattr(upstream.model, "model_lowvram", False)), upstream.lowvram_patch_counter())
            probe(upstream, clip, grad=True).square().mean().backward()  # the adapter trains through the patches
            grads = [p.grad for p in net.parameters()]
            grads_ok = all(g is not None and bool(torch.isfinite(g).all()) for g in grads) and \
                any(float(g.abs().max()) > 0 for g in grads)
        finally:
            mm.load_models_gpu = load
            family.restore()
            if mode == "low-VRAM":
                upstream.unpatch_model(torch.device("cpu"))
        error, effect = relative(seen, reference), relative(reference, base_probe)
        ok = error < SAME and effect > 1e-3 and grads_ok and (mode == "normal" or (lowvram[0] and lowvram[1] > 0))
        report("pass" if ok else "fail", f"{mode} load: training runs on the upstream LoRA's patched weights",
               f"rel. difference to ComfyUI's patched forward {error:.1e} (the LoRA's effect {effect:.2f}); "
               f"low-VRAM {lowvram[0]}, per-forward patches {lowvram[1]}; adapter gradients {grads_ok}")
    mm.unload_all_models()


def model_after(upstream_mod, patcher, clip, state, reference, label: str) -> list[str]:
    """3: the MODEL after a run: same patch objects, no adapter layer, the patched forward as before."""
    import comfy.model_management as mm

    problems = []
    if upstream_mod.patch_state(patcher) != state:
        problems.append("the MODEL's patches / object patches / options changed")
    left = [n for n, _ in patcher.model.diffusion_model.named_modules() if n.endswith(("lora_A", "base_layer"))]
    if left:
        problems.append(f"adapter layers left in the MODEL: {left[:3]}")
    mm.load_models_gpu([patcher])
    error = relative(probe(patcher, clip), reference)
    if error > SAME:
        problems.append(f"{label}: the MODEL's forward moved by {error:.1e} (relative)")
    return problems


def check_runs(comfy_family, upstream_mod, model, upstream, clip, vae, out: Path, reference, loaded, lora) -> None:
    """2 + 3: a run on the LoRA-patched MODEL with a hook that must not run; then Cancel and an error."""
    import torch
    from safetensors import safe_open

    import comfy.model_management as mm

    from model_path_run import model_path_config, train_model_path
    from trainer import Callbacks, hosted_family, train

    hooked = upstream.clone()

    def hook(apply_model, args):  # noqa: ARG001 - a sampling hook: the training forward must not call it
        raise RuntimeError("the UNet function wrapper ran inside training")

    hooked.set_model_unet_function_wrapper(hook)
    state = upstream_mod.patch_state(hooked)
    print(f"runs start {time.process_time():.1f}s CPU", flush=True)
    patched, conv_key = lora
    data = small_dataset(out / "data")
    result, family = train_model_path(comfy_family, hooked, clip, vae, out / "whole", steps=STEPS, data=data,
                                      batch_size=2)
    try:
        trained = {n for n, m in hooked.model.diffusion_model.named_modules() if hasattr(m, "lora_A")}
    finally:
        family.restore()
    record = json.loads((result.work_dir / "run.json").read_text(encoding="utf-8")).get("base_patches", {})
    final = [c for c in result.checkpoints if c.final][-1].path
    with safe_open(str(final), "pt") as fh:
        meta = json.loads(fh.metadata().get("crucible_base_patches", "{}"))
        prefixes = {k.split(".", 1)[0] for k in fh.keys()}
    names = family.key_styles["unet"].names
    expected = {names["diffusion_model." + n] for n in trained}
    wanted = {"patched_weights": len(patched),
              "weight_patches": [{"kind": "lora", "strength": STRENGTH, "strength_model": 1.0, "weights": len(patched)}],
              "not_in_training": ["model_function_wrapper"]}
    losses = result.losses
    problems = [] if len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses))) else [f"losses {losses}"]
    digest = record.pop("digest", None)
    problems += [] if record == wanted and digest else [f"run.json base_patches {record} != {wanted} (+ digest)"]
    problems += [] if meta == dict(wanted, digest=digest) else [f"LoRA crucible_base_patches {meta} != {wanted}"]
    report("fail" if problems else "pass", f"{STEPS}-step run on the LoRA-patched MODEL records what was upstream; "
           "the raising UNet wrapper never ran", "\n".join(problems) or f"losses {[round(x, 4) for x in losses]}; "
           f"base_patches {json.dumps(record)}")
    problems = [] if prefixes == expected else [f"exported {len(prefixes)} modules, trained {len(expected)}: "
                                                f"extra {sorted(prefixes - expected)[:3]}"]
    problems += [f"the upstream-only key {conv_key} was exported"] if conv_key in prefixes else []
    report("fail" if problems else "pass", "the exported LoRA holds only the newly trained adapter",
           "\n".join(problems) or f"{len(prefixes)} modules, none of the upstream-only conv's")

    problems = model_after(upstream_mod, hooked, clip, state, reference, "after the run")
    print(f"whole run done {time.process_time():.1f}s CPU", flush=True)

    class StopAt(Callbacks):
        def __init__(self, fail: bool):
            self.fail, self.seen = fail, 0

        def on_step(self, info):
            self.seen = info.step
            if self.fail and info.step >= 1:
                raise RuntimeError("an error in the middle of a run")

        def should_stop(self):
            return self.seen >= 1

    for label, fail in (("after Cancel", False), ("after an error", True)):
        family = comfy_family.ComfyModelFamily(hooked, clip, vae)
        try:  # as the Train node runs it: restore() in a finally
            with hosted_family(family):
                stopped = train(model_path_config(out / label.replace(" ", "_"), steps=STEPS, data=data, batch_size=1,
                                                  cache_latents=False, cache_text_embeddings=False), StopAt(fail))
            problems += [] if fail or stopped.cancelled else [f"{label}: the run was not cancelled"]
        except RuntimeError as exc:
            if not fail or "middle of a run" not in str(exc):
                raise
        else:
            problems += [f"{label}: the error did not reach the caller"] if fail else []
        finally:
            family.restore()
        problems += model_after(upstream_mod, hooked, clip, state, reference, label)
        print(f"{label} done {time.process_time():.1f}s CPU", flush=True)
    mm.unload_all_models()  # ComfyUI takes the LoRA back out: the file's weights again
    after = digests(model.model.diffusion_model)
    changed = [k for k, v in loaded.items() if after.get(k) != v]
    problems += [f"{len(changed)} base weights differ from the file's once unloaded: {changed[:3]}"] if changed else []
    report("fail" if problems else "pass", "the user's MODEL keeps its upstream LoRA and nothing of training "
           "(after the run, a Cancel and an error; base weights exact once unloaded)", "\n".join(problems) or
           f"{len(after)} base weights bit-identical; patches {len(hooked.patches)} as before")


def check_unload(comfy_family, upstream_mod, upstream, clip, vae, out: Path, reference) -> None:
    """5: ComfyUI's memory management mid-run (what an 8-12 GB GPU does when the VAE or CLIP loads): before the
    2nd step's VAE encode half of the MODEL is freed (``free_memory``: a partial, low-VRAM unload), the preview
    after step 2 and the 3rd step's encode unload every model (``unload_all_models``) before the VAE runs. The run goes on with the same losses and LoRA as an undisturbed run with the same preview (same
    seed), and the MODEL is as before afterwards."""
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file

    import comfy.model_management as mm

    from model_path_run import model_path_config
    from trainer import hosted_family, train

    state = upstream_mod.patch_state(upstream)
    data = small_dataset(out / "data_unload")

    def config(label: str):  # built while the family is registered ("comfy" is known only then)
        run = model_path_config(out / "unload", steps=3, data=data, batch_size=1, cache_latents=False,
                                cache_text_embeddings=False)
        return replace(run, save=replace(run.save, run_name=label), sample=replace(
            run.sample, prompts=(PROMPT,), steps=1, cfg=1.0, width=64, height=64, sample_every_n_steps=2))
    runs, events = {}, []
    encode, decode = vae.encode, vae.decode

    def disturbing_decode(samples):
        events.append("preview decode after unload_all_models")
        mm.unload_all_models()
        return decode(samples)

    def disturbing_encode(pixels):
        encodes = sum(1 for e in events if e.startswith("encode"))
        events.append(f"encode {encodes + 1}")
        if encodes + 1 == 2:  # the MODEL is loaded from step 1: free half of it (ComfyUI's partial unload)
            loaded = next(m for m in mm.current_loaded_models if m.model is upstream)
            size = loaded.model.loaded_size()
            mm.free_memory(mm.get_free_memory(mm.get_torch_device()) + size // 2, mm.get_torch_device())
            events.append(f"partial unload: {size} -> {loaded.model.loaded_size()} bytes loaded")
        elif encodes + 1 == 3:
            mm.unload_all_models()
            events.append("unload_all_models")
        return encode(pixels)

    for label in ("undisturbed", "unloaded"):
        mm.unload_all_models()
        if label == "unloaded":
            vae.encode, vae.decode = disturbing_encode, disturbing_decode
        family = comfy_family.ComfyModelFamily(upstream, clip, vae)
        try:  # an error here is the stage's failure (the traceback is reported)
            with hosted_family(family):
                result = train(config(label))
        finally:
            vae.encode, vae.decode = encode, decode
            family.restore()
        final = [c for c in result.checkpoints if c.final][-1].path
        runs[label] = (result.losses, load_file(str(final)))
    (quiet, quiet_lora), (moved, moved_lora) = runs["undisturbed"], runs["unloaded"]
    problems = [] if len(moved) == 3 and torch.allclose(torch.tensor(moved), torch.tensor(quiet), rtol=1e-5,
                                                         atol=0) else [f"losses {moved} != {quiet}"]
    diff = [k for k in quiet_lora if not torch.allclose(moved_lora.get(k, quiet_lora[k] + 1), quiet_lora[k],
                                                         rtol=1e-4, atol=1e-7)]
    problems += [f"{len(diff)} LoRA tensors differ: {diff[:3]}"] if diff or set(moved_lora) != set(quiet_lora) else []
    problems += model_after(upstream_mod, upstream, clip, state, reference, "after the disturbed run")
    mm.unload_all_models()
    report("fail" if problems else "pass", "ComfyUI unloads / partly unloads the MODEL mid-run (low VRAM): the run "
           "goes on with the undisturbed run's losses and LoRA, the MODEL is unchanged",
           "\n".join(problems) or f"losses {[round(x, 5) for x in moved]}; {len(moved_lora)} LoRA tensors equal; "
           f"events {events}")


def check_sampling(comfy_family, upstream, clip, vae) -> None:
    """4: ModelSamplingDiscrete(v_prediction) upstream: v on the patched σ table (the model's own is ε)."""
    import torch

    import comfy.model_management as mm
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    from trainer.config import ModelConfig

    mm.unload_all_models()
    (vmodel,) = ModelSamplingDiscrete().patch(upstream, "v_prediction", True)  # zsnr: a σ table unlike the model's
    family = comfy_family.ComfyModelFamily(vmodel, clip, vae)
    try:
        comps = family.load(ModelConfig(family="comfy"))
        sigmas = vmodel.get_model_object("model_sampling").sigmas.double()
        table = torch.allclose(comps.noise_scheduler.alphas_cumprod.double(), 1 / (1 + sigmas ** 2), rtol=1e-5)
    finally:
        family.restore()
        mm.unload_all_models()
    ok = family.default_prediction == "v_prediction" and table and \
        comps.noise_scheduler.config.prediction_type == "v_prediction"
    report("pass" if ok else "fail", "ModelSamplingDiscrete(v_prediction, zsnr) upstream: training predicts v on "
           "the patched σ table", f"prediction {family.default_prediction}, "
           f"scheduler {comps.noise_scheduler.config.prediction_type}, σ table equal {table}")


def main() -> None:
    import importlib
    import tempfile
    import traceback

    import torch

    started = time.perf_counter()
    args = setup_comfy()
    import folder_paths
    import nodes

    from model_path_run import PACKAGE, comfy_sd15, load_comfy_family

    comfy_family = load_comfy_family(args.pack_dir)
    upstream_mod = importlib.import_module(f"{PACKAGE}.nodes.comfy_upstream")
    with torch.inference_mode():
        model, clip, vae = comfy_sd15()
    loaded = digests(model.model.diffusion_model)
    base_probe = probe(model, clip)
    with tempfile.TemporaryDirectory(prefix="crucible-mp-upstream-") as tmp:
        folder_paths.add_model_folder_path("loras", tmp)
        lora = write_upstream_lora(model, Path(tmp))
        with torch.inference_mode():
            (upstream,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, LORA_NAME, STRENGTH)
        import comfy.model_management as mm

        mm.load_models_gpu([upstream])
        reference = probe(upstream, clip)  # ComfyUI's own forward of the LoRA-patched MODEL
        steps = {"forward": lambda: check_forward(comfy_family, upstream, clip, vae, reference, base_probe),
                 "runs": lambda: check_runs(comfy_family, upstream_mod, model, upstream, clip, vae, Path(tmp),
                                            reference, loaded, lora),
                 "sampling": lambda: check_sampling(comfy_family, upstream, clip, vae),
                 "unload": lambda: check_unload(comfy_family, upstream_mod, upstream, clip, vae, Path(tmp),
                                                reference)}
        wanted = {n for n in args.only.split(",") if n} or set(steps)
        for step in (steps[name] for name in steps if name in wanted):
            try:
                step()
            except Exception:  # noqa: BLE001 - report and go on
                report("fail", "MODEL path upstream", traceback.format_exc()[-3000:])
            print(f"model_path_upstream: {time.perf_counter() - started:.0f}s so far "
                  f"({time.process_time():.0f}s CPU)", flush=True)
    print(f"model_path_upstream: {time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
