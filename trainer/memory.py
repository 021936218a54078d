"""Estimated peak training memory, before anything is loaded.

The estimate is a sum of parts, each from exact parameter counts of the full-size architecture
(:mod:`trainer.full_size`, built on the ``meta`` device: no memory, no download) and one traced forward pass:

=====================  ==============================================================================================
part                   bytes
=====================  ==============================================================================================
denoiser weights       (N_denoiser − N_swapped) × b_w   (b_w = 2 for a LoRA under bf16/fp16 — the frozen base is
                       loaded in the compute dtype — or a full fine-tune with ``full_bf16``, else 4). N_swapped: the
                       last ``blocks_to_swap`` blocks less the two largest of them (running + prefetched)
text encoders          Σ N_te × b (compute dtype when frozen), only while resident: 0 when ``cache_text_embeddings`` moves them off a CUDA
                       device (on the CPU the training device *is* host memory, so they still count)
VAE                    N_vae × (4 for SDXL, which runs its VAE in fp32, or without mixed precision; else 2), 0 when
                       ``cache_latents`` moves it off the device
trainable parameters   LoRA: N_lora × (4 weight + 4 gradient + s_opt); full fine-tune: N_denoiser × (b_g + s_opt)
                       (its weights are the denoiser weights above; b_g = 4, 2 with ``full_bf16``, 0 with
                       ``fused_backward_pass``, which frees each gradient as soon as its tensor is stepped)
activations            the tensors autograd saves for the backward pass (once per storage, weights left out), measured
                       by tracing one forward pass of the
                       full-size denoiser with the LoRA attached on the ``meta`` device at the run's resolution and batch
                       in the compute dtype (attention counted as a fused kernel: q, k, v, output and log-sum-exp, which
                       is what PyTorch's flash / memory-efficient / CPU-flash SDPA keep). With gradient checkpointing:
                       what is saved outside the checkpointed blocks plus the largest block, recomputed in backward.
VAE encode transient   without a latent cache: 3 feature maps of 128 channels at full resolution (the VAE encoder's
                       widest layer), alive before the denoiser runs; the peak takes the larger of this and activations
=====================  ==============================================================================================

s_opt (optimizer state bytes per trained parameter): AdamW 8, AdamW 8-bit 2, Lion 4, SGD 0 (no momentum), Adafactor
~0 (factored second moments: O(rows + columns), ignored), DAdapt* 12, Prodigy 16.

Assumptions and what is left out (so the number is a floor on CUDA, within ~15% where measured):

* CUDA: the context (~0.3–0.5 GiB) and allocator fragmentation are not included, nor are preview samples (the
  sampler needs the encoders back on the device and its own activations).
* CPU: a process also holds Python, torch and diffusers (~0.5–1 GiB resident); the benchmark reports it separately.
* Text-encoder activations when a text encoder trains are not traced (small next to the denoiser's).
* Measured against ``benchmarks/bench_memory.py`` (see ``tests/test_memory_estimate.py`` and
  ``benchmarks/results/``); only CPU measurements exist so far.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

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
    blocks_to_swap: int = 0  # LoRA: swapped blocks' frozen weights off the device, two of them in at a time
    fused_backward_pass: bool = False  # gradients freed tensor by tensor: no whole-model gradient
    full_bf16: bool = False  # full fine-tune: trained weights (and gradients) in bf16

    @classmethod
    def from_config(cls, cfg, resolved: dict | None = None) -> "MemoryOptions":
        from .defaults import resolved_settings

        resolved = resolved or resolved_settings(cfg)
        t, n = cfg.training, cfg.network
        res = max((d.max_bucket_reso if d.enable_bucket else d.resolution) for d in cfg.datasets) \
            if cfg.datasets else 1024
        return cls(family=cfg.model.family, network_type=n.network_type, network_dim=n.network_dim,
                   target_preset=n.target_preset, precision=resolved["mixed_precision"], optimizer=cfg.optim.optimizer,
                   gradient_checkpointing=resolved["gradient_checkpointing"], resolution=res,
                   batch_size=t.batch_size, cache_latents=t.cache_latents,
                   cache_text_embeddings=t.cache_text_embeddings and not n.train_text_encoder,
                   train_text_encoder=n.train_text_encoder, blocks_to_swap=t.blocks_to_swap,
                   fused_backward_pass=t.fused_backward_pass, full_bf16=t.full_bf16)


@dataclass(frozen=True)
class Estimate:
    options: MemoryOptions
    parts: dict = field(default_factory=dict)  # name -> GiB

    @property
    def total_gib(self) -> float:
        p = self.parts
        fixed = sum(v for k, v in p.items() if k not in ("activations", "vae encode (transient)"))
        return fixed + max(p.get("activations", 0.0), p.get("vae encode (transient)", 0.0))

    def format(self) -> str:
        o = self.options
        detail = ", ".join(f"{k} {v:.2f}" for k, v in self.parts.items() if v > 0.005)
        return (f"estimated peak memory {self.total_gib:.1f} GiB for {o.family} {o.network_type} at {o.resolution} px, "
                f"batch {o.batch_size}, {o.precision}, {o.optimizer}, gradient checkpointing "
                f"{'on' if o.gradient_checkpointing else 'off'} ({detail} GiB)")


def estimate(opts: MemoryOptions, device: str = "cuda") -> Estimate:
    """The estimated peak on ``device`` (see the module docstring for the formula). On the CPU the training device
    is host memory, so encoders moved off it after caching still count."""
    from .families import get_family
    from .full_size import ARCHITECTURES, param_counts

    counts = param_counts(opts.family)
    names = [n for n, _ in ARCHITECTURES[opts.family]]
    denoiser, encoders = names[0], [n for n in names if n.startswith("text_encoder")]
    full = opts.network_type == "full"
    lowp = opts.precision in ("bf16", "fp16")
    b_frozen = 2 if lowp else 4  # frozen parts are held in the compute dtype (LoRA and full fine-tune alike)
    b_w = 2 if lowp and (not full or opts.full_bf16) else 4  # the denoiser: trained in fp32 unless full_bf16
    b_te = 4 if full and opts.train_text_encoder and not opts.full_bf16 else b_frozen
    b_vae = 4 if get_family(opts.family).vae_fp32 or not lowp else b_frozen
    s_opt = OPTIMIZER_STATE_BYTES.get(opts.optimizer, 8)
    swapped = swapped_param_count(opts.family, denoiser, opts.blocks_to_swap) if opts.blocks_to_swap else 0
    parts = {"denoiser weights": (counts[denoiser] - swapped) * b_w}
    host = device == "cpu"
    parts["text encoders"] = 0 if opts.cache_text_embeddings and not host else sum(counts[n] for n in encoders) * b_te
    parts["vae"] = 0 if opts.cache_latents and not host else counts["vae"] * b_vae
    if full:  # fused backward: one tensor's gradient at a time (the largest, ignored here)
        b_grad = 0 if opts.fused_backward_pass else (2 if opts.full_bf16 else 4)
        parts["gradients + optimizer state"] = counts[denoiser] * (b_grad + s_opt)
    else:
        lora = lora_param_count(opts.family, denoiser, opts.target_preset, opts.network_dim)
        parts["trainable parameters"] = lora * (4 + 4 + s_opt)
    b_act = 2 if lowp else 4
    parts["activations"] = activation_bytes(opts.family, opts.resolution, opts.gradient_checkpointing,
                                            opts.network_dim, opts.target_preset) * opts.batch_size * b_act / 4
    if not opts.cache_latents:
        parts["vae encode (transient)"] = 3 * 128 * opts.resolution ** 2 * opts.batch_size * b_vae
    return Estimate(opts, {k: v / GIB for k, v in parts.items()})


def estimate_case(case: tuple[str, str, str], resolution: int, device: str = "cuda") -> Estimate:
    """The estimate for a benchmark case ``(family, kind, preset)`` (``benchmarks/bench_memory.py``)."""
    from .defaults import Device, resolve_gradient_checkpointing, resolve_mixed_precision

    family, kind, preset = case
    precision = resolve_mixed_precision("auto", Device(cuda=device == "cuda", bf16=True))
    low = preset in ("low", "lowest")
    return estimate(MemoryOptions(
        family=family, network_type="lora" if kind == "lora" else "full", precision=precision,
        optimizer="adamw8bit" if preset == "lowest" and device == "cuda" else "adamw",
        gradient_checkpointing=low or resolve_gradient_checkpointing(None, family), resolution=resolution,
        cache_latents=low, cache_text_embeddings=low), device)


def fitting_switches(cfg, available_gib: float, resolved: dict | None = None) -> list[str]:
    """Switches that bring the estimate under ``available_gib``, cheapest first, cumulatively."""
    from dataclasses import replace

    opts = MemoryOptions.from_config(cfg, resolved)
    steps = [("gradient_checkpointing on", dict(gradient_checkpointing=True)),
             ("mixed_precision bf16", dict(precision="bf16") if opts.precision == "no" else None),
             ("cache_latents on", dict(cache_latents=True)),
             ("cache_text_embeddings on", dict(cache_text_embeddings=True) if not opts.train_text_encoder else None),
             ("optimizer adamw8bit", dict(optimizer="adamw8bit") if opts.optimizer == "adamw" else None),
             *memory_option_switches(cfg, opts),
             ("batch_size 1", dict(batch_size=1) if opts.batch_size > 1 else None),
             ("a lower resolution (768)", dict(resolution=768) if opts.resolution > 768 else None)]
    chosen = []
    for label, change in steps:
        if change is None or all(getattr(opts, k) == v for k, v in change.items()):
            continue
        opts = replace(opts, **change)
        chosen.append(label)
        if estimate(opts).total_gib <= available_gib:
            return chosen
    return chosen + ["nothing available here fits: fp8 base weights are not implemented yet"]


def memory_option_switches(cfg, opts: MemoryOptions) -> list[tuple[str, dict | None]]:
    """The memory options as fitting switches: bf16 weights and the fused backward pass for a full fine-tune, block
    swap (half the blocks, then all but two) for a LoRA run; each only where the run can use it."""
    from .families import get_family
    from .full_size import ARCHITECTURES, build_meta
    from .param_step import FUSED_OPTIMIZERS

    if opts.network_type == "full":
        return [("full_bf16 on", dict(full_bf16=True) if opts.precision == "bf16" else None),
                ("fused_backward_pass on", dict(fused_backward_pass=True)
                 if opts.optimizer in FUSED_OPTIMIZERS and cfg.training.gradient_accumulation_steps == 1 else None)]
    count = len(get_family(opts.family).swappable_blocks(build_meta(opts.family, ARCHITECTURES[opts.family][0][0])))
    return [(f"blocks_to_swap {n}", dict(blocks_to_swap=n) if n > opts.blocks_to_swap else None)
            for n in sorted({count // 2, count - 2}) if n > 0]


def device_memory_gib() -> tuple[float, float] | None:
    """(free, total) GiB of the CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return free / GIB, total / GIB


