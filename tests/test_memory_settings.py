"""Memory-related defaults and numerics (issue 16): ``auto`` precision, per-family gradient checkpointing, fp16
overflow skipping, the SDXL VAE in fp32 and a latent-cache key that includes the VAE dtype. CPU only."""
from __future__ import annotations

import json

import pytest
import torch

from trainer.config import TrainConfig, TrainingConfig
from trainer.defaults import Device, resolve_gradient_checkpointing, resolve_mixed_precision, resolved_settings
from trainer.families import get_family
from trainer.numerics import MAX_CONSECUTIVE_SKIPS, overflow_decision


# --- sensible defaults ---------------------------------------------------------------------------------------------
def test_auto_precision_is_the_default_and_picks_bf16_or_fp16_by_device():
    assert TrainingConfig().mixed_precision == "auto"
    assert resolve_mixed_precision("auto", Device(cuda=True, bf16=True)) == "bf16"  # Ampere and newer
    assert resolve_mixed_precision("auto", Device(cuda=True, bf16=False)) == "fp16"  # Turing/Volta: + scaler
    assert resolve_mixed_precision("auto", Device(cuda=False, bf16=True)) == "bf16"  # the CPU
    for explicit in ("no", "fp16", "bf16"):  # an explicit choice is never second-guessed
        assert resolve_mixed_precision(explicit, Device(cuda=False, bf16=True)) == explicit


def test_gradient_checkpointing_defaults_on_for_the_large_families_and_sd15_above_512_px():
    assert TrainingConfig().gradient_checkpointing is None
    above = {name: get_family(name).gradient_checkpointing_above_px for name in ("sd15", "sdxl", "sd3", "flux")}
    assert above == {"sd15": 512, "sdxl": 0, "sd3": 0, "flux": 0}
    assert resolve_gradient_checkpointing(None, "sdxl", 512) and not resolve_gradient_checkpointing(None, "sd15", 512)
    assert resolve_gradient_checkpointing(None, "sd15", 1024)  # 3.2 GiB of activations at 1024 px: over 4 GiB
    assert resolve_gradient_checkpointing(True, "sd15", 512) and not resolve_gradient_checkpointing(False, "flux")
    cfg = TrainConfig.from_dict({"training": {"gradient_checkpointing": "auto", "mixed_precision": "auto"}})
    assert cfg.training.gradient_checkpointing is None
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # round-trips through run metadata / config.json
    def checkpointed(*datasets):
        cfg = TrainConfig.from_dict({"model": {"family": "sd15"}, "datasets": [{"path": "x", **d} for d in datasets]})
        return resolved_settings(cfg)["gradient_checkpointing"]

    # buckets keep their area within resolution² however long a side gets: the area decides, not max_bucket_reso
    assert not checkpointed({"resolution": 512, "enable_bucket": True, "max_bucket_reso": 1024})
    assert checkpointed({"resolution": 512}, {"resolution": 768})  # the largest dataset decides


def test_caches_default_on_for_the_t5_families_where_the_run_allows_them():
    """SD3 and Flux never train their T5-XXL in a LoRA: "auto" caches latents and text and frees the encoders; off
    where a cache cannot work (random augmentation, a training text encoder) instead of refusing the run; an explicit
    choice always wins."""
    assert TrainingConfig().cache_latents is None and TrainingConfig().cache_text_embeddings is None
    assert {n: get_family(n).caches_by_default for n in ("sd15", "sdxl", "sd3", "flux")} == \
        {"sd15": False, "sdxl": False, "sd3": True, "flux": True}

    def resolved(family, dataset=None, network=None, **training):
        cfg = TrainConfig.from_dict({"model": {"family": family}, "training": training, "network": network or {},
                                     "datasets": [{"path": "x", **(dataset or {})}]})
        r = resolved_settings(cfg)
        return r["cache_latents"], r["cache_text_embeddings"]

    assert resolved("flux") == (True, True) and resolved("sd3") == (True, True)
    assert resolved("sdxl") == (False, False) and resolved("sd15") == (False, False)
    assert resolved("flux", {"flip_aug": True}) == (False, True)  # flipped pixels change every epoch
    assert resolved("flux", {"crop_style": "random"}) == (False, True)
    assert resolved("sd3", network={"train_text_encoder": True}) == (True, False)
    assert resolved("flux", cache_latents=False, cache_text_embeddings=False) == (False, False)
    assert resolved("sdxl", cache_latents=True, cache_text_embeddings=True) == (True, True)
    cfg = TrainConfig.from_dict({"training": {"cache_latents": "auto", "cache_text_embeddings": "auto"}})
    assert cfg.training.cache_latents is None and TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_an_explicit_latent_cache_with_augmentation_is_still_refused(make_config, tiny_sd15, demo_dataset, tmp_path):
    from trainer.errors import ConfigError
    from trainer.loop import train

    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"max_train_steps": 1, "cache_latents": True})
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "datasets": [{**cfg.to_dict()["datasets"][0], "flip_aug": True}]})
    with pytest.raises(ConfigError, match="cache_latents cannot be combined with flip_aug"):
        train(cfg)


