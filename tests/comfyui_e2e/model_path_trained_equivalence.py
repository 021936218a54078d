"""Training through the MODEL path gives the diffusers path's LoRA on the same weights (issue 18, known families).

Called by ``model_path_equivalence.py`` (ComfyUI's venv) once it has checked the forward pass of a family, on the
same objects: Crucible's diffusers components and ComfyUI's ``ModelPatcher`` around the same tiny weights. The same
LoRA is then trained twice for ``STEPS`` steps by the library's own loop (``trainer.loop.train``: the real
optimizer step, objective, noise/timestep draws, AdamW, gradient clipping, scheduler and LoRA export), once through
Crucible's diffusers family and once through :class:`ComfyModelFamily` around the ComfyUI MODEL, with identical

* data: the same latents and text conditioning per dataset item (the encoders are bypassed here; ComfyUI's CLIP
  and VAE are compared to Crucible's on SD1.5 by ``model_path_equivalence``), the same batches (``seed``);
* noise and timesteps: the loop draws them from the run's seed on both sides (SD3 at the σ shift 3.0 both sides,
  Flux dev at its auto shift, which ``model_path_equivalence`` checks equal);
* initial LoRA weights: every A/B matrix is drawn from a generator seeded by the module's ComfyUI weight name, so
  the two layouts start from the same adapter (B non-zero, so A trains from step 1 as well);
* optimizer and learning rate (AdamW, constant ``LEARNING_RATE``, fp32, no mixed precision).

Compared: each step's loss (relative ``LOSS_TOL``) and every tensor of the two exported LoRA files after mapping
each key to the ComfyUI weight it patches with ComfyUI's own key map (``comfy.lora.model_lora_keys_unet``), as the
difference relative to what training changed: ‖W_MODEL − W_diffusers‖ / ‖W_diffusers − W_initial‖ ≤ ``LORA_TOL``
over the whole LoRA and ≤ ``TENSOR_TOL`` per tensor (alphas equal). Tensors training did not move cannot pass.

Which modules train (preset ``attn_mlp``):
* SD1.5 and SDXL: the diffusers preset's modules (every attention and feed-forward Linear) map 1:1 onto ComfyUI's
  UNet modules.
* SD3 and Flux: ComfyUI fuses q/k/v into one ``qkv`` Linear (Flux single blocks fuse q/k/v and the MLP input into
  ``linear1``), so a LoRA on a fused layer is another parameterisation than three LoRAs on the diffusers layers.
  Only modules unfused on both sides train here: attention output projections (``to_out.0`` ↔ ``x_block.attn.proj``
  / ``attn2.proj`` / ``img_attn.proj``, ``to_add_out`` ↔ ``context_block.attn.proj`` / ``txt_attn.proj``), the MLP
  layers (``ff.net.0.proj``/``ff.net.2`` ↔ ``mlp.fc1``/``fc2`` / ``img_mlp.0``/``2``, ``ff_context`` likewise), the
  final ``proj_out`` ↔ ``final_layer.linear`` and Flux's single-block ``proj_out`` ↔ ``linear2``.
Both families' ``lora_target_modules`` are narrowed to that common set for the run (no user option involved): the
diffusers modules whose export key ComfyUI's key map sends onto one whole weight. Separately, the two paths' own
``attn_mlp`` must select the same ComfyUI weights (fused ones counted once): a weight only one side selects fails
(``tests/test_comfy_preset_words.py`` checks every preset on the full-size models).

Control: SD3 trained again on the diffusers side at ``CONTROL_LR_FACTOR`` × the learning rate must be reported as
a mismatch (the comparison can fail).

Tolerances (fp32 on the CPU): the forward passes agree to ~1e-6 relative (``model_path_equivalence``), so the losses
agree to ~1e-7 (``LOSS_TOL`` 1e-5). AdamW divides each element's step by its gradient's running RMS, so an element
whose gradient is near zero (within the paths' ~1e-6 fp32 difference) can step differently by up to a whole step:
single tensors show up to ~1e-3 of their update (SDXL's worst measured 1.0e-3), the whole LoRA ≤ ~2e-4 (SDXL
1.4e-4; SD1.5 2e-5, SD3 and Flux 1e-5). A 1 % learning-rate change gives ~1e-2 over the LoRA (the control); a
module trained on another layer than its counterpart gives ~1 in that tensor.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import tempfile
import time
from pathlib import Path

STEPS = 4  # the task asks a handful; each step of the 3072-wide Flux costs ~3 CPU-s per path
BATCH = 2
LEARNING_RATE = 1e-3
RANK = 4
PRESET = "attn_mlp"
SEED = 7
LATENT_SIZE = 8  # 64 px
LOSS_TOL = 1e-5  # |Δloss| / loss per step
LORA_TOL = 1e-3  # ‖Δ‖ / ‖trained − initial‖ over the whole LoRA (see the module doc)
TENSOR_TOL = 1e-2  # the same per LoRA tensor: a module trained on the wrong layer is ~1
CONTROL_LR_FACTOR = 1.01
CONTROL_FAMILY = "sd3"  # the cheapest run, and a family whose modules are mapped across fused layouts
FILE_SUFFIXES = {".lora_down.weight": "down", ".lora_A.weight": "down", ".lora_up.weight": "up",
                 ".lora_B.weight": "up", ".alpha": "alpha"}


def pack_module(name: str):
    from model_path_equivalence import PACK_ALIAS

    return importlib.import_module(f"{PACK_ALIAS}.trainer.{name}")


# --- which modules: the common, unfused set -------------------------------------------------------------------------
def matches(name: str, entries) -> bool:
    """peft's ``target_modules`` rule: the name equals an entry or ends with ``"." + entry``."""
    return any(name == e or name.endswith("." + e) for e in entries)


