"""Estimated peak training memory of a run through the graph's MODEL / CLIP / VAE (issue 16, "tell the user before
training"), for the Step Plan node.

The Crucible Model path estimates from full-size architectures it knows by name (:mod:`trainer.memory`). Here the
model is whatever ComfyUI loaded, so every part is read from the loaded objects themselves:

=====================  ==============================================================================================
part                   bytes
=====================  ==============================================================================================
denoiser weights       Σ numel × element size of the diffusion model's tensors as stored (an fp8 checkpoint or
                       ``weight_dtype`` fp8 on Load Diffusion Model: 1 byte; ComfyUI's manual cast computes in
                       ``manual_cast_dtype`` per layer and stores as loaded)
trainable parameters   the adapter the run attaches (network type, rank, conv/block ranks, the target preset's
                       modules: ``comfy_presets.preset_modules`` via the family), counted exactly by attaching it
                       to a ``meta`` copy of the module tree: × (4 weight + 4 gradient + optimizer state bytes)
activations            one forward of the ``meta`` copy (ComfyUI's own ``apply_model`` with the run's conditioning
                       shapes, resolution and batch) traced with :func:`trainer.memory.traced_activation_bytes`:
                       saved tensors once per storage, weights left out, attention as a fused kernel; with gradient
                       checkpointing the blocks the run checkpoints (``HostedModule``'s block lists) count as units.
                       Scaled to 2 bytes under bf16/fp16 autocast
text encoders, VAE     ComfyUI's model management owns them: after encoding they stay loaded until it needs the
                       room. They count during the steps when their cache is off (every batch is encoded: the CLIP
                       / VAE are loaded then), and in the caching peak before step 1 (the MODEL is loaded first, then
                       the caches fill with CLIP and VAE loaded). On the CPU they always count (host memory is the
                       device)
VAE encode transient   without a latent cache: 3 feature maps of the VAE encoder's first convolution's width at full
                       resolution (as :mod:`trainer.memory`)
previews (a third      with preview prompts (``MemoryOptions.previews``), :func:`trainer.memory.preview_terms`
peak, between steps)   for the loaded VAE (its bytes as stored, the decoder's widest layer): each preview re-encodes its
                       prompts with the CLIP, samples with the MODEL, then ``VAE.decode`` loads the VAE from host memory
                       and frees what ComfyUI owns (the MODEL, the CLIP) to make room for it and its decode. So on a GPU
                       the adapter, its gradients and optimizer state + the VAE + its decode; on the CPU the training
                       peak's weights and encoders (all in host memory) + the decode. The CLIP's load for the prompts
                       stays below the training or caching peak, which hold the CLIP and the MODEL at once
=====================  ==============================================================================================

ComfyUI's manual cast (fp8 weights computed in bf16) runs in the trace, so each layer's cast copy that the backward
pass keeps is counted (a whole bf16 copy of the model without gradient checkpointing; one block's with it).
Not counted (a floor, like :mod:`trainer.memory`): the CUDA context and allocator fragmentation; autocast's copies
of weights stored in another dtype than the compute dtype (fp16 weights under bf16 autocast: the trace runs without
autocast); split or sub-quadratic attention (ComfyUI's CPU default), which saves more than a fused kernel. Only ComfyUI-specific glue lives here; the arithmetic it shares is :mod:`trainer.memory`'s.
"""
from __future__ import annotations

import copy
import types
from dataclasses import replace
from types import SimpleNamespace

import torch

from ..trainer import (OPTIMIZER_STATE_BYTES, Components, Estimate, MemoryOptions, attach_network, preview_terms,
                       traced_activation_bytes)
from .comfy_family import COMPONENT, HostedModule, out_of_place_updates

GIB = 2**30
TRANSIENT = "vae encode (transient)"


