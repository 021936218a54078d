"""Single-file (ComfyUI/LDM) conversion, config derivation on full-size layouts, safety and tokenizer search."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from trainer.config import ModelConfig
from trainer.errors import ModelLoadError
from trainer.families import get_family
from trainer.families import ldm_configs as lc
from trainer.families import ldm_layout as ll
from trainer.families import single_file as sf
from trainer.families import tokenizers as tk
from trainer.tiny import build_tiny_components, build_tiny_tokenizer, single_file_path

# The released models' diffusers configs (the fields that describe the architecture).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], use_linear_projection=True,
                 transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _assert_subset(derived: dict, standard: dict) -> None:
    for key, value in standard.items():
        assert _plain(derived[key]) == _plain(value), f"{key}: derived {derived[key]!r}, standard {value!r}"


def _shapes(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# --- full-size layouts on the meta device ------------------------------------------------------------------------

@pytest.mark.parametrize("family, standard, pooled", [("sd15", SD15_UNET, None), ("sdxl", SDXL_UNET, 1280)])
def test_full_size_unet_config_is_derived_from_shapes(family, standard, pooled):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**standard)
    ldm = ll.unet_to_ldm(unet.state_dict())
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in ldm or family == "sdxl"
    assert "middle_block.1.proj_in.weight" in ldm and "out.2.weight" in ldm
    derived = lc.unet_config_from_ldm(ldm, family, pooled_dim=pooled)
    _assert_subset(derived, standard)
    # diffusers' own converter maps our LDM names back onto exactly the original keys and shapes
    back = convert_ldm_unet_checkpoint({ll.UNET_PREFIX + k: v for k, v in ldm.items()}, derived)
    assert {k: tuple(v.shape) for k, v in back.items()} == _shapes(unet)


def test_full_size_sdxl_unet_uses_the_original_ldm_names():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ldm = ll.unet_to_ldm(UNet2DConditionModel(**SDXL_UNET).state_dict())
    # names ComfyUI's SDXL detection and kohya's LDM-named LoRAs rely on
    for key in ("input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight", "input_blocks.3.0.op.weight",
                "middle_block.1.transformer_blocks.9.ff.net.2.weight", "output_blocks.2.2.conv.weight",
                "output_blocks.5.2.conv.weight", "label_emb.0.0.weight", "time_embed.2.weight",
                "output_blocks.8.0.skip_connection.weight"):
        assert key in ldm, key
    assert tuple(ldm["label_emb.0.0.weight"].shape) == (1280, 2816)


def test_full_size_vae_and_clip_configs_are_derived_from_shapes():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    vae_ldm = ll.vae_to_ldm(vae.state_dict())
    assert tuple(vae_ldm["encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)  # conv 1x1 as in LDM files
    assert "decoder.up.3.upsample.conv.weight" in vae_ldm and "encoder.down.1.block.0.nin_shortcut.weight" in vae_ldm
    for family, scale in (("sd15", 0.18215), ("sdxl", 0.13025)):
        derived = lc.vae_config_from_ldm(vae_ldm, family)
        _assert_subset(derived, SD_VAE)
        assert derived["scaling_factor"] == scale
    prefix_l = get_family("sd15").single_file_prefixes["text_encoder"]
    l_ldm = ll.clip_l_to_ldm(clip_l.state_dict(), prefix_l)
    assert f"{prefix_l}text_model.encoder.layers.11.mlp.fc2.weight" in l_ldm
    _assert_subset(lc.clip_config_from_ldm(lc.strip_prefix(l_ldm, prefix_l), "clip_l"), CLIP_L)
    prefix_g = get_family("sdxl").single_file_prefixes["text_encoder_2"]
    g_ldm = ll.clip_g_to_ldm(clip_g.state_dict(), prefix_g)
    assert tuple(g_ldm[f"{prefix_g}transformer.resblocks.31.attn.in_proj_weight"].shape) == (3840, 1280)
    assert f"{prefix_g}text_projection" in g_ldm and f"{prefix_g}ln_final.weight" in g_ldm
    _assert_subset(lc.clip_config_from_ldm(lc.strip_prefix(g_ldm, prefix_g), "clip_g"), CLIP_G)


# --- exact round trips on tiny models ----------------------------------------------------------------------------

def test_clip_g_round_trip_through_diffusers_openclip_converter():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    comps = build_tiny_components("sdxl", seed=3)
    clip_g = comps.text_encoders[1]
    prefix = get_family("sdxl").single_file_prefixes["text_encoder_2"]
    ldm = ll.clip_g_to_ldm(clip_g.state_dict(), prefix)
    back = convert_open_clip_checkpoint(clip_g, ldm, prefix=prefix)
    original = clip_g.state_dict()
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_vae_file_in_any_layout_loads_to_the_same_weights(tmp_path):
    comps = build_tiny_components("sd15", seed=5)
    original = comps.vae.state_dict()
    ldm = ll.vae_to_ldm(original)
    layouts = {"prefixed": {ll.VAE_PREFIX + k: v for k, v in ldm.items()}, "bare": ldm, "diffusers": original}
    for name, weights in layouts.items():
        vae = sf.load_vae(weights, "sd15", name)
        assert all(torch.equal(vae.state_dict()[k], original[k]) for k in original), name


def test_single_file_markers_set_prediction_type_and_zero_snr(tmp_path):
    from trainer.families.sd15 import make_noise_scheduler

    comps = build_tiny_components("sd15", tokenizer_dir=tmp_path / "m_tokenizer")
    comps.noise_scheduler = make_noise_scheduler("v_prediction", zero_terminal_snr=True)
    state = ll.diffusers_to_single_file(comps, "sd15")
    assert ll.V_PRED_KEY in state and ll.ZTSNR_KEY in state
    from safetensors.torch import save_file

    save_file(state, tmp_path / "m.safetensors")
    loaded = get_family("sd15").load(ModelConfig(path=str(tmp_path / "m.safetensors")))
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    assert loaded.noise_scheduler.config.rescale_betas_zero_snr
    explicit = get_family("sd15").load(ModelConfig(path=str(tmp_path / "m.safetensors"), prediction_type="epsilon"))
    assert explicit.noise_scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("dropped, reported", [
    ("middle_block.1.proj_out.weight", "mid_block.attentions.0.proj_out"),  # found when the weights are assigned
    ("input_blocks.1.0.out_layers.3.weight", "input_blocks.1.0.out_layers.3.weight"),  # needed to derive the config
])
def test_incomplete_checkpoint_is_refused_with_the_missing_tensor(tiny_sd15, tmp_path, dropped, reported):
    from safetensors.torch import load_file, save_file

    state = load_file(single_file_path(tiny_sd15))
    del state[ll.UNET_PREFIX + dropped]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(ModelLoadError, match="broken.safetensors") as err:
        get_family("sd15").load(ModelConfig(path=str(tmp_path / "broken.safetensors"),
                                            tokenizer_path=str(tiny_sd15 / "tokenizer")))
    assert reported in str(err.value)


# --- what is refused -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(ModelLoadError, match=r"(?i)convert it to \.safetensors"):
        get_family("sd15").load(ModelConfig(path=str(path)))


def test_renamed_pickle_and_missing_files_are_refused(tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        sf.read_checkpoint(fake)
    with pytest.raises(ModelLoadError, match="does not exist"):
        sf.read_checkpoint(tmp_path / "nothing.safetensors")


def test_family_detection_from_keys():
    assert sf.detect_family(["model.diffusion_model.input_blocks.0.0.weight",
                             "cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd15"
    assert sf.detect_family(["conditioner.embedders.1.model.positional_embedding"]) == "sdxl"
    assert sf.detect_family(["conditioner.embedders.0.model.text_projection"]) == "sdxl_refiner"
    assert sf.detect_family(["cond_stage_model.model.token_embedding.weight"]) == "sd2"
    assert sf.detect_family(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]) == "sd3"
    assert sf.detect_family(["lora_unet_down.weight"]) is None
    with pytest.raises(ModelLoadError, match="set model.family to 'sdxl'"):
        sf.check_family({"conditioner.embedders.1.model.positional_embedding": None}, "sd15", "x.safetensors")
    with pytest.raises(ModelLoadError, match="no VAE"):
        sf.check_family({"model.diffusion_model.input_blocks.0.0.weight": None,
                         "cond_stage_model.transformer.text_model.x": None}, "sd15", "x.safetensors")


# --- tokenizer search ----------------------------------------------------------------------------------------------

@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No tokenizer hint from the environment or the working directory."""
    monkeypatch.delenv(tk.ENV_TOKENIZER_DIR, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_tokenizer_error_lists_every_place_tried(isolated):
    model = isolated / "models" / "checkpoints" / "mine.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"")
    with pytest.raises(ModelLoadError) as err:
        tk.find_clip_tokenizer_dir(ModelConfig(path=str(model)))
    message = str(err.value)
    for place in ("mine_tokenizer", str(model.parent / "tokenizer"), str(isolated / "comfy" / "sd1_tokenizer"),
                  tk.ENV_TOKENIZER_DIR, "model.tokenizer_path"):
        assert place in message, place


def test_tokenizer_found_in_comfyui_places(isolated, monkeypatch):
    root = isolated / "ComfyUI"
    build_tiny_tokenizer(root / "comfy" / "sd1_tokenizer")
    model = root / "models" / "checkpoints" / "sub" / "mine.safetensors"
    model.parent.mkdir(parents=True)
    cfg = ModelConfig(path=str(model))
    assert tk.find_clip_tokenizer_dir(cfg) == root / "comfy" / "sd1_tokenizer"  # ComfyUI root above the file
    elsewhere = ModelConfig(path=str(isolated / "mine.safetensors"))
    with pytest.raises(ModelLoadError):
        tk.find_clip_tokenizer_dir(elsewhere)
    monkeypatch.syspath_prepend(str(root))  # ComfyUI's root is on sys.path while it runs
    assert tk.find_clip_tokenizer_dir(elsewhere) == root / "comfy" / "sd1_tokenizer"
    monkeypatch.setenv(tk.ENV_TOKENIZER_DIR, str(build_tiny_tokenizer(isolated / "hint")))
    assert tk.find_clip_tokenizer_dir(elsewhere) == isolated / "hint"  # the hint comes before sys.path


def test_tokenizer_beside_the_file_and_explicit_path(isolated):
    build_tiny_tokenizer(isolated / "mine_tokenizer")
    cfg = ModelConfig(path=str(isolated / "mine.safetensors"))
    assert tk.find_clip_tokenizer_dir(cfg) == isolated / "mine_tokenizer"
    explicit = ModelConfig(path=str(isolated / "mine.safetensors"), tokenizer_path=str(isolated / "empty"))
    with pytest.raises(ModelLoadError, match="model.tokenizer_path"):
        tk.find_clip_tokenizer_dir(explicit)


def test_clip_g_pads_with_exclamation_mark(tmp_path):
    folder = build_tiny_tokenizer(tmp_path / "tok")
    clip_l, clip_g = tk.load_clip_tokenizer(folder, "clip_l"), tk.load_clip_tokenizer(folder, "clip_g")
    assert clip_g.pad_token == "!" and clip_g.pad_token_id == 0
    assert clip_l.pad_token_id == clip_l.eos_token_id
    assert clip_l.model_max_length == clip_g.model_max_length == 77
    ids = clip_l("a photo of the cat").input_ids
    assert ids[0] == clip_l.bos_token_id and ids[-1] == clip_l.eos_token_id and len(ids) == 7  # 5 words, merges applied


def test_tokenizer_larger_than_the_text_encoder_is_refused(tiny_sd15, tmp_path):
    big = shutil.copytree(tiny_sd15 / "tokenizer", tmp_path / "big")
    vocab = json.loads((big / "vocab.json").read_text(encoding="utf-8"))
    vocab.update({f"extra{i}</w>": len(vocab) + i for i in range(10)})
    (big / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        get_family("sd15").load(ModelConfig(path=str(single_file_path(tiny_sd15)), tokenizer_path=str(big)))


def test_tiny_builder_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_tiny_components("sd15", seed=0), build_tiny_components("sd15", seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    c = build_tiny_components("sd15", seed=1)
    sa, sb, sc = (x.denoiser.state_dict() for x in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv_in.weight"], sc["conv_in.weight"])