def comfy_weight(key_map, key: str) -> str | None:
    """The ComfyUI weight a LoRA key prefix patches whole (None: unmapped, or a slice of a fused weight)."""
    weight = key_map.get(key)
    return weight if isinstance(weight, str) else None


def common_targets(diffusers_family, comps, comfy_family) -> tuple[list[str], list[str], dict]:
    """(diffusers module names, ComfyUI module names, facts): the diffusers preset's modules whose export key
    ComfyUI's key map sends onto one whole weight (not a slice of a fused one), and those weights' modules. ``facts``
    also says how the MODEL path's own preset differs from the diffusers preset: the ComfyUI weights (whole, or
    fused ones any of whose slices the diffusers preset trains) it selects beyond those and those it misses."""
    component = comps.denoiser_name
    style = diffusers_family.key_styles[component]
    entries = diffusers_family.lora_target_modules(component, PRESET)
    ours = [n for n, m in comps.denoiser.named_modules() if n and matches(n, entries)]
    weight_of = {n: comfy_weight(comfy_family.key_map, style.module_key(n)) for n in ours}
    common = {w for w in weight_of.values() if w is not None}
    targets = [comfy_family.key_map.get(style.module_key(n)) for n in ours]  # whole weights and slices of fused ones
    selected = {t if isinstance(t, str) else t[0] for t in targets if t is not None}
    theirs = {n + ".weight" for n in comfy_family.lora_target_modules("unet", PRESET)}
    facts = {"fused": sum(w is None for w in weight_of.values()), "common": len(common),
             "comfy_only": sorted(theirs - selected), "comfy_misses": sorted(selected - theirs)}
    return [n for n in ours if weight_of[n] is not None], sorted(w.removesuffix(".weight") for w in common), facts


@contextlib.contextmanager
def narrowed_targets(family, names: list[str]):
    """The family's ``lora_target_modules`` returns exactly ``names`` while the block runs."""
    family.lora_target_modules = lambda component, preset: list(names)
    try:
        yield
    finally:
        del family.lora_target_modules


