"""Train the graph's own MODEL / CLIP / VAE: a model family around the objects ComfyUI's loaders return.

:class:`ComfyModelFamily` is a :class:`trainer.families.ModelFamily` built at run time around one ``MODEL``
(ComfyUI's ``ModelPatcher``), its ``CLIP`` and ``VAE``; the Train node registers it with
``trainer.hosted_family`` for the run, so the loop, the exporter and the settings check use it unchanged
(``trainer/`` never imports ComfyUI; every ComfyUI import here happens inside a method).

* predict: ``model.model.apply_model(x, σ, c_crossattn=…, **extra conds)`` with the model's own ``model_sampling``.
  The loop speaks DDPM (``x_t = √ᾱ·x0 + √(1-ᾱ)·ε``, integer t, target ε or v) or rectified flow (``x_t = (1-σ)·x0 +
  σ·ε``, t = σ·1000, target ε − x0); ComfyUI's discrete ε/v models take ``x0 + σ·ε`` with ``σ = √((1-ᾱ)/ᾱ)``, its
  flow models ``(1-σ)·x0 + σ·ε`` with σ. The noise schedule given to the loop is rebuilt from the model's own σ
  table, so the loop draws exactly the σ ComfyUI samples with; ``apply_model`` returns the denoised x0, from which
  the raw output the loop's objective expects (ε, v or velocity) is recovered exactly as ComfyUI derived x0 from it.
* encode_text: ``clip.encode_from_tokens(clip.tokenize(text), return_dict=True)`` per caption (every text encoder
  ComfyUI supports); encode_images: ``vae.encode`` and the latent format's ``process_in``.
* LoRA: peft on ``model.model.diffusion_model``'s Linear / Conv modules (ComfyUI's casting ops stay the base layer,
  so fp8 weights are cast per forward as ComfyUI does; scaled-fp8 layers: nodes/comfy_weights.py);
  :meth:`ComfyModelFamily.restore` removes it again, so the user's MODEL is unchanged after the run. Around every
  ComfyUI call (encodes, previews, the load before each forward) the adapter is out of the tree, so ComfyUI may
  unload / re-patch the MODEL mid-run (comfy_adapter_swap).
* Export keys: ComfyUI's own ``comfy.lora.model_lora_keys_unet`` for the loaded model names every key, so the stock
  LoraLoader loads each one by construction (``nodes/comfy_keys.py``); which modules each target preset
  trains: ``nodes/comfy_presets.py``.
* Text encoders (``network.train_text_encoder``): the CLIP's CLIP-L/G/H towers train as components ``text_encoder``
  (``_2``) through the same encode path, with gradients; keys from ``comfy.lora.model_lora_keys_clip``
  (``nodes/comfy_text.py``); ComfyUI may unload / re-patch the CLIP mid-run too (the towers are swap roots);
  :meth:`ComfyModelFamily.restore` takes their adapter out of the user's CLIP too.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Mapping, Sequence

import torch

from ..trainer import Components, CrucibleError, ModelFamily
from .comfy_adapter_swap import AdapterSwap
from .comfy_autograd import differentiable_rope, out_of_place_updates
from .comfy_conds import apply_grouped, batch_clip_outputs, sample_kwargs
from .comfy_keys import PREFIX, ComfyKeyStyle, lora_key_names
from .comfy_presets import preset_modules
from .comfy_text import clip_key_names, text_towers, tower_modules, tower_targets
from .comfy_upstream import ddpm_scheduler, model_sampling_of, upstream_of, warn_upstream
from .comfy_weights import QuantizedLinearViews, usable_by_autograd

HOSTED_NAME = "comfy"  # model.family of a run through the graph's MODEL
COMPONENT = "unet"  # the denoiser's component name (ComfyUI's LoRA keys call every diffusion model lora_unet_)
COND, POOLED, GEOMETRY = "encoder_hidden_states", "pooled_output", "image_geometry"
# ComfyUI's ModelSamplingFlux node (and FluxPipeline's calculate_shift): μ = base_shift at 256 image tokens, max_shift
# at 4096, linear in between
FLUX_BASE_SHIFT, FLUX_BASE_TOKENS, FLUX_MAX_TOKENS = 0.5, 256, 4096
EXTRA = "comfy:"  # other CLIP outputs (attention masks, …) travel in the conditioning under this prefix

class HostedModule(torch.nn.Module):
    """A module ComfyUI owns, seen by the loop: ``.to()`` is a no-op, because ComfyUI's memory management places
    and casts its weights (the loop's dtype casts would otherwise turn an fp8 model into bf16 in the user's MODEL).
    The wrapped module is the child ``diffusion_model`` / ``first_stage_model``, so peft names match ComfyUI's."""

    def __init__(self, name: str, module: torch.nn.Module):
        super().__init__()
        self.add_module(name, module)
        self.hosted_name = name

    @property
    def inner(self) -> torch.nn.Module:
        return getattr(self, self.hosted_name)

    def to(self, *args, **kwargs):  # placement belongs to ComfyUI
        return self

    def forward(self, *args, **kwargs):  # pragma: no cover - the family calls ComfyUI's apply_model instead
        raise CrucibleError("a ComfyUI model runs through its own apply_model, not this wrapper")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block of the model's top-level block lists (UNet input/output blocks, DiT layers) in the
        backward pass (non-reentrant ``torch.utils.checkpoint``), as the loop asks of every trained module."""
        from torch.utils.checkpoint import checkpoint

        for block in self._blocks():
            if "forward" in vars(block):
                continue  # already wrapped

            def run(*args, _forward=block.forward, **kwargs):
                if torch.is_grad_enabled():  # recomputed blocks update out of place too (comfy_autograd)
                    return checkpoint(_call_out_of_place, _forward, *args, use_reentrant=False, **kwargs)
                return _forward(*args, **kwargs)

            block.forward = run
            block._crucible_checkpointed = True

    def disable_gradient_checkpointing(self) -> None:
        for block in self._blocks():
            if vars(block).pop("_crucible_checkpointed", False):
                vars(block).pop("forward", None)

    def _blocks(self) -> list[torch.nn.Module]:
        """The blocks of the top-level block lists, and the top-level blocks of ComfyUI's own Sequential kinds (the
        UNet's middle block); a Sequential block by its layers, because ComfyUI's UNet runs those itself
        (``forward_timestep_embed`` never calls the block's forward, so wrapping it did nothing)."""
        blocks = [block for child in self.inner.children() for block in (
            child if isinstance(child, torch.nn.ModuleList) else [child] if isinstance(child, torch.nn.Sequential)
            and type(child) is not torch.nn.Sequential else [])]
        layers = [layer for block in blocks for layer in (block if isinstance(block, torch.nn.Sequential) else [block])]
        # a layer that runs a list of blocks itself (the UNet's SpatialTransformer: up to 10 transformer blocks)
        # checkpoints each of them, as diffusers does, so one recompute never holds the whole list's activations
        return [unit for layer in layers for unit in ([b for c in layer.children() if isinstance(c, torch.nn.ModuleList)
                                                       for b in c] or [layer])]


def _call_out_of_place(forward, *args, **kwargs):
    with out_of_place_updates():
        return forward(*args, **kwargs)


def held_loaded(patcher) -> bool:
    """ComfyUI holds this MODEL as its last ``load_models_gpu`` left it: among its loaded models, every weight on the
    load device (no low-VRAM streaming), its own weight patches applied, no extra patch models to load with it. Then
    another ``load_models_gpu`` changes nothing, and ``predict`` skips it with the adapter swap and the inference-tensor
    walk around it (together ~85 ms per forward on the full-size SDXL UNet's ~9000 modules, measured on the CPU;
    the call alone ~0.05 ms). Any unload, partial unload or re-patch fails one of these tests."""
    import comfy.model_management as mm

    model = patcher.model
    try:
        return (any(loaded.model is patcher for loaded in getattr(mm, "current_loaded_models", ()))
                and getattr(model, "model_lowvram", True) is False
                and patcher.loaded_size() >= patcher.model_size() > 0
                and getattr(model, "current_weight_patches_uuid", None) == patcher.patches_uuid
                and not patcher.model_patches_models())
    except AttributeError:  # a ComfyUI without these: always load, as before
        return False


def _prediction_of(model_sampling) -> str:
    """epsilon | v_prediction | flow, from the classes ComfyUI mixes into the model's model_sampling: a discrete
    1000-step ε or v schedule, or rectified flow (SD3-style or Flux σ shift). Anything else is refused by name."""
    import comfy.model_sampling as ms

    kind = type(model_sampling)
    discrete = isinstance(model_sampling, ms.ModelSamplingDiscrete) and not isinstance(
        model_sampling, (ms.ModelSamplingDiscreteEDM, ms.StableCascadeSampling))
    if discrete and isinstance(model_sampling, ms.V_PREDICTION) and not isinstance(model_sampling, ms.EDM):
        return "v_prediction"
    if discrete and isinstance(model_sampling, ms.EPS) and not isinstance(model_sampling, (ms.V_PREDICTION, ms.X0)):
        return "epsilon"
    if isinstance(model_sampling, ms.CONST) and isinstance(model_sampling, (ms.ModelSamplingDiscreteFlow,
                                                                             ms.ModelSamplingFlux)):
        return "flow"
    raise CrucibleError(f"the MODEL's sampling ({kind.__name__}) is neither a discrete ε/v schedule nor rectified "
                        "flow; Crucible cannot train it through the comfy_model input yet")


class ComfyModelFamily(ModelFamily):
    """One run's family around ComfyUI's MODEL, CLIP and VAE (see the module docstring)."""

    name = HOSTED_NAME
    title = "ComfyUI MODEL"
    denoiser_name = COMPONENT
    modelspec_implementation = "comfyui"

    @property
    def guidance_distilled(self) -> bool:
        """The diffusion model embeds a guidance value (Flux dev): ``training.guidance_scale`` feeds it."""
        return bool(getattr(getattr(self.patcher.model.diffusion_model, "params", None), "guidance_embed", False))

    @property
    def honoured_settings(self) -> frozenset[str]:
        return frozenset({"clip_skip"} | ({"guidance_scale"} if self.guidance_distilled else set()))

    def __init__(self, model, clip, vae, key_map: Mapping[str, str] | None = None, train_text_encoder: bool = False,
                 clip_key_map: Mapping[str, str] | None = None):
        if model is None or clip is None or vae is None:
            missing = [n for n, v in (("comfy_model", model), ("comfy_clip", clip), ("comfy_vae", vae)) if v is None]
            raise CrucibleError(f"Crucible Train: the MODEL path needs comfy_model, comfy_clip and comfy_vae connected; "
                                f"missing {', '.join(missing)} (connect your Load Checkpoint's outputs)")
        self.patcher, self.clip, self.vae = model, clip, vae
        base = model.model
        self.title = f"ComfyUI {type(base).__name__}"
        self.base_model_version = type(base).__name__
        self.modelspec_architecture = f"comfyui/{type(base).__name__}"
        self.default_prediction = _prediction_of(model_sampling_of(model))  # ModelSampling* patches included
        self.base_patches = upstream_of(model)  # LoRAs etc. applied upstream (nodes/comfy_upstream.py)
        self.latent_channels = int(getattr(base.latent_format, "latent_channels", 4))
        if key_map is None:
            import comfy.lora

            key_map = comfy.lora.model_lora_keys_unet(base, {})
        self.key_map = dict(key_map)
        self.guidance = None
        self._denoiser = HostedModule("diffusion_model", base.diffusion_model)
        self._swap = AdapterSwap(base.diffusion_model)  # ComfyUI's view of the MODEL (nodes/comfy_adapter_swap.py)
        self._views = QuantizedLinearViews(base.diffusion_model)  # scaled-fp8 layers as Linear until restore()
        try:
            self._collect_modules(base, train_text_encoder, clip_key_map)
        except BaseException:
            self._views.undo()
            raise

    def _collect_modules(self, base, train_text_encoder: bool, clip_key_map) -> None:
        """The trainable modules and their LoRA key names (diffusion model; CLIP towers when trained)."""
        modules = {f"{PREFIX}{n}": m for n, m in base.diffusion_model.named_modules() if n}
        self._mapped = set(self.key_map.values())
        self._modules = modules
        self.lora_targets = {COMPONENT: {}}  # computed per preset on demand (lora_target_modules)
        names = [n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                 and n + ".weight" in self._mapped]
        self.key_styles = {COMPONENT: ComfyKeyStyle("lora_unet", kohya=True, names=lora_key_names(names, self.key_map))}
        self.towers, self.frozen_encoders, self._tower_modules = [], [], {}
        if train_text_encoder:
            self._add_text_towers(clip_key_map)

    def _add_text_towers(self, clip_key_map: Mapping[str, str] | None) -> None:
        """The CLIP text towers as trained components, their modules and LoRA key names (nodes/comfy_text.py)."""
        if clip_key_map is None:
            import comfy.lora

            clip_key_map = comfy.lora.model_lora_keys_clip(self.clip.cond_stage_model, {})
        self.towers, self.frozen_encoders = text_towers(self.clip.cond_stage_model, clip_key_map)
        mapped = set(clip_key_map.values())
        numbered = len(self.towers) + len(self.frozen_encoders) > 1  # kohya: lora_te_ for one encoder, lora_teN_ else
        for tower in self.towers:
            modules = tower_modules(tower, mapped)
            self._tower_modules[tower.component] = modules
            self.key_styles[tower.component] = ComfyKeyStyle(
                "lora_te", kohya=True, names=clip_key_names(list(modules), clip_key_map, numbered))
            self._swap.add_encoder(tower.module)  # ComfyUI loads / unloads the CLIP too (comfy_adapter_swap)

    # --- loading: the graph already loaded everything --------------------------------------------------------
    def load(self, cfg, device="cpu", dtype=None) -> Components:
        import comfy.model_management as mm

        # ComfyUI places (and, in low-VRAM mode, streams) the weights; a trained CLIP with them
        mm.load_models_gpu([self.patcher] + ([self.clip.patcher] if self.towers else []))
        base = self.patcher.model
        with torch.inference_mode(False):
            for module in [base.diffusion_model, *(tower.module for tower in self.towers)]:
                usable_by_autograd(module)
        if self.frozen_encoders:
            import logging

            logging.getLogger("crucible").warning(
                "train_text_encoder: %s train; %s stay frozen (the MODEL path trains CLIP text encoders only, as "
                "kohya trains T5 only with --train_t5xxl)", ", ".join(t.child for t in self.towers),
                ", ".join(self.frozen_encoders))
        differentiable_rope()  # comfy-kitchen's RoPE kernels have no backward of their own
        warn_upstream(self.base_patches)
        ms = model_sampling_of(self.patcher)
        if self.default_prediction == "flow":
            from diffusers import FlowMatchEulerDiscreteScheduler

            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        else:
            scheduler = ddpm_scheduler(ms.sigmas.detach().float().cpu(), self.default_prediction)
        return Components(denoiser=self._denoiser, vae=HostedModule("first_stage_model", self.vae.first_stage_model),
                          text_encoders=[HostedModule(t.child, t.module) for t in self.towers], tokenizers=[],
                          noise_scheduler=scheduler, denoiser_name=COMPONENT,
                          text_encoder_names=tuple(t.component for t in self.towers),
                          source=f"ComfyUI {type(base).__name__}",
                          extras={"comfy_model": self.patcher, "comfy_clip": self.clip, "comfy_vae": self.vae})

    def latent_cache_identity(self, cfg, comps: Components) -> str:
        """The graph's VAE has no file path here: its weights themselves (a hash of every tensor's bytes, once per
        run), so a later run with another VAE never reuses these latents from the disk cache."""
        import hashlib

        digest = hashlib.blake2b(digest_size=8)
        for name, tensor in sorted(self.vae.first_stage_model.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return f"comfy-vae-{digest.hexdigest()}"

    def restore(self) -> None:
        """Take the trained adapter out of the user's MODEL and CLIP again (peft layers → their base layers)."""
        self._denoiser.disable_gradient_checkpointing()
        self._swap.forget()  # a layer taken out is out already
        self._swap.take_out()  # the diffusion model's and every trained tower's, for good
        self._swap.forget()
        self._views.undo()  # each quantized layer's own class again (nodes/comfy_weights.py)

    def lora_target_modules(self, component: str, preset: str) -> list[str]:
        if component in self._tower_modules:
            from ..trainer import TEXT_ENCODER_TARGETS

            if preset not in TEXT_ENCODER_TARGETS["clip_l"]:
                raise CrucibleError(f"network.target_preset '{preset}' is unknown")
            return tower_targets(self._tower_modules[component], TEXT_ENCODER_TARGETS["clip_l"][preset])
        if component != COMPONENT:
            raise CrucibleError(f"the MODEL path trains the diffusion model and the CLIP's CLIP text encoders, not "
                                f"'{component}'")
        chosen = preset_modules(self._modules, preset, self._mapped)
        if not chosen:
            raise CrucibleError(f"network.target_preset '{preset}' matched no module of {self.title} that ComfyUI "
                                "maps LoRA keys for; choose all_linear")
        return chosen

    # --- training ----------------------------------------------------------------------------------------------
    def configure_training(self, comps: Components, training: Any) -> None:
        self.guidance = float(training.guidance_scale)

    def flow_shift(self, comps: Components, latents: torch.Tensor) -> float | None:
        """The σ shift of ``training.flow_shift`` 0 ("auto"). A guidance-distilled model with Flux's time shift
        (Flux dev) shifts by resolution as the diffusers path does: ComfyUI's *ModelSamplingFlux* rule for this
        latent size, with the MODEL's own shift as ``max_shift`` (1.15 on a stock Flux dev, so this is exactly
        ``FluxPipeline``'s ``exp(mu)``). Any other flow model, and a MODEL whose sampling a ModelSampling* node
        patched upstream, trains with the shift it samples with."""
        ms = model_sampling_of(self.patcher)
        import comfy.model_sampling as cms

        patched = "model_sampling" in (getattr(self.patcher, "object_patches", None) or {})
        if isinstance(ms, cms.ModelSamplingFlux):  # flux_time_shift(μ, 1, t) is the σ shift by e^μ
            mu = float(ms.shift)
            if self.guidance_distilled and not patched:
                tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)  # 2×2 patches
                slope = (mu - FLUX_BASE_SHIFT) / (FLUX_MAX_TOKENS - FLUX_BASE_TOKENS)
                mu = FLUX_BASE_SHIFT + slope * (tokens - FLUX_BASE_TOKENS)
            return math.exp(mu)
        shift = getattr(ms, "shift", None)
        return float(shift) if shift is not None else None

    def encode_text(self, comps: Components, captions: Sequence[str], clip_skip: int = 1,
                    max_token_length: int = 75, weights=None):
        if weights is not None:
            raise CrucibleError("weighted_captions: ComfyUI's CLIP reads (word:1.2) itself; turn weighted_captions off")
        clip = self.clip
        if clip_skip > 1:
            clip = clip.clone()
            clip.clip_layer(-clip_skip)
        trains = bool(self.towers) and torch.is_grad_enabled()  # ComfyUI's CLIP layers add to x in place
        with self._swap.comfy_encodes(usable_by_autograd), out_of_place_updates() if trains else nullcontext():
            outs = [clip.encode_from_tokens(clip.tokenize(text), return_dict=True) for text in captions]
        device = next(comps.denoiser.parameters()).device  # captions of different lengths: comfy_conds
        return batch_clip_outputs(outs, COND, POOLED, EXTRA, device)

    def encode_images(self, comps: Components, pixels: torch.Tensor) -> torch.Tensor:
        images = ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)  # ComfyUI IMAGE: [B,H,W,C] in [0,1]
        with self._swap.comfy_owns_model():  # loading the VAE may unload the MODEL
            latents = self.vae.encode(images)
        return self.patcher.model.process_latent_in(latents).to(pixels.device)

    def _sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        ms = model_sampling_of(self.patcher)
        if self.default_prediction == "flow":
            return timesteps.float() / 1000.0  # the loop's t = σ·1000 (FlowMatchingObjective)
        return ms.sigma(timesteps.float()).to(timesteps.device)

    def _model_conds(self, cond, x: torch.Tensor) -> list[dict[str, Any]]:
        """ComfyUI's model-specific inputs (``extra_conds``: c_crossattn, SDXL's y, Flux guidance, …) per sample,
        each caption at its own length (``predict`` batches them as ComfyUI's sampler does)."""
        base = self.patcher.model
        factor = self.vae.spacial_compression_encode() if hasattr(self.vae, "spacial_compression_encode") else 8
        height, width = x.shape[-2] * factor, x.shape[-1] * factor
        per_sample = []
        for i in range(x.shape[0]):
            params = {"noise": x[i:i + 1], "device": x.device, "width": width, "height": height,
                      "target_width": width, "target_height": height, **sample_kwargs(cond, i, COND, POOLED, EXTRA)}
            if GEOMETRY in cond:  # SDXL: original size and crop of this image (kohya's size conditioning)
                h, w, top, left = (int(v) for v in cond[GEOMETRY][i].tolist())
                params.update(height=h, width=w, crop_h=top, crop_w=left)
            if self.guidance is not None:
                params["guidance"] = self.guidance
            conds = base.extra_conds(**params)
            per_sample.append({k: c.process_cond(batch_size=1, device=x.device, area=None) for k, c in conds.items()})
        return per_sample

    def predict(self, comps: Components, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        import comfy.model_management as mm
        from comfy.samplers import cond_cat, cond_equal_size

        base = self.patcher.model
        if not held_loaded(self.patcher):  # ComfyUI moved it out (a VAE / CLIP / preview load) or never loaded it
            with self._swap.comfy_owns_model():  # reloaded and re-patched (upstream LoRAs)
                mm.load_models_gpu([self.patcher])
                with torch.inference_mode(False):
                    usable_by_autograd(base.diffusion_model)  # a reload brings back the loader's inference tensors
        sigma = self._sigma(timesteps).to(noisy_latents.device, torch.float32)
        s = sigma.view(-1, *([1] * (noisy_latents.ndim - 1)))
        if self.default_prediction == "flow":
            x = noisy_latents.float()
        else:  # the loop's √ᾱ·x0 + √(1-ᾱ)·ε is ComfyUI's (x0 + σ·ε)/√(1+σ²)
            x = noisy_latents.float() * torch.sqrt(1.0 + s * s)
        with out_of_place_updates():  # ComfyUI's blocks add to their residual streams in place
            denoised = apply_grouped(self._model_conds(cond, x), x, sigma,
                                     lambda xs, ss, **c: base.apply_model(xs, ss, transformer_options={}, **c),
                                     cond_equal_size, cond_cat)  # samples batched only as ComfyUI's sampler would
        if self.default_prediction == "v_prediction":  # ComfyUI: x0 = x/(σ²+1) − v·σ/√(σ²+1)
            return (x / (s * s + 1.0) - denoised) * torch.sqrt(s * s + 1.0) / s
        return (x - denoised) / s  # ε (x0 = x − σ·ε) and flow velocity (x0 = x − σ·v)

    # --- sampling ----------------------------------------------------------------------------------------------
    def pipeline(self, comps: Components):
        raise CrucibleError("a ComfyUI MODEL has no diffusers pipeline; previews use ComfyUI's sampler")

    def sample(self, comps: Components, prompts: Sequence[str], *, seed: int, steps: int, cfg: float,
               width: int, height: int, negative_prompt: str = "", guidance: float | None = None):
        """Previews through ComfyUI's own sampler (euler, normal), the adapter in each forward of the MODEL."""
        def conditioning(text: str):
            out = self.clip.encode_from_tokens(self.clip.tokenize(text), return_dict=True)
            cond = out.pop("cond")
            if guidance is not None:
                out["guidance"] = guidance
            return [[cond, out]]

        factor = self.vae.spacial_compression_encode() if hasattr(self.vae, "spacial_compression_encode") else 8
        with self._swap.comfy_owns_model(), self._swap.adapter_in_forwards():  # adapters only inside forwards
            return self._sample(prompts, conditioning, factor, seed, steps, cfg, width, height, negative_prompt)

    def _sample(self, prompts, conditioning, factor, seed, steps, cfg, width, height, negative_prompt):
        import comfy.sample
        from PIL import Image

        negative = conditioning(negative_prompt)
        images = []
        for prompt in prompts:
            latent = torch.zeros([1, self.latent_channels, height // factor, width // factor])
            latent = comfy.sample.fix_empty_latent_channels(self.patcher, latent)
            noise = comfy.sample.prepare_noise(latent, seed)
            samples = comfy.sample.sample(self.patcher, noise, steps, cfg, "euler", "normal", conditioning(prompt),
                                          negative, latent, denoise=1.0, seed=seed, disable_pbar=True)
            decoded = self.vae.decode(samples)  # IMAGE [B,H,W,C] (video VAEs add a frame axis)
            pixels = decoded.reshape(-1, *decoded.shape[-3:])[0].clamp(0, 1)
            array = (pixels.float().cpu().numpy() * 255).round().astype("uint8")
            images.append(Image.fromarray(array))
        return images

    def full_export_state_dict(self, comps: Components):
        raise CrucibleError("the MODEL path trains LoRA-type adapters only; full fine-tunes use the Crucible Model path")


def hosted_model_config(model, clip, vae, crucible_model=None, network=None):
    """The family, model config and network config of a Train run through the graph's MODEL / CLIP / VAE.
    The adapter trains the diffusion model and, with ``train_text_encoder``, the CLIP's CLIP text encoders; full
    fine-tunes (and a CLIP with no CLIP text encoder to train) are refused by name, before anything is built."""
    from ..trainer import ModelConfig, NetworkConfig

    missing = [n for n, v in (("comfy_model", model), ("comfy_clip", clip), ("comfy_vae", vae)) if v is None]
    if missing:
        raise CrucibleError(f"Crucible Train: the MODEL path needs comfy_model, comfy_clip and comfy_vae connected; "
                            f"missing {', '.join(missing)} (connect your Load Checkpoint's outputs)")
    if crucible_model is not None:
        raise CrucibleError("Crucible Train: connect either 'model' (a Crucible Model) or comfy_model/clip/vae, not both")
    network = network or NetworkConfig()
    if network.network_type == "full":
        raise CrucibleError("Crucible Network Options: network_type 'full' is not available with comfy_model (it would "
                            "overwrite the loaded model); choose lora, dora, loha or lokr")
    family = ComfyModelFamily(model, clip, vae, train_text_encoder=network.train_text_encoder)
    return family, ModelConfig(family=family.name), network
