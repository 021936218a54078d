"""The MODEL path's target presets (``nodes/comfy_presets.preset_modules``) read module names by their words, also the
parts of underscore-joined words: ComfyUI's Flux / Chroma / Qwen-Image blocks call their attention and MLP layers
``img_attn.proj`` / ``txt_mlp.0``, Wan ``self_attn.o``. ``attn_mlp`` on them must train what the diffusers path's
``attn_mlp`` trains there (tests/comfyui_e2e/model_path_trained_equivalence.py compares the trained LoRAs)."""
from __future__ import annotations

import importlib

import pytest
import torch

import comfy_stubs


@pytest.fixture(scope="module")
def preset_modules(tmp_path_factory):
    _, restore = comfy_stubs.install(tmp_path_factory.mktemp("comfyui"))
    try:
        comfy_stubs.load_pack()
        yield importlib.import_module(f"{comfy_stubs.PACK_NAME}.nodes.comfy_family").preset_modules
    finally:
        restore()


def chosen(preset_modules, names: list[str], preset: str) -> list[str]:
    modules = {name: torch.nn.Linear(2, 2) for name in names}
    return preset_modules(modules, preset, {n + ".weight" for n in names})


FLUX = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.0",
        "double_blocks.0.img_mlp.2", "double_blocks.0.txt_attn.proj", "double_blocks.0.txt_mlp.0",
        "double_blocks.0.img_mod.lin", "single_blocks.0.linear1", "single_blocks.0.linear2", "single_blocks.0.modulation.lin",
        "time_in.in_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"]


def test_flux_blocks_attention_and_mlp_layers_are_attn_mlp(preset_modules):
    """Single-stream blocks fuse q/k/v with the MLP input (linear1: attn) and the attention output with the MLP
    output (linear2: mlp), as the diffusers Flux preset trains q/k/v with attn and proj_mlp/proj_out with attn_mlp;
    the final output projection trains with attn_mlp (the diffusers preset's proj_out), its modulation does not."""
    attn = FLUX[:2] + ["double_blocks.0.txt_attn.proj", "single_blocks.0.linear1"]
    assert chosen(preset_modules, FLUX, "attn") == attn
    assert chosen(preset_modules, FLUX, "attn_mlp") == FLUX[:6] + FLUX[7:9] + ["final_layer.linear"]


def test_underscore_parts_do_not_widen_the_unet_presets(preset_modules):
    unet = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.ff.net.2",
            "input_blocks.1.1.proj_in", "input_blocks.1.0.emb_layers.1", "time_embed.0", "label_emb.0.0",
            "blocks.0.self_attn.o", "blocks.0.cross_attn.k"]
    assert chosen(preset_modules, unet, "attn_mlp") == [unet[0], unet[1], unet[6], unet[7]]


def test_block_output_projections_and_embedder_mlps_are_not_attention_or_mlp(preset_modules):
    """SDXL's transformer proj_out (a Linear) and SD3's timestep / pooled-text embedder MLPs train with all_linear,
    as on the diffusers path; SD3.5's second self-attention (attn2) is attention."""
    names = ["input_blocks.4.1.proj_out", "input_blocks.4.1.proj_in", "t_embedder.mlp.0", "y_embedder.mlp.2",
             "joint_blocks.0.x_block.attn2.qkv", "joint_blocks.0.x_block.attn2.proj", "joint_blocks.0.x_block.mlp.fc1"]
    assert chosen(preset_modules, names, "attn") == names[4:6]
    assert chosen(preset_modules, names, "attn_mlp") == names[4:]
    assert chosen(preset_modules, names, "all_linear") == names