# --- the same data and the same initial adapter on both sides --------------------------------------------------------
class SameData:
    """Latents and text conditioning per dataset item, drawn from the item's index: one object per side."""

    def __init__(self, family: str, comps, channels: int, side: int):
        self.family, self.comps, self.channels, self.side = family, comps, channels, side

    def item(self, index: int):
        import torch

        from model_path_equivalence import conditioning

        generator = torch.Generator().manual_seed(1000 + index)
        latent = torch.randn(1, self.channels, LATENT_SIZE, LATENT_SIZE, generator=generator)
        cond = conditioning(self.family, self.comps, 1, generator)[self.side]
        return latent, {k: v for k, v in cond.items() if k != "image_geometry"}

    def latents(self, batch_plan):
        import torch

        return torch.cat([self.item(s[0])[0] for s in batch_plan])

    def conditioning(self, batch_plan, epoch: int):  # the loop's text cache interface
        import torch

        conds = [self.item(s[0])[1] for s in batch_plan]
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}

    def fill(self, report=None, share=None) -> None:  # TextCache.fill's signature: nothing to encode
        pass


def initial_lora(weight: str, in_features: int, out_features: int):
    """(A, B) of the module patching ComfyUI weight ``weight``: the same on both sides."""
    import torch

    generator = torch.Generator().manual_seed(int(hashlib.sha256(weight.encode()).hexdigest()[:12], 16))
    a = torch.randn(RANK, in_features, generator=generator) / in_features ** 0.5
    b = torch.randn(out_features, RANK, generator=generator) * 0.05
    return a, b


def same_data_trainer(loop, data: SameData, weight_of):
    """The loop's Trainer with the item's latents/conditioning instead of the encoders and the shared initial
    adapter (``weight_of``: adapted module name → ComfyUI weight); every step runs the loop's own code."""

    class SameDataTrainer(loop.Trainer):
        def _setup_caches(self):
            super()._setup_caches()
            self.text_cache = data

        def _latents(self, batch_plan, epoch: int):
            return data.latents(batch_plan).to(self.acc.device)

        def _setup_denoiser(self):
            import torch

            super()._setup_denoiser()
            module = next(iter(self.net.modules.values()))
            with torch.no_grad():
                for name, layer in module.named_modules():
                    if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                        a, b = initial_lora(weight_of(name), layer.in_features, layer.out_features)
                        layer.lora_A["default"].weight.copy_(a)
                        layer.lora_B["default"].weight.copy_(b)

    return SameDataTrainer


def run_config(family_name: str, family: str, out: Path, run_name: str, lr: float, pack_dir: str):
    training = {"batch_size": BATCH, "max_train_steps": STEPS, "seed": SEED, "mixed_precision": "no",
                "gradient_checkpointing": False, "cache_latents": False, "cache_text_embeddings": False,
                "validation_split": 0.0}  # validation would encode held-out images with each side's own VAE
    if family == "flux":
        training["guidance_scale"] = 3.5
    if family == "sd3":  # the MODEL's own shift on both sides (the diffusers path's auto is kohya's 1.0)
        training["flow_shift"] = 3.0
    return pack_module("config").TrainConfig.from_dict({
        "model": {"family": family_name, "path": ""},
        "datasets": [{"path": str(Path(pack_dir) / "trainer" / "demo_data"), "resolution": 64, "repeats": 1}],
        "network": {"network_type": "lora", "network_dim": RANK, "network_alpha": RANK, "target_preset": PRESET},
        "optim": {"optimizer": "adamw", "learning_rate": lr, "lr_scheduler": "constant"},
        "training": training,
        "save": {"output_dir": str(out / "loras"), "work_dir": str(out / "runs"), "run_name": run_name,
                 "save_every_n_steps": 0, "save_every_n_epochs": 0, "save_precision": "fp32", "save_state": False}})


def train_once(loop, cfg, trainer_class, components=None):
    """``trainer.loop.train`` with ``trainer_class`` as its Trainer: (losses, the final LoRA's tensors)."""
    from safetensors.torch import load_file

    original = loop.Trainer
    loop.Trainer = trainer_class
    try:
        result = loop.train(cfg, components=components)
    finally:
        loop.Trainer = original
    final = sorted(result.run_dir.glob("*.safetensors"))
    if not final:
        raise AssertionError(f"no LoRA saved under {result.run_dir}")
    return result.losses, load_file(str(final[-1]))


