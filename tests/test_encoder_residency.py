"""Cache, then free — out of host memory (issue 16, trainer.encoder_residency): once the latent / text caches are
filled, the encoders they replace are dropped from memory (not only moved off the device), read again from the
model files only for preview samples (and a full fine-tune's single-file export), and released again after. Reloaded
encoders are the same tensors, so previews, validation, exports and resumed runs are unchanged."""
from __future__ import annotations

import gc
import logging
import weakref
from functools import partial

import pytest
import torch

from run_helpers import ONE_EPOCH_EXACT, StopAt, short_run_config
from trainer.callbacks import Callbacks
from trainer.encoder_residency import ReleasedEncoder
from trainer.families import get_family
from trainer.families.base import ModelFamily
from trainer.loop import train

make_config = partial(short_run_config, defaults=ONE_EPOCH_EXACT)
CACHES = {"cache_latents": True, "cache_text_embeddings": True}
PREVIEW = {"prompts": ["a red circle"], "steps": 2, "cfg": 2.0, "seed": 7, "sample_every_n_steps": 2,
           "sample_every_n_epochs": 1}  # after step 2, and at the end of the run (epoch 1 = step 3)


class Watch:
    """Weak references to every encoder module the run's family loads (``load`` and ``load_encoders``), so a test
    can ask which of them are still alive; nothing here keeps one alive."""

    def __init__(self, monkeypatch, family_name: str = "sd15"):
        self.loaded: list[tuple[str, weakref.ref]] = []  # (what, ref) in load order
        self.reloads = 0
        cls = type(get_family(family_name))
        real_load, real_encoders = cls.load, cls.load_encoders

        def load(family, cfg, *args, **kwargs):
            comps = real_load(family, cfg, *args, **kwargs)
            self._track("vae", comps.vae)
            for name, module in zip(comps.text_encoder_names, comps.text_encoders):
                self._track(name, module)
            return comps

        def load_encoders(family, cfg, comps, dtype=None):
            self.reloads += 1
            modules = real_encoders(family, cfg, comps, dtype)
            for name, module in modules.items():
                self._track(name, module)
            return modules

        monkeypatch.setattr(cls, "load", load)
        monkeypatch.setattr(cls, "load_encoders", load_encoders)

    def _track(self, name: str, module) -> None:
        self.loaded.append((name, weakref.ref(module)))

    def alive(self) -> list[str]:
        gc.collect()
        return [name for name, ref in self.loaded if ref() is not None]


class AliveAtSteps(Callbacks):
    """Records which encoders are alive at each optimizer step (after any preview of the step before)."""

    def __init__(self, watch: Watch):
        self.watch, self.alive = watch, {}

    def on_step(self, info):
        self.alive[info.step] = self.watch.alive()


def test_after_caching_every_cached_encoder_is_gone_from_memory(tiny_sd15, demo_dataset, tmp_path, monkeypatch,
                                                                 caplog):
    watch = Watch(monkeypatch)
    steps = AliveAtSteps(watch)
    with caplog.at_level(logging.INFO, logger="crucible"):
        train(make_config(tiny_sd15, demo_dataset, tmp_path, training=CACHES), steps)
    assert {name for name, _ in watch.loaded} == {"vae", "text_encoder"}
    assert steps.alive == {1: [], 2: [], 3: []}  # from step 1 on, no VAE or text encoder is held by anyone
    assert watch.reloads == 0  # nothing needed them: no preview
    said = [r.getMessage() for r in caplog.records if "released" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("caches filled: released vae, text_encoder from memory (")


def test_only_what_a_cache_replaces_goes(tiny_sd15, demo_dataset, tmp_path, monkeypatch):
    """Latents cached, captions encoded live (no text cache): the text encoder stays; so does everything when a
    text encoder trains (its cache is refused) with only the text cache asked for."""
    watch = Watch(monkeypatch)
    steps = AliveAtSteps(watch)
    train(make_config(tiny_sd15, demo_dataset, tmp_path / "a", training={"cache_latents": True}), steps)
    assert steps.alive[1] == ["text_encoder"]
    watch.loaded.clear()
    train(make_config(tiny_sd15, demo_dataset, tmp_path / "b", training={"cache_text_embeddings": True},
                      network={"train_text_encoder": True}), steps)
    assert sorted(steps.alive[1]) == ["text_encoder", "vae"]


def test_release_encoders_false_keeps_them_in_host_memory(tiny_sd15, demo_dataset, tmp_path, monkeypatch, caplog):
    watch = Watch(monkeypatch)
    steps = AliveAtSteps(watch)
    with caplog.at_level(logging.INFO, logger="crucible"):
        train(make_config(tiny_sd15, demo_dataset, tmp_path, training={**CACHES, "release_encoders": False}), steps)
    assert sorted(steps.alive[1]) == ["text_encoder", "vae"]
    assert any(r.getMessage() == "caches filled: vae, text_encoder moved off the training device"
               for r in caplog.records)


def test_encoders_handed_to_the_run_are_never_released(tiny_sd15, demo_dataset, tmp_path):
    """The caller owns them (ComfyUI's objects on the MODEL path are kept by a family without load_encoders)."""
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training=CACHES)
    comps = get_family("sd15").load(cfg.model)
    train(cfg, components=comps)
    assert not isinstance(comps.vae, ReleasedEncoder) and not isinstance(comps.text_encoders[0], ReleasedEncoder)
    assert next(comps.vae.parameters()).is_floating_point()


