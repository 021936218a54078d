"""The trained-LoRA comparison of the MODEL-path equivalence check (model_path_trained_equivalence.compare), without
ComfyUI: two LoRA files in the two layouts' key styles, paired through a ComfyUI-style key map, pass when equal and
are reported when a tensor, a loss or the training itself differs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_path_trained_equivalence as mte  # noqa: E402

KEY_MAP = {"lora_unet_down_blocks_0_attn_to_out_0": "diffusion_model.input_blocks.1.proj.weight",
           "lora_unet_input_blocks_1_proj": "diffusion_model.input_blocks.1.proj.weight",
           "transformer.blocks.0.ff": "diffusion_model.blocks.0.mlp.weight",
           "diffusion_model.blocks.0.mlp": "diffusion_model.blocks.0.mlp.weight",
           "transformer.blocks.0.to_q": ("diffusion_model.blocks.0.qkv.weight", (0, 0, 8))}
WEIGHTS = {"diffusion_model.input_blocks.1.proj.weight": (6, 5), "diffusion_model.blocks.0.mlp.weight": (7, 6)}


def trained(seed: int = 0) -> dict:
    """(ComfyUI weight, part) → the trained tensor: the shared initial value plus an update of ~1e-2."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for weight, (n_out, n_in) in WEIGHTS.items():
        a, b = mte.initial_lora(weight, n_in, n_out)
        out[(weight, "down")] = a + 1e-2 * torch.randn(a.shape, generator=generator)
        out[(weight, "up")] = b + 1e-2 * torch.randn(b.shape, generator=generator)
        out[(weight, "alpha")] = torch.tensor(float(mte.RANK))
    return out


def as_file(tensors: dict, diffusers_side: bool) -> dict:
    """The tensors under one side's keys: kohya (SD-style) for the first weight, PEFT-style for the second."""
    prefixes = {"diffusion_model.input_blocks.1.proj.weight": ("lora_unet_down_blocks_0_attn_to_out_0",
                                                              "lora_unet_input_blocks_1_proj"),
                "diffusion_model.blocks.0.mlp.weight": ("transformer.blocks.0.ff", "diffusion_model.blocks.0.mlp")}
    out = {}
    for (weight, part), tensor in tensors.items():
        prefix = prefixes[weight][0 if diffusers_side else 1]
        kohya = prefix.startswith("lora_unet")
        suffix = {"down": "lora_down.weight" if kohya else "lora_A.weight",
                  "up": "lora_up.weight" if kohya else "lora_B.weight", "alpha": "alpha"}[part]
        out[f"{prefix}.{suffix}"] = tensor
    return out


LOSSES = [1.0 - 0.05 * step for step in range(mte.STEPS)]


def problems(ours: dict, theirs: dict, their_losses=None) -> list[str]:
    found, _ = mte.compare(LOSSES, as_file(ours, True), their_losses or LOSSES, as_file(theirs, False), KEY_MAP)
    return found


def test_the_same_training_in_both_layouts_passes():
    ours = trained()
    assert problems(ours, {k: v.clone() for k, v in ours.items()}) == []


def test_a_small_difference_in_one_tensor_is_reported():
    ours, theirs = trained(), trained()
    key = ("diffusion_model.blocks.0.mlp.weight", "up")
    theirs[key] = theirs[key] + 0.05 * (ours[key] - mte.initial_of(ours, key))  # 5 % of what training changed
    assert any("of their trained update" in p and "blocks.0.mlp" in p for p in problems(ours, theirs))


def test_a_learning_rate_one_percent_off_is_reported():
    ours = trained()
    theirs = {k: v if k[1] == "alpha" else mte.initial_of(ours, k) + 1.01 * (v - mte.initial_of(ours, k))
              for k, v in ours.items()}
    assert any("trained LoRAs differ" in p for p in problems(ours, theirs))


def test_losses_and_untrained_tensors_are_reported():
    ours = trained()
    assert any("losses differ" in p for p in problems(ours, dict(ours), [x * (1 + 1e-4) for x in LOSSES]))
    untouched = {k: v if k[1] == "alpha" else mte.initial_of(ours, k) for k, v in ours.items()}
    assert problems(untouched, dict(untouched))  # nothing trained: nothing to compare, never a pass


def test_a_key_on_a_slice_of_a_fused_weight_cannot_be_paired():
    with pytest.raises(AssertionError, match="to_q"):
        mte.by_weight({"transformer.blocks.0.to_q.lora_A.weight": torch.zeros(4, 8)}, KEY_MAP)


def test_target_names_follow_peft_suffix_matching():
    assert mte.matches("transformer_blocks.0.ff.net.2", ["ff.net.2"])
    assert not mte.matches("transformer_blocks.0.ff_context.net.2", ["ff.net.2"])


def test_preset_differences_count_fused_weights_by_their_slices():
    """A fused ComfyUI weight the diffusers preset trains a slice of counts as selected by it: the MODEL path must
    select it too (Flux's single-block linear1), and a weight only one side selects is reported either way."""
    import types

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Module()])
            for name in ("ff", "to_q"):
                setattr(self.blocks[0], name, torch.nn.Linear(2, 2))

    style = types.SimpleNamespace(module_key=lambda name: "transformer." + name)
    diffusers = types.SimpleNamespace(key_styles={"transformer": style},
                                      lora_target_modules=lambda component, preset: ["ff", "to_q"])
    comps = types.SimpleNamespace(denoiser_name="transformer", denoiser=Denoiser())

    def facts(selected):
        comfy = types.SimpleNamespace(key_map=KEY_MAP, lora_target_modules=lambda component, preset: selected)
        return mte.common_targets(diffusers, comps, comfy)

    ours, theirs, same = facts(["diffusion_model.blocks.0.mlp", "diffusion_model.blocks.0.qkv"])
    assert (ours, theirs) == (["blocks.0.ff"], ["diffusion_model.blocks.0.mlp"])
    assert (same["comfy_only"], same["comfy_misses"], same["fused"]) == ([], [], 1)
    _, _, missing = facts(["diffusion_model.blocks.0.mlp", "diffusion_model.input_blocks.1.proj"])
    assert missing["comfy_misses"] == ["diffusion_model.blocks.0.qkv.weight"]
    assert missing["comfy_only"] == ["diffusion_model.input_blocks.1.proj.weight"]


def test_the_text_stand_in_takes_every_argument_the_loop_passes_the_text_cache():
    """The run's text cache is replaced by a stand-in that serves the same embeddings to both paths; the loop calls
    ``fill(report, share)`` on it (since the caches fill by shares across processes). A stand-in with an older
    signature failed every training comparison of the stage with a TypeError."""
    import inspect

    from trainer.cache import TextCache

    wanted = set(inspect.signature(TextCache.fill).parameters)
    assert wanted <= set(inspect.signature(mte.SameData.fill).parameters)
