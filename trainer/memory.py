"""Estimated peak training memory, before anything is loaded.

The estimate is a sum of parts, each from exact parameter counts of the full-size architecture
(:mod:`trainer.full_size`, built on the ``meta`` device: no memory, no download) and one traced forward pass:

=====================  ==============================================================================================
part                   bytes
=====================  ==============================================================================================
denoiser weights       N_denoiser × b_w   (b_w = 2 for a LoRA under bf16/fp16 — the frozen base is loaded in the
                       compute dtype — and for a ``full_bf16`` full fine-tune, else 4); with ``fp8_base`` each
                       Linear weight takes 1 byte; with ``blocks_to_swap`` on CUDA the last N blocks are left out
                       but the two largest of them (the running block and the prefetched next one)
text encoders          Σ N_te × b (the compute dtype while frozen; T5's Linear weights 1 byte with ``fp8_base``),
                       only while resident: 0 when
                       ``cache_text_embeddings`` moves them off a CUDA device; on the CPU the training device *is*
                       host memory, and they leave it too (0) unless ``training.release_encoders`` is off
                       (:mod:`trainer.encoder_residency`)
VAE                    N_vae × (4 for SDXL, which runs its VAE in fp32, or without mixed precision; else 2), 0 when
                       ``cache_latents`` moves it off the device (on the CPU: as the text encoders, except that a
                       run with previews keeps it in host memory, :mod:`trainer.sample_prompts`)
trainable parameters   LoRA: N_lora × (4 weight + 4 gradient + s_opt); full fine-tune: N_denoiser × (b_g gradient +
                       s_opt) (its weights are the denoiser weights above; b_g = 2 with ``full_bf16``, whose
                       optimizer states stay fp32 for the stochastic-rounding update); a fused backward pass holds
                       one gradient at a time (the largest tensor)
activations            the tensors autograd saves for the backward pass (once per storage, weights left out), measured
                       by tracing one forward pass of the
                       full-size denoiser with the LoRA attached on the ``meta`` device at the run's resolution and batch
                       in the compute dtype (attention counted as a fused kernel: q, k, v, output and log-sum-exp, which
                       is what PyTorch's flash / memory-efficient / CPU-flash SDPA keep). With gradient checkpointing:
                       what is saved outside the checkpointed blocks plus the largest block, recomputed in backward.
VAE encode transient   without a latent cache: 3 feature maps of 128 channels at full resolution (the VAE encoder's
                       widest layer), alive before the denoiser runs; the peak takes the larger of this and activations
caching (before step   with a latent or text cache, the caches fill before step 1 while every encoder is resident:
1, a separate peak)    their weights + the VAE (+ its encode transient for latents). The denoiser is read from the
                       model files only once they are filled and the encoders released (trainer.run_setup); a model
                       handed to the run in memory (``model_given``) waits in host memory, which on the CPU is the
                       device, so it counts there. The estimate is the larger of this and the training peak
                       (``Estimate.caching_gib`` / ``training_gib``)
previews (between      with ``sample.prompts`` (:func:`preview_terms`, shared with the MODEL path): no activations;
steps, a third peak)   the training peak's weights and optimizer state + the VAE (back from host memory) + 3 feature
                       maps of 128 channels at full resolution (the decoder's widest layer, one image); the prompts were
                       encoded before step 1, no text encoder comes back (``Estimate.previewing_gib``)
=====================  ==============================================================================================

Sharded over N processes (FSDP2, ``shards``), each part is per rank: :mod:`trainer.sharded_memory` says what changes.

s_opt (optimizer state bytes per trained parameter): AdamW 8, AdamW 8-bit 2, Lion 4, SGD 0 (no momentum), Adafactor
~0 (factored second moments: O(rows + columns), ignored), DAdapt* 12, Prodigy 16.

The switches of the benchmark's presets (``default``/``low``/``lowest``) are :mod:`trainer.memory_presets`.

Assumptions and what is left out (so the number is a floor on CUDA, within ~15% where measured):

* CUDA: the context (~0.3–0.5 GiB) and allocator fragmentation are not included, nor are the sampler's own
  (no-grad) denoiser activations during previews; the previews' decode term is arithmetic, not measured yet.
* CPU: a process also holds Python, torch, diffusers and torch's runtime (oneDNN kernels, thread pools, the
  allocator arenas of its threads): ~0.45 GiB, measured by the benchmark after a tiny warm-up step (``base_gib``) and
  added to the estimate when it is compared with a CPU measurement.
* Text-encoder activations when a text encoder trains are not traced (small next to the denoiser's).
* Checked against ``benchmarks/bench_memory.py`` (within 15% of every recorded row: ``tests/test_memory_estimate.py``
  reads ``benchmarks/results/memory-cpu.json``); only CPU measurements exist so far, and the fp8, block-swap, fused
  backward and full-bf16 terms are arithmetic from the storage formats, not measured yet.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .activation_trace import _SavedBytes, activation_bytes, traced_activation_bytes  # noqa: F401 (re-exported)

GIB = 2**30
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "lion": 4, "sgd": 0, "adafactor": 0, "dadaptation": 12,
                         "dadaptadam": 12, "prodigy": 16}


@dataclass(frozen=True)
class MemoryOptions:
    family: str
    network_type: str = "lora"  # lora | dora | loha | lokr | full
    network_dim: int = 16
    target_preset: str = "attn_mlp"
    precision: str = "bf16"  # resolved: no | fp16 | bf16
    optimizer: str = "adamw"
    gradient_checkpointing: bool = True
    resolution: int = 1024
    batch_size: int = 1
    cache_latents: bool = False
    cache_text_embeddings: bool = False
    train_text_encoder: bool = False
    release_encoders: bool = True  # cached encoders leave host memory too (training.release_encoders)
    # the memory switches (model.fp8_base; training.blocks_to_swap, fused_backward_pass, full_bf16)
    fp8_base: bool = False  # frozen denoiser (and T5) Linear weights stored in float8
    blocks_to_swap: int = 0  # denoiser blocks kept in host memory, streamed in ahead of use (CUDA)
    fused_backward_pass: bool = False  # the optimizer steps each parameter as its gradient arrives
    full_bf16: bool = False  # full fine-tune: weights, gradients and optimizer states in bf16
    previews: bool = False  # sample.prompts: previews render during training with the VAE kept (trainer.sample_prompts)
    # the model was handed to the run in memory (the benchmark's --in-memory): its denoiser is there while the caches
    # fill; read from model files, the denoiser is read only after they are filled and the encoders released
    model_given: bool = False
    shards: int = 1  # processes the denoiser is sharded over (FSDP2, trainer.sharded_memory): the estimate is per rank

    @classmethod
    def from_config(cls, cfg, resolved: dict | None = None, previews: bool | None = None,
                    shards: int = 1) -> "MemoryOptions":
        """``previews``: whether previews render (default: the config has preview prompts; the Step Plan, which
        does not see the Train node's prompts, says whether its plan samples). ``shards``: the processes an FSDP2
        launch shards the denoiser over (``python -m trainer plan --num-processes N --fsdp``)."""
        from .defaults import resolved_settings, training_resolution

        resolved = resolved or resolved_settings(cfg)
        t, n = cfg.training, cfg.network
        return cls(family=cfg.model.family, network_type=n.network_type, network_dim=n.network_dim,
                   target_preset=n.target_preset, precision=resolved["mixed_precision"], optimizer=cfg.optim.optimizer,
                   gradient_checkpointing=resolved["gradient_checkpointing"], resolution=training_resolution(cfg),
                   batch_size=t.batch_size, cache_latents=resolved["cache_latents"],
                   cache_text_embeddings=resolved["cache_text_embeddings"] and not n.train_text_encoder,
                   train_text_encoder=n.train_text_encoder, release_encoders=t.release_encoders,
                   fp8_base=cfg.model.fp8_base, blocks_to_swap=t.blocks_to_swap,
                   fused_backward_pass=t.fused_backward_pass, full_bf16=t.full_bf16,
                   previews=bool(cfg.sample.prompts) if previews is None else previews, shards=shards)


@dataclass(frozen=True)
class Estimate:
    options: MemoryOptions
    parts: dict = field(default_factory=dict)  # name -> GiB, during the training steps
    caching_gib: float = 0.0  # the peak while the caches fill, before step 1 (0 without caches)
    previewing_gib: float = 0.0  # the peak while a preview renders between steps (0 without previews)
    preview: PreviewTerms | None = None  # what the previews add (bytes: preview_terms), None without previews
    loading_gib: float = 0.0  # sharded: rank 0's whole denoiser while prepare() shards it (host memory on a GPU)
    loading_on_device: bool = False  # the CPU: host memory is the device, so loading is one of the peaks

    @property
    def training_gib(self) -> float:
        p = self.parts
        fixed = sum(v for k, v in p.items() if k not in ("activations", "vae encode (transient)"))
        return fixed + max(p.get("activations", 0.0), p.get("vae encode (transient)", 0.0))

    @property
    def total_gib(self) -> float:
        """The peak (of rank 0, where the denoiser is sharded: on the CPU its loading is one of the peaks)."""
        return max(self.other_ranks_gib, self.loading_gib if self.loading_on_device else 0.0)

    @property
    def other_ranks_gib(self) -> float:
        """The peak without rank 0's loading: every rank's but rank 0's in a sharded run (the same on a GPU)."""
        return max(self.training_gib, self.caching_gib, self.previewing_gib)

    def format(self) -> str:
        o = self.options
        detail = ", ".join(f"{k} {v:.2f}" for k, v in self.parts.items() if v > 0.005)
        extra = [n for n in ("cache_latents", "cache_text_embeddings", "fp8_base", "fused_backward_pass", "full_bf16")
                 if getattr(o, n)]
        extra += [f"blocks_to_swap {o.blocks_to_swap}"] if o.blocks_to_swap else []
        return (f"estimated peak memory {self.total_gib:.1f} GiB for {o.family} {o.network_type} at {o.resolution} px, "
                f"batch {o.batch_size}, {o.precision}, {o.optimizer}, gradient checkpointing "
                f"{'on' if o.gradient_checkpointing else 'off'}{''.join(', ' + e for e in extra)} ({detail} GiB)"
                + (f"; the peak is while the caches fill before step 1 ({self.caching_gib:.1f} GiB: every "
                   f"encoder on the device, training {self.training_gib:.1f} GiB)"
                   if self.caching_gib > self.training_gib else "")
                + (f"; previews peak at {self.previewing_gib:.1f} GiB (the VAE decoding on the device)"
                   if self.previewing_gib > max(self.training_gib, self.caching_gib) else "")
                + self._sharding_note())

    def _sharding_note(self) -> str:
        if self.options.shards == 1:
            return ""
        note = (f"; per rank, the denoiser sharded over {self.options.shards} processes (FSDP2); rank 0 first reads "
                f"it whole: {self.loading_gib:.1f} GiB of host memory while prepare() shards it")
        if self.total_gib > self.other_ranks_gib:  # on the CPU, where loading is rank 0's peak
            note += f" (the other ranks peak at {self.other_ranks_gib:.1f} GiB)"
        return note


def estimate(opts: MemoryOptions, device: str = "cuda") -> Estimate:
    """The estimated peak on ``device`` (see the module docstring for the formula). On the CPU the training device
    is host memory, so swapped blocks still count, and so do cached encoders unless they are released."""
    from .families import get_family
    from .full_size import ARCHITECTURES, param_counts

    counts = param_counts(opts.family)
    names = [n for n, _ in ARCHITECTURES[opts.family]]
    denoiser, encoders = names[0], [n for n in names if n.startswith("text_encoder")]
    full = opts.network_type == "full"
    lowp = opts.precision in ("bf16", "fp16")
    b_frozen = 2 if lowp else 4  # frozen parts are held in the compute dtype (LoRA and full fine-tune alike)
    b_w = 2 if lowp and (not full or opts.full_bf16) else 4  # a fully trained denoiser: fp32 unless full_bf16
    b_te = 4 if full and opts.train_text_encoder and not opts.full_bf16 else b_frozen
    b_vae = 4 if get_family(opts.family).vae_fp32 or not lowp else b_frozen
    fp8 = opts.fp8_base and not full  # fp8 stores frozen weights only
    host = device == "cpu"
    kept = host and not opts.release_encoders  # cached encoders stay in host memory: the CPU's training device
    parts = {"denoiser weights": _stored_bytes(opts.family, denoiser, b_w, fp8)}
    if opts.blocks_to_swap and not host:  # swapped blocks wait in host memory; two are on the device at a time
        swapped = sorted(_swapped_block_bytes(opts.family, opts.blocks_to_swap, b_w, fp8), reverse=True)
        parts["denoiser weights"] -= sum(swapped[2:])
    resident_encoders = sum(_stored_bytes(opts.family, n, b_te, fp8 and _is_t5(opts.family, n)) for n in encoders)
    parts["text encoders"] = 0 if opts.cache_text_embeddings and not kept else resident_encoders
    parts["vae"] = 0 if opts.cache_latents and not kept else counts["vae"] * b_vae
    preview = preview_terms(opts, counts["vae"] * b_vae, b_vae, host, counted=parts["vae"] > 0)
    parts["vae"] += preview.in_steps if preview else 0
    s_opt = OPTIMIZER_STATE_BYTES.get(opts.optimizer, 8)  # fp32 states, also under full_bf16
    if full:
        b_g = 2 if opts.full_bf16 else 4  # gradients take the trained weights' dtype
        grads = _largest_tensor(opts.family, denoiser) if opts.fused_backward_pass else counts[denoiser]
        parts["gradients + optimizer state"] = grads * b_g + counts[denoiser] * s_opt
    else:
        lora = lora_param_count(opts.family, denoiser, opts.target_preset, opts.network_dim)
        parts["trainable parameters"] = lora * (4 + 4 + s_opt)
    loading = 0
    if opts.shards > 1:  # FSDP2: per rank (trainer.sharded_memory)
        from .sharded_memory import largest_unit_params, sharded_denoiser_bytes

        whole = parts["denoiser weights"]
        # rank 0 reads the whole denoiser into host memory; on the CPU (the device) it keeps its shard beside it
        loading = whole + (whole // opts.shards if host else 0)
        parts["denoiser weights"] = sharded_denoiser_bytes(opts.family, whole, opts.shards, 2 if lowp else 4)
        key = "gradients + optimizer state" if full else "trainable parameters"
        parts[key] = parts[key] // opts.shards + (largest_unit_params(opts.family) * b_g if full else 0)
    b_act = 2 if lowp else 4
    parts["activations"] = activation_bytes(opts.family, opts.resolution, opts.gradient_checkpointing,
                                            opts.network_dim, opts.target_preset) * opts.batch_size * b_act / 4
    transient = 3 * 128 * opts.resolution ** 2 * opts.batch_size * b_vae
    caching = 0
    if opts.cache_latents or opts.cache_text_embeddings:  # the caches fill before step 1 with every encoder resident
        # (they leave after): their weights and the VAE's encode transient. The denoiser is read from the model files
        # only after that (trainer.run_setup); one handed to the run is in host memory: on the CPU, the device
        caching = (parts["denoiser weights"] if host and opts.model_given else 0) + resident_encoders + \
            counts["vae"] * b_vae + (transient if opts.cache_latents else 0)
    if not opts.cache_latents:
        parts["vae encode (transient)"] = transient
    held = sum(v for k, v in parts.items() if k not in ("activations", "vae encode (transient)"))  # between steps
    return Estimate(opts, {k: v / GIB for k, v in parts.items()}, caching / GIB,
                    preview.peak(held) / GIB if preview else 0.0, preview, loading / GIB, host)


@dataclass(frozen=True)
class PreviewTerms:  # bytes a run with preview prompts adds, the same on both paths for the same VAE: see preview_terms
    in_steps: int = 0  # joins the training peak: on the CPU the VAE stays in host memory (the device) all run long
    vae: int = 0  # brought onto a GPU for each preview's decode (0 when the held parts have it already)
    decode: int = 0  # 3 feature maps of the decoder's widest layer at full resolution, one image

    def peak(self, held: int) -> int:  # ``held``: what stays on the device between steps (no activations)
        return held + self.vae + self.decode


def preview_terms(opts: MemoryOptions, vae_bytes: int, element_size: int, host: bool, counted: bool,
                  decoder_width: int = 128) -> PreviewTerms | None:
    """The previews' terms (None without ``opts.previews``) for a VAE of ``vae_bytes`` (elements of
    ``element_size``); ``host``: the device is host memory; ``counted``: the held parts hold the VAE already."""
    if not opts.previews:
        return None
    extra, decode = 0 if counted else vae_bytes, 3 * decoder_width * opts.resolution ** 2 * element_size
    return PreviewTerms(in_steps=extra, decode=decode) if host else PreviewTerms(vae=extra, decode=decode)


def estimate_case(case, resolution: int, device: str = "cuda", model_given: bool = False) -> Estimate:
    """The estimate for a benchmark case (a name such as ``sdxl-lora-low`` or ``(family, kind, preset)``; the
    switches are :mod:`trainer.memory_presets`'; what a case leaves unset takes the config default, ``auto``
    resolved as a run resolves it: :mod:`trainer.defaults`). ``model_given``: the model is handed to the run in
    memory (:attr:`MemoryOptions.model_given`), not read from files."""
    from .defaults import Device, resolve_caches, resolve_gradient_checkpointing, resolve_mixed_precision
    from .memory_presets import get_case, resolve_case

    c = get_case(case)
    s = resolve_case(c, device).settings
    precision = resolve_mixed_precision("auto", Device(cuda=device == "cuda", bf16=True))
    caches = resolve_caches(s.get("cache_latents"), s.get("cache_text_embeddings"), c.family)
    return estimate(MemoryOptions(
        family=c.family, network_type="lora" if c.kind == "lora" else "full", precision=precision,
        optimizer=s.get("optimizer", "adamw"),
        gradient_checkpointing=resolve_gradient_checkpointing(s.get("gradient_checkpointing"), c.family, resolution),
        resolution=resolution, **caches,
        fp8_base=s.get("fp8_base", False), blocks_to_swap=s.get("blocks_to_swap", 0),
        fused_backward_pass=s.get("fused_backward_pass", False), full_bf16=s.get("full_bf16", False),
        model_given=model_given), device)


def fitting_switches(cfg, available_gib: float, resolved: dict | None = None, device: str = "cuda",
                     previews: bool | None = None, shards: int = 1) -> list[str]:
    """Switches that bring the estimate under ``available_gib``, cheapest first, cumulatively; each names config
    fields (``trainer.memory_presets.option_path`` finds them, a test checks), ending with "nothing available here
    fits" when even all of them do not. Sharded (``shards`` > 1), only those a sharded run honours
    (:mod:`trainer.sharding`)."""
    from dataclasses import replace

    opts = MemoryOptions.from_config(cfg, resolved, previews, shards)
    full = opts.network_type == "full"
    one = shards == 1  # full_bf16, fp8_base, fused_backward_pass and blocks_to_swap are refused sharded
    steps = [("gradient_checkpointing on", dict(gradient_checkpointing=True)),
             ("mixed_precision bf16", dict(precision="bf16") if opts.precision == "no" else None),
             ("cache_latents on", dict(cache_latents=True)),
             ("cache_text_embeddings on", dict(cache_text_embeddings=True) if not opts.train_text_encoder else None),
             ("full_bf16 on", dict(full_bf16=True) if full and one else None),
             ("fp8_base on", dict(fp8_base=True) if not full and one else None),
             ("optimizer adamw8bit", dict(optimizer="adamw8bit") if opts.optimizer == "adamw" and not full else None),
             ("fused_backward_pass on with optimizer adafactor",
              dict(fused_backward_pass=True, optimizer="adafactor") if full and one else None),
             ("batch_size 1", dict(batch_size=1) if opts.batch_size > 1 else None),
             ("blocks_to_swap 16", dict(blocks_to_swap=16) if device == "cuda" and not full and one
              and opts.blocks_to_swap < 16 else None),
             ("a lower resolution (768)", dict(resolution=768) if opts.resolution > 768 else None)]
    chosen = []
    for label, change in steps:
        if change is None or all(getattr(opts, k) == v for k, v in change.items()):
            continue
        opts = replace(opts, **change)
        chosen.append(label)
        if estimate(opts, device).total_gib <= available_gib:
            return chosen
    return chosen + ["nothing available here fits"]


def device_memory_gib() -> tuple[float, float] | None:
    """(free, total) GiB of the CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(b / GIB for b in torch.cuda.mem_get_info())


def memory_report(cfg, resolved: dict | None = None, previews: bool | None = None, shards: int = 1) -> str:
    """The lines the Step Plan node and ``python -m trainer plan`` show (``previews``, ``shards``: see
    :meth:`MemoryOptions.from_config`)."""
    est = estimate(MemoryOptions.from_config(cfg, resolved, previews, shards))
    lines = [est.format()]
    mem = device_memory_gib()
    if mem is None:
        lines.append("device memory: unknown here (no CUDA device); compare with your GPU's memory")
        return "\n".join(lines)
    free, total = mem
    if est.total_gib <= free:
        lines.append(f"fits: {free:.1f} GiB free of {total:.1f} GiB")
    else:
        lines.append(f"will NOT fit: {free:.1f} GiB free of {total:.1f} GiB. To fit, turn on: "
                     + ", ".join(fitting_switches(cfg, free, resolved, previews=previews, shards=shards)))
    return "\n".join(lines)


# --- exact counts from meta-device builds ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def lora_param_count(family: str, component: str, preset: str, rank: int) -> int:
    """Parameters of a rank-``rank`` LoRA on the preset's modules of the full-size component."""
    import torch

    from .full_size import build_meta
    from .lora_targets import lora_target_modules

    module = build_meta(family, component)
    targets = lora_target_modules(family, component, preset)
    total = 0
    for name, sub in module.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(sub, torch.nn.Linear):
            total += rank * (sub.in_features + sub.out_features)
        elif isinstance(sub, torch.nn.Conv2d):
            k = sub.kernel_size[0] * sub.kernel_size[1]
            total += rank * (sub.in_channels * k + sub.out_channels)
    return total


@functools.lru_cache(maxsize=None)
def _is_t5(family: str, component: str) -> bool:
    from .full_size import build_meta

    return type(build_meta(family, component)).__name__.startswith("T5")


@functools.lru_cache(maxsize=None)
def _linear_weights(family: str, component: str, prefix: str = "") -> tuple[int, int]:
    """(all parameters, Linear weight parameters) of the full-size component, or of its submodule ``prefix``."""
    import torch

    from .full_size import build_meta

    module = build_meta(family, component)
    if prefix:
        module = module.get_submodule(prefix)
    linear = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    return sum(p.numel() for p in module.parameters()), linear


def _stored_bytes(family: str, component: str, b_w: int, fp8: bool, prefix: str = "") -> int:
    """Bytes of the (frozen) weights: ``b_w`` per parameter, 1 per Linear weight with fp8 base weights."""
    total, linear = _linear_weights(family, component, prefix)
    return total * b_w - (linear * (b_w - 1) if fp8 else 0)


def _swapped_block_bytes(family: str, n: int, b_w: int, fp8: bool) -> list[int]:
    """Bytes of each block ``blocks_to_swap = n`` keeps in host memory: the last n of the family's blocks in running
    order (the family's ``swap_block_attributes``, as :mod:`trainer.block_swap` swaps them)."""
    import torch

    from .families import get_family
    from .full_size import ARCHITECTURES, build_meta

    component = ARCHITECTURES[family][0][0]
    module = build_meta(family, component)
    names = []
    for attr in get_family(family).swap_block_attributes:
        sub = getattr(module, attr, None)
        if isinstance(sub, torch.nn.ModuleList):
            names += [f"{attr}.{i}" for i in range(len(sub))]
        elif sub is not None:
            names.append(attr)
    return [_stored_bytes(family, component, b_w, fp8, name) for name in names[-n:]] if n > 0 else []


@functools.lru_cache(maxsize=None)
def _largest_tensor(family: str, component: str) -> int:
    from .full_size import build_meta

    return max(p.numel() for p in build_meta(family, component).parameters())