def test_a_family_that_cannot_reload_keeps_its_encoders(tiny_sd15, demo_dataset, tmp_path, monkeypatch, caplog):
    """As ComfyUI's MODEL path (nodes/comfy_family.py has no load_encoders): its CLIP and VAE are ComfyUI's objects,
    left to ComfyUI's model management, never dropped by the run."""
    assert ModelFamily.load_encoders(get_family("sd15"), None, None) is None  # the base class: cannot
    assert all(get_family(n).reloads_encoders for n in ("sd15", "sdxl", "sd3", "flux"))
    watch = Watch(monkeypatch)
    monkeypatch.setattr(type(get_family("sd15")), "load_encoders", ModelFamily.load_encoders)
    steps = AliveAtSteps(watch)
    with caplog.at_level(logging.INFO, logger="crucible"):
        train(make_config(tiny_sd15, demo_dataset, tmp_path, training=CACHES, sample=PREVIEW), steps)
    assert sorted(steps.alive[1]) == ["text_encoder", "vae"]
    assert any(r.getMessage().endswith("leaves them to their owner") for r in caplog.records)


# --- previews -------------------------------------------------------------------------------------------------------

def _preview_run(model_path, data, out, release: bool, monkeypatch, family="sd15", **sections):
    watch = Watch(monkeypatch, family)
    steps = AliveAtSteps(watch)
    sections.setdefault("training", {})
    sections["training"] = {**CACHES, "release_encoders": release, **sections["training"]}
    result = train(make_config(model_path, data, out, sample=PREVIEW, **sections), steps)
    return result, watch, steps


def _pixels(result) -> list[bytes]:
    from PIL import Image

    return [Image.open(p).tobytes() for s in result.samples for p in s.paths]


def test_previews_render_the_same_images_with_the_encoders_released(tiny_sd15, demo_dataset, tmp_path, monkeypatch):
    kept, _, _ = _preview_run(tiny_sd15, demo_dataset, tmp_path / "kept", False, monkeypatch)
    freed, watch, steps = _preview_run(tiny_sd15, demo_dataset, tmp_path / "freed", True, monkeypatch)
    assert [s.step for s in freed.samples] == [2, 3]  # a step-2 preview and the end-of-run one
    assert _pixels(freed) == _pixels(kept) and len(set(_pixels(freed)[0])) > 1
    assert freed.losses == kept.losses
    assert watch.reloads == 0  # the prompts were encoded before the release (trainer.sample_prompts) ...
    assert steps.alive[3] == ["vae"] and watch.alive() == []  # ... so only the VAE stays, in host memory


def test_sdxl_previews_with_the_encoders_released_single_file(tiny_sdxl, demo_dataset, tmp_path, monkeypatch):
    """SDXL from its single file: only the VAE and text encoders are read back (its time ids keep working on
    the released VAE's config)."""
    from trainer.tiny import single_file_path

    path = single_file_path(tiny_sdxl)
    kept, _, _ = _preview_run(path, demo_dataset, tmp_path / "kept", False, monkeypatch, "sdxl",
                              model={"family": "sdxl"})
    freed, watch, _ = _preview_run(path, demo_dataset, tmp_path / "freed", True, monkeypatch, "sdxl",
                                   model={"family": "sdxl"})
    assert _pixels(freed) == _pixels(kept) and freed.losses == kept.losses and watch.reloads == 0


def test_flux_fp8_bf16_previews_with_the_encoders_released(tiny_flux, demo_dataset, tmp_path, monkeypatch):
    """Flux from ComfyUI split files under bf16 with fp8_base: T5 comes back quantized as it was."""
    model = {"family": "flux", "fp8_base": True, "text_encoder_paths": [str(p) for p in tiny_flux.text_encoder_files],
             "vae_path": str(tiny_flux.vae_file)}
    training = {"mixed_precision": "bf16", "guidance_scale": 3.5}
    kept, _, _ = _preview_run(tiny_flux.transformer_file, demo_dataset, tmp_path / "kept", False, monkeypatch,
                              "flux", model=model, training=training)
    freed, watch, steps = _preview_run(tiny_flux.transformer_file, demo_dataset, tmp_path / "freed", True,
                                       monkeypatch, "flux", model=model, training=training)
    assert _pixels(freed) == _pixels(kept) and freed.losses == kept.losses
    assert watch.reloads == 0 and steps.alive[1] == ["vae"] and watch.alive() == []