def meta_copy(module: torch.nn.Module, memo: dict | None = None) -> torch.nn.Module:
    """The module tree with every parameter and buffer replaced by an empty ``meta`` tensor of the same shape and
    dtype: no weight is copied (other attributes are shared, read-only). Tied tensors stay tied."""
    memo = {} if memo is None else memo
    clone = copy.copy(module)
    clone.__dict__ = dict(module.__dict__)
    if vars(clone).pop("_crucible_checkpointed", False):  # a checkpoint wrapper would call the real block
        vars(clone).pop("forward", None)
    for name, value in list(vars(clone).items()):  # methods bound to the original module: bound to the copy
        if isinstance(value, types.MethodType) and value.__self__ is module:
            vars(clone)[name] = types.MethodType(value.__func__, clone)

    def meta(tensor, parameter: bool):
        if tensor is None:
            return None
        if id(tensor) not in memo:
            empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            memo[id(tensor)] = torch.nn.Parameter(empty, requires_grad=False) if parameter else empty
        return memo[id(tensor)]

    clone._parameters = {k: meta(v, True) for k, v in module._parameters.items()}
    clone._buffers = {k: meta(v, False) for k, v in module._buffers.items()}
    clone._modules = {k: None if v is None else meta_copy(v, memo) for k, v in module._modules.items()}
    return clone


def stored_bytes(module) -> int:
    """Bytes of a module's tensors as stored (0 for anything that is not a module: a stand-in CLIP)."""
    if not isinstance(module, torch.nn.Module):
        return 0
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def linear_weight_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes, parameters) of the Linear weights: what fp8 weights would store at 1 byte each."""
    weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear) and m.weight is not None]
    return sum(w.numel() * w.element_size() for w in weights), sum(w.numel() for w in weights)


def clip_module(clip):
    return getattr(clip, "cond_stage_model", None)


def vae_module(vae):
    return getattr(vae, "first_stage_model", None)


def decoder_width(vae) -> int:
    """The width of the VAE decoder's last convolution's input (its widest layer at full resolution: 128 for the SD
    and Flux VAEs), for a preview's decode; 128 where the module has no such layer."""
    conv = getattr(getattr(vae_module(vae), "decoder", None), "conv_out", None)
    return int(conv.in_channels) if isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)) else 128


def encoder_width(vae) -> int:
    """The width of the VAE encoder's first convolution (128 for the SD VAEs), for the encode transient."""
    module = vae_module(vae)
    if isinstance(module, torch.nn.Module):
        for sub in module.modules():
            if isinstance(sub, torch.nn.Conv2d):
                return int(sub.out_channels)
    return 128


