"""Previews without reloading the text encoders (issue 16, trainer.sample_prompts): with the text caches on, a run
encodes its preview prompts (and negative prompt) once, before the text encoders leave memory, and every preview
renders from those embeddings with the VAE alone — as kohya's ``--cache_text_encoder_outputs`` with
``--sample_prompts``. The images equal the ones rendered with the text encoders present, pixel for pixel."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.encoder_residency import ReleasedEncoder
from trainer.families import get_family

FAMILIES = ["sd15", "sdxl", "sd3", "flux"]
PROMPTS = ["a red circle", "a blue square on a long, long wooden table " * 4]  # the second: two CLIP windows


def _released(comps):
    """``comps`` with every text encoder replaced by what a run leaves after releasing it."""
    return dataclasses.replace(comps, text_encoders=[ReleasedEncoder(n, getattr(m, "config", None), m.dtype)
                                                     for n, m in zip(comps.text_encoder_names, comps.text_encoders)])


def _render(family, comps, conditioning=None, **over):
    kw = dict(seed=3, steps=2, cfg=2.5, width=64, height=64, negative_prompt="blurry", guidance=3.5, **over)
    if conditioning is not None:
        kw["conditioning"] = conditioning
    return [im.tobytes() for im in family.sample(comps, PROMPTS, **kw)]


@pytest.mark.parametrize("name", FAMILIES)
def test_pre_encoded_prompts_render_the_images_the_text_encoders_render(tiny_components, name):
    family = get_family(name)
    comps = tiny_components(name, 1)
    with torch.no_grad():
        conditioning = [family.sample_conditioning(comps, p, "blurry", 2.5) for p in PROMPTS]
    assert all(isinstance(v, torch.Tensor) for c in conditioning for v in c.values())
    live = _render(family, comps)
    assert _render(family, _released(comps), conditioning) == live  # no text encoder touched
    assert live[0] != live[1] and len(set(live[0])) > 1  # the prompts matter: the check can fail


def test_a_pipeline_that_would_encode_a_prompt_names_the_released_encoder(tiny_components):
    """Without the embeddings the released text encoder is asked to encode, and says it was released."""
    family = get_family("sd15")
    with pytest.raises(AttributeError, match="the text_encoder was released from memory"):
        family.sample(_released(tiny_components("sd15", 0)), PROMPTS[:1], seed=1, steps=1, cfg=1.0, width=64,
                      height=64)


# --- in a run -------------------------------------------------------------------------------------------------------

def _run_sections(name, tiny):
    """Each family's model as the release tests load it: SD1.5 from its folder, SDXL from its single file, SD3 and
    Flux from ComfyUI split files (Flux under bf16 with fp8_base, so T5 comes back quantized on the old path)."""
    from trainer.tiny import single_file_path

    if name == "sd15":
        return tiny, {}
    if name == "sdxl":
        return single_file_path(tiny), {"model": {"family": "sdxl"}}
    model = {"family": name, "text_encoder_paths": [str(p) for p in tiny.text_encoder_files],
             "vae_path": str(tiny.vae_file)}
    if name == "sd3":
        return tiny.transformer_file, {"model": model}
    return tiny.transformer_file, {"model": {**model, "fp8_base": True},
                                   "training": {"mixed_precision": "bf16", "guidance_scale": 3.5}}


def _preview_run(name, tiny, demo_dataset, out, monkeypatch, callbacks=None, sample=None, resume_from=None):
    """A one-epoch run with the caches on and previews after step 2 and at the end (step 3). ``callbacks(cfg,
    steps)``: the run's callbacks, given its config and the recorder of what is alive at each step."""
    from test_encoder_residency import CACHES, PREVIEW, AliveAtSteps, Watch

    from run_helpers import ONE_EPOCH_EXACT, short_run_config
    from trainer.loop import train

    path, sections = _run_sections(name, tiny)
    sections["training"] = {**CACHES, **sections.get("training", {})}
    watch = Watch(monkeypatch, name)
    steps = AliveAtSteps(watch)
    cfg = short_run_config(path, demo_dataset, out, ONE_EPOCH_EXACT,
                           sample={**PREVIEW, "negative_prompt": "blurry", **(sample or {})}, **sections)
    result = train(cfg, callbacks(cfg, steps) if callbacks else steps, resume_from=resume_from)
    return result, watch, steps


def _pixels(result) -> list[bytes]:
    from PIL import Image

    return [Image.open(p).tobytes() for s in result.samples for p in s.paths]


