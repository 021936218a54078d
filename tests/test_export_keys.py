"""LoRA key names on the full-size architectures, checked against ComfyUI 0.8.0's own key maps.

Each model is built on the meta device (no memory, no download), peft adapters are injected for every target
preset, the exporter runs, and every written key must be one ComfyUI's LoraLoader maps
(vendored in ``tests/data/comfyui-0.8.0``, read through the ``comfyui_reference`` fixture), cover every trained module, hit no ComfyUI weight twice and carry
a scalar ``.alpha``.
"""
from __future__ import annotations

import re
import warnings
from functools import lru_cache

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from trainer.config import TARGET_PRESETS as PRESET_NAMES  # noqa: E402
from trainer.errors import ConfigError, CrucibleError  # noqa: E402
from trainer.export import adapter_layers, export_lora, export_peft_modules  # noqa: E402
from trainer.lora_keys import lora_prefix  # noqa: E402
from trainer.families import all_families, get_family  # noqa: E402
from trainer.lora_targets import lora_target_modules  # noqa: E402

# Suffixes ComfyUI 0.8.0 reads after a key prefix (lora_formats.md, plus comfy/weight_adapter/loha.py and lokr.py).
ACCEPTED_SUFFIXES = (
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".lora_B.weight", ".lora_A.weight",
    ".lora.up.weight", ".lora.down.weight", ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
    "_lora.up.weight", "_lora.down.weight", ".lora_B.default.weight", ".lora_A.default.weight", ".lora_B", ".lora_A",
    ".alpha", ".dora_scale", ".diff", ".diff_b", ".set_weight",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
)
UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight")

COMPONENTS = [(family.name, component) for family in all_families() for component in family.lora_targets]



from trainer.full_size import build_meta  # noqa: E402

# --- full-size models on the meta device -----------------------------------------------------------------------------

def build(family: str, component: str) -> nn.Module:
    """The published full-size architecture on the meta device (one definition: trainer/full_size.py)."""
    return build_meta(family, component)


def inject(model: nn.Module, config) -> nn.Module:
    """Real peft injection; the adapter weights are created on the meta device too (no memory, much faster)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.inject_adapter_in_model(config, model)


def component_map(reference, family: str, component: str) -> dict:
    return reference.keymap(family)["unet" if component == get_family(family).denoiser_name else "clip"]


# --- checks ------------------------------------------------------------------------------------------------------------

def split_key(key: str) -> tuple[str, str]:
    """Prefix and accepted suffix of a file key (the longest accepted suffix wins)."""
    for suffix in sorted(ACCEPTED_SUFFIXES, key=len, reverse=True):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise AssertionError(f"key {key!r} ends in no suffix ComfyUI reads")


def assert_loadable(reference, tensors: dict, family: str, component: str, trained: int) -> dict[str, object]:
    """ComfyUI's load-time view of an exported component; returns prefix -> target."""
    kmap = component_map(reference, family, component)
    groups: dict[str, dict[str, object]] = {}
    for key, value in tensors.items():
        prefix, suffix = split_key(key)
        assert prefix in kmap, f"{family}/{component}: ComfyUI would drop {key!r} (prefix not in its key map)"
        groups.setdefault(prefix, {})[suffix] = value
    assert len(groups) == trained, f"{len(groups)} key prefixes for {trained} trained modules"
    targets = {prefix: kmap[prefix] for prefix in groups}
    assert_no_double_hits(targets, groups)
    for prefix, parts in groups.items():
        assert ".alpha" in parts, f"{prefix} has no .alpha (ComfyUI would use scale 1.0)"
        assert parts[".alpha"].ndim == 0, f"{prefix}.alpha is not a scalar"
    return targets