def test_run_json_records_what_auto_resolved_to(make_config, tiny_sd15, demo_dataset, tmp_path):
    from trainer.loop import train

    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"max_train_steps": 1, "batch_size": 2})
    assert cfg.training.mixed_precision == "auto"
    result = train(cfg)
    resolved = json.loads((result.work_dir / "run.json").read_text())["resolved"]
    assert resolved == {"mixed_precision": "bf16", "mixed_precision_requested": "auto",
                        "gradient_checkpointing": False, "cache_latents": False, "cache_text_embeddings": False}


# --- numerics ------------------------------------------------------------------------------------------------------
def test_fp16_overflow_steps_are_skipped_not_fatal():
    first = overflow_decision(float("inf"), scaler_active=True, consecutive_skips=0, step=1)
    assert first.action == "skip" and first.consecutive_skips == 1 and "scaler skipped" in first.message
    again = overflow_decision(float("nan"), True, first.consecutive_skips, 2)
    assert again.action == "skip" and again.consecutive_skips == 2
    good = overflow_decision(0.7, True, again.consecutive_skips, 3)
    assert good.action == "step" and good.consecutive_skips == 0  # a good step resets the count


def test_many_consecutive_overflows_stop_with_a_clear_message():
    skips, decision = 0, None
    for step in range(1, MAX_CONSECUTIVE_SKIPS + 1):
        decision = overflow_decision(float("inf"), True, skips, step)
        skips = decision.consecutive_skips
        if step < MAX_CONSECUTIVE_SKIPS:
            assert decision.action == "skip"
    assert decision.action == "stop"
    assert f"{MAX_CONSECUTIVE_SKIPS} consecutive steps" in decision.message and "bf16" in decision.message


def test_without_a_scaler_an_infinite_gradient_still_stops_at_once():
    decision = overflow_decision(float("inf"), scaler_active=False, consecutive_skips=0, step=7)
    assert decision.action == "stop" and "at step 7" in decision.message
    assert overflow_decision(None, False, 0, 1).action == "step"  # nothing measured: nothing to decide


def test_sdxl_vae_runs_in_fp32_and_the_latent_cache_key_names_its_dtype(make_config, demo_dataset, tmp_path_factory,
                                                                        tmp_path):
    from trainer.callbacks import Callbacks
    from trainer.loop import Trainer
    from trainer.release import release_run
    from trainer.tiny import build_tiny_pipeline

    assert get_family("sdxl").vae_fp32 and not get_family("sd15").vae_fp32
    model = build_tiny_pipeline(tmp_path_factory.mktemp("xl") / "sdxl", family="sdxl", seed=1)
    cfg = make_config(model, demo_dataset, tmp_path, model={"family": "sdxl"}, network={"train_text_encoder": False},
                      training={"mixed_precision": "bf16", "cache_latents": True, "max_train_steps": 1})
    trainer = Trainer(cfg, Callbacks())
    try:
        trainer._setup(None)
        assert next(trainer.comps.vae.parameters()).dtype == torch.float32
        assert next(trainer.comps.denoiser.parameters()).dtype == torch.bfloat16
        assert trainer.latent_cache.model_id.endswith("|vae=torch.float32")
    finally:
        release_run(trainer)


