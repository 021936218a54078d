"""Setting a run up, in the order memory asks for: the accelerator and the encoders in their dtypes, with the
denoiser as shapes only (:meth:`RunSetup._setup_encoders`); the caches filled and the encoders they replace released
(:meth:`RunSetup._pre_encode`); then the denoiser read from the model files, the adapter, optimizer and objective
(:meth:`RunSetup._setup_denoiser`). So neither the device nor host memory ever holds the denoiser beside every
encoder (SimpleTuner's order; a model handed to the run goes onto the device after the caches fill: kohya's).

:class:`RunSetup` is one part of :class:`trainer.loop.Trainer`; it writes the attributes the step
(:mod:`trainer.train_step`) and the outputs (:mod:`trainer.run_outputs`) read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import torch

from .block_swap import attach_block_swap, place_resident
from .errors import CrucibleError
from .families import Components, PartDtypes
from .families.objectives import make_objective
from .network import Network, attach_network, param_groups
from .memory_options import check_run_memory_options, memory_lean, trained_weight_dtype
from .optim import build_optimizer, build_scheduler
from .quantized import apply_fp8_base, cast_frozen, fp8_loading
from .param_step import FusedBackward, keep_float32_state_on_load
from .prefetch import BatchPrefetcher
from .deepspeed_zero import check_deepspeed_run, configure_deepspeed, uses_deepspeed
from .sharding import check_sharded_run, is_sharded, rank0_loading, shards_weights
from .train_step import rounding_generator

log = logging.getLogger("crucible")

DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_dtypes(cfg, precision: str, vae_fp32: bool) -> PartDtypes:
    """The dtype each part is read into, so nothing is built wider and cast after. Under mixed precision the frozen
    parts are read in the compute dtype (kohya/diffusers practice: a 12B Flux in fp32 would not fit), and a full
    fine-tune's trained ones in fp32 (bf16 with ``full_bf16``); a VAE that overflows in half precision (SDXL's) in
    fp32. Without mixed precision every part is read as fp32, tensor by tensor: left to the loader (``None``), an
    fp16 file's tensors were read as they are stored and upcast after, so a whole fp16 copy sat beside the fp32
    model (+1.4 GiB of RSS loading the full-size SD1.5 for an fp32 LoRA, benchmarks/bench_fsdp_memory.py)."""
    compute = DTYPES[precision]
    trained = trained_weight_dtype(cfg) if cfg.network.network_type == "full" else compute
    net = cfg.network
    return PartDtypes(denoiser=trained if net.train_unet else compute,
                      text_encoders=trained if net.train_text_encoder else compute,
                      vae=torch.float32 if vae_fp32 else compute)


def make_accelerator(mixed_precision: str, find_unused_parameters: bool = False):
    """An ``accelerate.Accelerator`` for this run; outside ``accelerate launch`` its global state is reset so a
    long-lived process (ComfyUI) can run trainings with different precisions one after another.
    ``find_unused_parameters``: DDP accepts parameters without a gradient (text encoders: the layers after the
    clip-skip layer are never used)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched:
        AcceleratorState._reset_state(True)
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise CrucibleError("training.mixed_precision 'fp16' needs a CUDA GPU (it uses a gradient scaler); "
                            "on the CPU choose 'auto', 'bf16' or 'no'")
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)


def offload_module(module) -> None:
    """Move a module the run no longer needs on the training device to host memory (and give CUDA its blocks)."""
    module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def use_attention(comps: Components, mode: str) -> None:
    """``sdpa``: diffusers' default processors already call torch's scaled_dot_product_attention. ``xformers``:
    memory-efficient attention from the optional xformers package (CUDA builds)."""
    if mode == "xformers":
        from .errors import require

        require("xformers", "xformers", "model.attention 'xformers'")
        comps.denoiser.enable_xformers_memory_efficient_attention()


