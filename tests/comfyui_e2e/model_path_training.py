"""SDXL and Flux trained through the MODEL path in ComfyUI's own process (issue 18), where no stock loader can give
the stage a tiny model (``model_path_files.py`` says why).

Runs inside the ComfyUI venv (a subprocess of ``checks_model_path_families.py``). The MODEL is ComfyUI's own model
class around tiny weights (SDXL: ``model_path_equivalence.build_sdxl``; Flux: the smallest Flux dev ComfyUI
detects, ``comfy_models``), the VAE ComfyUI's ``comfy.sd.VAE`` from an SD-shaped VAE with the family's latent
channels. The CLIP is a stand-in: ComfyUI's SDXL and Flux text encoders are full size (CLIP-G, T5-XXL) and are built
from fixed configs; each caption becomes a fixed embedding seeded by its text (ComfyUI's CLIP itself is checked on
SD1.5 and SD3). The pack's :class:`ComfyModelFamily` wraps them as Crucible Train does, and the library's ``train``
runs 12 steps, saving every 6:

* the loss falls (mean of the last five steps below the first five);
* every key of the saved LoRA is a ComfyUI ``lora_unet_…`` key, and ComfyUI's own loader
  (``comfy.sd.load_lora_for_models``) patches one weight per trained module with no ``lora key not loaded``;
* ComfyUI's sampler renders the LoRA-patched MODEL unlike the base MODEL;
* the user's MODEL is unchanged after the run (``restore``);
* SDXL and Flux: a run cancelled after step 6 and resumed equals the uninterrupted run (LoRA tensors and losses).
"""
from __future__ import annotations

import gc
import hashlib
import importlib
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: the model fixtures
from comfy_python import LogCapture, report, setup_comfy  # noqa: E402

FAMILIES = ("sdxl", "flux")
STEPS, SAVE_EVERY = 12, 6


@dataclass(frozen=True)
class CaseSettings:
    """What differs between the cases' runs: batch size, learning rate, the render's cfg, Flux dev's guidance,
    other training / network / optimizer settings, whether Cancel → resume is checked too, the steps and the
    save interval."""
    batch: int
    learning_rate: float
    cfg: float
    guidance: float | None = None
    training: dict = field(default_factory=dict, hash=False)
    resume: bool = True
    network: dict = field(default_factory=dict, hash=False)
    optim: dict = field(default_factory=dict, hash=False)
    steps: int = STEPS
    save_every: int = SAVE_EVERY


# Adam moves every LoRA weight by about lr per step: the 3072-wide Flux diverges at the tiny SDXL's 1e-2. SDXL trains
# LoCon (all_linear_conv): its ResBlock convs carry the tiny UNet; with all_linear alone (100 modules since the presets
# follow kohya: no 1x1 ResBlock shortcuts) 12 steps did not lower the loss (1.0545 -> 1.0641)
SETTINGS = {"sdxl": CaseSettings(4, 1e-2, 5.0, network={"target_preset": "all_linear_conv"}),
            "flux": CaseSettings(2, 3e-3, 1.0, guidance=3.5)}
TEXT_TOKENS = {"sdxl": 77, "flux": 8}  # the stand-in's sequence length (Flux: short, the 3072-wide model is slow)
DIFFERENT = 1e-3  # mean |Δ| of the decoded [0,1] images above which two renders differ
LOG_FORBIDS = ("lora key not loaded", "NOT LOADED")


class TextStandIn:
    """A CLIP stand-in with ComfyUI's CLIP interface: each caption → a fixed random embedding seeded by its text."""

    def __init__(self, context_dim: int, pooled_dim: int, tokens: int):
        self.context_dim, self.pooled_dim, self.tokens = context_dim, pooled_dim, tokens

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens(self, tokens: str, return_dict: bool = False):
        import torch

        generator = torch.Generator().manual_seed(int(hashlib.sha256(tokens.encode()).hexdigest()[:8], 16))
        return {"cond": torch.randn(1, self.tokens, self.context_dim, generator=generator),
                "pooled_output": torch.randn(1, self.pooled_dim, generator=generator)}

    def clone(self) -> "TextStandIn":
        return self

    def clip_layer(self, layer: int) -> None:
        pass


