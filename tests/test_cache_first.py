"""Cache, then free (issue 16): the caches fill before the denoiser is set up. From model files the denoiser is not
even read until the caches are filled and the encoders released (SimpleTuner's order: host memory never holds it
beside T5-XXL); a model handed to the run (ComfyUI's MODEL) goes onto the device only once the encoders are
offloaded (kohya's order), so the caching phase never holds the denoiser and every encoder on the device, on a GPU
as on this CPU-only machine (one order for every device). The tests record, in order, the denoiser's moves or reads,
the encoders' forwards and the denoiser's forwards (the training steps)."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from run_helpers import ONE_EPOCH_EXACT, short_run_config
from trainer import run_setup
from trainer.families import get_family
from trainer.loop import train

make_config = partial(short_run_config, defaults=ONE_EPOCH_EXACT)
CACHES = {"cache_latents": True, "cache_text_embeddings": True}


def _moves_of(denoiser: torch.nn.Module, events: list[str]) -> None:
    real_to = denoiser.to

    def to(*args, **kwargs):
        if kwargs.get("device") is not None or any(isinstance(a, (str, torch.device)) for a in args):
            events.append("denoiser to device")
        return real_to(*args, **kwargs)

    denoiser.to = to


def _recorded_run(cfg, monkeypatch) -> list[str]:
    events: list[str] = []
    comps = get_family(cfg.model.family).load(cfg.model, device="cpu")
    _moves_of(comps.denoiser, events)
    real_place = run_setup.place_resident
    monkeypatch.setattr(run_setup, "place_resident", lambda module, device, skip: events.append(
        "denoiser to device") or real_place(module, device, skip))
    comps.vae.encoder.register_forward_pre_hook(lambda *_: events.append("encode") and None)
    for encoder in comps.text_encoders:
        encoder.register_forward_pre_hook(lambda *_: events.append("encode") and None)
    comps.denoiser.register_forward_pre_hook(lambda *_: events.append("step") and None)
    train(cfg, components=comps)
    return events


@pytest.mark.parametrize("swap", [0, 2], ids=["resident", "block_swap"])
def test_with_caches_the_denoiser_reaches_the_device_after_caching_and_before_step_1(tiny_sd15, demo_dataset,
                                                                                    tmp_path, monkeypatch, swap):
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={**CACHES, "blocks_to_swap": swap})
    events = _recorded_run(cfg, monkeypatch)
    first_step = events.index("step")
    before = events[:first_step]
    assert before.count("denoiser to device") == 1, events[:first_step + 1]  # once: never by accelerate's prepare
    placed = before.index("denoiser to device")
    assert "encode" in before[:placed]  # the caches filled ...
    assert "encode" not in events[placed:]  # ... all of them before the denoiser went on; nothing encodes after


def test_without_caches_the_denoiser_goes_on_at_setup_as_before(tiny_sd15, demo_dataset, tmp_path, monkeypatch):
    events = _recorded_run(make_config(tiny_sd15, demo_dataset, tmp_path), monkeypatch)
    assert events[0] == "denoiser to device"  # at set-up, before anything runs
    assert "encode" in events[events.index("step") - 1:]  # the encoders run in the steps


def test_a_resumed_run_with_the_denoiser_placed_after_caching_continues_exactly(tiny_sd15, demo_dataset, tmp_path,
                                                                              monkeypatch):
    """The resumed optimizer state and the EMA copy follow the denoiser onto the device after caching."""
    from run_helpers import StopAt

    whole = train(make_config(tiny_sd15, demo_dataset, tmp_path / "a", training={**CACHES, "ema": True}))
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path / "b", training={**CACHES, "ema": True})
    first = train(cfg, StopAt(1))
    resumed = train(cfg, resume_from=first.state_dir)
    assert first.losses == whole.losses[:1] and resumed.losses == whole.losses


@pytest.mark.parametrize("name", ["sd15", "sd3"])
def test_from_model_files_the_denoiser_is_read_only_after_the_caches_fill_and_the_encoders_leave_memory(
        tiny_model_configs, demo_dataset, tmp_path, monkeypatch, name):
    """SimpleTuner's order: the model is loaded with its denoiser as shapes only (nothing of it read), the caches
    fill, the encoders are released, and only then is the denoiser read, so host memory never holds it beside
    T5-XXL. Recorded on the family's own loaders in a real run from ComfyUI's files."""
    from dataclasses import asdict

    from trainer.encoder_residency import ReleasedEncoder

    family = type(get_family(name))
    events: list[str] = []
    loaded = {}
    load, load_denoiser = family.load, family.load_denoiser

    def recording_load(self, *args, **kwargs):
        comps = load(self, *args, **kwargs)
        events.append("load: denoiser " + ("shapes only" if all(p.is_meta for p in comps.denoiser.parameters())
                                           else "read"))
        for module in [comps.vae.encoder, *comps.text_encoders]:
            module.register_forward_pre_hook(lambda *_: events.append("encode") and None)
        loaded["comps"] = comps
        return comps

    def recording_load_denoiser(self, cfg, comps, *args, **kwargs):
        released = [isinstance(m, ReleasedEncoder) for m in [comps.vae, *comps.text_encoders]]
        events.append("read denoiser" + (" after the encoders were released" if all(released) else ""))
        denoiser = load_denoiser(self, cfg, comps, *args, **kwargs)
        denoiser.register_forward_pre_hook(lambda *_: events.append("step") and None)
        return denoiser

    monkeypatch.setattr(family, "load", recording_load)
    monkeypatch.setattr(family, "load_denoiser", recording_load_denoiser)
    model = tiny_model_configs(name)[1]
    cfg = make_config(model.path, demo_dataset, tmp_path, model=asdict(model),
                      training={**CACHES, "mixed_precision": "no", "max_train_steps": 2})
    result = train(cfg)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    read = events.index("read denoiser after the encoders were released")
    assert events[0] == "load: denoiser shapes only"
    assert "encode" in events[:read] and "encode" not in events[read:]  # every cache filled before the read ...
    assert events[read + 1:] == ["step"] * len(events[read + 1:]) and "step" not in events[:read]  # ... then steps


def test_a_denoiser_file_that_breaks_after_caching_is_named(tiny_sd15, demo_dataset, tmp_path):
    """The denoiser's tensors are read after the caches fill: a file damaged between the load's checks and that read
    still gets an error naming it (and the run saves nothing)."""
    from trainer.errors import CrucibleError
    from trainer.tiny import single_file_path

    path = tmp_path / "model.safetensors"
    path.write_bytes(single_file_path(tiny_sd15).read_bytes())
    cfg = make_config(path, demo_dataset, tmp_path, training=CACHES)
    real_fill = run_setup.RunSetup._pre_encode

    def fill_then_damage(self):
        real_fill(self)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # truncated, as an interrupted copy leaves it

    with pytest.MonkeyPatch.context() as m:
        m.setattr(run_setup.RunSetup, "_pre_encode", fill_then_damage)
        with pytest.raises(CrucibleError, match=str(path.name)):
            train(cfg)
    assert not list((tmp_path / "loras").glob("**/*.safetensors"))
