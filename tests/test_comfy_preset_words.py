"""The MODEL path's target presets (``nodes/comfy_presets.preset_modules``) read module names by their words, also the
parts of underscore-joined words: ComfyUI's Flux / Chroma / Qwen-Image blocks call their attention and MLP layers
``img_attn.proj`` / ``txt_mlp.0``, Wan ``self_attn.o``.

On SD1.5, SDXL, SD3 medium, SD3.5 medium (MMDiT-X: a second self-attention ``attn2`` in the first 13 blocks) and
Flux.1 dev, every preset selects the weights the diffusers families' preset selects (``trainer/lora_targets.py``),
checked on the full-size denoisers built on meta. The two sides pair through ComfyUI 0.8.0's own LoRA key map
(vendored in tests/data): each diffusers module's export key names the ComfyUI weight it patches, whole or a slice of
a fused one (SD3/Flux ``qkv``, Flux's single-block ``linear1``). ComfyUI's modules are stood in for by modules of the
paired diffusers module's kind (Linear, Conv2d with its kernel) under ComfyUI's real names, which is all the MODEL
path's selection reads. A fused weight counts as chosen by the diffusers preset when any of its slices is (a LoRA on
the MODEL path adapts the whole fused layer). tests/comfyui_e2e/model_path_trained_equivalence.py compares the
trained LoRAs in ComfyUI's own process."""
from __future__ import annotations

import importlib
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import comfy_stubs  # noqa: E402
from trainer.config import TARGET_PRESETS  # noqa: E402
from trainer.families import get_family  # noqa: E402
from trainer.full_size import build_meta  # noqa: E402


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
        "double_blocks.0.img_mod.lin", "single_blocks.0.linear1", "single_blocks.0.linear2",
        "single_blocks.0.modulation.lin",
        "time_in.in_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"]


def test_flux_blocks_attention_and_mlp_layers_are_attn_mlp(preset_modules):
    """Single-stream blocks fuse q/k/v with the MLP input (linear1: attn) and the attention output with the MLP
    output (linear2: mlp), as the diffusers Flux preset trains q/k/v with attn and proj_mlp/proj_out with attn_mlp;
    the final output projection trains with attn_mlp (the diffusers preset's proj_out), its modulation does not."""
    attn = FLUX[:2] + ["double_blocks.0.txt_attn.proj", "single_blocks.0.linear1"]
    assert chosen(preset_modules, FLUX, "attn") == attn
    assert chosen(preset_modules, FLUX, "attn_mlp") == FLUX[:6] + FLUX[7:9] + ["final_layer.linear"]
    assert "single_blocks.0.modulation.lin" not in chosen(preset_modules, FLUX, "attn_mlp")


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
    final = ["diffusion_model.proj_out", "diffusion_model.final_layer.linear",
             "diffusion_model.output_blocks.0.1.proj_out"]
    assert chosen(preset_modules, final, "attn_mlp") == final[:2]  # final output projections, not a block's


# --- both paths select the same weights on the full-size models ---------------------------------------------------
def sd35_medium():
    """SD3.5 medium's transformer (stabilityai/stable-diffusion-3.5-medium's config) on meta."""
    import diffusers

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


# (case, Crucible family, ComfyUI key map, builder of the diffusers denoiser)
CASES = [("sd15", "sd15", "sd15", None), ("sdxl", "sdxl", "sdxl", None), ("sd3-medium", "sd3", "sd3", None),
         ("sd3.5-medium", "sd3", "sd3", sd35_medium), ("flux-dev", "flux", "flux", None)]


def peft_matches(name: str, entries) -> bool:
    """peft's ``target_modules`` rule for a list: the name equals an entry or ends with ``"." + entry``."""
    return any(name == e or name.endswith("." + e) for e in entries)


def paired(family: str, keymap: str, build, reference):
    """(diffusers module → ComfyUI weight it patches, ComfyUI stand-in modules by name, ComfyUI's mapped weights)."""
    fam = get_family(family)
    component = fam.denoiser_name
    model = build() if build else build_meta(family, component)
    kmap = reference.keymap(keymap)["unet"]
    style = fam.key_styles[component]
    weight_of, stand_ins = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        target = kmap.get(style.module_key(name))
        assert target is not None, f"{family}: ComfyUI maps no key for the diffusers module {name}"
        weight = target if isinstance(target, str) else target[0]
        weight_of[name] = weight
        kind = (torch.nn.Linear(1, 1, device="meta") if isinstance(module, torch.nn.Linear)
                else torch.nn.Conv2d(1, 1, module.kernel_size, device="meta"))
        assert type(stand_ins.setdefault(weight.removesuffix(".weight"), kind)) is type(kind), weight
    # every weight of the real model has ComfyUI's generic key (model_lora_keys_unet), whether this file's model
    # had the module or not (SD3 medium has no attn2; the map still sends the diffusers attn2 keys there)
    mapped = {w for w in kmap.values() if isinstance(w, str)} | set(weight_of.values())
    return weight_of, stand_ins, mapped


@pytest.mark.parametrize("case,family,keymap,build", CASES, ids=[c[0] for c in CASES])
def test_each_preset_trains_the_same_weights_on_both_paths(case, family, keymap, build, preset_modules,
                                                            comfyui_reference):
    weight_of, stand_ins, mapped = paired(family, keymap, build, comfyui_reference)
    fam = get_family(family)
    for preset in TARGET_PRESETS:
        entries = fam.lora_target_modules(fam.denoiser_name, preset)
        diffusers_side = {w for n, w in weight_of.items() if peft_matches(n, entries)}
        model_side = {n + ".weight" for n in preset_modules(stand_ins, preset, mapped)}
        only_model, only_diffusers = sorted(model_side - diffusers_side), sorted(diffusers_side - model_side)
        assert not only_model and not only_diffusers, (
            f"{case} {preset}: {len(only_model)} weights only the MODEL path trains (e.g. {only_model[:3]}), "
            f"{len(only_diffusers)} only the diffusers path (e.g. {only_diffusers[:3]})")