def strip_adapters(root) -> None:
    """peft layers → their base layers (the diffusers denoiser as it was before the run)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(root.named_modules()):
        if name and isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, module.get_base_layer())
    vars(root).pop("peft_config", None)  # or the next run's adapter would be peft's second one


def by_weight(tensors, key_map) -> dict[tuple[str, str], object]:
    """A LoRA file's tensors keyed by (ComfyUI weight, down/up/alpha); an unmappable key raises."""
    out = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in FILE_SUFFIXES if key.endswith(s)), None)
        weight = comfy_weight(key_map, key[: -len(suffix)]) if suffix else None
        if weight is None:
            raise AssertionError(f"LoRA key {key!r} does not patch one whole ComfyUI weight")
        out[(weight, FILE_SUFFIXES[suffix])] = tensor
    return out


def update_gap(ours, theirs, initial) -> float:
    """‖theirs − ours‖ / ‖ours − initial‖: how far apart the two trained tensors are, relative to how far training
    moved them (infinite if training did not move them)."""
    moved = float((ours - initial).norm())
    return float((theirs - ours).norm()) / moved if moved > 0 else float("inf")


def initial_of(tensors, key):
    """The initial value of the LoRA tensor ``key`` = (ComfyUI weight, down/up) of a file's mapped tensors."""
    weight, part = key
    a, b = initial_lora(weight, tensors[(weight, "down")].shape[1], tensors[(weight, "up")].shape[0])
    return a if part == "down" else b


def compare(losses_d, lora_d, losses_c, lora_c, key_map) -> tuple[list[str], str]:
    """(problems, detail): per-step losses and every mapped LoRA tensor of the two runs."""
    import torch

    from model_path_equivalence import relative

    ours, theirs = by_weight(lora_d, key_map), by_weight(lora_c, key_map)
    problems = []
    if ours.keys() != theirs.keys():
        problems.append(f"the LoRAs patch different weights: {len(ours.keys() - theirs.keys())} only on the diffusers "
                        f"path, {len(theirs.keys() - ours.keys())} only on the MODEL path")
    loss_gap = max((abs(a - b) / abs(a) for a, b in zip(losses_d, losses_c)), default=float("inf"))
    if len(losses_d) != STEPS or len(losses_c) != STEPS or loss_gap > LOSS_TOL:
        problems.append(f"losses differ (rel. {loss_gap:.1e} > {LOSS_TOL:g}): diffusers "
                        f"{[round(x, 6) for x in losses_d]}, MODEL {[round(x, 6) for x in losses_c]}")
    gaps, elementwise = {}, 0.0
    for key in sorted(ours.keys() & theirs.keys()):
        elementwise = max(elementwise, relative(theirs[key], ours[key]))
        if key[1] == "alpha":
            gaps[key] = 0.0 if torch.equal(ours[key], theirs[key]) else float("inf")
        else:
            gaps[key] = update_gap(ours[key], theirs[key], initial_of(ours, key))
    worst = max(gaps, key=gaps.get) if gaps else None
    moved = sum(float((ours[k] - initial_of(ours, k)).norm()) ** 2 for k in gaps if k[1] != "alpha") ** 0.5
    apart = sum(float((theirs[k] - ours[k]).norm()) ** 2 for k in gaps if k[1] != "alpha") ** 0.5
    whole = apart / moved if moved > 0 else float("inf")
    if worst is None or whole > LORA_TOL:
        problems.append(f"the trained LoRAs differ by {whole:.1e} of the trained update (> {LORA_TOL:g})")
    if worst is not None and gaps[worst] > TENSOR_TOL:
        bad = sum(g > TENSOR_TOL for g in gaps.values())
        problems.append(f"{bad} of {len(gaps)} LoRA tensors differ by more than {TENSOR_TOL:g} of their trained "
                        f"update (worst {gaps[worst]:.1e}: {worst[0]} {worst[1]})")
    detail = (f"{STEPS} steps, losses {[round(x, 4) for x in losses_d]} (max rel. Δ {loss_gap:.1e}); "
              f"{len(gaps)} LoRA tensors: ‖Δ‖ / ‖trained update‖ = {whole:.1e} over the LoRA, ≤ "
              f"{max(gaps.values(), default=0):.1e} per tensor"
              + (f" ({worst[0]} {worst[1]})" if worst else "") + f"; max |Δ| / max |tensor| = {elementwise:.1e}")
    return problems, detail


