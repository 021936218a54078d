"""Patches applied to the MODEL upstream of Crucible Train (nodes/comfy_upstream.py, issue 18): a ModelSampling* object
patch decides the prediction, schedule and σ shift training uses; weight patches (LoRAs) are recorded in the family's
``base_patches`` (run.json, LoRA metadata); sampling hooks are named as not trained with. ComfyUI's ModelPatcher is
stood in by :class:`FakePatcher` with 0.8.0's attributes (``patches``, ``object_patches``, ``model_options``,
``get_model_object``); the real one runs in tests/comfyui_e2e/model_path_upstream.py."""
from __future__ import annotations

import json
import logging
import math
import types

import pytest
import torch

from test_comfy_family import (CONST, FakeBaseModel, ModelSamplingDiscreteFlow, ModelSamplingFlux, comfy_key_map,
                               module, sampling)  # noqa: F401 - module is the fixture

NO_PATHS = types.SimpleNamespace(path="", vae_path="", tokenizer_path="", text_encoder_paths=())


class FakePatcher:
    """comfy.model_patcher.ModelPatcher's patch bookkeeping: patches are kept here and applied only on load."""

    def __init__(self, base, object_patches=None, patches=None, model_options=None):
        self.model = base
        self.object_patches = dict(object_patches or {})
        self.patches = dict(patches or {})
        self.model_options = model_options or {"transformer_options": {}}

    def get_model_object(self, name):
        return self.object_patches.get(name, getattr(self.model, name))

    def patch_model(self):  # what load_models_gpu does to object patches
        for name, obj in self.object_patches.items():
            setattr(self.model, name, obj)


@pytest.fixture()
def loading(module, monkeypatch):
    import sys

    mm = sys.modules["comfy.model_management"]
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, **kw: [m.patch_model() for m in models])
    return module


def family_with(module, patcher):
    vae = types.SimpleNamespace(first_stage_model=torch.nn.Conv2d(3, 4, 1))
    return module.ComfyModelFamily(patcher, clip=object(), vae=vae, key_map=comfy_key_map(patcher.model))


class Adapter:  # comfy.weight_adapter.LoRAAdapter: a patch with a name
    name = "lora"


def test_a_model_sampling_patch_upstream_decides_prediction_and_schedule(loading):
    """ModelSamplingDiscrete(v_prediction) on an ε model: the MODEL samples as v, so it trains as v on the patched σ
    table. Before, the family read the unloaded model's own ε sampling and trained the v MODEL with an ε target."""
    base = FakeBaseModel(sampling("epsilon"))
    patched = sampling("v_prediction")
    patched.sigmas = patched.sigmas * 1.5  # a schedule unlike the model's own
    family = family_with(loading, FakePatcher(base, {"model_sampling": patched}))
    assert family.default_prediction == "v_prediction"
    comps = family.load(NO_PATHS)
    assert comps.noise_scheduler.config.prediction_type == "v_prediction"
    assert torch.allclose(comps.noise_scheduler.alphas_cumprod.double(), 1 / (1 + patched.sigmas.double() ** 2),
                          atol=1e-6)
    assert family.base_patches["object_patches"] == ["model_sampling"]


def test_a_flow_shift_patch_upstream_is_the_shift_training_uses(loading):
    """ModelSamplingSD3(shift=6) on an SD3 MODEL trains with shift 6; a ModelSamplingFlux node's μ on Flux dev is used
    as it is (the resolution rule applies only to the MODEL's own sampling)."""
    base = FakeBaseModel(sampling("flow"))
    sd3 = type("ModelSampling", (CONST, ModelSamplingDiscreteFlow), {})(shift=6.0)
    family = family_with(loading, FakePatcher(base, {"model_sampling": sd3}))
    assert family.flow_shift(None, torch.zeros(1, 16, 64, 64)) == pytest.approx(6.0)

    base = FakeBaseModel(sampling("flow"))
    base.diffusion_model.params = types.SimpleNamespace(guidance_embed=True)
    flux = type("ModelSampling", (CONST, ModelSamplingFlux), {})(shift=0.9)
    family = family_with(loading, FakePatcher(base, {"model_sampling": flux}))
    assert family.flow_shift(None, torch.zeros(1, 16, 64, 64)) == pytest.approx(math.exp(0.9))
    base.model_sampling = flux  # the same sampling as the model's own: the resolution rule
    family = family_with(loading, FakePatcher(base))
    assert family.flow_shift(None, torch.zeros(1, 16, 64, 64)) < math.exp(0.9) - 0.1


