"""What only SD1.5 does, on its tiny model (diffusers folder and ComfyUI single file). The shared contract is
tests/test_family_contract.py."""
from __future__ import annotations

import shutil

import pytest
import torch

from trainer.config import ModelConfig
from trainer.errors import ConfigError, ModelLoadError
from trainer.families import get_family
from trainer.families.clip_text import chunked_token_ids
from trainer.tiny import single_file_path

FAMILY = get_family("sd15")
LONG = ", ".join(f"tag{i} photo of the red cat" for i in range(20))  # well over 75 tokens


def test_the_schedule_is_sds_scaled_linear_epsilon(folder_comps, file_comps):
    for comps in (folder_comps, file_comps):
        assert comps.noise_scheduler.config.prediction_type == "epsilon"
        assert comps.noise_scheduler.config.beta_schedule == "scaled_linear"


def test_encode_text_shapes_clip_skip_and_long_captions(folder_comps):
    with torch.no_grad():
        last = FAMILY.encode_text(folder_comps, ["a cat", LONG])["encoder_hidden_states"]
        penultimate = FAMILY.encode_text(folder_comps, ["a cat", LONG], clip_skip=2)["encoder_hidden_states"]
        long = FAMILY.encode_text(folder_comps, ["a cat", LONG], max_token_length=150)["encoder_hidden_states"]
    assert last.shape == (2, 77, 32) and penultimate.shape == (2, 77, 32)
    assert not torch.allclose(last, penultimate)
    assert long.shape == (2, 154, 32)
    assert torch.allclose(long[:, :77], last, atol=1e-6)  # the first window is the 75-token encoding
    assert not torch.allclose(long[1, 77:], long[0, 77:])  # the long caption's second window carries its tail
    with pytest.raises(ConfigError, match="clip_skip"):
        FAMILY.encode_text(folder_comps, ["a cat"], clip_skip=4)  # the tiny CLIP has 3 layers


def test_chunked_token_ids_wraps_each_window(folder_comps):
    tok = folder_comps.tokenizers[0]
    ids = chunked_token_ids(tok, ["a cat", LONG], max_token_length=150)
    assert ids.shape == (2, 2, 77)
    assert (ids[:, :, 0] == tok.bos_token_id).all()
    short = ids[0, 0].tolist()
    assert short[:4] == [tok.bos_token_id, *tok("a cat", add_special_tokens=False).input_ids, tok.eos_token_id]
    assert ids[1, 1, -1] == tok.eos_token_id or ids[1, 1, -1] == tok.pad_token_id
    body = tok(LONG, add_special_tokens=False).input_ids
    assert ids[1, 0, 1:76].tolist() == body[:75] and ids[1, 1, 1:76].tolist() == body[75:150]
    with pytest.raises(ConfigError, match="max_token_length"):
        chunked_token_ids(tok, ["a"], max_token_length=100)


def test_blocks_are_kohyas_sd15_layout(folder_comps):
    names = [n for n, _ in folder_comps.denoiser.named_modules()]
    # kohya's SD1.5 layout: 0-11 = IN00-IN11, 12 = MID, 13-24 = OUT00-OUT11
    assert FAMILY.block_index("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == 1
    assert FAMILY.block_index("unet", "up_blocks.1.resnets.2.conv1.lora_A.default") == 18
    assert FAMILY.block_index("unet", "mid_block.attentions.0.proj_in") == 12
    assert FAMILY.block_index("unet", "conv_in") == 0
    assert FAMILY.block_index("text_encoder", "encoder.layers.0.mlp.fc1") is None
    blocks = {FAMILY.block_index("unet", n) for n in names} - {None}
    assert blocks == {0, 1, 3, 4, 12, 13, 14, 15, 16, 17}  # the tiny UNet: 2 down/up blocks, 1 layer each


def test_full_export_round_trips_through_the_single_file_loader(folder_comps, tiny_sd15, tmp_path):
    from trainer.fileio import save_safetensors

    state = FAMILY.single_file_state_dict(folder_comps)
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in state)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.") for k in state)
    save_safetensors(tmp_path / "export.safetensors", state)
    again = FAMILY.load(ModelConfig(path=str(tmp_path / "export.safetensors"),
                                    tokenizer_path=str(tiny_sd15 / "tokenizer")))
    original = folder_comps.denoiser.state_dict()
    assert all(torch.equal(again.denoiser.state_dict()[k], v) for k, v in original.items())


def test_options_prediction_zero_snr_and_vae_path(tiny_sd15):
    cfg = ModelConfig(path=str(tiny_sd15), prediction_type="v_prediction", zero_terminal_snr=True,
                      vae_path=str(single_file_path(tiny_sd15)))
    comps = FAMILY.load(cfg)
    assert comps.noise_scheduler.config.prediction_type == "v_prediction"
    assert comps.noise_scheduler.config.rescale_betas_zero_snr
    assert FAMILY.pipeline(comps).scheduler.config.timestep_spacing == "trailing"
    with pytest.raises(ConfigError, match="epsilon or v_prediction"):
        FAMILY.load(ModelConfig(path=str(tiny_sd15), prediction_type="flow"))


def test_bad_paths_are_refused(tmp_path, tiny_sd15):
    with pytest.raises(ModelLoadError, match="model.path is empty"):
        FAMILY.load(ModelConfig())
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers sd15 pipeline folder"):
        FAMILY.load(ModelConfig(path=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="does not exist"):
        FAMILY.load(ModelConfig(path=str(tmp_path / "missing.safetensors")))
    pickled = shutil.copytree(tiny_sd15, tmp_path / "pickled")
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save({"conv_in.weight": torch.zeros(1)}, weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(ModelLoadError, match=r"unet.*pickle \.bin weights are refused"):
        FAMILY.load(ModelConfig(path=str(pickled)))