@pytest.mark.parametrize("name", FAMILIES)
def test_previews_equal_the_reload_path_and_the_text_encoders_are_never_loaded_again(
        name, request, demo_dataset, tmp_path, monkeypatch):
    """The old path (no pre-encoded prompts: the text encoders are read back from the files for each preview and
    encode the prompts there) against the pre-encoded one: the same images and losses; the text encoders load once,
    at the start, and are gone from step 1 on; only the VAE stays in host memory for the previews."""
    import trainer.sample_prompts

    tiny = request.getfixturevalue(f"tiny_{name}")
    with monkeypatch.context() as m:
        m.setattr(trainer.sample_prompts, "encode_preview_prompts", lambda trainer: None)
        old, old_watch, _ = _preview_run(name, tiny, demo_dataset, tmp_path / "old", m)
    new, watch, steps = _preview_run(name, tiny, demo_dataset, tmp_path / "new", monkeypatch)
    assert old_watch.reloads == 2  # the old path read the encoders back for each of its two previews
    assert [s.step for s in new.samples] == [2, 3]
    assert _pixels(new) == _pixels(old) and len(set(_pixels(new)[0])) > 1
    assert new.losses == old.losses
    assert watch.reloads == 0  # load_encoders never called: no text encoder read again
    first = get_family(name).encoders[0].component
    assert [n for n, _ in watch.loaded].count(first) == 1  # loaded once, by load()
    assert steps.alive == {1: ["vae"], 2: ["vae"], 3: ["vae"]} and watch.alive() == []


class Relay:
    """Callbacks that pass every call on to ``inner`` (the alive-at-steps recorder), adding their own on_step."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_prompts_edited_mid_run_are_encoded_again_with_one_reload(tiny_sd15, demo_dataset, tmp_path, monkeypatch,
                                                                   caplog):
    """A caller that replaces the preview prompts while the run trains (nothing does today: the config is frozen,
    and this test reaches past that) gets previews of the new prompts: encoded again once, the text encoders read
    back for that and released again."""
    import logging

    edited = ("a green triangle",)

    class EditAfterStep1(Relay):
        def __init__(self, cfg, inner):
            super().__init__(inner)
            self.cfg = cfg

        def on_step(self, info):
            if info.step == 1:
                object.__setattr__(self.cfg, "sample", dataclasses.replace(self.cfg.sample, prompts=edited))
            self.inner.on_step(info)

    wanted, _, _ = _preview_run("sd15", tiny_sd15, demo_dataset, tmp_path / "b", monkeypatch,
                                sample={"prompts": list(edited)})
    with caplog.at_level(logging.INFO, logger="crucible"):
        result, watch, steps = _preview_run("sd15", tiny_sd15, demo_dataset, tmp_path / "a", monkeypatch,
                                            callbacks=EditAfterStep1)
    assert [s.prompts for s in result.samples] == [edited, edited]
    assert _pixels(result) == _pixels(wanted)
    assert watch.reloads == 1  # once, for the edited list; the end-of-run preview reused it
    assert steps.alive[3] == ["vae"]  # the text encoder was released again after the re-encode
    assert sum("preview prompts changed" in r.getMessage() for r in caplog.records) == 1


def test_prompts_edited_on_resume_are_encoded_by_the_resumed_run(tiny_sd15, demo_dataset, tmp_path, monkeypatch):
    class StopAfterStep2(Relay):
        seen = 0

        def on_step(self, info):
            self.seen = info.step
            self.inner.on_step(info)

        def should_stop(self):
            return self.seen >= 2

    edited = {"prompts": ["a green triangle"], "negative_prompt": "dark"}
    whole, _, _ = _preview_run("sd15", tiny_sd15, demo_dataset, tmp_path / "whole", monkeypatch, sample=edited)
    first, _, _ = _preview_run("sd15", tiny_sd15, demo_dataset, tmp_path / "part", monkeypatch,
                               callbacks=lambda cfg, steps: StopAfterStep2(steps))
    assert first.cancelled and [s.step for s in first.samples] == [2]
    resumed, watch, steps = _preview_run("sd15", tiny_sd15, demo_dataset, tmp_path / "part", monkeypatch,
                                         sample=edited, resume_from=first.state_dir)
    assert [s.step for s in resumed.samples][-1] == 3 and watch.reloads == 0 and steps.alive[3] == ["vae"]
    assert _pixels(resumed)[-1] == _pixels(whole)[-1]  # the edited prompts, not the ones encoded before the stop
    assert _pixels(resumed)[-1] != _pixels(first)[0]


def test_the_long_preview_prompt_needs_two_clip_windows(tiny_components):
    from trainer.families.clip_text import windows_needed

    assert windows_needed(tiny_components("sd15", 1).tokenizers[0], PROMPTS) == 2