def test_nan_latents_are_refused_and_never_cached(demo_dataset):
    from trainer.cache import LatentCache
    from trainer.config import DatasetConfig
    from trainer.dataset import DataSource
    from trainer.errors import ConfigError

    source = DataSource((DatasetConfig(path=str(demo_dataset), resolution=64),), seed=1)
    cache = LatentCache(source, "model|vae=torch.float16")
    with pytest.raises(ConfigError, match="NaN/inf latents"):
        cache.latents([(0, 0)], 1, lambda pixels: torch.full((pixels.shape[0], 4, 8, 8), float("nan")))
    assert cache.memory == {}


# --- cache, then free ----------------------------------------------------------------------------------------------
def _cached_config(make_config, tiny_sd15, demo_dataset, tmp_path, **training):
    return make_config(tiny_sd15, demo_dataset, tmp_path, training={
        "mixed_precision": "no", "cache_latents": True, "cache_text_embeddings": True, "batch_size": 2,
        "max_train_steps": 4, **training}, save={"save_every_n_epochs": 0, "save_every_n_steps": 2})


def test_caches_fill_before_step_1_then_the_encoders_leave_the_device(make_config, tiny_sd15, demo_dataset, tmp_path,
                                                                      monkeypatch):
    import trainer.loop as loop
    import trainer.run_setup as run_setup
    from trainer.callbacks import Callbacks

    events: list = []
    real_offload, real_step = run_setup.offload_module, loop.Trainer._optimizer_step

    def spy_offload(module):
        events.append(("offload", type(module).__name__))
        real_offload(module)

    def spy_step(self, group, step, epoch):
        if step == 1:  # what step 1 finds: every image cached, the encoders off the training device
            events.append(("step1", len(self.latent_cache.memory), len(self.text_cache.entries)))
            released = [m for m in (self.comps.vae, *self.comps.text_encoders) if type(m).__name__ == "ReleasedEncoder"]
            assert len(released) == 2  # off the device, and out of memory too (tests/test_encoder_residency.py)
        return real_step(self, group, step, epoch)

    class Progress(Callbacks):
        def on_prepare(self, done, total, what):
            events.append(("prepare", what, done, total))

    monkeypatch.setattr(run_setup, "offload_module", spy_offload)
    monkeypatch.setattr(loop.Trainer, "_optimizer_step", spy_step)
    loop.train(_cached_config(make_config, tiny_sd15, demo_dataset, tmp_path), Progress())
    kinds = [e[0] for e in events]
    offloaded = [e[1] for e in events if e[0] == "offload"]
    assert offloaded[:2] == ["AutoencoderKL", "CLIPTextModel"] and kinds.index("step1") > kinds.index("offload")
    images = [e for e in events if e[:2] == ("prepare", "caching latents")]
    assert images and images[-1][2] == images[-1][3]  # progress reported up to the last image
    step1 = next(e for e in events if e[0] == "step1")
    assert step1[1] == step1[2] == images[-1][3]


def test_pre_encoded_losses_equal_lazy_caching_and_resume_stays_exact(make_config, tiny_sd15, demo_dataset, tmp_path,
                                                                      monkeypatch):
    import trainer.loop as loop
    from run_helpers import StopAt

    eager = loop.train(_cached_config(make_config, tiny_sd15, demo_dataset, tmp_path / "eager")).losses
    with monkeypatch.context() as m:  # the old behaviour: caches filled as epoch 1 reaches each image
        m.setattr(loop.Trainer, "_pre_encode", lambda self: None)
        lazy = loop.train(_cached_config(make_config, tiny_sd15, demo_dataset, tmp_path / "lazy")).losses
    assert eager == lazy and len(eager) == 4
    cfg = _cached_config(make_config, tiny_sd15, demo_dataset, tmp_path / "resumed")
    first = loop.train(cfg, StopAt(2))
    assert first.cancelled
    resumed = loop.train(cfg, resume_from=first.state_dir)
    assert resumed.losses == eager
