"""The Flux family adapter on a tiny Flux.1-dev-style model: diffusers folder and ComfyUI split files, packing,
guidance, the resolution-dependent shift, a real LoRA and full training run, export and sampling."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import ModelConfig, TrainConfig, TrainingConfig
from trainer.errors import ConfigError, ModelLoadError
from trainer.families import get_family
from trainer.families.flow_common import transformer_layout
from trainer.families.flux import (DEV_SCHEDULER, flux_original_to_diffusers, flux_rope_axes, flux_transformer_config,
                                   image_ids, pack_latents, unpack_latents)
from trainer.fileio import atomic_write_json, save_safetensors
from tiny_flow import build_tiny_flow_model, flux_to_original, tiny_transformer_config

FAMILY = get_family("flux")
CAPTIONS = ["a red circle", "blue square, flat colour, simple shape"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_flow_model(tmp_path_factory.mktemp("flux"), "flux", seed=0)


@pytest.fixture(scope="module")
def folder_comps(tiny):
    return FAMILY.load(tiny.folder_config())


@pytest.fixture(scope="module")
def file_comps(tiny):
    return FAMILY.load(tiny.file_config())


def _pixels(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _outputs(comps):
    with torch.no_grad():
        cond = FAMILY.encode_text(comps, CAPTIONS)
        latents = FAMILY.encode_images(comps, _pixels())
        pred = FAMILY.predict(comps, latents, torch.tensor([100.0, 900.0]), cond)
    return cond["encoder_hidden_states"], cond["pooled_projections"], latents, pred


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_split_files_load_the_same_model_as_the_folder(folder_comps, file_comps):
    assert (folder_comps.extras["format"], file_comps.extras["format"]) == ("diffusers", "single_file")
    assert file_comps.text_encoder_names == ("text_encoder", "text_encoder_2")
    for name, module in folder_comps.modules().items():
        assert _same_weights(module, file_comps.modules()[name]), name
    assert _same_weights(folder_comps.vae, file_comps.vae)
    assert file_comps.vae.config.scaling_factor == 0.3611 and file_comps.vae.config.shift_factor == 0.1159
    for comps in (folder_comps, file_comps):
        config = dict(comps.noise_scheduler.config)
        assert {k: config[k] for k in DEV_SCHEDULER} == DEV_SCHEDULER
        assert comps.extras["guidance_embeds"] is True
    for a, b in zip(_outputs(folder_comps), _outputs(file_comps)):
        assert torch.equal(a, b)


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


def test_guidance_comes_from_the_training_config(tiny):
    comps = FAMILY.load(tiny.folder_config())
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


def test_schnell_has_no_guidance_and_no_dynamic_shift(tiny, tmp_path):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    schnell = FluxTransformer2DModel(**{**tiny_transformer_config("flux"), "guidance_embeds": False}).eval()
    path = save_safetensors(tmp_path / "flux1-schnell.safetensors", flux_to_original(schnell.state_dict()))
    comps = FAMILY.load(tiny.file_config(path=str(path)))
    assert comps.extras["guidance_embeds"] is False and not comps.noise_scheduler.config.use_dynamic_shifting
    assert _same_weights(comps.denoiser, schnell) and FAMILY.flow_shift(comps, torch.zeros(1, 16, 8, 8)) is None
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


def test_loading_errors_name_the_input(tiny, tmp_path):
    clip_l, t5 = map(str, tiny.text_encoder_files)
    sd3_file = save_safetensors(tmp_path / "sd3.safetensors",
                                {"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(3, 1)})
    with pytest.raises(ModelLoadError, match="is a sd3 transformer.*set model.family to 'sd3'"):
        FAMILY.load(tiny.file_config(path=str(sd3_file)))
    (tmp_path / "sd3" / "transformer").mkdir(parents=True)
    atomic_write_json(tmp_path / "sd3" / "model_index.json", {"_class_name": "StableDiffusion3Pipeline"})
    with pytest.raises(ModelLoadError, match="StableDiffusion3Pipeline; set model.family to 'sd3'"):
        FAMILY.load(ModelConfig(family="flux", path=str(tmp_path / "sd3")))
    with pytest.raises(ModelLoadError, match="not a diffusers Flux folder"):
        FAMILY.load(ModelConfig(family="flux", path=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="needs the T5-XXL"):
        FAMILY.load(tiny.file_config(text_encoder_paths=(clip_l,)))
    with pytest.raises(ModelLoadError, match="2 CLIP files but Flux uses CLIP-L"):
        FAMILY.load(tiny.file_config(text_encoder_paths=(clip_l, clip_l, t5)))
    with pytest.raises(ModelLoadError, match="two T5-XXL files"):
        FAMILY.load(tiny.file_config(text_encoder_paths=(clip_l, t5, t5)))
    with pytest.raises(ModelLoadError, match="pickle"):
        FAMILY.load(tiny.file_config(path=str(tmp_path / "flux.ckpt")))


def test_lora_targets_exist_in_the_model(folder_comps):
    for component, module in folder_comps.modules().items():
        names = [n for n, _ in module.named_modules()]
        for target in FAMILY.lora_target_modules(component, "all_linear"):
            assert any(n == target or n.endswith("." + target) for n in names), (component, target)


def test_sample_renders_deterministic_images(file_comps):
    kwargs = dict(seed=3, steps=2, width=64, height=64)
    first = FAMILY.sample(file_comps, ["a red circle", "a blue square"], cfg=3.5, **kwargs)
    again = FAMILY.sample(file_comps, ["a red circle"], cfg=3.5, **kwargs)
    other_guidance = FAMILY.sample(file_comps, ["a red circle"], cfg=1.0, **kwargs)
    assert [im.size for im in first] == [(64, 64), (64, 64)] and first[0].mode == "RGB"
    assert first[0].tobytes() == again[0].tobytes() != other_guidance[0].tobytes()
    assert first[0].tobytes() != first[1].tobytes()


# --- training through the real loop --------------------------------------------------------------------------------

def _config(tiny, data, out, network: dict, steps: int, lr: float) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"family": "flux", "path": str(tiny.folder)},
        "datasets": [{"path": str(data), "resolution": 64, "repeats": 1}],
        "network": {"network_dim": 4, "network_alpha": 4, "target_preset": "attn_mlp", **network},
        "optim": {"learning_rate": lr, "lr_scheduler": "constant"},
        "training": {"batch_size": 4, "max_train_steps": steps, "seed": 3, "mixed_precision": "no", "timestep_sampling": "logit_normal",
                     "guidance_scale": 3.5},
        "save": {"output_dir": str(out / "models"), "work_dir": str(out / "runs"), "run_name": "t",
                 "save_every_n_epochs": 0, "save_every_n_steps": steps, "save_precision": "fp32"},
    })


def _load_for_training(cfg: TrainConfig):
    return FAMILY.load(cfg.model)  # the loop calls configure_training itself


@pytest.fixture(scope="module")
def lora_run(tiny, demo_dataset, tmp_path_factory):
    from trainer.loop import train

    cfg = _config(tiny, demo_dataset, tmp_path_factory.mktemp("lora"), {}, steps=30, lr=1e-2)
    comps = _load_for_training(cfg)
    return cfg, comps, train(cfg, components=comps)


def test_the_loop_configures_guidance_and_the_resolution_shift(lora_run, monkeypatch):
    cfg, comps, _ = lora_run
    assert comps.extras["guidance"] == 3.5  # set by the loop through configure_training
    from trainer.callbacks import Callbacks
    from trainer.loop import Trainer

    trainer = Trainer(cfg, Callbacks())
    comps = FAMILY.load(cfg.model)  # a fresh model: _setup injects an adapter
    trainer._setup(comps)
    latents = torch.zeros(1, 16, 8, 8)
    assert trainer.objective.shift_fn is not None  # flow_shift 0 = auto
    assert trainer.objective.shift_fn(latents) == FAMILY.flow_shift(comps, latents)


def test_lora_training_lowers_the_loss(lora_run):
    _, _, result = lora_run
    losses = result.losses
    assert len(losses) == 30 and all(map(math.isfinite, losses))
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8, losses


def test_lora_export_is_comfyui_shaped_and_reloads(lora_run, comfyui_reference):
    from trainer.checkpoints import load_lora_file
    from trainer.network import attach_network

    cfg, trained, result = lora_run
    tensors = load_file(str(result.checkpoints[-1].path))
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert all(k.startswith("transformer.") for k in tensors)
    assert all(f"{p}.alpha" in tensors and f"{p}.lora_B.weight" in tensors for p in prefixes)
    assert "transformer.single_transformer_blocks.0.proj_mlp" in prefixes
    keymap = comfyui_reference.keymap("flux")
    assert prefixes <= set(keymap["unet"]), sorted(prefixes - set(keymap["unet"]))[:3]
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])

    def output(comps):
        with torch.no_grad():
            return FAMILY.predict(comps, latents, t, FAMILY.encode_text(comps, ["red circle"]))

    fresh = _load_for_training(cfg)
    FAMILY.configure_training(fresh, cfg.training)  # the same guidance value the trained model saw
    base = output(fresh)
    load_lora_file(attach_network(FAMILY, fresh, cfg.network), result.checkpoints[-1].path)
    reloaded = output(fresh)
    assert torch.allclose(reloaded, output(trained), atol=1e-5)
    assert (reloaded - base).abs().max() > 1e-3  # the LoRA changed the model


def test_full_finetune_exports_a_transformer_that_reloads(tiny, demo_dataset, tmp_path):
    from trainer.loop import train

    cfg = _config(tiny, demo_dataset, tmp_path, {"network_type": "full"}, steps=3, lr=1e-3)
    comps = _load_for_training(cfg)
    before = {k: v.clone() for k, v in comps.denoiser.state_dict().items()}
    result = train(cfg, components=comps)
    state = load_file(str(result.checkpoints[-1].path))
    assert result.checkpoints[-1].kind == "full"
    assert transformer_layout(state) == ("flux", "diffusers")  # what ComfyUI's Load Diffusion Model detects
    assert any(not torch.equal(before[k], v) for k, v in state.items())
    again = FAMILY.load(tiny.file_config(path=str(result.checkpoints[-1].path)))
    assert _same_weights(again.denoiser, comps.denoiser)