def comfy_vae(latent_channels: int):
    import comfy.sd
    import torch
    from diffusers import AutoencoderKL

    from comfy_sd15 import comfy_sd15_vae_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        vae = AutoencoderKL(**dict(comfy_sd15_vae_config(), latent_channels=latent_channels))
    return comfy.sd.VAE(sd=vae.state_dict())


def case_objects(family: str):
    """(ComfyUI MODEL, CLIP stand-in, ComfyUI VAE)."""
    import comfy_models
    from model_path_equivalence import build_sdxl

    case = build_sdxl() if family == "sdxl" else comfy_models.build("flux")
    config = case.comps.denoiser.config
    if family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        clip = TextStandIn(config.cross_attention_dim, pooled, TEXT_TOKENS[family])
    else:
        clip = TextStandIn(config.joint_attention_dim, config.pooled_projection_dim, TEXT_TOKENS[family])
    model = case.model
    del case  # the diffusers copy (2 GB for Flux)
    gc.collect()
    return model, clip, comfy_vae(16 if family == "flux" else 4)


def pack_modules(pack_dir: str):
    """(the pack's ``nodes/comfy_family`` module, its library: ``config``, ``loop``, ``families``, ``Callbacks``),
    imported under the equivalence scripts' pack alias."""
    from model_path_equivalence import PACK_ALIAS, comfy_family_module

    module = comfy_family_module(pack_dir)
    pack = type("Pack", (), {name: importlib.import_module(f"{PACK_ALIAS}.trainer.{name}")
                             for name in ("config", "loop", "families")})
    pack.Callbacks = importlib.import_module(f"{PACK_ALIAS}.trainer").Callbacks
    return module, pack


def run_config(pack, settings: CaseSettings, demo: Path, out: Path, run_name: str):
    """The TrainConfig of one in-process MODEL-path run (family ``comfy``): LoRA dim 4 on all_linear, 64 px,
    ``settings.steps`` steps, a LoRA every ``settings.save_every``."""
    return pack.config.TrainConfig.from_dict({
        "model": {"family": "comfy", "path": ""},
        "datasets": [{"path": str(demo), "resolution": 64, "repeats": 1}],
        "network": {"network_type": "lora", "network_dim": 4, "network_alpha": 4, "target_preset": "all_linear",
                    **settings.network},
        "optim": {"learning_rate": settings.learning_rate, "lr_scheduler": "constant", **settings.optim},
        "training": {"batch_size": settings.batch, "epochs": 100, "max_train_steps": settings.steps, "seed": 7,
                     "mixed_precision": "no", "cache_latents": True, "cache_text_embeddings": True,
                     **({"guidance_scale": settings.guidance} if settings.guidance is not None else {}),
                     **settings.training},
        "save": {"output_dir": str(out / "loras"), "work_dir": str(out / "runs"), "run_name": run_name,
                 "save_every_n_steps": settings.save_every, "save_every_n_epochs": 0, "save_precision": "fp32"}})


def hosted_run(pack, family, config_of, callbacks=None, resume_from=None):
    """``pack.loop.train`` on ``family`` as Crucible Train runs it: the family registered (``config_of()`` is built
    then: family "comfy" is known only while registered), and ``restore`` after, also after a Cancel or an error."""
    try:
        with pack.families.hosted_family(family):
            return pack.loop.train(config_of(), callbacks, resume_from=resume_from)
    finally:
        family.restore()


def stop_after(pack, step: int):
    """Callbacks that cancel the run after ``step`` (as the Cancel button does between steps)."""
    class StopAt(pack.Callbacks):
        seen = 0

        def on_step(self, info):
            self.seen = info.step

        def should_stop(self):
            return self.seen >= step

    return StopAt()


