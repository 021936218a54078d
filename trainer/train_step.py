"""One optimizer step: sample σ/t → ``objective.noise`` → ``family.predict`` → weighted MSE against the target,
accumulated over the step's micro-batches, clipped, and applied.

:class:`TrainStep` is one part of :class:`trainer.loop.Trainer` (it reads what :mod:`trainer.run_setup` set up).
Noise and timesteps come from a generator seeded per (seed, step, micro-batch, rank): a resumed run computes exactly
the steps an uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Any

import torch
import torch.nn.functional as F

from .errors import TrainingDivergedError
from .noise import offset_noise, pyramid_noise
from .numerics import overflow_decision
from .param_step import step_parameter

log = logging.getLogger("crucible")


def _derived_seed(seed: int, *keys: int) -> int:
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(_derived_seed(seed, *keys))


def rounding_generator(seed: int, step: int, device) -> torch.Generator:
    """The stochastic-rounding draws of one step (on the weights' device): a resumed run rounds as the first did."""
    return torch.Generator(device).manual_seed(_derived_seed(seed, step, "stochastic rounding"))


class TrainStep:
    """The optimizer step and its loss (part of :class:`trainer.loop.Trainer`)."""

    def _optimizer_step(self, group: list[Any], step: int, epoch: int) -> float:
        total = torch.zeros((), device=self.acc.device)
        if self.fused is not None:  # the weights are stepped during the backward pass (trainer.param_step)
            self.fused.begin(step)
        for micro, batch_plan in enumerate(group):
            last = micro == len(group) - 1
            sync = contextlib.nullcontext() if last or self.acc.num_processes == 1 or self.deepspeed else \
                self.acc.no_sync(self.train_comps.denoiser)
            with sync:
                loss = self._loss(batch_plan, epoch, step, micro)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"loss became {loss.item()} at step {step} (epoch {epoch}); training stopped. The last "
                        "good checkpoint is kept. Lower the learning rate, or use bf16/no mixed precision")
                if self.deepspeed:  # the engine steps at the group's last micro-batch; the loss is scaled here
                    self.acc.gradient_state._set_sync_gradients(last)
                    self.acc.backward(loss / len(group), scale_wrt_gas=False)
                else:
                    self.acc.backward(loss / len(group))
            total += loss.detach()
        if self.block_swap is not None:
            self.block_swap.settle()  # every swapped block back in CPU memory before the next forward
        params = self.params
        if self.fused is not None:
            return self._after_fused_step(total / len(group))
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
        if self.bf16_weights:  # bf16-stored weights: stepped in fp32, rounded back stochastically
            if decision.action == "step":
                inner = getattr(self.optimizer, "optimizer", self.optimizer)
                generator = rounding_generator(self.cfg.training.seed, step, self.acc.device)
                for p in params:
                    step_parameter(inner, p, generator)
        else:
            self.optimizer.step()  # fp16: the scaler skips an overflowed step itself and lowers its scale
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and decision.action == "step":
            self.ema.step(params)
        mean = self.acc.reduce(total / len(group), reduction="mean")
        return float(mean)

    def _after_fused_step(self, mean: torch.Tensor) -> float:
        self.scheduler.step()
        if self.ema is not None:
            self.ema.step(self.params)
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
            return self.family.encode_images(self.comps, pixels.to(self.acc.device, dtype=vae_dtype)).float()

    def _latents(self, batch_plan, epoch: int) -> torch.Tensor:
        if self.latent_cache is not None:
            return self.latent_cache.latents(batch_plan, epoch, self._encode_pixels).to(self.acc.device)
        return self._encode_pixels(self.prefetch.get(batch_plan, epoch).pixels)