# --- the check ------------------------------------------------------------------------------------------------------
def vae_with_config(comps) -> None:
    """The loop moves ``comps.vae`` like a module: SDXL's size conditioning reads only the VAE's config
    (``model_path_equivalence`` gives it the released VAE's), so that config in an empty module."""
    import torch

    if comps.vae is not None and not isinstance(comps.vae, torch.nn.Module):
        stand_in = torch.nn.Module()
        stand_in.config = comps.vae.config
        comps.vae = stand_in


def check_training(family: str, module, comps, model, clip, vae, pack_dir: str) -> list[tuple[str, list[str], str]]:
    """The trained-LoRA comparison of one family (and the control): [(check name, problems, detail)]."""
    started, cpu = time.perf_counter(), time.process_time()
    loop, families = pack_module("loop"), pack_module("families")
    diffusers_family = families.get_family(family)
    probe = module.ComfyModelFamily(model, clip, vae)
    ours_names, theirs_names, facts = common_targets(diffusers_family, comps, probe)
    key_map, channels = probe.key_map, probe.latent_channels
    style = diffusers_family.key_styles[comps.denoiser_name]
    vae_with_config(comps)

    def diffusers_run(out: Path, lr: float, run_name: str):
        trainer = same_data_trainer(loop, SameData(family, comps, channels, 0),
                                    lambda name: comfy_weight(key_map, style.module_key(name)))
        try:
            with narrowed_targets(diffusers_family, ours_names):
                return train_once(loop, run_config(family, family, out, run_name, lr, pack_dir), trainer, comps)
        finally:
            strip_adapters(comps.denoiser)

    def comfy_run(out: Path):
        hosted = module.ComfyModelFamily(model, clip, vae)
        trainer = same_data_trainer(loop, SameData(family, comps, channels, 1), lambda name: name + ".weight")
        try:
            with families.hosted_family(hosted), narrowed_targets(hosted, theirs_names):
                cfg = run_config(hosted.name, family, out, "model_path", LEARNING_RATE, pack_dir)
                return train_once(loop, cfg, trainer)
        finally:
            hosted.restore()

    scope = f"{facts['common']} {PRESET} modules"
    if facts["fused"]:
        scope += (f" unfused on both sides (output projections and MLP layers; {facts['fused']} diffusers modules "
                  "(q/k/v, Flux's proj_mlp) are slices of ComfyUI's fused qkv / linear1: not compared)")
    name = f"{family} training: the MODEL path trains the diffusers path's LoRA (same weights, data, noise, init)"
    out_checks = [(f"{family} {PRESET}: the MODEL path's preset selects the diffusers preset's weights", [
        f"{label} {len(facts[key])} weight(s) (e.g. {facts[key][0]})" for key, label in (
            ("comfy_only", "only the MODEL path selects"), ("comfy_misses", "the MODEL path misses"))
        if facts[key]], f"{facts['common']} whole weights, {facts['fused']} diffusers modules on fused ones")]

    def took() -> str:
        return f"{time.perf_counter() - started:.1f}s, CPU {time.process_time() - cpu:.0f}s"

    with tempfile.TemporaryDirectory(prefix=f"crucible-mp-trained-{family}-") as tmp:
        losses_d, lora_d = diffusers_run(Path(tmp), LEARNING_RATE, "diffusers")
        losses_c, lora_c = comfy_run(Path(tmp))
        problems, detail = compare(losses_d, lora_d, losses_c, lora_c, key_map)
        out_checks.append((name, problems, f"{scope}; {detail} ({took()})"))
        if family == CONTROL_FAMILY:
            started, cpu = time.perf_counter(), time.process_time()
            control_losses, control_lora = diffusers_run(Path(tmp), LEARNING_RATE * CONTROL_LR_FACTOR, "control")
            found, _ = compare(control_losses, control_lora, losses_c, lora_c, key_map)
            out_checks.append((f"{family} training control: {CONTROL_LR_FACTOR}× the learning rate on the diffusers "
                               "side is reported as a mismatch",
                               [] if found else ["no mismatch reported: the check cannot fail"],
                               f"reported: {'; '.join(found) or '-'} ({took()})"))
    gc.collect()
    return out_checks