# --- reloaded encoders are the same ---------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [0, 1], ids=["folder", "files"])
@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "flux"])
def test_reloaded_encoders_are_the_loaded_ones(tiny_components, tiny_model_configs, name, source):
    family = get_family(name)
    cfg = tiny_model_configs(name)[source]
    comps = tiny_components(name, source)
    again = family.load_encoders(cfg, comps)
    assert list(again) == ["vae", *comps.text_encoder_names]
    for module, reloaded in zip([comps.vae, *comps.text_encoders], again.values()):
        assert type(reloaded) is type(module)
        ours, theirs = module.state_dict(), reloaded.state_dict()
        assert list(ours) == list(theirs)
        assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
        assert reloaded.config.to_dict() == module.config.to_dict() if hasattr(module.config, "to_dict") else True
    twin = type(comps)(**{**comps.__dict__, "vae": again["vae"],
                          "text_encoders": [again[n] for n in comps.text_encoder_names]})
    with torch.no_grad():
        cond, cond_again = family.encode_text(comps, ["a red circle"]), family.encode_text(twin, ["a red circle"])
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        latents, latents_again = family.encode_images(comps, pixels), family.encode_images(twin, pixels)
    assert all(torch.equal(cond[k], cond_again[k]) for k in cond) and torch.equal(latents, latents_again)


def test_the_released_vae_still_answers_for_its_config_and_refuses_the_rest():
    from types import SimpleNamespace

    stand_in = ReleasedEncoder("vae", SimpleNamespace(block_out_channels=(32, 64)))
    assert stand_in.config.block_out_channels == (32, 64)
    assert getattr(stand_in, "module", stand_in) is stand_in  # unwrap() leaves it as it is
    with pytest.raises(AttributeError, match="the vae was released from memory after the caches were filled.*encode"):
        stand_in.encode(torch.zeros(1))


# --- validation, resume, full fine-tune export ----------------------------------------------------------------------

def test_validation_loss_is_the_same_with_the_encoders_released(tiny_sd15, demo_dataset, tmp_path, monkeypatch):
    """Validation's images and captions are encoded before the release, so saves need no reload."""
    def run(out, release):
        watch = Watch(monkeypatch)
        cfg = make_config(tiny_sd15, demo_dataset, out, training={**CACHES, "release_encoders": release,
                                                                  "epochs": 2, "validation_split": 0.1},
                          save={"save_every_n_epochs": 1})
        return train(cfg), watch

    kept, _ = run(tmp_path / "kept", False)
    freed, watch = run(tmp_path / "freed", True)
    assert [c.val_loss for c in freed.checkpoints] == [c.val_loss for c in kept.checkpoints]
    assert all(c.val_loss is not None for c in freed.checkpoints) and watch.reloads == 0


def test_validation_with_a_trained_text_encoder_still_encodes_its_captions_live(tiny_sd15, demo_dataset, tmp_path):
    """Only the VAE goes (latents cached; a trained text encoder has no text cache): validation's captions must
    follow the text encoder as it learns, so they are not frozen at the release."""
    def run(out, release):
        cfg = make_config(tiny_sd15, demo_dataset, out, network={"train_text_encoder": True},
                          training={"cache_latents": True, "release_encoders": release, "epochs": 2,
                                    "validation_split": 0.1}, save={"save_every_n_epochs": 1})
        return [c.val_loss for c in train(cfg).checkpoints]

    assert run(tmp_path / "freed", True) == run(tmp_path / "kept", False)


def test_a_resumed_run_with_released_encoders_continues_exactly(tiny_sd15, demo_dataset, tmp_path, monkeypatch):
    training = {**CACHES, "epochs": 2}
    whole = train(make_config(tiny_sd15, demo_dataset, tmp_path / "a", training=training, sample=PREVIEW))
    watch = Watch(monkeypatch)
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path / "b", training=training, sample=PREVIEW)
    first = train(cfg, StopAt(2))
    steps = AliveAtSteps(watch)
    resumed = train(cfg, steps, resume_from=first.state_dir)
    assert first.losses == whole.losses[:2] and resumed.losses == whole.losses
    assert min(steps.alive) == 3 and steps.alive[3] == ["vae"]  # the resumed run filled its caches, released again
    assert _pixels(resumed)[-1] == _pixels(whole)[-1]  # the last preview, from prompts the resumed run encoded


