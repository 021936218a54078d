"""The SD3 family adapter on a tiny SD3.5-style model: diffusers folder, ComfyUI split files and full checkpoint,
text conditioning, a real LoRA and full training run, export and sampling."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import ModelConfig, TrainConfig
from trainer.errors import ConfigError, ModelLoadError
from trainer.families import get_family
from trainer.families.flow_common import find_t5_tokenizer_dir, transformer_layout
from trainer.families.sd3 import sd3_original_to_diffusers, sd3_transformer_config
from trainer.fileio import save_safetensors
from tiny_flow import build_tiny_flow_model, sd3_to_original, text_encoder_file_state, tiny_t5_config

FAMILY = get_family("sd3")
CAPTIONS = ["a red circle", "blue square, flat colour, simple shape"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_flow_model(tmp_path_factory.mktemp("sd3"), "sd3", seed=0)


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
    assert file_comps.text_encoder_names == ("text_encoder", "text_encoder_2", "text_encoder_3")
    for name, module in folder_comps.modules().items():
        assert _same_weights(module, file_comps.modules()[name]), name
    assert _same_weights(folder_comps.vae, file_comps.vae)
    assert file_comps.vae.config.scaling_factor == 1.5305 and file_comps.vae.config.shift_factor == 0.0609
    assert dict(file_comps.noise_scheduler.config)["shift"] == dict(folder_comps.noise_scheduler.config)["shift"] == 3.0
    for a, b in zip(_outputs(folder_comps), _outputs(file_comps)):
        assert torch.equal(a, b)


def test_full_comfyui_checkpoint_with_embedded_vae_and_clips(tiny, folder_comps, tmp_path):
    """sd3.5_*.safetensors style: model.diffusion_model. + first_stage_model. + text_encoders.* (T5 given apart)."""
    from trainer.families.single_file import vae_to_ldm

    state = {f"model.diffusion_model.{k}": v for k, v in sd3_to_original(folder_comps.denoiser.state_dict()).items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(folder_comps.vae.state_dict()).items()})
    for kind, encoder in zip(("clip_l", "clip_g"), folder_comps.text_encoders):
        state.update({f"text_encoders.{kind}.transformer.{k}": v for k, v in text_encoder_file_state(encoder).items()})
    models = tiny.comfy_root / "models" / "checkpoints"
    save_safetensors(models / "sd3-all-in-one.safetensors", state)
    t5_file = tiny.text_encoder_files[2]
    comps = FAMILY.load(ModelConfig(family="sd3", path=str(models / "sd3-all-in-one.safetensors"),
                                    text_encoder_paths=(str(t5_file),)))
    for a, b in zip(_outputs(folder_comps), _outputs(comps)):
        assert torch.equal(a, b)


def test_encode_text_matches_comfyui_conditioning(folder_comps):
    (clip_l, tok_l), (clip_g, tok_g), (t5, tok_t5) = zip(folder_comps.text_encoders, folder_comps.tokenizers)
    with torch.no_grad():
        cond = FAMILY.encode_text(folder_comps, CAPTIONS)
        ids_l = tok_l(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt").input_ids
        ids_g = tok_g(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt").input_ids
        out_l, out_g = clip_l(ids_l, output_hidden_states=True), clip_g(ids_g, output_hidden_states=True)
        ids_t5 = tok_t5(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt").input_ids
        t5_states = t5(ids_t5).last_hidden_state
    context, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
    assert context.shape == (2, 77 + 77, 96) and pooled.shape == (2, 32 + 32)
    clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)  # penultimate, no final norm
    assert torch.allclose(context[:, :77, :clip.shape[-1]], clip, atol=1e-5)
    assert torch.equal(context[:, :77, clip.shape[-1]:], torch.zeros(2, 77, 96 - clip.shape[-1]))
    assert torch.allclose(context[:, 77:], t5_states, atol=1e-5)
    assert ids_t5[0].tolist().count(tok_t5.eos_token_id) == 1 and ids_t5[0, -1] == tok_t5.pad_token_id
    assert torch.allclose(pooled, torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1), atol=1e-5)
    with torch.no_grad():
        skip2 = FAMILY.encode_text(folder_comps, CAPTIONS, clip_skip=2)["encoder_hidden_states"]
        long = FAMILY.encode_text(folder_comps, CAPTIONS, max_token_length=150, t5_length=32)
    assert not torch.allclose(skip2[:, :77], context[:, :77]) and torch.equal(skip2[:, 77:], context[:, 77:])
    assert long["encoder_hidden_states"].shape == (2, 154 + 32, 96)
    assert torch.allclose(long["pooled_projections"], pooled, atol=1e-6)  # pooled from the first window
    with pytest.raises(ConfigError, match="clip_skip"):
        FAMILY.encode_text(folder_comps, CAPTIONS, clip_skip=3)  # the tiny CLIPs have 3 layers


def test_text_encoder_files_are_told_apart_and_t5_is_optional(tiny, folder_comps):
    shuffled = FAMILY.load(tiny.file_config(text_encoder_paths=tuple(map(str, tiny.text_encoder_files[::-1]))))
    assert all(_same_weights(a, b) for a, b in zip(shuffled.text_encoders, folder_comps.text_encoders))
    comps = FAMILY.load(tiny.file_config(text_encoder_paths=tuple(map(str, tiny.text_encoder_files[:2]))))
    assert comps.text_encoder_names == ("text_encoder", "text_encoder_2") and len(comps.tokenizers) == 2
    with torch.no_grad():
        without = FAMILY.encode_text(comps, CAPTIONS)
        with_t5 = FAMILY.encode_text(folder_comps, CAPTIONS)
        pred = FAMILY.predict(comps, torch.zeros(2, 16, 8, 8), torch.tensor([500.0, 500.0]), without)
    assert without["encoder_hidden_states"].shape == (2, 77, 96)  # CLIP only, as ComfyUI without T5
    assert torch.allclose(without["encoder_hidden_states"], with_t5["encoder_hidden_states"][:, :77], atol=1e-6)
    assert pred.shape == (2, 16, 8, 8)


def test_latents_and_prediction(folder_comps):
    vae = folder_comps.vae
    with torch.no_grad():
        latents = FAMILY.encode_images(folder_comps, _pixels())
        mean = vae.encode(_pixels()).latent_dist.mean
        cond = FAMILY.encode_text(folder_comps, CAPTIONS)
        early = FAMILY.predict(folder_comps, latents, torch.tensor([10.0, 10.0]), cond)
        late = FAMILY.predict(folder_comps, latents, torch.tensor([990.0, 990.0]), cond)
    assert latents.shape == (2, FAMILY.latent_channels, 8, 8) and FAMILY.default_prediction == "flow"
    assert torch.allclose(latents, (mean - 0.0609) * 1.5305, atol=1e-6)
    assert early.shape == latents.shape and not torch.allclose(early, late)


def test_real_sizes_convert_and_derive_their_config():
    """Full-size SD3.5 layout on the meta device: original naming round-trips and the config is recovered."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    config = dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=24,
                  dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    with init_empty_weights():
        model = SD3Transformer2DModel(**config)
    state = model.state_dict()
    original = sd3_to_original(state)
    assert "joint_blocks.23.context_block.adaLN_modulation.1.weight" in original and "pos_embed" in original
    assert transformer_layout(original) == ("sd3", "original") and transformer_layout(state) == ("sd3", "diffusers")
    back = sd3_original_to_diffusers(dict(original))
    assert back.keys() == state.keys() and all(back[k].shape == state[k].shape for k in state)
    derived = sd3_transformer_config(back)
    assert {k: v for k, v in derived.items() if model.config[k] != v} == {}