def assert_no_double_hits(targets: dict[str, object], groups: dict[str, dict]) -> None:
    """No two prefixes patch the same ComfyUI weight, unless they patch disjoint slices of it."""
    whole: dict[str, str] = {}
    slices: dict[str, list[tuple[int, int, int, str]]] = {}
    for prefix, target in targets.items():
        if isinstance(target, str) or target[1] is None:
            weight = target if isinstance(target, str) else target[0]
            assert weight not in whole and weight not in slices, f"{prefix} and another prefix both patch {weight}"
            whole[weight] = prefix
            continue
        weight, (dim, offset, length) = target[0], target[1]
        assert weight not in whole, f"{prefix} patches a slice of {weight}, which another prefix patches whole"
        up = next((groups[prefix][s] for s in UP_SUFFIXES if s in groups[prefix]), None)
        if up is not None:
            assert up.shape[0] == length, f"{prefix}: {up.shape[0]} outputs for a {length}-row slice of {weight}"
        for other_dim, other_offset, other_length, other in slices.get(weight, []):
            assert dim == other_dim and (offset + length <= other_offset or other_offset + other_length <= offset), \
                f"{prefix} and {other} patch overlapping slices of {weight}"
        slices.setdefault(weight, []).append((dim, offset, length, prefix))


def all_modules(model: nn.Module, types) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, types)}


# --- tests -------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def widest(family: str, component: str) -> nn.Module:
    """The full-size component with a real peft LoRA (r 4, alpha 8) on every module of its widest preset.

    Narrower presets are checked on subsets of this adapter, chosen by peft's own target matching: the exporter
    handles each module on its own, so this equals injecting each preset separately, at a fraction of the time.
    """
    targets = lora_target_modules(family, component, PRESET_NAMES[-1])
    return inject(build(family, component), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))


