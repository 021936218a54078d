"""The stage's ``comfy_sd15`` checkpoint (``tests/comfy_sd15.py``) against what ComfyUI's Load Checkpoint
needs.

The real-ComfyUI stage loads the built file; this test catches a shape change in seconds, without ComfyUI, by
building the same modules on the meta device and checking the single-file tensors for the facts ComfyUI reads:

* ``comfy/model_detection.py`` derives the UNet config from the weights and ``comfy/supported_models.py`` matches it
  against ``SD15.unet_config`` (model_channels 320, context_dim 768, conv ``proj_in``, no ``label_emb``, no temporal
  layers); Stable Zero123, tried first, differs only by 8 input channels.
* The CLIP-L and VAE are built from fixed configs with uninitialised weights and loaded non-strictly, so every one
  of their tensors must be in the file with ComfyUI's shape. The CLIP side is compared with ComfyUI 0.8.0's own LoRA
  key map for SD1.5 (vendored in ``tests/data/comfyui-0.8.0``): every CLIP-L weight a LoRA can patch must exist.
"""
from __future__ import annotations

import re

import pytest

from trainer.families.single_file import diffusers_to_single_file
from comfy_sd15 import comfy_sd15_components

UNET = "model.diffusion_model."
CLIP = "cond_stage_model.transformer.text_model."
VAE = "first_stage_model."


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, ...]]:
    """Single-file key -> shape, from modules built without memory (accelerate's meta-device init)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        comps = comfy_sd15_components(seed=0)
    return {k: tuple(v.shape) for k, v in diffusers_to_single_file(comps, "sd15").items()}


def test_unet_has_the_facts_comfyui_detects_sd15_by(shapes):
    assert shapes[UNET + "input_blocks.0.0.weight"][:2] == (320, 4)  # model_channels, in_channels (not Zero123's 8)
    attn = sorted(k for k in shapes if k.startswith(UNET + "input_blocks.") and k.endswith("attn2.to_k.weight"))
    assert attn and shapes[attn[0]][1] == 768  # context_dim, read from the first input transformer
    proj_in = attn[0].split("transformer_blocks.")[0] + "proj_in.weight"
    assert len(shapes[proj_in]) == 4  # a 1x1 conv: use_linear_in_transformer False
    assert not any(k.startswith(UNET + "label_emb.") or "time_stack" in k or "time_mix" in k for k in shapes)
    resnet_out = re.compile(re.escape(UNET) + r"input_blocks\.\d+\.0\.out_layers\.3\.weight")
    widths = {shape[0] for k, shape in shapes.items() if resnet_out.match(k)}
    assert widths and all(w % 320 == 0 for w in widths)  # channel_mult = width // model_channels
    assert any(k.startswith(UNET + "input_blocks.") and k.endswith(".0.op.weight") for k in shapes)  # two levels


def test_text_encoder_has_every_clip_l_weight_comfyui_0_8_builds(shapes, comfyui_reference):
    keymap = comfyui_reference.keymap("sd15")
    # text_projection is not in SD1.5 files: ComfyUI initialises it to the identity itself.
    targets = {t for t in keymap["clip"].values() if isinstance(t, str) and t.startswith("clip_l.transformer.")
               and t != "clip_l.transformer.text_projection.weight"}
    ours = {"clip_l.transformer." + k.removeprefix("cond_stage_model.transformer.")
            for k in shapes if k.startswith(CLIP)}
    assert len(targets) > 70 and targets <= ours, sorted(targets - ours)[:5]
    assert shapes[CLIP + "embeddings.token_embedding.weight"] == (49408, 768)
    assert shapes[CLIP + "embeddings.position_embedding.weight"] == (77, 768)
    assert shapes[CLIP + "encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert not any(k.startswith(CLIP + "encoder.layers.12.") for k in shapes)


def test_vae_is_the_sd_vae_comfyui_builds(shapes):
    vae = {k.removeprefix(VAE): v for k, v in shapes.items() if k.startswith(VAE)}
    assert vae["encoder.conv_in.weight"] == (128, 3, 3, 3) and vae["decoder.conv_in.weight"] == (512, 4, 3, 3)
    assert [vae[f"encoder.down.{i}.block.1.conv2.weight"][0] for i in range(4)] == [128, 256, 512, 512]
    assert [vae[f"decoder.up.{i}.block.2.conv2.weight"][0] for i in range(4)] == [128, 256, 512, 512]
    assert "encoder.down.2.downsample.conv.weight" in vae  # without it ComfyUI builds the 4x upscaler's VAE
    assert vae["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)  # 1x1 convs, as the LDM VAE stores them
    assert vae["quant_conv.weight"] == (8, 8, 1, 1) and vae["post_quant_conv.weight"] == (4, 4, 1, 1)
    params = sum(_numel(s) for s in vae.values())
    assert params == 83_653_863  # the released SD VAE, to the parameter


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