def cancel_resume_problems(pack, run, run_name: str, whole, stop: int) -> tuple[list[str], dict]:
    """A run (``run(run_name, callbacks=None, resume_from=None)`` → RunResult) cancelled after step ``stop`` and
    resumed, against the uninterrupted ``whole`` RunResult: (problems, the whole run's final LoRA tensors)."""
    import torch
    from safetensors.torch import load_file

    first_part = run(run_name, stop_after(pack, stop))
    resumed = run(run_name, resume_from=first_part.state_dir)
    ours = load_file(str(sorted(whole.run_dir.glob("*.safetensors"))[-1]))
    theirs = load_file(str(sorted(resumed.run_dir.glob("*.safetensors"))[-1]))
    differ = [k for k in ours if k not in theirs or not torch.equal(ours[k], theirs[k])]
    problems = ([] if first_part.cancelled else ["the first part was not cancelled"]) + \
        ([f"{len(differ)} of {len(ours)} LoRA tensors differ: {differ[:3]}"] if differ else []) + \
        ([f"losses differ: {resumed.losses} vs {whole.losses}"] if resumed.losses != whole.losses else [])
    return problems, ours


def render(model, clip, vae, cfg: float):
    """ComfyUI's sampler (euler, 2 steps, 64 px) on ``model``: the decoded image [H, W, C] in [0, 1]."""
    import torch

    with torch.no_grad():
        return _render(model, clip, vae, cfg)


def _render(model, clip, vae, cfg: float):
    import comfy.sample
    import torch

    out = clip.encode_from_tokens(clip.tokenize("crucible, red circle, black background"), return_dict=True)
    cond = out.pop("cond")
    positive = [[cond, {**out, "guidance": 3.5}]]
    empty = clip.encode_from_tokens(clip.tokenize(""), return_dict=True)
    negative = [[empty.pop("cond"), empty]]
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, 8, 8))
    noise = comfy.sample.prepare_noise(latent, 1)
    samples = comfy.sample.sample(model, noise, 2, cfg, "euler", "normal", positive,
                                  negative, latent, denoise=1.0, seed=1, disable_pbar=True)
    return vae.decode(samples)[0].float().clamp(0, 1)


def lora_checks(path: Path, model, clip, vae, cfg: float, base_image) -> list[str]:
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    keys = list(lora)
    problems = [f"not a lora_unet_ key: {k}" for k in keys if not k.startswith("lora_unet_")][:5]
    modules = {k.rsplit(".lora_down.weight", 1)[0] for k in keys if k.endswith(".lora_down.weight")}
    with LogCapture() as log:
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    problems += log.matching(*LOG_FORBIDS)[:5]
    if len(patched.patches) != len(modules):
        problems.append(f"ComfyUI patched {len(patched.patches)} weights for {len(modules)} trained modules")
    difference = float((render(patched, clip, vae, cfg) - base_image).abs().mean())
    if difference <= DIFFERENT:
        problems.append(f"the LoRA-patched MODEL renders like the base MODEL (mean |Δ| {difference:.2e})")
    return problems + [f"{len(modules)} modules, render mean |Δ| to base {difference:.3f}"] * (not problems)


def preview_check(result, label: str) -> tuple[str, str, str]:
    """(status, name, detail): the run's preview, rendered through ComfyModelFamily.sample (ComfyUI's sampler with
    the adapter in place), is an image that is not flat."""
    import numpy as np

    images = [image for sample in result.samples for image in sample.images]
    if not images:
        return "fail", f"{label}: a preview renders", f"no preview image ({len(result.samples)} sample events)"
    pixels = np.asarray(images[-1].convert("RGB"), dtype=np.float32)
    spread = float(pixels.std())
    return ("pass" if spread > 1.0 else "fail", f"{label}: a preview renders through ComfyUI's sampler",
            f"{pixels.shape[1]}×{pixels.shape[0]} at step {result.samples[-1].step}, pixel std {spread:.1f}")


def weight_digests(module) -> dict[str, str]:
    """A digest of every tensor's bytes by name (a copy of the 2 GB Flux would double its memory); a quantized
    weight (ComfyUI's ``QuantizedTensor``) by its stored fp8 data (its scale is a tensor of its own)."""
    return {name: hashlib.blake2b(getattr(tensor, "_qdata", tensor).detach().cpu().contiguous().view(-1)
                                  .view(torch_uint8()).numpy().tobytes(), digest_size=16).hexdigest()
            for name, tensor in module.state_dict().items()}