class RunSetup:
    """Builds the run's models, adapter, optimizer, objective and caches (part of :class:`trainer.loop.Trainer`)."""

    def _setup(self, components: Components | None):
        """Every part of the set-up, without filling the caches in between (as :meth:`trainer.loop.Trainer.run`
        does)."""
        self._setup_encoders(components)
        self._setup_denoiser()

    def _setup_encoders(self, components: Components | None):
        """The accelerator, the plan, the model with its denoiser as shapes only (nothing of it read: it is read
        after the caches are filled and their encoders released, :meth:`_setup_denoiser`), the encoders on the
        device in their dtypes, the caches and the validator."""
        from .defaults import resolved_settings
        from .families.weights import denoiser_shapes_only
        from .plan import compute_plan
        from .validation import Validator, training_source

        cfg = self.cfg
        self.resolved = resolved_settings(cfg)  # "auto" precision / checkpointing, recorded in run.json
        precision = self.resolved["mixed_precision"]
        self.acc = make_accelerator(precision, cfg.network.train_text_encoder)
        self.source = training_source(cfg)
        self.plan = compute_plan(cfg, self.source, num_processes=self.acc.num_processes)
        for note in self.plan.notes:  # settings this model ignores: said, never silent
            log.warning("%s", note)
        check_run_memory_options(cfg, precision, self.acc.num_processes)
        # FSDP: known before prepare() shards anything (a sharded model's forward, previews included, needs every rank)
        self.sharded = shards_weights(self.acc)
        if self.sharded:
            check_sharded_run(cfg, self.acc.is_fsdp2)
        # DeepSpeed ZeRO-2: whole weights on every rank, the optimizer's fp32 copy and state in slices
        self.deepspeed = uses_deepspeed(self.acc)
        if self.deepspeed:
            check_deepspeed_run(cfg, self.acc.state.deepspeed_plugin.deepspeed_config)
        device = self.acc.device
        # every part is read straight into its training dtype (load_dtypes); a LoRA's adapter stays fp32 (below)
        self.dtypes = load_dtypes(cfg, precision, self.family.vae_fp32)
        # cache, then read: the denoiser is read after the caches are filled and the encoders released (SimpleTuner's
        # order), so host memory never holds it beside T5-XXL; a model handed to the run (ComfyUI's MODEL) is there
        self.denoiser_read_later = components is None and self.family.reads_denoiser_apart
        # fp8 base: quantized on the host while loading, then moved; sharded: rank 0 alone reads the denoiser
        with self._loading(), denoiser_shapes_only() if self.denoiser_read_later else contextlib.nullcontext():
            on_host = cfg.model.fp8_base or self.sharded
            comps = components or self.family.load(cfg.model, device="cpu" if on_host else device, dtype=self.dtypes)
        self.owns_encoders = components is None  # the caller's encoders are never released (encoder_residency)
        if cfg.model.fp8_base:
            apply_fp8_base(comps.text_encoders, self.dtypes.denoiser or torch.float32)  # LoRA only
        for module in [comps.vae, *comps.text_encoders]:
            if module is not None:
                module.to(device)
        if self.family.vae_fp32 and comps.vae is not None:
            comps.vae.to(dtype=torch.float32)  # kohya no_half_vae: this VAE overflows to NaN in half precision
        self.comps = comps
        for name, module in zip(comps.text_encoder_names, comps.text_encoders):
            self._cast(name, module)
        if precision != "no" and cfg.network.network_type == "full" and comps.vae is not None \
                and not self.family.vae_fp32:
            comps.vae.to(dtype=DTYPES[precision])  # a LoRA run loads it in the compute dtype already
        self.family.configure_training(comps, cfg.training)
        if cfg.network.network_type == "full" and cfg.network.train_text_encoder and not cfg.save.single_file_dir:
            log.warning("network_type 'full' exports only the %s; the trained text encoder is kept in the training "
                        "state only. Set save.single_file_dir to also save the whole model", comps.denoiser_name)
        self.max_token_length = max(d.captions.max_token_length for d in cfg.datasets)
        self._setup_caches()
        # a sharded model's forward needs every rank: then every rank validates (and rank 0 records it)
        self.validator = Validator.for_run(self) if self.acc.is_main_process or self.sharded else None

    def _loading(self):
        """The context the model's weights are read in: fp8 base quantizes while reading; a sharded run's rank 0
        alone reads the denoiser (trainer.sharding)."""
        stack = contextlib.ExitStack()
        stack.enter_context(fp8_loading(self.cfg.model.fp8_base))
        if self.sharded:
            stack.enter_context(rank0_loading(self.acc))
        return stack

    def _cast(self, name: str, module) -> None:
        """A trained module into its trained dtype, a frozen one into the compute dtype (T5's ``wo`` stays fp32 under
        fp16, transformers' keep-in-fp32; fp8 weights stay fp8); nothing without mixed precision."""
        precision = self.resolved["mixed_precision"]
        if precision == "no" or module is None:
            return
        net = self.cfg.network
        trains = net.train_unet if name == self.comps.denoiser_name else net.train_text_encoder
        if net.network_type == "full" and trains:
            module.to(dtype=trained_weight_dtype(self.cfg))
        else:
            cast_frozen(module, DTYPES[precision])

    def _setup_denoiser(self):
        """The denoiser (read now unless the run was handed it) on the device in its dtype, the adapter, block swap,
        optimizer, scheduler, objective, ``prepare()``, EMA and the fused backward pass."""
        cfg, comps = self.cfg, self.comps
        device = self.acc.device
        swap = cfg.training.blocks_to_swap
        if self.denoiser_read_later:
            # block swap: the swapped blocks never go to the device whole; sharded: prepare() moves it as it shards
            with self._loading():
                on_host = swap or cfg.model.fp8_base or self.sharded
                comps.denoiser = self.family.load_denoiser(cfg.model, comps, device="cpu" if on_host else device,
                                                           dtype=self.dtypes)
            self.denoiser_read_later = False
        if cfg.model.fp8_base:
            apply_fp8_base([comps.denoiser], self.dtypes.denoiser or torch.float32)  # LoRA only
        if not self.sharded:
            self._place_denoiser(comps.denoiser)
        self._cast(comps.denoiser_name, comps.denoiser)
        use_attention(comps, cfg.model.attention)
        with torch.random.fork_rng(devices=[]):  # adapter init draws from the global RNG: seed it, leave it as it was
            torch.manual_seed(cfg.training.seed)
            self.net: Network = attach_network(self.family, comps, cfg.network)
        self.block_swap = attach_block_swap(self.family, comps.denoiser, swap, device)
        if cfg.network.network_type != "full":
            from diffusers.training_utils import cast_training_params

            cast_training_params(list(self.net.modules.values()), dtype=torch.float32)
        if self.resolved["gradient_checkpointing"]:
            self._enable_gradient_checkpointing()
        self.optimizer = build_optimizer(param_groups(self.family, self.net, cfg.optim), cfg.optim, memory_lean(cfg))
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.plan)
        prediction = cfg.model.prediction_type or self.family.default_prediction
        self.objective = make_objective(prediction, comps.noise_scheduler, cfg.training,
                                        shift_fn=lambda latents: self.family.flow_shift(comps, latents))
        names = list(self.net.modules)
        # the denoiser is placed already (with block swap, all but its swapped blocks, which accelerate would move
        # whole); a sharded one accelerate places as it shards it
        placement = None if self.sharded or self.deepspeed else [n != comps.denoiser_name for n in names] + [True]
        if self.deepspeed:
            configure_deepspeed(self.acc, cfg)
        prepared = self.acc.prepare(*self.net.modules.values(), self.optimizer, device_placement=placement)
        self.optimizer = prepared[-1]
        # read after prepare(): FSDP2 replaces the parameters with their shards (and after param_groups froze
        # zero-LR blocks); walked once, used every step
        self.params = self.net.parameters()
        self.sharded = is_sharded(self.net.modules.values())
        if self.sharded:
            log.info("rank %d holds a shard of the trained weights (FSDP2)", self.acc.process_index)
        self.ema = None
        if cfg.training.ema:  # sharded: each rank the EMA of its own shards (trainer.sharded_ema)
            from .sharded_ema import make_ema

            self.ema = make_ema(self.params, cfg.training.ema_decay, self.sharded)
            if self.sharded:
                log.info("rank %d keeps the EMA of its shards", self.acc.process_index)
        wrapped = dict(zip(names, prepared[:-1]))
        # Only the forward pass goes through the (possibly DDP-wrapped) modules.
        self.train_comps = dataclasses.replace(
            comps, denoiser=wrapped.get(comps.denoiser_name, comps.denoiser),
            text_encoders=[wrapped.get(n, m) for n, m in zip(comps.text_encoder_names, comps.text_encoders)])
        self.trains_text = any(n in wrapped for n in comps.text_encoder_names)
        # bf16-stored trained weights and the fused backward pass step one tensor at a time (trainer.param_step)
        self.bf16_weights = cfg.training.full_bf16
        self.fused = None
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper holds the optimizer
        if self.bf16_weights:
            keep_float32_state_on_load(inner)
        if cfg.training.fused_backward_pass:
            self.fused = FusedBackward(inner, self.params, cfg.optim.max_grad_norm,
                                       lambda step, device: rounding_generator(cfg.training.seed, step, device))

    def _setup_caches(self) -> None:
        caches = self.resolved  # cache_latents / cache_text_embeddings with "auto" resolved (trainer.defaults)
        self.prefetch = BatchPrefetcher(self.source, enabled=not caches["cache_latents"])
        from .cache import LatentCache, TextCache

        tr, comps = self.cfg.training, self.comps
        self.latent_cache = self.text_cache = None
        if caches["cache_latents"]:
            folder = self.work_dir / "cache" / "latents" if tr.cache_latents_to_disk else None
            vae_dtype = next(comps.vae.parameters()).dtype
            # the VAE dtype is part of the key: latents encoded by a half-precision VAE are never reused in fp32
            ident = f"{self.family.latent_cache_identity(self.cfg.model, comps)}|vae={vae_dtype}"
            self.latent_cache = LatentCache(self.source, ident, folder)
        trains_text = self.cfg.network.train_text_encoder
        if caches["cache_text_embeddings"] and trains_text:
            log.warning("cache_text_embeddings is ignored while a text encoder trains (its outputs change every step)")
        elif caches["cache_text_embeddings"]:
            def encode(texts: list[str], weights=None):
                extra = {"weights": weights} if weights is not None else {}
                with torch.no_grad(), self.acc.autocast():
                    return self.family.encode_text(comps, texts, clip_skip=self.cfg.model.clip_skip,
                                                   max_token_length=self.max_token_length, **extra)

            self.text_cache = TextCache(self.source, tr.caption_variants, encode)

    def _pre_encode(self) -> None:
        """Cache, then free: fill the latent / text caches before step 1, encode the validation inputs and the
        preview prompts (:mod:`trainer.sample_prompts`), then move the encoders they replace off the training device
        and out of memory (:mod:`trainer.encoder_residency`; previews bring the VAE back). Caching is deterministic,
        so the losses equal a run that fills its caches lazily, and a resumed run's."""
        from .encoder_residency import EncoderResidency
        from .sample_prompts import encode_preview_prompts, renders_previews

        from .cache_sharing import CacheShare

        report = self.callbacks.on_prepare if self.acc.is_main_process else (lambda *a: None)
        share = CacheShare.of(self.acc)  # several processes: each encodes its share of the images, then they swap
        cached = []
        if self.latent_cache is not None:
            self.latent_cache.fill(self._encode_pixels, lambda d, t: report(d, t, "caching latents"), share)
            cached.append("vae")
        if self.text_cache is not None:
            self.text_cache.fill(lambda d, t: report(d, t, "caching text embeddings"), share)
            cached += list(self.comps.text_encoder_names)
        previews = renders_previews(self)  # they render from prompts encoded now, with the VAE alone
        self.residency = EncoderResidency(self, cached, self.owns_encoders, keep=("vae",) if previews else ())
        if self.validator is not None and self.residency.cached:  # validation then needs no encoder back
            self.validator.prepare(captions=bool(self.text_cache is not None))
        if previews and self.text_cache is not None:
            self.preview_prompts = encode_preview_prompts(self)
        self.residency.leave()

    def _place_denoiser(self, denoiser) -> None:
        """The denoiser onto the training device; with block swap, all but its swapped blocks (trainer.block_swap)."""
        swap = self.cfg.training.blocks_to_swap
        if swap:
            place_resident(denoiser, self.acc.device, self.family.swappable_blocks(denoiser)[-swap:])
        else:
            denoiser.to(self.acc.device)

    def _encoders_on_device(self, needed: bool = True):
        """The encoders the caches replaced back on the training device for the duration (preview samples),
        reloaded first where they were released from memory."""
        residency = getattr(self, "residency", None)
        return residency.present(needed) if residency is not None else contextlib.nullcontext()

    def _enable_gradient_checkpointing(self) -> None:
        for module in self.net.modules.values():
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            elif hasattr(module, "gradient_checkpointing_enable"):
                # Non-reentrant: transformers 4.x defaults to reentrant checkpointing, which gives a LoRA injected with
                # peft directly no gradient (the block inputs do not require grad), so the text encoder never learns.
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                module.train()  # transformers checkpoints only in training mode (CLIP/T5 have no dropout to enable)
