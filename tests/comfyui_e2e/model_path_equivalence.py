"""The MODEL path and the diffusers path compute the same thing on the same weights (issue 18, known families).

Runs inside the ComfyUI venv (a subprocess of ``checks_model_path_families.py``). For SD1.5, SDXL, SD3 and Flux the
same random tiny weights are loaded twice (``comfy_models.py``): as Crucible's diffusers components and as ComfyUI's
own ``ModelPatcher``. The pack's :class:`ComfyModelFamily` wraps the ComfyUI model and Crucible's diffusers family
adapter wraps the diffusers one; both are then asked what the loop asks:

* **denoiser** — for the same clean latents, noise, timesteps and text conditioning, the loop's noisy latent goes
  through each family's ``predict``; the raw outputs (ε for SD1.5/SDXL, flow velocity for SD3/Flux) must agree
  (max |Δ| / max |out| ≤ ``PREDICT_TOL``). SDXL is fed per-image size/crop conditioning (``image_geometry``), Flux
  an embedded guidance of 3.5 on both sides. The noisy latent itself is the loop's: the ComfyUI family's noise
  schedule (rebuilt from the model's σ table) must give the diffusers family's ᾱ (ε models).
* **text** (SD1.5, the one family whose text encoder the stage builds at ComfyUI's size): ComfyUI's CLIP
  (``clip.encode_from_tokens``) against Crucible's CLIP-L encoding, with a tokenizer made from ComfyUI's own
  ``comfy/sd1_tokenizer`` files.
* **latents** (SD1.5): ComfyUI's VAE (``vae.encode`` + ``process_latent_in``) against the diffusers VAE's scaled mean.
* **σ shift** the flow families sample training noise with: compared and reported. Flux differs by design (below).
* **training** (``model_path_trained_equivalence.py``, on the same objects): the same LoRA trained a few steps through
  both families by the loop's own step gives the same losses and LoRA tensors; a 1 % learning-rate change fails.

Differences by design, converted inside ComfyModelFamily and so not differences here:
- ComfyUI's discrete models take ``x0 + σ·ε`` with σ = √((1-ᾱ)/ᾱ); the loop's DDPM latent ``√ᾱ·x0 + √(1-ᾱ)·ε`` is
  multiplied by √(1+σ²). ``apply_model`` returns x0; ε is recovered as ``(x − x0)/σ`` (flow: the velocity likewise).
- Flux's guidance: ComfyUI takes it as a conditioning value (``guidance``), diffusers as a tensor; both embed
  ``guidance·1000``.
- The σ shift ``training.flow_shift`` 0 ("auto") trains with: Flux dev's must equal the diffusers path's
  resolution-dependent ``exp(mu)`` at 256, 512 and 1024 px (ComfyUI's model declares one fixed shift, its
  *ModelSamplingFlux* ``max_shift``; ComfyModelFamily applies the node's rule per latent size).
Kept different on purpose (reported, not failed): SD3 on the MODEL path trains with the shift the model samples
with (3.0), the diffusers path with kohya's ``training_shift`` 1.0; set ``flow_shift`` to choose either.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: the model fixtures (tiny_flow, comfy_sd15)
from comfy_python import report, setup_comfy  # noqa: E402

FAMILIES = ("sd15", "sdxl", "sd3", "flux")
PACK_ALIAS = "crucible_pack_under_test"
PREDICT_TOL = 2e-3  # max |Δ| / max |out|, float32 on the CPU (attention and RoPE are computed differently)
TEXT_TOL = 1e-4
LATENT_TOL = 1e-4
SCHEDULE_TOL = 1e-5  # |Δᾱ|


def comfy_family_module(pack_dir: str):
    """The pack's ``nodes/comfy_family.py`` imported as the pack's submodule (its ``..trainer`` relative import),
    without running the pack's ``nodes/__init__`` (which registers every node)."""
    root = Path(pack_dir)
    for name, path in ((PACK_ALIAS, root), (f"{PACK_ALIAS}.nodes", root / "nodes")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    return importlib.import_module(f"{PACK_ALIAS}.nodes.comfy_family")


def model_config(module):
    """The model config of a run through the MODEL path (no files: the graph loaded everything)."""
    return sys.modules[f"{PACK_ALIAS}.trainer"].ModelConfig(family=module.HOSTED_NAME)


def relative(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


class _NoVae:
    """The ComfyUI family reads nothing from the VAE to predict (latent factor 8 when absent)."""

    def __init__(self):
        import torch

        self.first_stage_model = torch.nn.Identity()


def build_sd15(seed: int = 0):
    """The stage's ComfyUI-loadable SD1.5 (``tests/comfy_sd15.py``) loaded by ComfyUI with its CLIP and VAE, and the
    same components as Crucible's diffusers SD1.5 with a CLIP tokenizer from ComfyUI's own vocabulary files."""
    import comfy.sd
    import torch
    from transformers import CLIPTokenizer

    from comfy_sd15 import comfy_sd15_components
    from trainer.families.ldm_layout import diffusers_to_single_file

    comps = comfy_sd15_components(seed)
    state = diffusers_to_single_file(comps, "sd15")
    fp32 = {"dtype": torch.float32}
    model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(state, output_vae=True, output_clip=True,
                                                                model_options=fp32, te_model_options=fp32)
    del state
    vocab = Path(comfy.sd.__file__).resolve().parent / "sd1_tokenizer"
    comps.tokenizers = [CLIPTokenizer.from_pretrained(str(vocab))]
    return comps, model, clip, vae


def build_sdxl(seed: int = 0):
    """The tiny SDXL UNet with ComfyUI's size-conditioning embedder: ComfyUI's SDXL class embeds each of the six
    size/crop numbers with a fixed 256-wide ``Timestep(256)``, so the tiny UNet's ``addition_time_embed_dim`` is 256
    (the released SDXL's) rather than the unit tests' 8, or ComfyUI's ``label_emb`` input would not fit."""
    import torch
    from diffusers import UNet2DConditionModel

    import comfy_models
    from trainer.tiny import build_tiny_components, tiny_unet_config

    comps = build_tiny_components("sdxl", seed)
    config = tiny_unet_config("sdxl")
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    config.update(addition_time_embed_dim=256, projection_class_embeddings_input_dim=pooled + 6 * 256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        comps.denoiser = UNet2DConditionModel(**config).eval()
    return comfy_models.sdxl_case(comps)


def conditioning(family: str, comps, batch: int, generator):
    """Random text conditioning of the right widths: (diffusers family's cond, ComfyUI family's cond)."""
    import torch

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    den = comps.denoiser
    if family == "sd15":
        ctx = rand(batch, 77, den.config.cross_attention_dim)
        return {"encoder_hidden_states": ctx}, {"encoder_hidden_states": ctx}
    if family == "sdxl":
        ctx = rand(batch, 77, den.config.cross_attention_dim)
        pooled = rand(batch, den.config.projection_class_embeddings_input_dim - 6 * den.config.addition_time_embed_dim)
        geometry = torch.tensor([[96, 80, 8, 0], [64, 72, 0, 4]][:batch])  # original h, w, crop top, left
        return ({"encoder_hidden_states": ctx, "text_embeds": pooled, "image_geometry": geometry},
                {"encoder_hidden_states": ctx, "pooled_output": pooled, "image_geometry": geometry})
    ctx = rand(batch, 12, den.config.joint_attention_dim)
    pooled = rand(batch, den.config.pooled_projection_dim)
    return ({"encoder_hidden_states": ctx, "pooled_projections": pooled},
            {"encoder_hidden_states": ctx, "pooled_output": pooled})


def noisy_inputs(family: str, comps, comfy_comps, channels: int, generator):
    """(noisy latents, timesteps, schedule problems): the loop's noising with the diffusers family's schedule, and
    the ComfyUI family's schedule compared to it."""
    import torch

    x0 = torch.randn(2, channels, 8, 8, generator=generator)
    noise = torch.randn(2, channels, 8, 8, generator=generator)
    if family in ("sd15", "sdxl"):
        timesteps = torch.tensor([80, 730])
        ours = comps.noise_scheduler.alphas_cumprod.double()
        theirs = comfy_comps.noise_scheduler.alphas_cumprod.double()
        gap = float((ours - theirs).abs().max())
        problems = [] if gap <= SCHEDULE_TOL else [f"ᾱ of the ComfyUI family's schedule differs by {gap:.2e}"]
        return comps.noise_scheduler.add_noise(x0, noise, timesteps), timesteps, problems
    sigmas = torch.tensor([0.2, 0.85])
    s = sigmas.view(-1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, sigmas * 1000, []


def compare_denoiser(family: str, module, comps, model, clip=None, vae=None) -> tuple[list[str], str]:
    import torch

    from trainer.families import get_family

    diffusers_family = get_family(family)
    comfy_family = module.ComfyModelFamily(model, clip if clip is not None else object(),
                                           vae if vae is not None else _NoVae())
    comfy_comps = comfy_family.load(model_config(module))
    if family in ("sd15", "sdxl"):  # Crucible's own noise schedule (the diffusers folder's scheduler)
        from trainer.families.sd15 import make_noise_scheduler

        comps.noise_scheduler = make_noise_scheduler()
    if family == "sdxl":  # the released SDXL VAE's 8× factor (ComfyUI's), for the size conditioning's target size
        comps.vae = types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=(128, 256, 512, 512)))
    if family == "flux":  # dev: guidance embedding and the resolution-dependent shift schedule
        from diffusers import FlowMatchEulerDiscreteScheduler

        from trainer.families.flux import DEV_SCHEDULER

        comps.noise_scheduler = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
        comps.extras.update(guidance_embeds=True, guidance=3.5)
        comfy_family.configure_training(comfy_comps, types.SimpleNamespace(guidance_scale=3.5))
    generator = torch.Generator().manual_seed(3)
    cond_d, cond_c = conditioning(family, comps, 2, generator)
    channels = comfy_family.latent_channels
    noisy, timesteps, problems = noisy_inputs(family, comps, comfy_comps, channels, generator)
    with torch.no_grad():
        ours = diffusers_family.predict(comps, noisy, timesteps, cond_d)
        theirs = comfy_family.predict(comfy_comps, noisy, timesteps, cond_c)
    gap = relative(theirs, ours)
    if gap > PREDICT_TOL:
        problems.append(f"predictions differ: max |Δ| / max |out| = {gap:.2e} (> {PREDICT_TOL:g}); per sample "
                        f"{[round(relative(theirs[i], ours[i]), 5) for i in range(ours.shape[0])]}")
    detail = f"{comfy_family.default_prediction} output, max |Δ| / max |out| = {gap:.1e} at t={timesteps.tolist()}"
    problems += control(family, diffusers_family, comps, noisy, timesteps, cond_d, theirs)
    if family in ("sd3", "flux"):
        for size in (32, 64, 128):  # 256, 512 and 1024 px
            latents = torch.zeros(1, channels, size, size)
            ours_shift, their_shift = diffusers_family.flow_shift(comps, latents), comfy_family.flow_shift(comfy_comps, latents)
            detail += f"; σ shift at {size * 8}px: diffusers {ours_shift or 1.0:.4f}, MODEL {their_shift:.4f}"
            if family == "flux" and abs(ours_shift - their_shift) > 1e-6:
                problems.append(f"Flux dev's auto σ shift at {size * 8}px differs: {ours_shift} vs {their_shift}")
    return problems, detail


def control(family: str, diffusers_family, comps, noisy, timesteps, cond, theirs) -> list[str]:
    """The comparison can fail: the diffusers side without SDXL's size/crop conditioning or with another Flux
    guidance must differ from the MODEL path's prediction by more than the tolerance."""
    import torch

    if family == "sdxl":
        changed = {k: v for k, v in cond.items() if k != "image_geometry"}
        what = "SDXL without its per-image size/crop conditioning"
    elif family == "flux":
        changed, what = cond, "Flux at guidance 1.0 instead of 3.5"
        comps.extras["guidance"] = 1.0
    else:
        return []
    with torch.no_grad():
        other = diffusers_family.predict(comps, noisy, timesteps, changed)
    comps.extras["guidance"] = 3.5
    gap = relative(theirs, other)
    return [] if gap > PREDICT_TOL else [f"control: {what} still matches (rel. {gap:.1e}): the check cannot fail"]

    return problems, detail


def compare_text_and_latents(module, comps, model, clip, vae) -> list[tuple[str, list[str], str]]:
    import torch

    from trainer.families import get_family

    diffusers_family = get_family("sd15")
    comfy_family = module.ComfyModelFamily(model, clip, vae)
    comfy_comps = comfy_family.load(model_config(module))
    captions = ["a photo of a red fox in the snow", "two cats"]
    out = []
    with torch.no_grad():
        ours = diffusers_family.encode_text(comps, captions)["encoder_hidden_states"]
        theirs = comfy_family.encode_text(comfy_comps, captions)["encoder_hidden_states"]
    gap = relative(theirs, ours) if theirs.shape == ours.shape else float("inf")
    out.append(("sd15 text: ComfyUI's CLIP encodes captions as Crucible's CLIP-L does",
                [] if gap <= TEXT_TOL else [f"{tuple(theirs.shape)} vs {tuple(ours.shape)}, rel. {gap:.2e}"],
                f"{tuple(ours.shape)}, max |Δ| / max |out| = {gap:.1e}"))
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        ours = diffusers_family.encode_images(comps, pixels)
        theirs = comfy_family.encode_images(comfy_comps, pixels)
    gap = relative(theirs, ours) if theirs.shape == ours.shape else float("inf")
    out.append(("sd15 latents: ComfyUI's VAE encodes images as Crucible's VAE does (scaled mean)",
                [] if gap <= LATENT_TOL else [f"{tuple(theirs.shape)} vs {tuple(ours.shape)}, rel. {gap:.2e}"],
                f"{tuple(ours.shape)}, max |Δ| / max |out| = {gap:.1e}"))
    return out


def main() -> None:
    import time
    import traceback

    import torch

    args = setup_comfy()
    import comfy_models
    from model_path_trained_equivalence import check_training

    module = comfy_family_module(args.pack_dir)
    torch.set_grad_enabled(False)
    wanted = {n for n in args.only.split(",") if n} or set(FAMILIES)
    for family in FAMILIES:
        if family not in wanted:
            continue
        started = time.perf_counter()
        name = f"{family} denoiser: MODEL path predicts what the diffusers path predicts (same weights)"
        try:
            if family == "sd15":
                comps, model, clip, vae = build_sd15()
                problems, detail = compare_denoiser(family, module, comps, model, clip, vae)
                for check, check_problems, check_detail in compare_text_and_latents(module, comps, model, clip, vae):
                    report("fail" if check_problems else "pass", check, "\n".join(check_problems) or check_detail)
            else:
                case = build_sdxl() if family == "sdxl" else comfy_models.build(family)
                comps, model, clip, vae = case.comps, case.model, object(), _NoVae()
                problems, detail = compare_denoiser(family, module, comps, model)
        except Exception:  # noqa: BLE001 - report and go on with the next family
            report("fail", name, traceback.format_exc()[-3000:])
            continue
        detail += f" ({time.perf_counter() - started:.1f}s)"
        report("fail" if problems else "pass", name, "\n".join(problems + [detail]) if problems else detail)
        try:  # the same LoRA trained through both paths (model_path_trained_equivalence)
            for check, check_problems, check_detail in check_training(family, module, comps, model, clip, vae,
                                                                      args.pack_dir):
                report("fail" if check_problems else "pass", check, "\n".join(check_problems + [check_detail]))
        except Exception:  # noqa: BLE001
            report("fail", f"{family} training: the MODEL path trains the diffusers path's LoRA",
                   traceback.format_exc()[-3000:])
        comps = model = case = None
        gc.collect()


if __name__ == "__main__":
    main()
