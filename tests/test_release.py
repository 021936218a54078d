"""A run gives back every model it loaded by the time ``train()`` returns: no reference cycle is left for Python's
cycle collector to find later (ComfyUI runs the next nodes in the same process, right away)."""
from __future__ import annotations

import gc
import weakref

import pytest

from trainer.config import TrainConfig
from trainer.loop import train
from trainer.release import forget_frames


@pytest.mark.slow
def test_models_die_with_the_run_even_without_the_cycle_collector(tiny_sd15, demo_dataset, tmp_path, monkeypatch):
    from trainer.families import get_family

    refs = []
    cls = type(get_family("sd15"))
    real = cls.load

    def load(family, *args, **kwargs):
        comps = real(family, *args, **kwargs)
        refs.extend(weakref.ref(m) for m in (comps.denoiser, comps.vae, *comps.text_encoders))
        return comps

    monkeypatch.setattr(cls, "load", load)
    cfg = TrainConfig.from_dict({
        "model": {"family": "sd15", "path": str(tiny_sd15)},
        "datasets": [{"path": str(demo_dataset), "resolution": 64, "repeats": 1}],
        "network": {"network_dim": 4, "network_alpha": 4},
        # bf16: accelerate wraps forward in a cycle; the text cache and EMA add the trainer's own cycles
        "training": {"batch_size": 4, "max_train_steps": 2, "seed": 1, "mixed_precision": "bf16",
                     "cache_text_embeddings": True, "cache_latents": True, "ema": True},
        "save": {"output_dir": str(tmp_path / "loras"), "work_dir": str(tmp_path / "work"), "run_name": "r",
                 "save_every_n_steps": 2}})
    monkeypatch.setattr(gc, "collect", lambda *args: 0)  # nothing may rely on the collector
    gc.disable()
    try:
        result = train(cfg)
        alive = [ref() is not None for ref in refs]
    finally:
        gc.enable()
    assert [c.step for c in result.checkpoints] == [2]
    assert len(alive) == 3 and not any(alive), f"still referenced after train() returned: {alive}"


def test_forget_frames_clears_the_locals_a_traceback_keeps():
    refs = []

    class Big:
        def __init__(self):
            refs.append(weakref.ref(self))

    def inner():
        big = Big()  # noqa: F841 - held by this frame only
        raise ValueError("boom")

    def outer():
        try:
            inner()
        except ValueError as exc:
            raise RuntimeError("wrapped") from exc

    with pytest.raises(RuntimeError) as info:
        outer()
    assert refs[0]() is not None  # the traceback keeps inner()'s frame, and with it `big`
    forget_frames(info.value)
    assert refs[0]() is None
    assert "inner" in "".join(__import__("traceback").format_exception(info.value.__cause__))
