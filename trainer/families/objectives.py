"""Training objectives: what noise is added, what the model must predict, how each sample's loss is weighted.

* :class:`DiffusionObjective` — DDPM-style epsilon or v-prediction (SD1.5, SDXL), with kohya's min-SNR weighting
  (``diffusers.training_utils.compute_snr``).
* :class:`FlowMatchingObjective` — rectified flow (SD3, Flux): ``x_t = (1-σ)·x0 + σ·ε``, target ``ε - x0``, σ drawn
  by :meth:`FlowMatchingObjective.sample_sigmas` (its own code: uniform, logit-normal and mode use the formulas of
  diffusers' ``compute_density_for_timestep_sampling``, plus SimpleTuner's "sigmoid" and the σ shift), and weighted
  with ``diffusers.training_utils.compute_loss_weighting_for_sd3``.

Every random draw takes an explicit ``torch.Generator``: the loop seeds one per step, so a resumed run draws exactly
what an uninterrupted one would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import TrainingConfig


@dataclass(frozen=True)
class NoisedBatch:
    noisy: torch.Tensor  # what the denoiser sees
    timesteps: torch.Tensor  # what the denoiser is told (0..999, float for flow)
    target: torch.Tensor  # what it must predict
    weights: torch.Tensor | None  # per-sample loss weights [B] or None


class DiffusionObjective:
    """Epsilon / v-prediction on a DDPM noise schedule."""

    def __init__(self, scheduler, prediction_type: str, training: TrainingConfig):
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.min_snr_gamma = training.min_snr_gamma
        self.num_timesteps = int(scheduler.config.num_train_timesteps)

    def noise(self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
        b = latents.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        return NoisedBatch(noisy, t, target, self._min_snr_weights(t))

    def noise_at(self, latents: torch.Tensor, noise: torch.Tensor, fraction: float) -> NoisedBatch:
        """Noise at a fixed point of the schedule (``fraction`` 1.0 = the last timestep), unweighted: validation."""
        t = torch.full((latents.shape[0],), min(self.num_timesteps - 1, max(0, round(fraction * self.num_timesteps) - 1)),
                       dtype=torch.long, device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = self.scheduler.get_velocity(latents, noise, t) if self.prediction_type == "v_prediction" else noise
        return NoisedBatch(noisy, t, target, None)

    def _min_snr_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        if self.min_snr_gamma <= 0:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, t.cpu()).to(t.device)
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        # epsilon: min(snr, γ)/snr; v-prediction: min(snr, γ)/(snr + 1) (Hang et al., kohya's apply_snr_weight)
        denom = snr + 1 if self.prediction_type == "v_prediction" else snr
        return clipped / denom.clamp(min=1e-8)


class FlowMatchingObjective:
    """Rectified flow as in diffusers' SD3/Flux training scripts."""

    def __init__(self, scheduler, training: TrainingConfig, shift: float | None = None,
                 shift_fn: Callable[[torch.Tensor], float | None] | None = None):
        self.scheduler = scheduler
        self.training = training
        self.shift = float(shift if shift is not None else (training.flow_shift or 1.0))
        # flow_shift 0 = "auto": ask the family per batch (Flux dev: resolution-dependent), else 1.0
        self.shift_fn = shift_fn if shift is None and training.flow_shift == 0 else None
        self.num_timesteps = int(getattr(scheduler.config, "num_train_timesteps", 1000))

    def sample_sigmas(self, batch: int, generator: torch.Generator, shift: float | None = None) -> torch.Tensor:
        tr = self.training
        if tr.timestep_sampling == "uniform":
            u = torch.rand(batch, generator=generator)
        elif tr.timestep_sampling == "logit_normal":
            u = torch.sigmoid(tr.logit_mean + tr.logit_std * torch.randn(batch, generator=generator))
        elif tr.timestep_sampling == "sigmoid":  # SimpleTuner/ai-toolkit "sigmoid": logit-normal with mean 0
            u = torch.sigmoid(tr.logit_std * torch.randn(batch, generator=generator))
        elif tr.timestep_sampling == "mode":
            u = torch.rand(batch, generator=generator)
            u = 1 - u - tr.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:  # validated by config; kept explicit so a new choice cannot slip through silently
            raise ValueError(f"unknown timestep_sampling {tr.timestep_sampling!r}")
        shift = self.shift if shift is None else shift
        if shift != 1.0:
            u = shift * u / (1 + (shift - 1) * u)
        return u.clamp(1e-5, 1.0)

    def noise(self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator,
              shift: float | None = None) -> NoisedBatch:
        if shift is None and self.shift_fn is not None:
            shift = self.shift_fn(latents)
        sigmas = self.sample_sigmas(latents.shape[0], generator, shift).to(latents.device, latents.dtype)
        s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1 - s) * latents + s * noise
        target = noise - latents
        return NoisedBatch(noisy, sigmas * self.num_timesteps, target, self._weights(sigmas))

    def noise_at(self, latents: torch.Tensor, noise: torch.Tensor, fraction: float) -> NoisedBatch:
        """Noise at a fixed σ = ``fraction`` (no shift; ai-toolkit's σ 1.0/0.75/0.5/0.25), unweighted: validation."""
        sigmas = torch.full((latents.shape[0],), float(fraction), device=latents.device, dtype=latents.dtype)
        s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        return NoisedBatch((1 - s) * latents + s * noise, sigmas * self.num_timesteps, noise - latents, None)

    def _weights(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        scheme = self.training.loss_weighting
        if scheme == "none":
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)


def make_objective(prediction_type: str, scheduler, training: TrainingConfig,
                   shift_fn: Callable[[torch.Tensor], float | None] | None = None):
    """The objective for a prediction type (``epsilon`` | ``v_prediction`` | ``flow``). ``shift_fn`` gives a flow
    family's own σ shift for a batch of latents (used when ``training.flow_shift`` is 0)."""
    if prediction_type == "flow":
        return FlowMatchingObjective(scheduler, training, shift_fn=shift_fn)
    return DiffusionObjective(scheduler, prediction_type, training)
