"""Optimizer and scheduler factories, noise shaping and loss weighting."""
from __future__ import annotations

import pytest
import torch

from trainer.config import ADAPTIVE_OPTIMIZERS, OPTIMIZERS, SCHEDULERS, OptimConfig, TrainConfig, TrainingConfig
from trainer.errors import ConfigError, CrucibleError
from trainer.optim import build_optimizer, build_scheduler, parse_optimizer_args
from trainer.plan import plan_from_counts, warmup_steps

LR_FREE = set(ADAPTIVE_OPTIMIZERS)


def quadratic():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8))
    return w, lambda: ((w - 3) ** 2).sum()


@pytest.mark.parametrize("name", [o for o in OPTIMIZERS if o != "adamw8bit"])
def test_every_optimizer_constructs_and_reduces_a_loss(name):
    w, loss_fn = quadratic()
    lr = 1.0 if name in LR_FREE else 0.05
    opt = build_optimizer([{"params": [w], "lr": lr, "name": "x"}], OptimConfig(optimizer=name, learning_rate=lr,
                                                                                 weight_decay=0.0))
    start = loss_fn().item()
    for _ in range(200):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < start * 0.9, name


def test_adafactor_relative_step_runs_without_lr():
    w, loss_fn = quadratic()
    opt = build_optimizer([{"params": [w], "lr": 1e-3}],
                          OptimConfig(optimizer="adafactor", optimizer_args=("relative_step=True",)))
    loss_fn().backward()
    opt.step()
    assert opt.defaults["relative_step"] is True


def test_adamw8bit_needs_cuda_with_a_clear_message():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    w, _ = quadratic()
    with pytest.raises(CrucibleError, match="CUDA"):
        build_optimizer([{"params": [w], "lr": 1e-3}], OptimConfig(optimizer="adamw8bit"))


def test_prodigy_warns_when_lr_is_not_one(caplog):
    w, _ = quadratic()
    build_optimizer([{"params": [w], "lr": 1e-3}], OptimConfig(optimizer="prodigy", learning_rate=1e-3))
    assert "learning_rate should be about 1.0" in caplog.text


def test_optimizer_args_parsed_and_bad_ones_named():
    assert parse_optimizer_args(("betas=(0.9, 0.99)", "eps=1e-8", "decouple=True", "mode=fast")) == \
        {"betas": (0.9, 0.99), "eps": 1e-8, "decouple": True, "mode": "fast"}
    w, _ = quadratic()
    with pytest.raises(ConfigError, match="optimizer_args"):
        build_optimizer([{"params": [w], "lr": 1e-3}], OptimConfig(optimizer_args=("nonsense_arg=1",)))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedules_match_diffusers_get_scheduler(name):
    from diffusers.optimization import get_scheduler

    cfg = OptimConfig(lr_scheduler=name, learning_rate=1.0, lr_warmup_ratio=0.1, lr_scheduler_num_cycles=2,
                      lr_scheduler_power=2.0)
    total = 50
    plan = plan_from_counts({(64, 64): total}, TrainConfig(optim=cfg).replace(training={"epochs": 1}))
    ours = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg, plan)
    ref_name = "constant_with_warmup" if name == "constant" else name  # constant + warmup: warmup applies
    ref = get_scheduler(ref_name, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), num_warmup_steps=5,
                        num_training_steps=total, num_cycles=2, power=2.0)
    a, b = [], []
    for _ in range(total):
        a.append(ours.get_last_lr()[0])
        b.append(ref.get_last_lr()[0])
        ours.optimizer.step(), ours.step(), ref.optimizer.step(), ref.step()
    assert a == pytest.approx(b)


def test_the_scheduler_warms_up_for_the_plans_warmup():
    """The Step Plan's warmup is the value the scheduler applies: it is read from the plan, not recomputed."""
    from dataclasses import replace

    cfg = OptimConfig(lr_scheduler="linear", learning_rate=1.0, lr_warmup_steps=2)
    plan = plan_from_counts({(64, 64): 20}, TrainConfig(optim=cfg).replace(training={"epochs": 1}))
    assert plan.warmup_steps == 2
    for warmup in (plan.warmup_steps, 7):
        shown = replace(plan, warmup_steps=warmup)
        scheduler = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg, shown)
        lrs = []
        for _ in range(warmup + 1):
            lrs.append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step(), scheduler.step()
        assert lrs[warmup] == pytest.approx(1.0) and lrs[warmup - 1] < 1.0, (warmup, lrs)


def test_warmup_ratio_overrides_steps_and_is_capped():
    assert warmup_steps(OptimConfig(lr_warmup_steps=7), 100) == 7
    assert warmup_steps(OptimConfig(lr_warmup_steps=7, lr_warmup_ratio=0.1), 100) == 10
    assert warmup_steps(OptimConfig(lr_warmup_steps=500), 100) == 100