def memory_report(cfg, resolved: dict | None = None) -> str:
    """The lines the Step Plan node and ``python -m trainer plan`` show."""
    est = estimate(MemoryOptions.from_config(cfg, resolved))
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
                     + ", ".join(fitting_switches(cfg, free, resolved)))
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
def swapped_param_count(family: str, component: str, blocks_to_swap: int) -> int:
    """Denoiser parameters off the device with ``blocks_to_swap`` (trainer.block_swap): the last N blocks, less the
    two largest of them (the running block and the prefetched next one are on the device)."""
    from .families import get_family
    from .full_size import build_meta

    blocks = get_family(family).swappable_blocks(build_meta(family, component))[-blocks_to_swap:]
    sizes = sorted((sum(p.numel() for p in block.parameters()) for block in blocks), reverse=True)
    return sum(sizes[2:])


@functools.lru_cache(maxsize=None)
def activation_bytes(family: str, resolution: int, checkpointing: bool, rank: int = 16,
                     preset: str = "attn_mlp") -> int:
    """Bytes autograd keeps for backward for one sample, in fp32 units (scale by 2/4 for half precision)."""
    import peft
    import torch
    import torch.nn.functional as F

    from .full_size import ARCHITECTURES, build_meta
    from .lora_targets import lora_target_modules

    component = ARCHITECTURES[family][0][0]
    model = build_meta(family, component)
    with torch.device("meta"):
        model = peft.inject_adapter_in_model(peft.LoraConfig(
            r=rank, lora_alpha=rank, target_modules=lora_target_modules(family, component, preset)), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.train()
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    counter = _SavedBytes(weights)
    units: list[int] = []

    def run_unit(fn, *args, **kwargs):  # a checkpointed block: count what it would save, keep none of it outside
        for k in ("use_reentrant", "preserve_rng_state", "determinism_check", "debug", "context_fn"):
            kwargs.pop(k, None)
        inner = _SavedBytes(weights)
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, inner.unpack):
            out = fn(*args, **kwargs)
        units.append(inner.total)
        return out

    if checkpointing:
        if hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        model._gradient_checkpointing_func = run_unit
        for sub in model.modules():
            if hasattr(sub, "_gradient_checkpointing_func"):
                sub._gradient_checkpointing_func = run_unit
    with torch.device("meta"), _fused_attention(F), \
            torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        _forward(model, family, resolution)
    return counter.total + (max(units) if units else 0)


class _SavedBytes:
    """Counts saved tensors once per storage, leaving out the weights (counted as weights, not activations)."""

    def __init__(self, weights: set | None = None):
        self.total, self.seen, self.weights = 0, set(), weights or set()

    def pack(self, t):
        key = t.untyped_storage()._cdata
        if key not in self.seen and key not in self.weights:  # a tensor saved by several ops is held once
            self.seen.add(key)
            self.total += t.numel() * 4  # fp32 units; the caller scales to the compute dtype
        return t

    @staticmethod
    def unpack(t):
        return t


@contextlib.contextmanager
def _fused_attention(F):
    """SDPA as a fused kernel saves its inputs, output and a log-sum-exp row, not the attention matrix."""
    import torch

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):  # pragma: no cover - never run (meta trace only)
            raise NotImplementedError

    real = F.scaled_dot_product_attention

    def fused(*args, **kwargs):
        q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
        return Fused.apply(q, k, v)

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _forward(model, family: str, resolution: int) -> None:
    from .families import get_family

    model(**get_family(family).full_size_forward_inputs(resolution))
