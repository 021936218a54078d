"""DoRA, LoHa and LoKr trained through the MODEL path (the graph's own MODEL / CLIP / VAE) on ComfyUI 0.8.0 itself.

On the tiny SD1.5 that ComfyUI detects (``tests/comfy_sd15.py``, loaded with its CLIP and VAE by
``comfy.sd.load_state_dict_guess_config`` as Load Checkpoint does), for each adapter type, in-process
(``model_path_run.py``; no server):
1. ``trainer.train`` runs 6 steps through ``ComfyModelFamily`` (``all_linear_conv``: attention, MLP, projections and
   convolutions) and writes the adapter file; the loss is finite.
2. ComfyUI reads the file as *LoraLoader* does (``load_torch_file`` + ``comfy.sd.load_lora_for_models``): no ``lora
   key not loaded`` / ``NOT LOADED`` line, and ComfyUI patches one weight per module in the file.
3. What ComfyUI applies is what was trained: ``apply_model`` of the MODEL with the trained adapter still in place
   against the same MODEL with the loaded file patched in (after ``restore()``), on one input, relative to the
   adapter's own effect: max |comfy − trained| / max |trained − base| < 1e-3.
4. The loaded file changes the render: the stock sampler (euler, 4 steps) + VAE decode with and without it differ
   (mean |Δ| over 0..255 above 0.5).
Only on ComfyUI 0.8.0 (the MODEL path targets today's ComfyUI).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: comfy_sd15
from comfy_python import LogCapture, report, run_script, setup_comfy  # noqa: E402

NETWORKS = ("dora", "loha", "lokr")
STEPS = 6
MAX_RELATIVE_ERROR = 1e-3
DIFFERENT_RENDER = 0.5  # mean |Δ| (0..255) above which two renders differ
PROMPT = "crucible, a red circle"


async def run_checks(ctx) -> None:
    if ctx.comfy_version != "0.8.0":
        ctx.results.skip("MODEL path adapters", f"runs on ComfyUI 0.8.0 only (this is {ctx.comfy_version})")
        return
    await run_script(ctx, Path(__file__), timeout=3600)  # ~8 min idle; 30 min ran out under load 20


def probe(model, clip):
    """apply_model's output on one fixed input (latent, σ at t=500, the prompt's conditioning)."""
    import torch

    base = model.model
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    sigma = base.model_sampling.sigma(torch.tensor([500.0]))
    with torch.no_grad():
        cond = clip.encode_from_tokens(clip.tokenize(PROMPT), return_dict=True)["cond"]
        return base.apply_model(x, sigma, c_crossattn=cond, transformer_options={}).float()


def render(model, clip, vae):
    """The stock sampler's image (euler, normal, 4 steps, cfg 1) of the prompt, as a 0..255 float array."""
    import torch

    import comfy.sample

    def conditioning(text):
        out = clip.encode_from_tokens(clip.tokenize(text), return_dict=True)
        return [[out.pop("cond"), out]]

    with torch.no_grad():
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, 11)
        samples = comfy.sample.sample(model, noise, 4, 1.0, "euler", "normal", conditioning(PROMPT),
                                      conditioning(""), latent, denoise=1.0, seed=11, disable_pbar=True)
        return vae.decode(samples)[0].float().clamp(0, 1) * 255.0


def module_prefixes(lora: dict) -> set[str]:
    """The LoRA key prefixes of a file (``lora_unet_x.hada_w1_a`` → ``lora_unet_x``)."""
    return {k.split(".", 1)[0] for k in lora}


def check_network(comfy_family, model, clip, vae, network: str, out: Path, base_probe, base_render) -> None:
    import torch

    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    from model_path_run import train_model_path

    result, family = train_model_path(comfy_family, model, clip, vae, out, network_type=network, steps=STEPS,
                                      preset="all_linear_conv", lr=3e-3)
    try:
        trained_probe = probe(model, clip)  # the trained adapter still in the MODEL
    finally:
        family.restore()
    losses = result.losses
    finals = [c for c in result.checkpoints if c.final]
    ok = len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses))) and finals
    report("pass" if ok else "fail", f"{network}: 6 steps through the MODEL path save an adapter file",
           f"losses {[round(x, 4) for x in losses]}, file {finals[-1].path.name if finals else None}")
    if not ok:
        return
    restored = probe(model, clip)
    if not torch.equal(restored, base_probe):
        report("fail", f"{network}: restore() leaves the MODEL as it came in",
               f"max |Δ| {float((restored - base_probe).abs().max()):.3g}")

    with LogCapture() as log:
        lora = comfy.utils.load_torch_file(str(finals[-1].path), safe_load=True)
        patched, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    problems = [f"ComfyUI: {m}" for m in log.matching("lora key not loaded", "NOT LOADED", "ERROR")][:10]
    prefixes = module_prefixes(lora)
    if len(patched.patches) != len(prefixes):
        problems.append(f"ComfyUI patched {len(patched.patches)} weights for the file's {len(prefixes)} modules")
    if not all(p.startswith("lora_unet_") for p in prefixes):
        problems.append(f"not all keys are ComfyUI's lora_unet_ keys: {sorted(prefixes)[:5]}")
    report("fail" if problems else "pass", f"{network}: the stock LoraLoader loads every key",
           "\n".join(problems) or f"{len(lora)} tensors, {len(prefixes)} modules, {len(patched.patches)} weights patched")

    mm.unload_all_models()
    mm.load_models_gpu([patched], force_full_load=True)
    try:
        comfy_probe = probe(patched, clip)
    finally:
        mm.unload_all_models()
    effect = float((trained_probe - base_probe).abs().max())
    error = float((comfy_probe - trained_probe).abs().max()) / max(effect, 1e-12)
    report("pass" if effect > 0 and error < MAX_RELATIVE_ERROR else "fail",
           f"{network}: ComfyUI applies what was trained (apply_model with the file = with the trained adapter)",
           f"max relative error {error:.2e} (adapter effect max {effect:.3g})")

    lora_render = render(patched, patched_clip, vae)
    difference = float((lora_render - base_render).abs().mean())
    report("pass" if difference > DIFFERENT_RENDER else "fail", f"{network}: the loaded adapter changes the render",
           f"mean |Δ| to the base render {difference:.2f} (0..255)")


def main() -> None:
    import tempfile
    import traceback

    import torch

    args = setup_comfy()
    from model_path_run import comfy_sd15, load_comfy_family

    comfy_family = load_comfy_family(args.pack_dir)
    with torch.inference_mode():  # as a ComfyUI node runs: the loaders' weights are inference tensors
        model, clip, vae = comfy_sd15()
    base_probe, base_render = probe(model, clip), render(model, clip, vae)
    wanted = {n for n in args.only.split(",") if n} or set(NETWORKS)
    with tempfile.TemporaryDirectory(prefix="crucible-mp-adapters-") as tmp:
        for network in NETWORKS:
            if network not in wanted:
                continue
            try:
                check_network(comfy_family, model, clip, vae, network, Path(tmp) / network, base_probe, base_render)
            except Exception:  # noqa: BLE001 - report and go on with the next type
                report("fail", f"{network} through the MODEL path", traceback.format_exc()[-3000:])


if __name__ == "__main__":
    main()