class ModelPathEstimator:
    """The estimate for one ComfyModelFamily (the Train node's wrapper around MODEL / CLIP / VAE) and one example
    conditioning (``cond``: what ``family.encode_text`` returns for one caption, batch 1, on any device)."""

    def __init__(self, family, cond: dict, device: str = "cuda"):
        self.family, self.device = family, device
        self.cond = {k: v.detach().to("cpu") if torch.is_tensor(v) else v for k, v in cond.items()}
        self._traces: dict = {}

    # --- parts -------------------------------------------------------------------------------------------------
    def estimate(self, opts: MemoryOptions, network, fp8_weights: bool = False) -> Estimate:
        base = self.family.patcher.model
        host = self.device == "cpu"
        weights = stored_bytes(base.diffusion_model)
        if fp8_weights:  # what-if: Linear weights stored in float8 (ComfyUI weight_dtype fp8_e4m3fn)
            linear, count = linear_weight_bytes(base.diffusion_model)
            weights -= linear - count
        adapter, traced = self._trace(network, opts.gradient_checkpointing, opts.resolution, opts.batch_size)
        b_act = 2 if opts.precision in ("bf16", "fp16") else 4
        vae_model = self.family.vae
        clip, vae = stored_bytes(clip_module(self.family.clip)), stored_bytes(vae_module(vae_model))
        vae_b = _element_size(vae_module(vae_model))
        transient = 3 * encoder_width(vae_model) * opts.resolution ** 2 * opts.batch_size * vae_b
        parts = {"denoiser weights": weights,
                 "text encoders": clip if host or not opts.cache_text_embeddings else 0,
                 "vae": vae if host or not opts.cache_latents else 0,
                 "trainable parameters": adapter * (4 + 4 + OPTIMIZER_STATE_BYTES.get(opts.optimizer, 8)),
                 "activations": traced * b_act // 4}
        caching = 0
        if opts.cache_latents or opts.cache_text_embeddings:  # the MODEL is loaded first, then the caches fill
            caching = weights + adapter * 4 + clip + vae + (transient if opts.cache_latents else 0)
        if not opts.cache_latents:
            parts[TRANSIENT] = transient
        # previews: ComfyUI's VAE lives in host memory (its offload device) and is loaded for each decode, which frees
        # what ComfyUI owns (the MODEL, the CLIP) as far as the VAE and its decode need; the adapter, its gradients and
        # optimizer state stay. On the CPU host memory is the device: everything stays, the VAE counted already.
        preview = preview_terms(opts, vae, vae_b, host, parts["vae"] > 0, decoder_width(vae_model))
        kept = [k for k in parts if k not in ("activations", TRANSIENT)] if host else ["trainable parameters", "vae"]
        previewing = preview.peak(sum(parts[k] for k in kept)) if preview else 0
        return Estimate(opts, {k: v / GIB for k, v in parts.items()}, caching / GIB, previewing / GIB, preview)

    def _trace(self, network, checkpointing: bool, resolution: int, batch: int) -> tuple[int, int]:
        """(adapter parameters, saved activation bytes in fp32 units) from a meta copy of the diffusion model."""
        key = (network, checkpointing, resolution, batch)
        if key not in self._traces:
            self._traces[key] = self._run_trace(network, checkpointing, resolution, batch)
        return self._traces[key]

    def _run_trace(self, network, checkpointing: bool, resolution: int, batch: int) -> tuple[int, int]:
        family = self.family
        base = family.patcher.model
        meta_base = meta_copy(base)
        hosted = HostedModule("diffusion_model", meta_base.diffusion_model)
        comps = Components(denoiser=hosted, vae=None, text_encoders=[], tokenizers=[], noise_scheduler=None,
                           denoiser_name=COMPONENT, text_encoder_names=())
        with torch.device("meta"):
            net = attach_network(family, comps, network)
        adapter = sum(p.numel() for p in net.parameters())
        factor = _spatial_factor(family.vae)
        side = max(1, resolution // factor)
        x = torch.zeros(batch, family.latent_channels, side, side)
        cond = {k: torch.cat([v] * batch) if torch.is_tensor(v) else v for k, v in self.cond.items()}
        from comfy.samplers import cond_cat

        with torch.no_grad():  # ComfyUI's extra_conds on the CPU (small tensors); one caption, so one batch
            conds = cond_cat(family._model_conds(cond, x))
        conds = {k: _to_meta(v) for k, v in conds.items()}
        sigma = torch.full((batch,), 0.5 if family.default_prediction == "flow" else 1.0, device="meta")
        options = _fused_attention_options()
        x_meta = _to_meta(x)
        blocks = hosted._blocks() if checkpointing else []
        meta_base.train()
        for sub in hosted.modules():  # the adapters' module dropout draws a random number per call (off by default)
            if hasattr(sub, "active_adapters") and hasattr(sub, "get_base_layer"):
                sub.training = False

        def forward():
            with torch.enable_grad(), out_of_place_updates():
                meta_base.apply_model(x_meta, sigma, transformer_options=options, **conds)

        return adapter, traced_activation_bytes(meta_base, forward, blocks)


def _to_meta(value):
    if torch.is_tensor(value):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    return value


def _element_size(module) -> int:
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.element_size()
    return 2


def _spatial_factor(vae) -> int:
    return vae.spacial_compression_encode() if hasattr(vae, "spacial_compression_encode") else 8


def _fused_attention_options() -> dict:
    """transformer_options that make ComfyUI's attention run PyTorch's SDPA (counted as a fused kernel), whatever it
    chose for this device (xformers, sage, split or sub-quadratic): what a training step on a GPU saves."""
    try:
        from comfy.ldm.modules.attention import attention_pytorch
    except ImportError:  # ComfyUI's stand-in in unit tests
        return {}
    return {"optimized_attention_override": lambda func, *args, **kwargs: attention_pytorch(*args, **kwargs)}


# --- the device as ComfyUI sees it, and what to switch ---------------------------------------------------------------
def comfy_device() -> tuple[str, float, float, str]:
    """(device type, free GiB, total GiB, ComfyUI's VRAM state) from ComfyUI's model management."""
    import comfy.model_management as mm

    device = mm.get_torch_device()
    free, total = mm.get_free_memory(device), mm.get_total_memory(device)
    kind = getattr(device, "type", str(device))
    state = "host RAM" if kind == "cpu" else getattr(getattr(mm, "vram_state", None), "name", "unknown")
    return kind, free / GIB, total / GIB, state


def fitting_switches(estimator: ModelPathEstimator, opts: MemoryOptions, network, available_gib: float) -> list[str]:
    """Switches that bring the estimate under ``available_gib``, cheapest first, cumulatively (as
    :func:`trainer.memory.fitting_switches` does for the Crucible Model path), ending with "nothing available here
    fits" when even all of them do not."""
    steps = [("gradient_checkpointing on (Training Options)", dict(gradient_checkpointing=True), {}),
             ("cache_latents on", dict(cache_latents=True), {}),
             ("cache_text_embeddings on", dict(cache_text_embeddings=True), {}),
             ("optimizer adamw8bit", dict(optimizer="adamw8bit") if opts.optimizer == "adamw" else None, {}),
             ("fp8 weights (weight_dtype fp8_e4m3fn on Load Diffusion Model, or a ComfyUI fp8 file)",
              {}, dict(fp8=True)),
             (f"network_dim {max(1, network.network_dim // 2)}", dict(network_dim=max(1, network.network_dim // 2))
              if network.network_dim > 4 else None, {}),
             ("batch_size 1", dict(batch_size=1) if opts.batch_size > 1 else None, {}),
             ("a lower resolution (768)", dict(resolution=768) if opts.resolution > 768 else None, {})]
    chosen, fp8 = [], _is_fp8(estimator.family.patcher.model.diffusion_model)
    for label, change, extra in steps:
        if change is None or (extra.get("fp8") and fp8) or \
                (change and all(getattr(opts, k) == v for k, v in change.items())):
            continue
        opts = replace(opts, **change)
        if "network_dim" in change:
            network = replace(network, network_dim=change["network_dim"])
        fp8 = fp8 or bool(extra.get("fp8"))
        chosen.append(label)
        if needed_gib(estimator.estimate(opts, network, fp8_weights=fp8), estimator.device) <= available_gib:
            return chosen
    return chosen + ["nothing available here fits"]


# devices whose out-of-memory error ComfyUI's VAE.decode catches to retry in tiles (comfy/sd.py catches
# model_management.OOM_EXCEPTION, torch.cuda.OutOfMemoryError): CUDA (and ROCm, also "cuda") raises it. MPS has been
# seen raising a plain RuntimeError ("MPS backend out of memory"); XPU is unchecked: there the whole decode counts
TILED_DECODE_RETRY = frozenset({"cuda"})


def needed_gib(est: Estimate, kind: str) -> float:
    """What must fit on ComfyUI's device: the estimate's peak, except a preview's decode on a device whose
    out-of-memory error ``VAE.decode`` retries in tiles (:data:`TILED_DECODE_RETRY`; slower previews, no failed
    run)."""
    return max(est.training_gib, est.caching_gib) if kind in TILED_DECODE_RETRY else est.total_gib


def _is_fp8(module: torch.nn.Module) -> bool:
    return any(p.element_size() == 1 for p in module.parameters())


def report(estimator: ModelPathEstimator, opts: MemoryOptions, network, device=None) -> str:
    """The lines the Step Plan shows for a run through comfy_model: the estimate, ComfyUI's view of the device and,
    when it will not fit, what ComfyUI would do and which switches would make it fit."""
    est = estimator.estimate(opts, network)
    kind, free, total, state = device or comfy_device()
    lines = [est.format(),
             "MODEL path: weights as stored (" + _dtypes(estimator.family.patcher.model) + "); CLIP and VAE are "
             "ComfyUI's: counted while their cache is off, in the caching peak before step 1"
             + (", and the VAE in the previews peak" if opts.previews else "")]
    where = f"ComfyUI's device {kind} ({state}): {free:.1f} GiB free of {total:.1f} GiB"
    need = needed_gib(est, kind)
    if need <= free:
        tiled = f"; a preview's whole decode ({est.previewing_gib:.1f} GiB) does not: ComfyUI's VAE decode retries"
        lines.append(f"fits: {where}" + (tiled + " in tiles (slower previews)" if est.total_gib > free else ""))
        return "\n".join(lines)
    lines.append(f"will NOT fit: {where}")
    weights = est.parts["denoiser weights"]
    rest = need - weights
    if kind != "cpu" and rest < free:
        lines.append(f"ComfyUI would load the MODEL partially (low VRAM): about {min(weights, need - free):.1f} "
                     f"of its {weights:.1f} GiB of weights stay in RAM and stream in layer by layer each step (slower); "
                     f"the adapter, optimizer state and activations ({rest:.1f} GiB) must fit on the device")
    elif kind != "cpu":
        lines.append(f"ComfyUI's low-VRAM offload cannot help: the adapter, optimizer state and activations alone "
                     f"take {rest:.1f} GiB")
    lines.append("To fit, switch: " + "; ".join(fitting_switches(estimator, opts, network, free)))
    return "\n".join(lines)


def _dtypes(base) -> str:
    stored = sorted({str(p.dtype).removeprefix("torch.") for p in base.diffusion_model.parameters()})
    cast = getattr(base, "manual_cast_dtype", None)
    return ", ".join(stored) + (f", computed in {str(cast).removeprefix('torch.')} (manual cast)" if cast else "")


def model_path_memory_report(comfy_model, comfy_clip, comfy_vae, crucible_model, dataset, network, optimizer,
                             training, batch_size: int, device=None, previews: bool = False) -> str:
    """The Step Plan's memory lines for a run through comfy_model / comfy_clip / comfy_vae: the same checks and the
    same resolved settings as Crucible Train (``hosted_model_config``, ``MemoryOptions.from_config`` under the
    hosted family), the conditioning of one empty caption as ComfyUI's CLIP pads it (CLIP 77 tokens, Flux's T5 at
    least 256); ``previews``: the run renders previews (the plan samples)."""
    from .comfy_family import hosted_model_config

    family, model_cfg, network = hosted_model_config(comfy_model, comfy_clip, comfy_vae, crucible_model, network)
    try:  # the family changes the user's MODEL until restore (scaled-fp8 layers seen as Linear: comfy_weights.py)
        return _model_path_report(family, model_cfg, network, dataset, optimizer, training, batch_size, device,
                                  previews)
    finally:
        family.restore()


def _model_path_report(family, model_cfg, network, dataset, optimizer, training, batch_size: int, device,
                       previews: bool) -> str:
    from ..trainer import OptimConfig, TrainConfig, TrainingConfig, hosted_family

    run = TrainConfig(model=model_cfg, datasets=tuple(dataset), network=network, optim=optimizer or OptimConfig(),
                      training=replace(training or TrainingConfig(), batch_size=batch_size))
    with hosted_family(family):
        opts = replace(MemoryOptions.from_config(run), family=family.title, previews=previews)
    cond = family.encode_text(SimpleNamespace(denoiser=torch.nn.Linear(1, 1)), [""])
    device = device or comfy_device()
    return report(ModelPathEstimator(family, cond, device[0]), opts, network, device)
