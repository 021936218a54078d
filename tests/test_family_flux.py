"""What only Flux does, on a tiny Flux.1-dev-style model: packing, guidance, the resolution-dependent shift,
schnell, layouts and loading errors. The shared contract is tests/test_family_contract.py."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.config import ModelConfig, TrainConfig, TrainingConfig
from trainer.errors import ConfigError, ModelLoadError
from trainer.families import get_family
from trainer.families.split_files import transformer_layout
from trainer.families.flux import (DEV_SCHEDULER, flux_original_to_diffusers, flux_rope_axes, flux_transformer_config,
                                   image_ids, pack_latents, unpack_latents)
from trainer.fileio import atomic_write_json, save_safetensors
from tiny_flow import flux_to_original, tiny_transformer_config

from family_helpers import same_weights

FAMILY = get_family("flux")
CAPTIONS = ["a red circle", "blue square, flat colour, simple shape"]


def test_split_files_are_dev_with_its_vae_and_dynamic_shift(folder_comps, file_comps):
    assert file_comps.text_encoder_names == ("text_encoder", "text_encoder_2")
    assert file_comps.vae.config.scaling_factor == 0.3611 and file_comps.vae.config.shift_factor == 0.1159
    for comps in (folder_comps, file_comps):
        config = dict(comps.noise_scheduler.config)
        assert {k: config[k] for k in DEV_SCHEDULER} == DEV_SCHEDULER
        assert comps.extras["guidance_embeds"] is True


def test_encode_text_is_t5_states_and_clip_pooled(folder_comps):
    (clip, tok_clip), (t5, tok_t5) = zip(folder_comps.text_encoders, folder_comps.tokenizers)
    with torch.no_grad():
        cond = FAMILY.encode_text(folder_comps, CAPTIONS)
        clip_ids = tok_clip(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt").input_ids
        pooled = clip(clip_ids).pooler_output
        ids = tok_t5(CAPTIONS, padding="max_length", max_length=256, return_tensors="pt").input_ids
        states = t5(ids).last_hidden_state
        same = FAMILY.encode_text(folder_comps, CAPTIONS, clip_skip=2, max_token_length=150)
        short = FAMILY.encode_text(folder_comps, CAPTIONS, t5_length=16)
    assert cond["encoder_hidden_states"].shape == (2, 256, 96) and cond["pooled_projections"].shape == (2, 32)
    assert torch.allclose(cond["encoder_hidden_states"], states, atol=1e-5)
    assert torch.allclose(cond["pooled_projections"], pooled, atol=1e-5)
    assert all(torch.equal(same[k], cond[k]) for k in cond)  # Flux uses neither clip_skip nor CLIP windows
    assert short["encoder_hidden_states"].shape == (2, 16, 96)


def test_packing_ids_and_prediction(folder_comps):
    latents = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(1))
    packed = pack_latents(latents)
    assert packed.shape == (2, 4 * 3, 64) and torch.equal(unpack_latents(packed, 8, 6), latents)
    assert torch.equal(packed[0, 1], latents[0, :, 0:2, 2:4].reshape(-1))  # patch (row 0, col 1), channel-major
    assert image_ids(8, 6)[4].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="multiples of 16"):
        pack_latents(torch.zeros(1, 16, 7, 8))
    with torch.no_grad():
        cond = FAMILY.encode_text(folder_comps, CAPTIONS)
        t = torch.tensor([300.0, 300.0])
        pred = FAMILY.predict(folder_comps, latents, t, cond)
        direct = folder_comps.denoiser(hidden_states=packed, timestep=t / 1000, guidance=torch.ones(2),
                                       pooled_projections=cond["pooled_projections"],
                                       encoder_hidden_states=cond["encoder_hidden_states"],
                                       txt_ids=torch.zeros(256, 3), img_ids=image_ids(8, 6)).sample
    assert pred.shape == latents.shape
    assert torch.allclose(pred, unpack_latents(direct, 8, 6), atol=1e-6)


def test_guidance_comes_from_the_training_config(tiny_flux):
    comps = FAMILY.load(tiny_flux.folder_config())
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cond = FAMILY.encode_text(comps, ["red circle"])
        default = FAMILY.predict(comps, latents, torch.tensor([500.0]), cond)
        FAMILY.configure_training(comps, TrainingConfig(guidance_scale=3.5))
        guided = FAMILY.predict(comps, latents, torch.tensor([500.0]), cond)
    assert comps.extras["guidance"] == 3.5 and not torch.allclose(default, guided)


def test_resolution_dependent_shift(folder_comps):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from trainer.families.objectives import FlowMatchingObjective

    small, large = torch.zeros(1, 16, 64, 64), torch.zeros(1, 16, 128, 128)  # 512 px and 1024 px
    # Flux dev's scheduler config (diffusers 0.32's calculate_shift defaults to max_shift 1.16, later ones to 1.15)
    expected = calculate_shift(1024, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)
    assert FAMILY.flow_shift(folder_comps, small) == pytest.approx(math.exp(expected))
    assert FAMILY.flow_shift(folder_comps, large) == pytest.approx(math.exp(1.15))  # 4096 tokens: max_shift
    assert get_family("sd3").flow_shift(folder_comps, small) is None
    objective = FlowMatchingObjective(folder_comps.noise_scheduler, TrainingConfig())
    plain = objective.sample_sigmas(2000, torch.Generator().manual_seed(0))
    shifted = objective.sample_sigmas(2000, torch.Generator().manual_seed(0), FAMILY.flow_shift(folder_comps, large))
    assert shifted.mean() > plain.mean() + 0.1  # shifting moves σ towards noise


def test_schnell_has_no_guidance_and_no_dynamic_shift(tiny_flux, tmp_path):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    schnell = FluxTransformer2DModel(**{**tiny_transformer_config("flux"), "guidance_embeds": False}).eval()
    path = save_safetensors(tmp_path / "flux1-schnell.safetensors", flux_to_original(schnell.state_dict()))
    comps = FAMILY.load(tiny_flux.file_config(path=str(path)))
    assert comps.extras["guidance_embeds"] is False and not comps.noise_scheduler.config.use_dynamic_shifting
    assert same_weights(comps.denoiser, schnell) and FAMILY.flow_shift(comps, torch.zeros(1, 16, 8, 8)) is None
    with torch.no_grad():
        pred = FAMILY.predict(comps, torch.zeros(1, 16, 8, 8), torch.tensor([500.0]),
                              FAMILY.encode_text(comps, ["a cat"]))
    assert pred.shape == (1, 16, 8, 8) and torch.isfinite(pred).all()


def test_real_sizes_convert_and_derive_their_config():
    """Full-size Flux.1-dev on the meta device: BFL naming round-trips through diffusers' own converter."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(guidance_embeds=True)
    state = model.state_dict()
    original = flux_to_original(state)
    assert original["single_blocks.37.linear1.weight"].shape == (3 * 3072 + 12288, 3072)
    assert transformer_layout(original) == ("flux", "original") and transformer_layout(state) == ("flux", "diffusers")
    back = flux_original_to_diffusers(dict(original))
    assert back.keys() == state.keys() and all(back[k].shape == state[k].shape for k in state)
    derived = flux_transformer_config(back)
    assert {k: v for k, v in derived.items() if model.config[k] != v} == {}
    assert flux_rope_axes(128) == (16, 56, 56)


