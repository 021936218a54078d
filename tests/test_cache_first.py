"""Cache, then free (issue 16): with the caches on a GPU, the denoiser waits in host memory while the encoders fill
the caches, and goes onto the device only once they are offloaded (kohya's order), so the caching phase never holds
the denoiser and every encoder on the device. This machine has no GPU: the test says the training device is not
host memory (``run_setup.is_host``) and records, in order, the denoiser's moves, the encoders' forwards and the
denoiser's forwards (the training steps)."""
from __future__ import annotations

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
    monkeypatch.setattr(run_setup, "is_host", lambda device: False)  # as on a GPU
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
    monkeypatch.setattr(run_setup, "is_host", lambda device: False)  # as on a GPU
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path / "b", training={**CACHES, "ema": True})
    first = train(cfg, StopAt(1))
    resumed = train(cfg, resume_from=first.state_dir)
    assert first.losses == whole.losses[:1] and resumed.losses == whole.losses
