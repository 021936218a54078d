"""What only SDXL does, on its tiny model (diffusers folder and ComfyUI single file). The shared contract is
tests/test_family_contract.py."""
from __future__ import annotations

import pytest
import torch

from trainer.config import ModelConfig
from trainer.errors import ModelLoadError
from trainer.families import get_family
from trainer.families.sdxl import sdxl_time_ids
from trainer.tiny import build_tiny_pipeline, single_file_path

from family_helpers import pixels

FAMILY = get_family("sdxl")
LONG = ", ".join(f"tag{i} photo of the blue sky" for i in range(20))


def test_single_file_has_clip_gs_tokenizer_and_vae_scale(folder_comps, file_comps):
    assert [t.pad_token for t in file_comps.tokenizers] == ["<|endoftext|>", "!"]
    assert folder_comps.vae.config.scaling_factor == file_comps.vae.config.scaling_factor == 0.13025


def test_encode_text_uses_penultimate_layers_and_pooled_clip_g(folder_comps):
    captions = ["a cat", LONG]
    with torch.no_grad():
        cond = FAMILY.encode_text(folder_comps, captions)
        skip2 = FAMILY.encode_text(folder_comps, captions, clip_skip=2)
        long = FAMILY.encode_text(folder_comps, captions, max_token_length=150)
        expected = []
        for encoder, tokenizer in zip(folder_comps.text_encoders, folder_comps.tokenizers):
            ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            out = encoder(ids.input_ids, output_hidden_states=True)
            expected.append(out.hidden_states[-2])
        pooled = out.text_embeds
    assert cond["encoder_hidden_states"].shape == (2, 77, 64) and cond["text_embeds"].shape == (2, 32)
    assert torch.allclose(cond["encoder_hidden_states"], torch.cat(expected, dim=-1), atol=1e-5)
    assert torch.allclose(cond["text_embeds"], pooled, atol=1e-5)
    assert not torch.allclose(skip2["encoder_hidden_states"], cond["encoder_hidden_states"])
    assert long["encoder_hidden_states"].shape == (2, 154, 64)
    assert torch.allclose(long["text_embeds"], cond["text_embeds"], atol=1e-6)  # pooled from the first window


def test_time_ids_default_to_the_latent_size(folder_comps):
    ids = sdxl_time_ids([(512, 768)], crops_top_left=[(16, 0)], target_sizes=[(256, 256)])
    assert ids.tolist() == [[512.0, 768.0, 16.0, 0.0, 256.0, 256.0]]
    with pytest.raises(ValueError):
        sdxl_time_ids([(64, 64)], crops_top_left=[])
    with torch.no_grad():
        cond = FAMILY.encode_text(folder_comps, ["a", "b"])
        latents = FAMILY.encode_images(folder_comps, pixels())
        t = torch.tensor([300, 300])
        default = FAMILY.predict(folder_comps, latents, t, cond)
        explicit = FAMILY.predict(folder_comps, latents, t, {**cond, "time_ids": sdxl_time_ids([(64, 64)] * 2)})
        broadcast = FAMILY.predict(folder_comps, latents, t, {**cond, "time_ids": sdxl_time_ids([(64, 64)])})
        other = FAMILY.predict(folder_comps, latents, t, {**cond, "time_ids": sdxl_time_ids([(1024, 1024)] * 2)})
    assert default.shape == latents.shape == (2, 4, 8, 8)
    assert torch.equal(default, explicit) and torch.equal(default, broadcast)
    assert not torch.allclose(default, other)


def test_sample_renders_with_and_without_negative_prompt(file_comps):
    plain = FAMILY.sample(file_comps, ["a blue sky"], seed=2, steps=2, cfg=3.0, width=64, height=64)
    negative = FAMILY.sample(file_comps, ["a blue sky"], seed=2, steps=2, cfg=3.0, width=64, height=64,
                             negative_prompt="a red cat")
    assert plain[0].size == negative[0].size == (64, 64)
    assert plain[0].tobytes() != negative[0].tobytes()


def test_lora_naming_targets_and_export_layout(folder_comps):
    assert {c: k.prefix for c, k in FAMILY.key_styles.items()} == {"unet": "lora_unet", "text_encoder": "lora_te1",
                                                                   "text_encoder_2": "lora_te2"}
    state = FAMILY.single_file_state_dict(folder_comps)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in state
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in state
    assert "model.diffusion_model.label_emb.0.0.weight" in state


def test_wrong_family_is_named(tiny_sdxl, tiny_sd15):
    with pytest.raises(ModelLoadError, match="set model.family to 'sdxl'"):
        get_family("sd15").load(ModelConfig(path=str(tiny_sdxl)))
    with pytest.raises(ModelLoadError, match="set model.family to 'sdxl'"):
        get_family("sd15").load(ModelConfig(path=str(single_file_path(tiny_sdxl))))
    with pytest.raises(ModelLoadError, match="set model.family to 'sd15'"):
        FAMILY.load(ModelConfig(path=str(single_file_path(tiny_sd15))))


def test_pooling_uses_the_tokenizers_eos_when_the_vocabulary_is_padded(tmp_path):
    # A single file only tells the embedding size (600 here); CLIP must still pool at the tokenizer's EOS token.
    folder = build_tiny_pipeline(tmp_path / "padded", family="sdxl", seed=4, vocab_size=600, single_file=True)
    comps = FAMILY.load(ModelConfig(path=str(single_file_path(folder))))
    clip_g, tokenizer = comps.text_encoders[1], comps.tokenizers[1]
    assert clip_g.config.vocab_size == 600 and clip_g.text_model.eos_token_id == tokenizer.eos_token_id
    with torch.no_grad():
        pooled = FAMILY.encode_text(comps, ["a cat"])["text_embeds"]
        ids = tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        last = clip_g(ids).last_hidden_state
        at_eos = clip_g.text_projection(last[0, int((ids[0] == tokenizer.eos_token_id).nonzero()[0])])
    assert torch.allclose(pooled[0], at_eos, atol=1e-6)
