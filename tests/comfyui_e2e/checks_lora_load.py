"""LoRA files Crucible exports load through ComfyUI's own code with no key lost, and patch exactly what peft merges.

For each family (sd15, sdxl, sd3, flux; models from ``comfy_models.py``) and network type (LoRA, DoRA, LoHa, LoKr):
1. Crucible's ``attach_network`` injects the adapter (``all_linear_conv`` preset: every attention, MLP, projection
   and, in UNets, convolution layer; on sd15 the text encoder too), every adapter weight is set random and non-zero
   (DoRA magnitudes moved away from the weight norms), and ``export_peft_modules`` writes the LoRA file.
2. ComfyUI reads it as *LoraLoader* does (``comfy.utils.load_torch_file`` + ``comfy.sd.load_lora_for_models``):
   no ``lora key not loaded`` and no ``NOT LOADED`` warning may appear.
3. ComfyUI applies it as for sampling (``comfy.model_management.load_models_gpu``). Every adapted module is looked
   up in ComfyUI's LoRA key map
   (``comfy.lora.model_lora_keys_unet`` / ``_clip``), which gives ComfyUI's weight (and, for fused q/k/v or swapped
   scale/shift, the slice and reordering): ComfyUI's weight change there must equal peft's merged weight change of
   the same module, max |Δcomfy − Δpeft| / max |Δpeft| < 1e-4, and ComfyUI must patch no other weight.

A family that this ComfyUI does not have (the 2024 tree: no SD3/Flux) SKIPs; on 0.8.0 every case must run.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: the model fixtures (tiny_flow, comfy_sd15)
from comfy_python import LogCapture, report, run_script, setup_comfy  # noqa: E402

NETWORKS = ("lora", "dora", "loha", "lokr")
MAX_RELATIVE_ERROR = 1e-4
MUST_SUPPORT = {"0.8.0": {"sd15", "sdxl", "sd3", "flux"}}


async def run_checks(ctx) -> None:
    await run_script(ctx, Path(__file__), timeout=2400)  # 13 min measured under heavy load


def attach_random_adapter(case, network: str, seed: int = 1):
    """Crucible's adapter injected into the case's own modules (undone by :func:`strip_adapter`), every adapter
    weight random and non-zero. In place rather than on a copy: the Flux is 2 GB."""
    import warnings

    import torch

    from trainer.config import NetworkConfig
    from trainer.families import get_family
    from trainer.families.base import Components
    from trainer.network import attach_network

    comps = case.comps
    view = Components(denoiser=comps.denoiser, vae=None, text_encoders=list(comps.text_encoders) if case.clip else [],
                      tokenizers=[], noise_scheduler=None, denoiser_name=comps.denoiser_name,
                      text_encoder_names=comps.text_encoder_names if case.clip else ())
    cfg = NetworkConfig(network_type=network, network_dim=4, network_alpha=8.0, target_preset="all_linear_conv",
                        train_text_encoder=case.clip is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = attach_network(get_family(case.family), view, cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules.values():
            for name, param in module.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1.2 + 0.2 * torch.rand(param.shape, generator=generator))
                elif any(tag in name for tag in ("lora_", "hada_", "lokr_")):
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return net


def strip_adapter(net) -> None:
    """Put every wrapped layer's base layer back, so the modules are the plain base model again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in net.modules.values():
        for name, layer in list(module.named_modules()):
            if isinstance(layer, BaseTunerLayer):
                parent, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, leaf, layer.get_base_layer())
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in module.__dict__:
                delattr(module, attr)
        left = [n for n, _ in module.named_parameters() if any(t in n for t in ("lora_", "hada_", "lokr_"))]
        if left:
            raise RuntimeError(f"adapter weights left after stripping: {left[:3]}")