def preset_modules(family: str, component: str, preset: str) -> set[str]:
    """The module names peft adapts for a preset (peft's matching, on the full-size module names)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = peft.LoraConfig(r=4, target_modules=lora_target_modules(family, component, preset))
    return {name for name in adapter_layers(widest(family, component)) if check_target_module_exists(config, name)}


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("family,component", COMPONENTS)
def test_every_preset_exports_loadable_keys(family, component, preset, comfyui_reference):
    model = widest(family, component)
    trained = preset_modules(family, component, preset)
    assert trained, "the preset trains nothing"
    state = {k: v for k, v in peft.get_peft_model_state_dict(model).items() if k.rsplit(".", 2)[0] in trained}
    assert {k.rsplit(".", 2)[0] for k in state} == trained
    tensors = export_lora(family, {component: state}, configs={component: model.peft_config["default"]})
    assert_loadable(comfyui_reference, tensors, family, component, len(trained))
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {8.0}


@pytest.mark.parametrize("family,component", COMPONENTS)
def test_presets_cover_what_they_promise(family, component):
    """No dead entries; presets nest; all_linear is every nn.Linear, all_linear_conv adds every nn.Conv2d."""
    model = build(family, component)
    names = {name for name, _ in model.named_modules()}
    for preset, entries in get_family(family).lora_targets[component].items():
        for entry in entries:
            assert any(n == entry or n.endswith("." + entry) for n in names), f"{preset} entry {entry!r} matches nothing"
    trained = {preset: preset_modules(family, component, preset) for preset in PRESET_NAMES}
    assert trained["attn"] < trained["attn_mlp"] <= trained["all_linear"] <= trained["all_linear_conv"]
    linear = all_modules(model, nn.Linear) - {"text_projection"}  # left out on purpose, see trainer/lora_targets.py
    one_by_one = {n for n, m in model.named_modules()
                  if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and n.split(".")[-1] in ("proj_in", "proj_out")}
    assert trained["all_linear"] == linear | one_by_one
    assert trained["all_linear_conv"] == linear | all_modules(model, nn.Conv2d)
    assert set(adapter_layers(widest(family, component))) == trained["all_linear_conv"]


@pytest.mark.parametrize("family,component,module,expected", [
    ("sd15", "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"),
    ("sd15", "text_encoder", "encoder.layers.0.self_attn.q_proj",
     "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"),
    ("sdxl", "text_encoder", "encoder.layers.0.self_attn.q_proj",
     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"),
    ("sdxl", "text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj",
     "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"),
    ("sd3", "transformer", "transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"),
    ("flux", "transformer", "transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"),
    ("sd3", "text_encoder_3", "encoder.block.0.layer.0.SelfAttention.q",
     "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"),
    ("flux", "text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q",
     "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"),
])
def test_key_names_follow_the_tested_conventions(family, component, module, expected):
    """The exact example keys of the conventions lora_formats.md marks as tested (CLIP always with text_model.)."""
    state = {f"{module}.lora_A.weight": torch.zeros(2, 8), f"{module}.lora_B.weight": torch.zeros(8, 2)}
    tensors = export_lora(family, {component: state}, configs={component: (2, 2.0)})
    assert expected in tensors
    stem = expected.rsplit(".", 2)[0]
    assert {stem + ".alpha", stem + (".lora_up.weight" if "lora_down" in expected else ".lora_B.weight")} < set(tensors)


# SD1.5 has 3x3 and 1x1 convolutions; SD3 has fused-qkv slices, swapped modulation halves and a conv patch embedding.
@pytest.mark.parametrize("family,component", [("sd15", "unet"), ("sd3", "transformer")])
@pytest.mark.parametrize("network", ["dora", "loha", "lokr"])
def test_dora_loha_lokr_keys_load_on_full_size_denoisers(family, component, network, comfyui_reference):
    targets = lora_target_modules(family, component, "all_linear_conv")
    config = {"dora": peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets),
              "loha": peft.LoHaConfig(r=4, alpha=8, target_modules=targets),
              "lokr": peft.LoKrConfig(r=4, alpha=8, target_modules=targets)}[network]
    model = inject(build(family, component), config)
    layers = adapter_layers(model)
    tensors = export_peft_modules(family, {component: model})
    assert_loadable(comfyui_reference, tensors, family, component, len(layers))
    if network == "dora":
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight
            scale = tensors[lora_prefix(family, component, name) + ".dora_scale"]
            assert tuple(scale.shape) == (weight.shape[0],) + (1,) * (weight.dim() - 1)


def test_rank_and_alpha_patterns_give_per_module_alpha():
    """Conv modules with their own rank/alpha (kohya conv_dim/conv_alpha) keep them in the file; rsLoRA too."""
    targets = lora_target_modules("sd15", "unet", "all_linear_conv")
    config = peft.LoraConfig(r=8, lora_alpha=4, target_modules=targets,
                             rank_pattern={"conv1": 2, "conv2": 2}, alpha_pattern={"conv1": 1.0, "conv2": 1.0})
    tensors = export_peft_modules("sd15", {"unet": inject(build("sd15", "unet"), config)})
    conv = [k for k in tensors if re.search(r"_conv[12]\.alpha$", k)]
    assert conv and all(float(tensors[k]) == 1.0 for k in conv)
    assert all(tensors[k.replace(".alpha", ".lora_down.weight")].shape[0] == 2 for k in conv)
    assert float(tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == 4.0

    rs = peft.LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["to_q"])
    tensors = export_peft_modules("sd15", {"unet": inject(build("sd15", "unet"), rs)})
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas == {8 / 16 ** 0.5 * 16}  # ComfyUI's alpha/rank must equal peft's lora_alpha/sqrt(r)


def test_exporter_refuses_what_comfyui_cannot_load():
    with pytest.raises(CrucibleError, match="lora_B.bias|LoRA biases"):
        export_lora("sd15", {"unet": {"conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3),
                                      "conv_in.lora_B.weight": torch.zeros(320, 2, 1, 1),
                                      "conv_in.lora_B.bias": torch.zeros(320)}}, configs={"unet": (2, 2.0)})
    with pytest.raises(CrucibleError, match="rank 2 but its adapter config says 4"):
        export_lora("sd15", {"unet": {"conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3),
                                      "conv_in.lora_B.weight": torch.zeros(320, 2, 1, 1)}}, configs={"unet": (4, 4.0)})
    with pytest.raises(CrucibleError, match="base weight"):
        export_lora("sd15", {"unet": {"conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3),
                                      "conv_in.lora_B.weight": torch.zeros(320, 2, 1, 1),
                                      "conv_in.lora_magnitude_vector": torch.ones(1, 320, 1, 1)}},
                    configs={"unet": (2, 2.0)})
    with pytest.raises(ConfigError, match="text_encoder_3"):
        export_lora("sdxl", {"text_encoder_3": {}}, configs={"text_encoder_3": (2, 2.0)})


def test_lora_target_modules_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.family"):
        lora_target_modules("sd2", "unet", "attn")
    with pytest.raises(ConfigError, match="transformer"):
        lora_target_modules("sd15", "transformer", "attn")
    with pytest.raises(ConfigError, match="network.target_preset"):
        lora_target_modules("sd15", "unet", "everything")
    assert lora_target_modules("sd15", "unet", "attn") == ["to_q", "to_k", "to_v", "to_out.0"]