def test_loading_errors_name_the_input(tiny, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    from trainer.families.single_file import vae_to_ldm
    from trainer.tiny import tiny_vae_config

    monkeypatch.delenv("CRUCIBLE_COMFY_TOKENIZER_DIR", raising=False)
    clip_l, clip_g, t5 = map(str, tiny.text_encoder_files)
    with pytest.raises(ModelLoadError, match="model.path is empty"):
        FAMILY.load(ModelConfig(family="sd3"))
    with pytest.raises(ConfigError, match="prediction_type"):
        FAMILY.load(tiny.folder_config(prediction_type="epsilon"))
    with pytest.raises(ModelLoadError, match="CLIP-G"):
        FAMILY.load(tiny.file_config(text_encoder_paths=(clip_l, t5)))
    with pytest.raises(ModelLoadError, match="same size"):
        FAMILY.load(tiny.file_config(text_encoder_paths=(clip_l, clip_l, t5)))
    with pytest.raises(ModelLoadError, match=r"text_encoder_paths\[0\].*not a CLIP or T5"):
        FAMILY.load(tiny.file_config(text_encoder_paths=(str(tiny.vae_file), clip_g)))
    with pytest.raises(ModelLoadError, match="no VAE"):
        FAMILY.load(tiny.file_config(vae_path=""))
    with pytest.raises(ModelLoadError, match="holds no SD3 transformer"):
        FAMILY.load(tiny.file_config(path=clip_l))
    small_vae = save_safetensors(tmp_path / "sd15-vae.safetensors",
                                 vae_to_ldm(AutoencoderKL(**tiny_vae_config("sd15")).state_dict()))
    with pytest.raises(ModelLoadError, match="4 latent channels"):
        FAMILY.load(tiny.file_config(vae_path=str(small_vae)))
    vocab = load_file(t5)["shared.weight"].shape[0]
    narrow_t5 = T5EncoderModel(T5Config(**{**tiny_t5_config(vocab), "d_model": 48}))
    narrow = save_safetensors(tmp_path / "t5-base.safetensors", text_encoder_file_state(narrow_t5))
    with pytest.raises(ModelLoadError, match="do not fit the SD3 transformer: its T5 input is 96 wide but they give 48"):
        FAMILY.load(tiny.file_config(text_encoder_paths=(clip_l, clip_g, str(narrow))))
    # outside a ComfyUI tree no T5 tokenizer can be found; the message lists where it looked and what to set
    lone = tmp_path / "lone"
    lone.mkdir()
    for file in (tiny.transformer_file, *tiny.text_encoder_files):
        shutil.copy(file, lone / file.name)
    moved = tiny.file_config(path=str(lone / tiny.transformer_file.name),
                             text_encoder_paths=tuple(str(lone / f.name) for f in tiny.text_encoder_files),
                             tokenizer_path=str(tiny.comfy_root / "comfy" / "sd1_tokenizer"))
    with pytest.raises(ModelLoadError, match="no T5 tokenizer found.*tokenizer_path"):
        FAMILY.load(moved)
    assert find_t5_tokenizer_dir(tiny.folder_config(), "tokenizer_3") == tiny.folder / "tokenizer_3"


def test_lora_targets_exist_in_the_model(folder_comps):
    for component, module in folder_comps.modules().items():
        names = [n for n, _ in module.named_modules()]
        for target in FAMILY.lora_target_modules(component, "attn_mlp"):
            assert any(n == target or n.endswith("." + target) for n in names), (component, target)


def test_sample_renders_deterministic_images(file_comps):
    kwargs = dict(seed=3, steps=2, cfg=4.0, width=64, height=64)
    first = FAMILY.sample(file_comps, ["a red circle", "a blue square"], **kwargs)
    again = FAMILY.sample(file_comps, ["a red circle"], **kwargs)
    negative = FAMILY.sample(file_comps, ["a red circle"], **kwargs, negative_prompt="green")
    assert [im.size for im in first] == [(64, 64), (64, 64)] and first[0].mode == "RGB"
    assert first[0].tobytes() == again[0].tobytes() != negative[0].tobytes()
    with pytest.raises(ConfigError, match="multiples of 16"):
        FAMILY.sample(file_comps, ["x"], **{**kwargs, "width": 72})


# --- training through the real loop --------------------------------------------------------------------------------

def _config(tiny, data, out, network: dict, steps: int, lr: float) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"family": "sd3", "path": str(tiny.folder)},
        "datasets": [{"path": str(data), "resolution": 64, "repeats": 1}],
        "network": {"network_dim": 4, "network_alpha": 4, "target_preset": "attn_mlp", **network},
        "optim": {"learning_rate": lr, "lr_scheduler": "constant"},
        "training": {"batch_size": 4, "max_train_steps": steps, "seed": 3, "mixed_precision": "no", "timestep_sampling": "logit_normal"},
        "save": {"output_dir": str(out / "models"), "work_dir": str(out / "runs"), "run_name": "t",
                 "save_every_n_epochs": 0, "save_every_n_steps": steps, "save_precision": "fp32"},
    })