def test_a_full_fine_tune_single_file_export_reads_the_encoders_back(tiny_sd15, demo_dataset, tmp_path,
                                                                     monkeypatch):
    from safetensors.torch import load_file

    def run(out, release):
        watch = Watch(monkeypatch)
        cfg = make_config(tiny_sd15, demo_dataset, out, network={"network_type": "full"},
                          optim={"learning_rate": 1e-4},
                          training={**CACHES, "release_encoders": release},
                          save={"single_file_dir": str(out / "single"), "save_every_n_epochs": 1})
        result = train(cfg)
        files = sorted((out / "single").rglob("*.safetensors"))
        assert len(files) == 1
        return load_file(str(files[0])), watch

    kept, _ = run(tmp_path / "kept", False)
    freed, watch = run(tmp_path / "freed", True)
    assert list(freed) == list(kept) and all(torch.equal(freed[k], kept[k]) for k in kept)
    assert any(k.startswith("first_stage_model.") for k in freed) and watch.reloads == 1 and watch.alive() == []


def test_the_cpu_memory_estimate_drops_the_released_encoders():
    """On the CPU the training device is host memory: released encoders leave it, kept ones still count there (on
    a GPU they leave the device either way)."""
    from dataclasses import replace

    from trainer.memory import MemoryOptions, estimate

    cached = MemoryOptions("sdxl", precision="bf16", resolution=512, cache_latents=True, cache_text_embeddings=True)
    released, kept = estimate(cached, "cpu"), estimate(replace(cached, release_encoders=False), "cpu")
    assert released.parts["text encoders"] == released.parts["vae"] == 0
    assert kept.parts["text encoders"] > 1 and kept.parts["vae"] > 0.1  # CLIP-L + CLIP-G in bf16; the fp32 VAE
    assert released.training_gib < kept.training_gib - 1
    assert estimate(replace(cached, release_encoders=False), "cuda").parts["text encoders"] == 0


@pytest.mark.slow
def test_two_processes_release_their_own_copies_and_rank0_previews_without_reloading(tiny_sd15, demo_dataset,
                                                                                     tmp_path):
    """The encoders are never DDP-wrapped (only trained modules are): each rank drops its own copy after caching;
    rank 0, which renders the previews, encoded their prompts first and keeps its VAE, so nothing is read back; and
    the ranks still end identical."""
    from test_multiprocess import assert_ranks_agree, launch_two_processes

    cfg = {"model": {"family": "sd15", "path": str(tiny_sd15)},
           "datasets": [{"path": str(demo_dataset), "resolution": 64, "repeats": 1}],
           "network": {"network_dim": 4, "network_alpha": 4},
           "training": {"batch_size": 2, "epochs": 1, "seed": 1, **CACHES},
           "sample": {"prompts": ["a red circle"], "steps": 2, "sample_every_n_steps": 2},
           "save": {"output_dir": str(tmp_path / "out"), "run_name": "mp", "save_every_n_epochs": 1}}
    output = launch_two_processes(tmp_path, cfg)
    assert_ranks_agree(output)
    assert output.count("caches filled: released vae, text_encoder from memory") == 1, output[-3000:]  # rank 1
    assert output.count("caches filled: released text_encoder from memory") == 1, output[-3000:]  # rank 0
    assert "vae kept in host memory for previews" in output and "reloaded" not in output, output[-3000:]
    assert len(list((tmp_path / "out" / "mp" / "samples").glob("*.png"))) == 1


def test_a_model_file_changed_during_training_is_named_not_reloaded(tiny_sd15, demo_dataset, tmp_path,
                                                                    monkeypatch):
    """A preview that reads the encoders back after the model's files changed would use other encoders than the
    caches: refused, naming the path and the switch; the checkpoint saved before it stays. (Previews read nothing
    back when their prompts were encoded before the release, trainer.sample_prompts; here they were not.)"""
    import os
    import shutil

    import trainer.sample_prompts
    from trainer.errors import ModelLoadError

    monkeypatch.setattr(trainer.sample_prompts, "encode_preview_prompts", lambda trainer: None)

    model = tmp_path / "model"
    shutil.copytree(tiny_sd15, model)

    class TouchAfterStep1(Callbacks):
        def on_step(self, info):
            if info.step == 1:
                vae = next((model / "vae").glob("*.safetensors"))
                os.utime(vae, ns=(vae.stat().st_atime_ns, vae.stat().st_mtime_ns + 10**9))

    cfg = make_config(model, demo_dataset, tmp_path / "out", training=CACHES, sample=PREVIEW,
                      save={"save_every_n_steps": 1})
    with pytest.raises(ModelLoadError, match=r"model files changed during training.*model\.path '.*model'.*"
                                             r"training\.release_encoders false"):
        train(cfg, TouchAfterStep1())
    assert list((tmp_path / "out" / "loras").rglob("*s000001.safetensors"))