# --- noise and loss weighting -----------------------------------------------------------------------------------
def test_offset_noise_adds_a_per_channel_constant():
    from trainer.noise import offset_noise

    noise = torch.zeros(2, 4, 8, 8)
    out = offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    per_channel = out.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel))  # constant over pixels
    assert out.abs().max() > 0
    assert offset_noise(noise, 0.0, torch.Generator()) is noise


def test_pyramid_noise_is_unit_std_and_spatially_correlated():
    from trainer.noise import pyramid_noise

    gen = torch.Generator().manual_seed(0)
    white = torch.randn(4, 4, 32, 32, generator=gen)
    out = pyramid_noise(white, 6, 0.8, torch.Generator().manual_seed(1))
    assert out.std(dim=(1, 2, 3)).sub(1).abs().max() < 1e-4

    def neighbour_corr(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1]

    assert neighbour_corr(out) > neighbour_corr(white) + 0.2


def ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def test_min_snr_weights_follow_the_formula():
    from diffusers.training_utils import compute_snr

    from trainer.families.objectives import DiffusionObjective

    sched = ddpm()
    obj = DiffusionObjective(sched, "epsilon", TrainingConfig(min_snr_gamma=5.0))
    latents, noise = torch.randn(64, 4, 4, 4), torch.randn(64, 4, 4, 4)
    nb = obj.noise(latents, noise, torch.Generator().manual_seed(0))
    snr = compute_snr(sched, nb.timesteps)
    assert torch.allclose(nb.weights, torch.clamp(snr, max=5.0) / snr)
    assert nb.weights.max() <= 1.0 + 1e-6 and nb.weights.min() < 0.5  # low-noise steps are down-weighted
    v = DiffusionObjective(sched, "v_prediction", TrainingConfig(min_snr_gamma=5.0)).noise(
        latents, noise, torch.Generator().manual_seed(0))
    assert torch.allclose(v.weights, torch.clamp(snr, max=5.0) / (snr + 1))
    assert torch.allclose(v.target, sched.get_velocity(latents, noise, v.timesteps))
    off = DiffusionObjective(sched, "epsilon", TrainingConfig()).noise(latents, noise, torch.Generator().manual_seed(0))
    assert off.weights is None and torch.equal(off.target, noise)


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "sigmoid", "mode"])
def test_flow_sigma_sampling_statistics(sampling):
    from trainer.families.objectives import FlowMatchingObjective

    obj = FlowMatchingObjective(flow_scheduler(), TrainingConfig(timestep_sampling=sampling, logit_mean=0.0, logit_std=1.0))
    s = obj.sample_sigmas(20000, torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() <= 1
    if sampling == "uniform":
        assert abs(s.mean().item() - 0.5) < 0.01 and abs(s.var().item() - 1 / 12) < 0.003
    elif sampling in ("logit_normal", "sigmoid"):
        logits = torch.logit(s.double())
        assert abs(logits.mean().item()) < 0.03 and abs(logits.std().item() - 1.0) < 0.03
    else:  # mode sampling concentrates mass around the middle relative to uniform
        assert ((s > 0.25) & (s < 0.75)).float().mean() > 0.5


def test_flow_shift_moves_sigmas_up():
    from trainer.families.objectives import FlowMatchingObjective

    base = FlowMatchingObjective(flow_scheduler(), TrainingConfig()).sample_sigmas(5000, torch.Generator().manual_seed(0))
    shifted = FlowMatchingObjective(flow_scheduler(), TrainingConfig(flow_shift=3.0)).sample_sigmas(
        5000, torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, (3 * base / (1 + 2 * base)).clamp(1e-5, 1))
    assert shifted.mean() > base.mean() + 0.1


def test_flow_noising_and_target():
    from trainer.families.objectives import FlowMatchingObjective

    obj = FlowMatchingObjective(flow_scheduler(), TrainingConfig(loss_weighting="cosmap"))
    x, n = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    nb = obj.noise(x, n, torch.Generator().manual_seed(0))
    sig = (nb.timesteps / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(nb.noisy, (1 - sig) * x + sig * n, atol=1e-6)
    assert torch.equal(nb.target, n - x)
    assert nb.weights is not None and nb.weights.shape == (3,)


def test_flow_shift_auto_asks_the_family_per_batch():
    from trainer.families.objectives import make_objective

    seen = []

    def family_shift(latents):
        seen.append(tuple(latents.shape))
        return 3.0

    x, n = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    auto = make_objective("flow", flow_scheduler(), TrainingConfig(), shift_fn=family_shift)
    fixed = make_objective("flow", flow_scheduler(), TrainingConfig(flow_shift=3.0))
    a = auto.noise(x, n, torch.Generator().manual_seed(0))
    b = fixed.noise(x, n, torch.Generator().manual_seed(0))
    assert seen == [(2, 16, 8, 8)] and torch.allclose(a.timesteps, b.timesteps)
    manual = make_objective("flow", flow_scheduler(), TrainingConfig(flow_shift=2.0), shift_fn=family_shift)
    manual.noise(x, n, torch.Generator().manual_seed(0))
    assert len(seen) == 1  # an explicit flow_shift wins over the family's