def torch_uint8():
    import torch

    return torch.uint8


def train_family(args, pack, module, family: str, out: Path, objects=None, settings: CaseSettings | None = None,
                 sample_prompts: tuple[str, ...] = (), lora_extra=None, data: Path | None = None) -> None:
    """The checks of the module doc on ``family`` (``objects``: its (MODEL, CLIP, VAE), by default
    :func:`case_objects`; ``settings`` by default :data:`SETTINGS`; ``sample_prompts``: a preview at the last step
    through the family's own sampler, which must render; ``lora_extra(path)``: one more (status, name, detail) check
    of the final LoRA; ``data``: the dataset folder, by default the demo data)."""
    from model_path_equivalence import model_config  # noqa: F401 - the pack alias is set up by comfy_family_module

    started = time.perf_counter()
    model, clip, vae = objects or case_objects(family)
    settings = settings or SETTINGS[family]
    demo = data or Path(args.pack_dir) / "trainer" / "demo_data"
    before = weight_digests(model.model.diffusion_model)
    base_image = render(model, clip, vae, settings.cfg)

    def config_of(run_name: str):
        config = run_config(pack, settings, demo, out, run_name)
        if sample_prompts:
            config = replace(config, sample=replace(config.sample, prompts=sample_prompts, steps=2, cfg=settings.cfg,
                                                    sample_every_n_steps=settings.steps))
        return config

    def run(run_name: str, callbacks=None, resume_from=None):
        return hosted_run(pack, module.ComfyModelFamily(model, clip, vae), lambda: config_of(run_name), callbacks,
                          resume_from)

    result = run(f"{family}_whole")
    losses = result.losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    label = f"{family} MODEL path"
    report("pass" if len(losses) == settings.steps and last < first else "fail",
           f"{label}: {settings.steps} steps, the loss falls",
           f"mean of the first five steps {first:.4f} → the last five {last:.4f} ({time.perf_counter() - started:.0f}s)")
    after = weight_digests(model.model.diffusion_model)
    changed = [k for k, v in before.items() if after.get(k) != v]
    report("fail" if changed or after.keys() != before.keys() else "pass", f"{label}: the MODEL is unchanged after the run",
           f"{len(changed)} weights changed: {changed[:3]}" if changed else f"{len(before)} weights as before")
    final = sorted(result.run_dir.glob("*.safetensors"))
    if not final:
        report("fail", f"{label}: LoRA saved", f"no LoRA under {result.run_dir}")
        return
    if sample_prompts:
        report(*preview_check(result, label))
    if lora_extra is not None:
        report(*lora_extra(final[-1]))
    problems = lora_checks(final[-1], model, clip, vae, settings.cfg, base_image)
    ok = len(problems) == 1 and problems[0][0].isdigit()
    report("pass" if ok else "fail", f"{label}: ComfyUI's loader patches every trained module; the render changes",
           "\n".join(problems))
    if not settings.resume:
        return
    started = time.perf_counter()
    problems, ours = cancel_resume_problems(pack, run, f"{family}_parts", result, settings.save_every)
    report("fail" if problems else "pass", f"{label}: Cancel after step {settings.save_every} → resume equals the "
           "whole run", "\n".join(problems) or f"{len(ours)} tensors equal ({time.perf_counter() - started:.0f}s)")


def main() -> None:
    import traceback

    args = setup_comfy()
    module, pack = pack_modules(args.pack_dir)
    wanted = {n for n in args.only.split(",") if n} or set(FAMILIES)
    for family in FAMILIES:
        if family not in wanted:
            continue
        with tempfile.TemporaryDirectory(prefix=f"crucible-mp-{family}-") as tmp:
            try:
                train_family(args, pack, module, family, Path(tmp))
            except Exception:  # noqa: BLE001 - report and go on with the next family
                report("fail", f"{family} MODEL path training", traceback.format_exc()[-3000:])
        gc.collect()


if __name__ == "__main__":
    main()