@pytest.fixture(scope="module")
def lora_run(tiny, demo_dataset, tmp_path_factory):
    from trainer.loop import train

    cfg = _config(tiny, demo_dataset, tmp_path_factory.mktemp("lora"), {}, steps=30, lr=1e-2)
    comps = FAMILY.load(cfg.model)
    return cfg, comps, train(cfg, components=comps)


def test_lora_training_lowers_the_loss(lora_run):
    _, _, result = lora_run
    losses = result.losses
    assert len(losses) == 30 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8, losses


def test_lora_export_is_comfyui_shaped_and_reloads(lora_run, comfyui_reference):
    from trainer.checkpoints import load_lora_file
    from trainer.network import attach_network

    cfg, trained, result = lora_run
    tensors = load_file(str(result.checkpoints[-1].path))
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert all(k.startswith("transformer.") for k in tensors)
    assert all(f"{p}.alpha" in tensors and f"{p}.lora_A.weight" in tensors for p in prefixes)
    keymap = comfyui_reference.keymap("sd3")
    assert prefixes <= set(keymap["unet"]), sorted(prefixes - set(keymap["unet"]))[:3]
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])

    def output(comps):
        with torch.no_grad():
            return FAMILY.predict(comps, latents, t, FAMILY.encode_text(comps, ["red circle"]))

    fresh = FAMILY.load(cfg.model)
    base = output(fresh)
    load_lora_file(attach_network(FAMILY, fresh, cfg.network), result.checkpoints[-1].path)
    reloaded = output(fresh)
    assert torch.allclose(reloaded, output(trained), atol=1e-5)
    assert (reloaded - base).abs().max() > 1e-3  # the LoRA changed the model


def test_full_finetune_exports_a_transformer_that_reloads(tiny, demo_dataset, tmp_path):
    from trainer.loop import train

    cfg = _config(tiny, demo_dataset, tmp_path, {"network_type": "full"}, steps=3, lr=1e-3)
    comps = FAMILY.load(cfg.model)
    before = {k: v.clone() for k, v in comps.denoiser.state_dict().items()}
    result = train(cfg, components=comps)
    exported = result.checkpoints[-1].path
    assert result.checkpoints[-1].kind == "full"
    state = load_file(str(exported))
    assert transformer_layout(state) == ("sd3", "diffusers")  # what ComfyUI's Load Diffusion Model detects
    assert any(not torch.equal(before[k], v) for k, v in state.items())
    again = FAMILY.load(tiny.file_config(path=str(exported)))
    assert _same_weights(again.denoiser, comps.denoiser)