def peft_change(layer):
    """(base weight, peft's merged weight − base) of one adapter layer; the base weight is restored bit for bit."""
    import torch

    weight = layer.get_base_layer().weight
    with torch.no_grad():
        base = weight.detach().clone()
        layer.merge()
        delta = layer.get_base_layer().weight.detach().float() - base.float()
        layer.unmerge()
        layer.get_base_layer().weight.data.copy_(base)  # unmerge is not exact in floating point
    return base.float(), delta


def comfy_target(key_map: dict, prefix: str):
    """(weight key, narrow (dim, start, size) or None, reorder function or None) of a LoRA key prefix, or None."""
    target = key_map.get(prefix)
    if target is None:
        return None
    if isinstance(target, str):
        return target, None, None
    return target[0], (target[1] if len(target) > 1 else None), (target[2] if len(target) > 2 else None)


class Loaded:
    """ComfyUI's patchers loaded as for sampling (``comfy.model_management.load_models_gpu``, which swaps out any
    other patcher of the same model): ``weights(key)`` is (unpatched, patched) from ComfyUI's own backup."""

    def __init__(self, patchers: dict) -> None:
        self.patchers = patchers
        self.owner = {k: which for which, p in patchers.items() for k in p.patches}

    def __enter__(self) -> "Loaded":
        import comfy.model_management as mm

        mm.unload_all_models()
        try:
            mm.load_models_gpu(list(self.patchers.values()), force_full_load=True)
        except TypeError:  # the 2024 tree has no force_full_load
            mm.load_models_gpu(list(self.patchers.values()))
        return self

    def __exit__(self, *exc) -> None:
        import comfy.model_management as mm

        mm.unload_all_models()

    def weights(self, key: str):
        import comfy.utils

        patcher = self.patchers[self.owner[key]]
        backup = patcher.backup[key]
        before = getattr(backup, "weight", backup)  # a namedtuple in 0.8.0, the tensor in the 2024 tree
        return before.detach().float(), comfy.utils.get_attr(patcher.model, key).detach().float()


def compare(case, network: str, tmp: Path) -> tuple[list[str], str]:
    """(problems, summary) of one family × network type (see the module doc)."""
    import comfy.lora
    import comfy.sd
    import comfy.utils
    import torch

    from trainer.export import adapter_layers, export_peft_modules
    from trainer.fileio import save_safetensors
    from trainer.lora_keys import key_style

    net = attach_random_adapter(case, network)
    try:
        path = save_safetensors(tmp / f"{case.family}_{network}.safetensors",
                                export_peft_modules(case.family, net.modules, dtype=torch.float32))
        with LogCapture() as log:
            lora = comfy.utils.load_torch_file(str(path), safe_load=True)
            model, clip = comfy.sd.load_lora_for_models(case.model, case.clip, lora, 1.0, 1.0)
        problems = [f"ComfyUI: {m}" for m in log.matching("lora key not loaded", "NOT LOADED")][:20]
        key_map = comfy.lora.model_lora_keys_unet(case.model.model, {})
        if case.clip is not None:
            key_map = comfy.lora.model_lora_keys_clip(case.clip.cond_stage_model, key_map)
        patchers = {"model": model, **({"clip": clip.patcher} if clip is not None else {})}
        worst, touched, counts = 0.0, set(), {}
        with Loaded(patchers) as loaded:
            for component, module in net.modules.items():
                layers = adapter_layers(module)
                counts[component] = len(layers)
                for name, layer in layers.items():
                    prefix = key_style(case.family, component).module_key(name)
                    error = _compare_module(prefix, comfy_target(key_map, prefix), layer, loaded, touched, problems)
                    worst = max(worst, error)
        extra = sorted(set(loaded.owner) - touched)
        if extra:
            problems.append(f"ComfyUI patched {len(extra)} weight(s) no adapted module maps to: {extra[:5]}")
        summary = (f"{len(lora)} tensors, modules {counts}, {len(loaded.owner)} ComfyUI weights patched, "
                   f"max relative error {worst:.2e}")
        return problems[:40], summary
    finally:
        strip_adapter(net)