def test_upstream_patches_are_recorded_and_sampling_hooks_named(loading, caplog):
    """Two LoRAs (one at 0.8, one at 1.0) and a model merge's plain weight; an attention replacement and a UNet
    function wrapper: the record counts patched weights per (kind, strength) and names the hooks training skips."""
    base = FakeBaseModel(sampling("epsilon"))
    lora = (0.8, Adapter(), 1.0, None, None)
    patches = {"diffusion_model.ff.weight": [lora, (1.0, Adapter(), 1.0, None, None)],
               "diffusion_model.attn1.to_q.weight": [lora], "diffusion_model.conv.weight": [(0.5, (torch.ones(1),), 0.5)]}
    options = {"transformer_options": {"patches_replace": {"attn1": {("input", 1): print}}, "patches": {}},
               "model_function_wrapper": print, "sampler_cfg_function": None}
    family = family_with(loading, FakePatcher(base, patches=patches, model_options=options))
    assert len(family.base_patches.pop("digest")) == 16
    assert family.base_patches == {
        "patched_weights": 3,
        "weight_patches": [{"kind": "diff", "strength": 0.5, "strength_model": 0.5, "weights": 1},
                           {"kind": "lora", "strength": 0.8, "strength_model": 1.0, "weights": 2},
                           {"kind": "lora", "strength": 1.0, "strength_model": 1.0, "weights": 1}],
        "not_in_training": ["model_function_wrapper", "transformer_options.patches_replace.attn1"]}
    with caplog.at_level(logging.WARNING, logger="crucible"):
        family.load(NO_PATHS)
    text = caplog.text
    assert "lora patch (strength 0.8" in text and "on 2 weights" in text
    assert "not applied in the training forward" in text and "transformer_options.patches_replace.attn1" in text


def test_a_plain_model_records_nothing_and_warns_nothing(loading, caplog):
    family = family_with(loading, FakePatcher(FakeBaseModel(sampling("epsilon"))))
    with caplog.at_level(logging.WARNING, logger="crucible"):
        family.load(NO_PATHS)
    assert family.base_patches == {} and "Crucible Train (comfy_model)" not in caplog.text


def test_the_record_reaches_the_loras_metadata_and_run_json(loading, make_config, tiny_sd15, demo_dataset, tmp_path):
    from dataclasses import replace

    from trainer.families import hosted_family
    from trainer.lora_metadata import lora_metadata
    from trainer.run_record import RunRecord

    patches = {"diffusion_model.ff.weight": [(0.7, Adapter(), 1.0, None, None)]}
    family = family_with(loading, FakePatcher(FakeBaseModel(sampling("epsilon")), patches=patches))
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path)
    cfg = replace(cfg, model=replace(cfg.model, family="comfy", path=""))
    with hosted_family(family):
        meta = lora_metadata(cfg, step=1, epoch=1)
    assert json.loads(meta["crucible_base_patches"]) == family.base_patches
    assert family.base_patches["patched_weights"] == 1
    assert "crucible_base_patches" not in lora_metadata(make_config(tiny_sd15, demo_dataset, tmp_path), step=1, epoch=1)
    record = RunRecord("r", "comfy", "lora", "finished", tmp_path, tmp_path, base_patches=dict(family.base_patches))
    record.write()
    assert RunRecord.load(tmp_path).base_patches == family.base_patches


def test_training_leaves_the_models_patches_as_they_were(loading):
    """Attach an adapter and restore: the MODEL's weight patches, object patches and options are the same objects."""
    from trainer.config import NetworkConfig
    from trainer.network import attach_network

    base = FakeBaseModel(sampling("epsilon"))
    patcher = FakePatcher(base, {"model_sampling": sampling("v_prediction")},
                          {"diffusion_model.ff.weight": [(0.7, Adapter(), 1.0, None, None)]},
                          {"transformer_options": {"patches": {"attn1_patch": [print]}}})
    from importlib import import_module

    upstream = import_module(loading.__name__.rsplit(".", 1)[0] + ".comfy_upstream")
    before = upstream.patch_state(patcher)
    family = family_with(loading, patcher)
    comps = family.load(NO_PATHS)
    attach_network(family, comps, NetworkConfig(network_dim=2, network_alpha=2.0, target_preset="all_linear"))
    family.restore()
    assert upstream.patch_state(patcher) == before
    assert not any("lora" in name for name, _ in base.diffusion_model.named_modules())


def test_a_resume_on_a_base_patched_differently_is_refused(loading, make_config, tiny_sd15, demo_dataset, tmp_path):
    """The state records the digest of the upstream patches: the same LoRA at the same strength resumes; another
    strength, other LoRA weights or no LoRA is refused by name (unless forced), as a changed config is."""
    from dataclasses import replace

    from trainer.errors import CrucibleError
    from trainer.families import hosted_family
    from trainer.state import load_state, save_state

    cfg = make_config(tiny_sd15, demo_dataset, tmp_path)
    cfg = replace(cfg, model=replace(cfg.model, family="comfy", path=""))

    class Lora(Adapter):
        def __init__(self, scale):
            self.weights = (torch.ones(2, 2) * scale, torch.ones(2, 2), None)

    def family(strength=0.8, scale=1.0, patched=True):
        patches = {"diffusion_model.ff.weight": [(strength, Lora(scale), 1.0, None, None)]} if patched else {}
        return family_with(loading, FakePatcher(FakeBaseModel(sampling("epsilon")), patches=patches))

    with hosted_family(family()):
        save_state(tmp_path / "state", step=2, epoch=1, payload={"w": torch.zeros(1)}, cfg=cfg, data_fingerprint="d")
    with hosted_family(family()):
        assert load_state(tmp_path / "state", cfg, "d").step == 2
    for changed in (family(strength=0.5), family(scale=2.0), family(patched=False)):
        with hosted_family(changed):
            with pytest.raises(CrucibleError, match="patches applied to the MODEL before Crucible Train"):
                load_state(tmp_path / "state", cfg, "d")
            assert load_state(tmp_path / "state", cfg, "d", force=True).step == 2
