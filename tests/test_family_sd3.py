"""What only SD3 does, on a tiny SD3.5-style model: ComfyUI split files and full checkpoint, its text conditioning
(CLIP-L + CLIP-G + optional T5), layouts and loading errors. The shared contract is tests/test_family_contract.py."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import ModelConfig
from trainer.errors import ConfigError, ModelLoadError
from trainer.families import get_family
from trainer.families.split_files import transformer_layout
from trainer.families.t5_text import find_t5_tokenizer_dir
from trainer.families.sd3 import sd3_original_to_diffusers, sd3_transformer_config
from trainer.fileio import save_safetensors
from tiny_flow import sd3_to_original, text_encoder_file_state, tiny_t5_config

from family_helpers import pixels, same_weights

FAMILY = get_family("sd3")
CAPTIONS = ["a red circle", "blue square, flat colour, simple shape"]


def _outputs(comps):
    with torch.no_grad():
        cond = FAMILY.encode_text(comps, CAPTIONS)
        latents = FAMILY.encode_images(comps, pixels())
        pred = FAMILY.predict(comps, latents, torch.tensor([100.0, 900.0]), cond)
    return cond["encoder_hidden_states"], cond["pooled_projections"], latents, pred


def test_split_files_are_sd3s_three_encoders_vae_and_schedule(folder_comps, file_comps):
    assert file_comps.text_encoder_names == ("text_encoder", "text_encoder_2", "text_encoder_3")
    assert file_comps.vae.config.scaling_factor == 1.5305 and file_comps.vae.config.shift_factor == 0.0609
    assert dict(file_comps.noise_scheduler.config)["shift"] == dict(folder_comps.noise_scheduler.config)["shift"] == 3.0


def test_full_comfyui_checkpoint_with_embedded_vae_and_clips(tiny_sd3, folder_comps, tmp_path):
    """sd3.5_*.safetensors style: model.diffusion_model. + first_stage_model. + text_encoders.* (T5 given apart)."""
    from trainer.families.ldm_layout import vae_to_ldm

    state = {f"model.diffusion_model.{k}": v for k, v in sd3_to_original(folder_comps.denoiser.state_dict()).items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(folder_comps.vae.state_dict()).items()})
    for kind, encoder in zip(("clip_l", "clip_g"), folder_comps.text_encoders):
        state.update({f"text_encoders.{kind}.transformer.{k}": v for k, v in text_encoder_file_state(encoder).items()})
    models = tiny_sd3.comfy_root / "models" / "checkpoints"
    save_safetensors(models / "sd3-all-in-one.safetensors", state)
    t5_file = tiny_sd3.text_encoder_files[2]
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


def test_text_encoder_files_are_told_apart_and_t5_is_optional(tiny_sd3, folder_comps):
    shuffled = FAMILY.load(tiny_sd3.file_config(text_encoder_paths=tuple(map(str, tiny_sd3.text_encoder_files[::-1]))))
    assert all(same_weights(a, b) for a, b in zip(shuffled.text_encoders, folder_comps.text_encoders))
    comps = FAMILY.load(tiny_sd3.file_config(text_encoder_paths=tuple(map(str, tiny_sd3.text_encoder_files[:2]))))
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
        latents = FAMILY.encode_images(folder_comps, pixels())
        mean = vae.encode(pixels()).latent_dist.mean
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


def test_loading_errors_name_the_input(tiny_sd3, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    from trainer.families.ldm_layout import vae_to_ldm
    from trainer.tiny import tiny_vae_config

    monkeypatch.delenv("CRUCIBLE_COMFY_TOKENIZER_DIR", raising=False)
    clip_l, clip_g, t5 = map(str, tiny_sd3.text_encoder_files)
    with pytest.raises(ModelLoadError, match="model.path is empty"):
        FAMILY.load(ModelConfig(family="sd3"))
    with pytest.raises(ConfigError, match="prediction_type"):
        FAMILY.load(tiny_sd3.folder_config(prediction_type="epsilon"))
    with pytest.raises(ModelLoadError, match="CLIP-G"):
        FAMILY.load(tiny_sd3.file_config(text_encoder_paths=(clip_l, t5)))
    with pytest.raises(ModelLoadError, match="same size"):
        FAMILY.load(tiny_sd3.file_config(text_encoder_paths=(clip_l, clip_l, t5)))
    with pytest.raises(ModelLoadError, match=r"text_encoder_paths\[0\].*not a CLIP or T5"):
        FAMILY.load(tiny_sd3.file_config(text_encoder_paths=(str(tiny_sd3.vae_file), clip_g)))
    with pytest.raises(ModelLoadError, match="no VAE"):
        FAMILY.load(tiny_sd3.file_config(vae_path=""))
    with pytest.raises(ModelLoadError, match="holds no SD3 transformer"):
        FAMILY.load(tiny_sd3.file_config(path=clip_l))
    small_vae = save_safetensors(tmp_path / "sd15-vae.safetensors",
                                 vae_to_ldm(AutoencoderKL(**tiny_vae_config("sd15")).state_dict()))
    with pytest.raises(ModelLoadError, match="4 latent channels"):
        FAMILY.load(tiny_sd3.file_config(vae_path=str(small_vae)))
    vocab = load_file(t5)["shared.weight"].shape[0]
    narrow_t5 = T5EncoderModel(T5Config(**{**tiny_t5_config(vocab), "d_model": 48}))
    narrow = save_safetensors(tmp_path / "t5-base.safetensors", text_encoder_file_state(narrow_t5))
    with pytest.raises(ModelLoadError, match="do not fit the SD3 transformer: its T5 input is 96 wide but they give 48"):
        FAMILY.load(tiny_sd3.file_config(text_encoder_paths=(clip_l, clip_g, str(narrow))))
    # outside a ComfyUI tree no T5 tokenizer can be found; the message lists where it looked and what to set
    lone = tmp_path / "lone"
    lone.mkdir()
    for file in (tiny_sd3.transformer_file, *tiny_sd3.text_encoder_files):
        shutil.copy(file, lone / file.name)
    moved = tiny_sd3.file_config(path=str(lone / tiny_sd3.transformer_file.name),
                             text_encoder_paths=tuple(str(lone / f.name) for f in tiny_sd3.text_encoder_files),
                             tokenizer_path=str(tiny_sd3.comfy_root / "comfy" / "sd1_tokenizer"))
    with pytest.raises(ModelLoadError, match="no T5 tokenizer found.*tokenizer_path"):
        FAMILY.load(moved)
    assert find_t5_tokenizer_dir(tiny_sd3.folder_config(), "tokenizer_3") == tiny_sd3.folder / "tokenizer_3"


def test_sample_takes_the_negative_prompt_and_needs_multiples_of_16(file_comps):
    kwargs = dict(seed=3, steps=2, cfg=4.0, width=64, height=64)
    plain = FAMILY.sample(file_comps, ["a red circle"], **kwargs)
    negative = FAMILY.sample(file_comps, ["a red circle"], **kwargs, negative_prompt="green")
    assert plain[0].tobytes() != negative[0].tobytes()
    with pytest.raises(ConfigError, match="multiples of 16"):
        FAMILY.sample(file_comps, ["x"], **{**kwargs, "width": 72})
