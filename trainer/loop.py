"""The training loop.

One optimizer step reads: sample σ/t → ``objective.noise`` → ``family.predict`` → weighted MSE against the target.
The loop never branches on the model family; everything family-specific is behind :class:`ModelFamily`.

Determinism: the epoch's batch order, captions and crops come from ``DataSource`` keyed by (seed, epoch); noise
and timesteps come from a generator seeded per (seed, step, micro-batch, rank). A run stopped after step *k* and
resumed from its saved state therefore computes exactly the steps an uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .callbacks import Callbacks, CheckpointInfo, SampleInfo, StepInfo
from .config import TrainConfig
from .errors import CrucibleError, TrainingDivergedError
from .families import Components, ModelFamily, get_family
from .families.objectives import make_objective
from .fileio import atomic_write_json
from .network import Network, attach_network, param_groups
from .noise import offset_noise, pyramid_noise
from .numerics import overflow_decision
from .optim import build_optimizer, build_scheduler
from .plots import save_loss_curve
from .run_paths import run_paths
from .run_record import RUN_FILE, RunRecord
from .state import load_state, save_state
from .validation import validation_summary

log = logging.getLogger("crucible")

DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunResult:
    run_dir: Path  # where checkpoints are
    work_dir: Path  # state, samples, config.json, run.json
    checkpoints: list[CheckpointInfo]
    losses: list[float]  # mean loss per optimizer step (index 0 = step 1)
    cancelled: bool
    plan: Any
    state_dir: Path | None = None
    samples: list[SampleInfo] = field(default_factory=list)
    record: RunRecord | None = None  # what run.json holds (None on the non-main processes of a multi-GPU run)


def train(cfg: TrainConfig, callbacks: Callbacks | None = None, *, resume_from: str | Path | None = None,
          force_resume: bool = False, components: Components | None = None) -> RunResult:
    """Train ``cfg`` to completion (or until ``callbacks.should_stop()``), saving as the plan says.

    Whatever the outcome (finished, cancelled, raised), every model the run loaded is released before this returns
    (:mod:`trainer.release`): a host like ComfyUI goes on running in the same process.
    """
    from .release import forget_frames, release_run

    trainer = Trainer(cfg, callbacks or Callbacks())
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return trainer.run(resume_from, force_resume, components)
    except BaseException as exc:
        forget_frames(exc)  # the traceback's frames would keep the models alive for as long as the caller keeps exc
        raise
    finally:
        release_run(trainer)


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


def step_generator(seed: int, *keys: int) -> torch.Generator:
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class BatchPrefetcher:
    """Decodes the next optimizer step's batches on a background thread while the current step computes.

    ``DataSource.load_batch`` is deterministic in (batch plan, epoch), so a prefetched batch is the batch the step
    would have loaded itself; order and results do not depend on timing.
    """

    def __init__(self, source, enabled: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self.source = source
        self.enabled = enabled
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crucible-prefetch") if enabled else None
        self.pending: dict[Any, Any] = {}

    @staticmethod
    def _key(batch_plan, epoch: int):
        return epoch, tuple(tuple(s) for s in batch_plan)

    def request(self, group: list[Any], epoch: int) -> None:
        if not self.enabled:
            return
        for batch_plan in group:
            key = self._key(batch_plan, epoch)
            if key not in self.pending:
                self.pending[key] = self.pool.submit(self.source.load_batch, batch_plan, epoch)

    def get(self, batch_plan, epoch: int):
        future = self.pending.pop(self._key(batch_plan, epoch), None)
        return future.result() if future is not None else self.source.load_batch(batch_plan, epoch)

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending.values():
                future.cancel()
            self.pending.clear()
            self.pool.shutdown(wait=True)


class Trainer:
    def __init__(self, cfg: TrainConfig, callbacks: Callbacks):
        self.cfg = cfg
        self.callbacks = callbacks
        self.family: ModelFamily = get_family(cfg.model.family)
        paths = run_paths(cfg.save)
        self.run_name, self.run_dir, self.work_dir, self.state_dir = paths.name, paths.run_dir, paths.work_dir, paths.state_dir
        self.checkpoints: list[CheckpointInfo] = []
        self.losses: list[float] = []
        self.samples: list[SampleInfo] = []
        self.started_at = time.time()  # kohya ss_training_started_at: when this run (not the process) started
        self.offloaded: list[Any] = []  # encoders moved off the device once the caches were filled
        self.overflow_skips = 0  # consecutive fp16 overflow steps the gradient scaler skipped (trainer.numerics)

    # --- set-up --------------------------------------------------------------------------------------------------
    def _setup(self, components: Components | None):
        from .defaults import resolved_settings
        from .plan import compute_plan
        from .validation import training_source

        cfg = self.cfg
        self.resolved = resolved_settings(cfg)  # "auto" precision / checkpointing, recorded in run.json
        precision = self.resolved["mixed_precision"]
        self.acc = make_accelerator(precision, cfg.network.train_text_encoder)
        self.source = training_source(cfg)
        self.plan = compute_plan(cfg, self.source, num_processes=self.acc.num_processes)
        for note in self.plan.notes:  # settings this model ignores: said, never silent
            log.warning("%s", note)
        device = self.acc.device
        # LoRA under mixed precision: frozen base weights load straight in the compute dtype (kohya/diffusers
        # practice; a 12B Flux in fp32 would not fit), the trainable adapter stays fp32 (below).
        lowp = cfg.network.network_type != "full" and precision != "no"
        weight_dtype = DTYPES[precision] if lowp else None
        from .quantized import apply_fp8_base, cast_frozen, fp8_loading  # issue #16

        with fp8_loading(cfg.model.fp8_base):  # fp8 base: quantized on the host while loading, then moved
            comps = components or self.family.load(cfg.model, device="cpu" if cfg.model.fp8_base else device,
                                                   dtype=weight_dtype)
        if cfg.model.fp8_base:
            apply_fp8_base([comps.denoiser, *comps.text_encoders], weight_dtype or torch.float32)
        comps.to(device=device)
        if self.family.vae_fp32 and comps.vae is not None:
            comps.vae.to(dtype=torch.float32)  # kohya no_half_vae: this VAE overflows to NaN in half precision
        self.comps = comps
        if lowp:
            for module in [comps.denoiser, *comps.text_encoders]:
                cast_frozen(module, weight_dtype)  # T5's wo stays fp32 under fp16 (transformers' keep-in-fp32)
        self.family.configure_training(comps, cfg.training)
        use_attention(comps, cfg.model.attention)
        if cfg.network.network_type == "full" and cfg.network.train_text_encoder and not cfg.save.single_file_dir:
            log.warning("network_type 'full' exports only the %s; the trained text encoder is kept in the training "
                        "state only. Set save.single_file_dir to also save the whole model", comps.denoiser_name)
        with torch.random.fork_rng(devices=[]):  # adapter init draws from the global RNG: seed it, leave it as it was
            torch.manual_seed(cfg.training.seed)
            self.net: Network = attach_network(self.family, comps, cfg.network)
        if cfg.network.network_type != "full":
            from diffusers.training_utils import cast_training_params

            cast_training_params(list(self.net.modules.values()), dtype=torch.float32)
        if self.resolved["gradient_checkpointing"]:
            self._enable_gradient_checkpointing()
        self.optimizer = build_optimizer(param_groups(self.family, self.net, cfg.optim), cfg.optim)
        self.params = self.net.parameters()  # after param_groups froze zero-LR blocks; walked once, used every step
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.plan)
        prediction = cfg.model.prediction_type or self.family.default_prediction
        self.objective = make_objective(prediction, comps.noise_scheduler, cfg.training,
                                        shift_fn=lambda latents: self.family.flow_shift(comps, latents))
        self.ema = None
        if cfg.training.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.net.parameters(), decay=cfg.training.ema_decay)
        self.max_token_length = max(d.captions.max_token_length for d in cfg.datasets)
        self._setup_caches()
        from .validation import Validator

        self.validator = Validator.for_run(self) if self.acc.is_main_process else None
        names = list(self.net.modules)
        prepared = self.acc.prepare(*self.net.modules.values(), self.optimizer)
        self.optimizer = prepared[-1]
        wrapped = dict(zip(names, prepared[:-1]))
        # Only the forward pass goes through the (possibly DDP-wrapped) modules.
        self.train_comps = dataclasses.replace(
            comps, denoiser=wrapped.get(comps.denoiser_name, comps.denoiser),
            text_encoders=[wrapped.get(n, m) for n, m in zip(comps.text_encoder_names, comps.text_encoders)])
        self.trains_text = any(n in wrapped for n in comps.text_encoder_names)

    def _setup_caches(self) -> None:
        self.prefetch = BatchPrefetcher(self.source, enabled=not self.cfg.training.cache_latents)
        from .cache import LatentCache, TextCache, model_identity

        tr, comps = self.cfg.training, self.comps
        self.latent_cache = self.text_cache = None
        if tr.cache_latents:
            folder = self.work_dir / "cache" / "latents" if tr.cache_latents_to_disk else None
            vae_dtype = next(comps.vae.parameters()).dtype
            # the VAE dtype is part of the key: latents encoded by a half-precision VAE are never reused in fp32
            ident = f"{model_identity(self.cfg.model.path, self.cfg.model.vae_path)}|vae={vae_dtype}"
            self.latent_cache = LatentCache(self.source, ident, folder)
        trains_text = self.cfg.network.train_text_encoder
        if tr.cache_text_embeddings and trains_text:
            log.warning("cache_text_embeddings is ignored while a text encoder trains (its outputs change every step)")
        elif tr.cache_text_embeddings:
            def encode(texts: list[str], weights=None):
                extra = {"weights": weights} if weights is not None else {}
                with torch.no_grad(), self.acc.autocast():
                    return self.family.encode_text(comps, texts, clip_skip=self.cfg.model.clip_skip,
                                                   max_token_length=self.max_token_length, **extra)

            self.text_cache = TextCache(self.source, tr.caption_variants, encode)

    def _pre_encode(self) -> None:
        """Cache, then free: fill the latent / text caches before step 1, then move the encoders they replace off
        the training device (back on only while preview samples render). Caching is deterministic, so the losses
        equal a run that fills its caches lazily, and a resumed run's."""
        report = self.callbacks.on_prepare if self.acc.is_main_process else (lambda *a: None)
        if self.latent_cache is not None:
            self.latent_cache.fill(self._encode_pixels, lambda d, t: report(d, t, "caching latents"))
            self.offloaded.append(self.comps.vae)
        if self.text_cache is not None:
            self.text_cache.fill(lambda d, t: report(d, t, "caching text embeddings"))
            self.offloaded += [m for m in self.comps.text_encoders if m is not None]
        for module in self.offloaded:
            offload_module(module)

    @contextlib.contextmanager
    def _encoders_on_device(self):
        """The offloaded encoders on the training device for the duration (preview samples)."""
        for module in self.offloaded:
            module.to(self.acc.device)
        try:
            yield
        finally:
            for module in self.offloaded:
                offload_module(module)

    def _enable_gradient_checkpointing(self) -> None:
        for module in self.net.modules.values():
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            elif hasattr(module, "gradient_checkpointing_enable"):
                # Non-reentrant: transformers 4.x defaults to reentrant checkpointing, which gives a LoRA injected with
                # peft directly no gradient (the block inputs do not require grad), so the text encoder never learns.
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                module.train()  # transformers checkpoints only in training mode (CLIP/T5 have no dropout to enable)

    # --- run -----------------------------------------------------------------------------------------------------
    def run(self, resume_from, force_resume: bool, components: Components | None) -> RunResult:
        self._setup(components)
        start = self._resume(resume_from, force_resume) if resume_from else 0
        if self.acc.is_main_process:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.work_dir / "config.json", self.cfg.to_dict())
        if self.acc.is_main_process:
            self.callbacks.on_start(self.plan)
        self._pre_encode()
        try:
            cancelled = self._loop(start)
        finally:
            self.prefetch.close()
        self.acc.wait_for_everyone()
        log.debug("rank %d trained weights sha256 %s", self.acc.process_index, self._weights_digest())
        record = self._write_manifest("cancelled" if cancelled else "finished")
        return RunResult(self.run_dir, self.work_dir, self.checkpoints, self.losses, cancelled, self.plan,
                         self.state_dir if self.cfg.save.save_state else None, self.samples, record)

    def _resume(self, folder, force: bool) -> int:
        saved = load_state(Path(folder), self.cfg, self.source.fingerprint(), force=force)
        payload = saved.payload
        self.net.load_state_dicts(payload["network"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.ema is not None and payload.get("ema"):
            self.ema.load_state_dict(payload["ema"])
        if self.acc.scaler is not None and payload.get("scaler"):
            self.acc.scaler.load_state_dict(payload["scaler"])
        self.losses = [float(x) for x in payload.get("losses", [])][: saved.step]
        if (Path(folder).parent / RUN_FILE).is_file():
            self.checkpoints = [c for c in RunRecord.load(Path(folder).parent).checkpoints
                                if c.step is not None and c.step <= saved.step and c.path.exists()]
        log.info("resuming %s at step %d (epoch %d)", self.run_name, saved.step, saved.epoch)
        return saved.step

    def _loop(self, start_step: int) -> bool:
        plan = self.plan
        step = start_step
        t0, done_here = time.monotonic(), 0
        for epoch in range(1, plan.epochs + 1):
            groups = self._epoch_groups(epoch)
            for index, group in enumerate(groups):
                step_of = (epoch - 1) * plan.steps_per_epoch + index + 1
                if step_of <= start_step:
                    continue
                if step_of > plan.total_steps:
                    break
                step = step_of
                if index + 1 < len(groups):  # decode the next step's images while this one computes
                    self.prefetch.request(groups[index + 1], epoch)
                loss = self._optimizer_step(group, step, epoch)
                self.losses.append(loss)
                done_here += 1
                spent = (time.monotonic() - t0) / done_here
                if self.acc.is_main_process:
                    self.callbacks.on_step(StepInfo(step, plan.total_steps, epoch, loss,
                                                    self.scheduler.get_last_lr()[0], spent,
                                                    spent * (plan.total_steps - step)))
                if plan.is_sample_step(step) and self.cfg.sample.prompts:
                    self._sample(step, epoch)
                stop = self._should_stop() and step < plan.total_steps
                if plan.is_save_step(step) or stop:
                    self._save(step, epoch, final=step == plan.total_steps)
                if stop:
                    log.info("stopped at step %d; checkpoint and state saved", step)
                    return True
            if step >= plan.total_steps:
                break
        return False

    def _should_stop(self) -> bool:
        """The main process's Cancel, agreed by every process (a stop on one rank alone would hang the others)."""
        wanted = self.acc.is_main_process and self.callbacks.should_stop()
        if self.acc.num_processes == 1:
            return wanted
        flag = torch.tensor([1.0 if wanted else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def _weights_digest(self) -> str:
        digest = hashlib.sha256()
        for _, name, p in sorted(self.net.named_trainable(), key=lambda x: (x[0], x[1])):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def _epoch_groups(self, epoch: int) -> list[list[Any]]:
        """This rank's micro-batches for the epoch, grouped into optimizer steps."""
        tr = self.cfg.training
        batches = self.source.epoch_batches(epoch, tr.batch_size, tr.drop_last)
        world, rank = self.acc.num_processes, self.acc.process_index
        if world > 1:  # pad by wrapping so every rank takes the same number of steps
            need = math.ceil(len(batches) / world) * world
            batches = (batches + batches[: need - len(batches)])[rank::world]
        accum = tr.gradient_accumulation_steps
        return [batches[i:i + accum] for i in range(0, len(batches), accum)]

    def _optimizer_step(self, group: list[Any], step: int, epoch: int) -> float:
        total = torch.zeros((), device=self.acc.device)
        for micro, batch_plan in enumerate(group):
            last = micro == len(group) - 1
            sync = contextlib.nullcontext() if last or self.acc.num_processes == 1 else \
                self.acc.no_sync(self.train_comps.denoiser)
            with sync:
                loss = self._loss(batch_plan, epoch, step, micro)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"loss became {loss.item()} at step {step} (epoch {epoch}); training stopped. The last "
                        "good checkpoint is kept. Lower the learning rate, or use bf16/no mixed precision")
                self.acc.backward(loss / len(group))
            total += loss.detach()
        params = self.params
        # Always measure the gradient norm (an infinite max_norm clips nothing), so a non-finite gradient stops the
        # run before the weights change — with clipping on or off.
        max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else float("inf")
        norm = self.acc.clip_grad_norm_(params, max_norm)
        decision = overflow_decision(None if norm is None else float(norm), self.acc.scaler is not None,
                                     self.overflow_skips, step)
        if decision.action == "stop":
            raise TrainingDivergedError(decision.message)
        self.overflow_skips = decision.consecutive_skips
        if decision.action == "skip":
            log.info(decision.message)
        self.optimizer.step()  # fp16: the scaler skips an overflowed step itself and lowers its scale
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and decision.action == "step":
            self.ema.step(params)
        mean = self.acc.reduce(total / len(group), reduction="mean")
        return float(mean)

    def _loss(self, batch_plan: Any, epoch: int, step: int, micro: int) -> torch.Tensor:
        tr, fam, comps = self.cfg.training, self.family, self.train_comps
        gen = step_generator(tr.seed, step, micro, self.acc.process_index)
        latents = self._latents(batch_plan, epoch)
        if self.text_cache is not None:
            cond = {k: v.to(self.acc.device) for k, v in self.text_cache.conditioning(batch_plan, epoch).items()}
        else:
            captions = [self.source.caption(s[0], epoch, s[1]) for s in batch_plan]
            extra = {}
            if any(c.weights is not None for c in captions):  # weighted captions: per-token weights
                extra["weights"] = [c.weights if c.weights is not None else ((c.text, 1.0),) for c in captions]
            text_ctx = contextlib.nullcontext() if self.trains_text else torch.no_grad()
            with text_ctx, self.acc.autocast():
                cond = fam.encode_text(comps, [c.text for c in captions], clip_skip=self.cfg.model.clip_skip,
                                       max_token_length=self.max_token_length, **extra)
        cond["image_geometry"] = torch.tensor(self.source.image_geometry(batch_plan, epoch))  # SDXL micro-conditioning
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        noise = offset_noise(noise, tr.noise_offset, gen)
        noise = pyramid_noise(noise, tr.multires_noise_iterations, tr.multires_noise_discount, gen)
        noised = self.objective.noise(latents, noise, gen)
        with self.acc.autocast():
            pred = fam.predict(comps, noised.noisy, noised.timesteps, cond)
        error = F.mse_loss(pred.float(), noised.target.float(), reduction="none")
        if tr.masked_loss:  # kohya masked_loss: masked-out pixels contribute nothing (trainer.masks)
            from .masks import apply_mask, batch_masks

            error = apply_mask(error, batch_masks(self.source, batch_plan, epoch))
        per_sample = error.mean(dim=tuple(range(1, pred.ndim)))
        if noised.weights is not None:
            per_sample = per_sample * noised.weights.to(per_sample)
        reg = [self.source.items[s[0]].is_reg for s in batch_plan]
        if any(reg):  # kohya prior_loss_weight: regularization samples' loss is scaled
            per_sample = per_sample * torch.tensor([tr.prior_loss_weight if r else 1.0 for r in reg]).to(per_sample)
        return per_sample.mean()

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.comps.vae.parameters()).dtype
        with torch.no_grad():
            return self.family.encode_images(self.train_comps, pixels.to(self.acc.device, dtype=vae_dtype)).float()

    def _latents(self, batch_plan, epoch: int) -> torch.Tensor:
        if self.latent_cache is not None:
            return self.latent_cache.latents(batch_plan, epoch, self._encode_pixels).to(self.acc.device)
        return self._encode_pixels(self.prefetch.get(batch_plan, epoch).pixels)

    # --- outputs -------------------------------------------------------------------------------------------------
    def _save(self, step: int, epoch: int, final: bool) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            from .checkpoints import write_checkpoint

            with self._ema_weights(), self._encoders_on_device(), self.acc.autocast():  # encoders may be offloaded
                validation = self.validator.evaluate()
                info = write_checkpoint(self, step, epoch, final=final, validation=validation)
            self.checkpoints.append(info)
            self._prune()
            if self.cfg.save.save_state:
                self._save_state(step, epoch)
            self._write_manifest("running")
            save_loss_curve(self.work_dir / "loss_curve.png", self.losses, self.checkpoints)
            self.callbacks.on_checkpoint(info)
        self.acc.wait_for_everyone()

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        params = self.net.parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def _save_state(self, step: int, epoch: int) -> None:
        payload = {
            "network": self.net.state_dicts(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "losses": list(self.losses),
            "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else {},  # fp16: resume exact
        }
        save_state(self.state_dir, step=step, epoch=epoch, payload=payload, cfg=self.cfg,
                   data_fingerprint=self.source.fingerprint(), extra={"run_name": self.run_name})

    def _prune(self) -> None:
        limit = self.cfg.save.checkpoint_limit
        if limit <= 0 or len(self.checkpoints) <= limit:
            return
        keep_last = self.checkpoints[-1]
        older = self.checkpoints[:-1]
        single_dir = Path(self.cfg.save.single_file_dir) / self.run_name if self.cfg.save.single_file_dir else None
        while len(older) + 1 > limit and older:
            victim = older.pop(0)
            for path in (victim.path, single_dir / victim.path.name if single_dir else None):
                if path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            log.info("checkpoint limit %d: removed %s", limit, victim.path.name)
        self.checkpoints = older + [keep_last]

    def _write_manifest(self, status: str) -> RunRecord | None:
        if not self.acc.is_main_process:
            return None
        record = RunRecord(self.run_name, self.family.name, "full" if self.net.is_full else "lora", status,
                           self.run_dir, self.work_dir, list(self.checkpoints),
                           validation_summary(self.validator, self.checkpoints), list(self.losses),
                           self.plan.to_dict(), self.resolved,
                           [{"step": s.step, "paths": [str(p) for p in s.paths]} for s in self.samples])
        record.write()
        return record

    def _sample(self, step: int, epoch: int) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            from .fileio import atomic_write

            s = self.cfg.sample
            res = self.cfg.dataset.resolution
            modules = list(self.net.modules.values())
            modes = [m.training for m in modules]
            for m in modules:
                m.eval()
            try:
                with torch.no_grad(), self._ema_weights(), self.acc.autocast(), self._encoders_on_device():
                    images = self.family.sample(self.comps, s.prompts, seed=s.seed, steps=s.steps, cfg=s.cfg,
                                                width=s.width or res, height=s.height or res,
                                                negative_prompt=s.negative_prompt, guidance=s.guidance)
            finally:
                for m, mode in zip(modules, modes):
                    m.train(mode)
            paths = []
            for i, image in enumerate(images):
                path = self.work_dir / "samples" / f"{self.run_name}-s{step:06d}-p{i}.png"
                atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
                paths.append(path)
            info = SampleInfo(step, epoch, tuple(s.prompts), tuple(images), tuple(paths))
            self.samples.append(info)
            self.callbacks.on_sample(info)
        self.acc.wait_for_everyone()