def test_loading_errors_name_the_input(tiny_flux, tmp_path):
    clip_l, t5 = map(str, tiny_flux.text_encoder_files)
    sd3_file = save_safetensors(tmp_path / "sd3.safetensors",
                                {"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(3, 1)})
    with pytest.raises(ModelLoadError, match="is a sd3 transformer.*set model.family to 'sd3'"):
        FAMILY.load(tiny_flux.file_config(path=str(sd3_file)))
    (tmp_path / "sd3" / "transformer").mkdir(parents=True)
    atomic_write_json(tmp_path / "sd3" / "model_index.json", {"_class_name": "StableDiffusion3Pipeline"})
    with pytest.raises(ModelLoadError, match="StableDiffusion3Pipeline; set model.family to 'sd3'"):
        FAMILY.load(ModelConfig(family="flux", path=str(tmp_path / "sd3")))
    with pytest.raises(ModelLoadError, match="not a diffusers Flux folder"):
        FAMILY.load(ModelConfig(family="flux", path=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="needs the T5-XXL"):
        FAMILY.load(tiny_flux.file_config(text_encoder_paths=(clip_l,)))
    with pytest.raises(ModelLoadError, match="2 CLIP files but Flux uses CLIP-L"):
        FAMILY.load(tiny_flux.file_config(text_encoder_paths=(clip_l, clip_l, t5)))
    with pytest.raises(ModelLoadError, match="two T5-XXL files"):
        FAMILY.load(tiny_flux.file_config(text_encoder_paths=(clip_l, t5, t5)))
    with pytest.raises(ModelLoadError, match="pickle"):
        FAMILY.load(tiny_flux.file_config(path=str(tmp_path / "flux.ckpt")))


def test_sample_cfg_is_the_embedded_guidance(file_comps):
    kwargs = dict(seed=3, steps=2, width=64, height=64)
    guided = FAMILY.sample(file_comps, ["a red circle"], cfg=3.5, **kwargs)
    other = FAMILY.sample(file_comps, ["a red circle"], cfg=1.0, **kwargs)
    assert guided[0].tobytes() != other[0].tobytes()


def test_the_loop_configures_guidance_and_the_resolution_shift(tiny_flux, demo_dataset, tmp_path):
    from trainer.callbacks import Callbacks
    from trainer.loop import Trainer

    cfg = TrainConfig.from_dict({
        "model": {"family": "flux", "path": str(tiny_flux.folder)},
        "datasets": [{"path": str(demo_dataset), "resolution": 64}],
        "training": {"max_train_steps": 1, "mixed_precision": "no", "guidance_scale": 3.5},
        "save": {"output_dir": str(tmp_path / "models"), "work_dir": str(tmp_path / "runs"), "run_name": "t"},
    })
    trainer = Trainer(cfg, Callbacks())
    comps = FAMILY.load(cfg.model)
    trainer._setup(comps)
    assert comps.extras["guidance"] == 3.5  # set by the loop through configure_training
    latents = torch.zeros(1, 16, 8, 8)
    assert trainer.objective.shift_fn is not None  # flow_shift 0 = auto
    assert trainer.objective.shift_fn(latents) == FAMILY.flow_shift(comps, latents)


def test_a_default_run_caches_latents_and_text_and_frees_the_encoders(tiny_flux, demo_dataset, tmp_path):
    """Issue 16: Flux's defaults fit (T5-XXL never trains in a LoRA): with the caches left at auto the run encodes
    everything before step 1 (then the VAE and text encoders leave: tests/test_cache_first.py), and run.json records
    what auto became."""
    import json

    from trainer.loop import train

    cfg = TrainConfig.from_dict({
        "model": {"family": "flux", "path": str(tiny_flux.folder)},
        "datasets": [{"path": str(demo_dataset), "resolution": 64}],
        "training": {"max_train_steps": 1, "validation_split": 0},
        "save": {"output_dir": str(tmp_path / "models"), "work_dir": str(tmp_path / "runs"), "run_name": "t",
                 "save_every_n_epochs": 0, "save_state": False},
    })
    assert cfg.training.cache_latents is None and cfg.training.cache_text_embeddings is None
    from trainer.callbacks import Callbacks

    class Seen(Callbacks):
        def __init__(self):
            self.prepared, self.steps_then = set(), []

        def on_prepare(self, done, total, what):
            self.prepared.add(what)

        def on_step(self, info):
            self.steps_then.append(set(self.prepared))

    seen = Seen()
    result = train(cfg, seen)
    assert seen.steps_then[0] == {"caching latents", "caching text embeddings"}  # both filled before step 1
    resolved = json.loads((result.work_dir / "run.json").read_text())["resolved"]
    assert resolved["cache_latents"] is True and resolved["cache_text_embeddings"] is True
    flipped = TrainConfig.from_dict({**cfg.to_dict(), "datasets": [{"path": str(demo_dataset), "resolution": 64,
                                                                    "flip_aug": True}]})
    from trainer.defaults import resolved_settings

    assert resolved_settings(flipped)["cache_latents"] is False  # auto: off with augmentation, not an error