def _compare_module(prefix: str, target, layer, loaded: Loaded, touched: set, problems: list) -> float:
    """ComfyUI's change of the weight ``prefix`` maps to against peft's merged change of ``layer``; the relative
    error (a problem is appended when it is too big or the weights cannot be compared)."""
    import torch

    if target is None:
        problems.append(f"{prefix}: not in ComfyUI's LoRA key map")
        return 0.0
    key, narrow, reorder = target
    if key not in loaded.owner:
        problems.append(f"{prefix}: ComfyUI did not patch its weight {key}")
        return 0.0
    touched.add(key)
    before, after = loaded.weights(key)
    if narrow is not None:
        before, after = before.narrow(*narrow), after.narrow(*narrow)
    if reorder is not None:  # ComfyUI's layout -> diffusers' (swap_scale_shift is its own inverse)
        before, after = reorder(before), reorder(after)
    peft_base, peft_delta = peft_change(layer)
    if before.numel() != peft_base.numel():
        problems.append(f"{prefix}: ComfyUI's weight {key} {tuple(before.shape)} vs peft {tuple(peft_base.shape)}")
        return 0.0
    before, after = before.reshape(peft_base.shape), after.reshape(peft_base.shape)
    if not torch.equal(before, peft_base):
        problems.append(f"{prefix}: ComfyUI's unpatched weight {key} differs from the diffusers module's "
                        f"(max {float((before - peft_base).abs().max()):.3g})")
        return 0.0
    scale = float(peft_delta.abs().max())
    error = float(((after - before) - peft_delta).abs().max()) / max(scale, 1e-12)
    if error >= MAX_RELATIVE_ERROR:
        problems.append(f"{prefix} -> {key}: max relative error {error:.3g} (change max {scale:.3g})")
    return error


def main() -> None:
    import gc
    import tempfile

    import torch

    # On the CPU the 2024 tree keeps text encoders in float16; the comparison needs ComfyUI's float32 weights.
    args = setup_comfy(comfy_flags=("--fp32-text-enc",))
    torch.set_grad_enabled(False)
    import comfy_models

    wanted = {n for n in args.only.split(",") if n} or set(comfy_models.FAMILIES)
    for family in comfy_models.FAMILIES:
        if family not in wanted:
            continue
        if not comfy_models.supported(family):
            status = "fail" if family in MUST_SUPPORT.get(args.comfy_version, ()) else "skip"
            report(status, f"{family} LoRA files", f"this ComfyUI ({args.comfy_version}) has no "
                   f"comfy.supported_models.{comfy_models.CONFIG_CLASS[family]}")
            continue
        try:
            case = comfy_models.build(family)
        except Exception:  # noqa: BLE001 - report and go on with the next family
            import traceback

            report("fail", f"{family} model for the LoRA checks", traceback.format_exc()[-3000:])
            continue
        report("pass", f"{family} model recognised by ComfyUI", case.how)
        with tempfile.TemporaryDirectory(prefix=f"crucible-lora-{family}-") as tmp:
            for network in NETWORKS:
                name = f"{family} {network} file: ComfyUI loads every key, patch equals peft's merge"
                if network == "dora" and not comfy_models.supports_dora():
                    status = "fail" if args.comfy_version in MUST_SUPPORT else "skip"
                    report(status, name, f"this ComfyUI ({args.comfy_version}) has no DoRA support "
                                         "(no dora_scale in comfy/lora.py)")
                    continue
                try:
                    with torch.enable_grad():  # the adapter is injected as in training
                        problems, summary = compare(case, network, Path(tmp))
                except Exception:  # noqa: BLE001
                    import traceback

                    report("fail", name, traceback.format_exc()[-3000:])
                    continue
                report("fail" if problems else "pass", name, "\n".join(problems) if problems else summary)
        del case
        gc.collect()


if __name__ == "__main__":
    main()
