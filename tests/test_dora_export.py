"""ComfyUI's weight formulas applied to exported DoRA, LoHa and LoKr tensors must give peft's merged weights.

``comfy_*`` below restate, from reading ComfyUI 0.8.0's ``comfy/weight_adapter/{base,lora,loha,lokr}.py``, how its
stock LoraLoader turns a file's tensors into a patched weight (strength 1, float32 patching). peft's reference is
its own ``merge()`` of the same adapter.
"""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from torch import nn  # noqa: E402

from trainer.export import adapter_layers, export_peft_modules  # noqa: E402
from trainer.lora_import import load_lora_into  # noqa: E402
from trainer.lora_keys import is_scale_shift_swapped, swap_halves  # noqa: E402

TOLERANCE = 1e-5



# --- ComfyUI 0.8.0, restated ---------------------------------------------------------------------------------------

def comfy_scale(alpha: torch.Tensor | None, rank: int | None) -> float:
    """Adapters multiply their product by alpha / rank; without an alpha (or a rank) the factor is 1."""
    return 1.0 if alpha is None or rank is None else float(alpha) / rank


def comfy_lora_delta(parts: dict, shape) -> torch.Tensor:
    down, up = parts["down"], parts["up"]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    return comfy_scale(parts.get("alpha"), down.shape[0]) * delta


def comfy_loha_delta(parts: dict, shape) -> torch.Tensor:
    def factor(n: int) -> torch.Tensor:
        a, b, t = parts[f"hada_w{n}_a"], parts[f"hada_w{n}_b"], parts.get(f"hada_t{n}")
        if t is None:
            return a @ b
        return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)

    delta = (factor(1) * factor(2)).reshape(shape)
    return comfy_scale(parts.get("alpha"), parts["hada_w1_b"].shape[0]) * delta


def comfy_lokr_delta(parts: dict, shape) -> torch.Tensor:
    rank = None
    w1 = parts.get("lokr_w1")
    if w1 is None:
        rank = parts["lokr_w1_b"].shape[0]
        w1 = parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts.get("lokr_w2")
    if w2 is None:
        rank = parts["lokr_w2_b"].shape[0]
        if "lokr_t2" in parts:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", parts["lokr_t2"], parts["lokr_w2_b"], parts["lokr_w2_a"])
        else:
            w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return comfy_scale(parts.get("alpha"), rank) * torch.kron(w1, w2).reshape(shape)


def comfy_patch(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor | None,
                swap: bool = False) -> torch.Tensor:
    """The patched weight. ``swap``: ComfyUI's weight holds the two output halves swapped (swap_scale_shift);
    ``weight`` is ComfyUI's own (already swapped) tensor and the delta passes through the swap."""
    if swap:
        delta = swap_halves(delta)
    if dora_scale is None:
        return weight + delta
    rows = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    return (weight + delta) * (dora_scale / (rows + torch.finfo(weight.dtype).eps))


# --- helpers -----------------------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    """One linear, one 3x3 conv and an SD3/Flux-style ``norm_out.linear`` (2·dim outputs, swapped in ComfyUI)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 48)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.norm_out = nn.Module()
        self.norm_out.linear = nn.Linear(16, 32)


def adapted(config, adapter_seed: int = 1, magnitude_gain: float = 1.3) -> nn.Module:
    """A Tiny model (always the same base weights) with a peft adapter whose every weight is random and non-zero
    (DoRA magnitude scaled away from ‖W‖ so the pre-compensation matters)."""
    torch.manual_seed(0)
    model = Tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(config, model)
    torch.manual_seed(adapter_seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(magnitude_gain + 0.2 * torch.rand_like(param))
            elif any(tag in name for tag in ("lora_", "hada_", "lokr_")):
                param.copy_(torch.randn_like(param) * 0.2)
    return model


def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's merged weight of every adapted module."""
    out = {}
    for name, layer in adapter_layers(model).items():
        layer.merge()
        out[name] = layer.get_base_layer().weight.detach().clone()
        layer.unmerge()
    return out


def file_parts(tensors: dict, family: str, module: str) -> dict[str, torch.Tensor]:
    """The tensors of one module, keyed by suffix (``down``/``up`` for either LoRA naming)."""
    stem = f"transformer.{module}." if family in ("sd3", "flux") else f"lora_unet_{module.replace('.', '_')}."
    parts = {k[len(stem):]: v.float() for k, v in tensors.items() if k.startswith(stem)}
    for down, up in (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight")):
        if down in parts:
            parts["down"], parts["up"] = parts.pop(down), parts.pop(up)
    return parts


def comfy_merge(model: nn.Module, tensors: dict, family: str, delta_fn) -> dict[str, torch.Tensor]:
    """ComfyUI's patched weights, mapped back to diffusers' row order for comparison."""
    out = {}
    for name, layer in adapter_layers(model).items():
        base = layer.get_base_layer().weight.detach().float()
        parts = file_parts(tensors, family, name)
        swap = is_scale_shift_swapped(family, name, tuple(base.shape))
        weight = swap_halves(base) if swap else base
        patched = comfy_patch(weight, delta_fn(parts, base.shape), parts.get("dora_scale"), swap)
        out[name] = swap_halves(patched) if swap else patched
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


TARGETS = ["proj", "conv", "norm_out.linear"]


# --- DoRA --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_dora_scale_reproduces_peft_merge(family):
    """Linear and conv rows, and (SD3) the swapped norm_out.linear: ComfyUI's result equals peft's merge."""
    model = adapted(peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS))
    tensors = export_peft_modules(family, {"unet" if family == "sd15" else "transformer": model})
    expected = merged_weights(model)
    assert max_diff(comfy_merge(model, tensors, family, comfy_lora_delta), expected) < TOLERANCE
    for name, layer in adapter_layers(model).items():
        weight = layer.get_base_layer().weight
        scale = file_parts(tensors, family, name)["dora_scale"]
        assert tuple(scale.shape) == (weight.shape[0],) + (1,) * (weight.dim() - 1)
    # A conv's scale must keep the weight's rank: (out, 1) does not broadcast, and ComfyUI skips the module.
    conv = adapter_layers(model)["conv"].get_base_layer().weight.detach()
    parts = file_parts(tensors, family, "conv")
    with pytest.raises(RuntimeError):
        comfy_patch(conv, comfy_lora_delta(parts, conv.shape), parts["dora_scale"].reshape(-1, 1))


@pytest.mark.parametrize("network", ["dora", "loha", "lokr"])
def test_import_inverts_export(network):
    """File -> fresh adapter (other alpha, SD3 naming with the swapped norm_out.linear) -> the same merged weights."""
    def make(alpha):
        return {"dora": peft.LoraConfig(r=4, lora_alpha=alpha, use_dora=True, target_modules=TARGETS),
                "loha": peft.LoHaConfig(r=4, alpha=alpha, target_modules=TARGETS),
                "lokr": peft.LoKrConfig(r=4, alpha=alpha, target_modules=TARGETS)}[network]
    model = adapted(make(8.0))
    tensors = export_peft_modules("sd3", {"transformer": model})
    fresh = adapted(make(3.0), adapter_seed=2)  # same base weights, other adapter values and alpha
    assert max_diff(merged_weights(fresh), merged_weights(model)) > 1e-2
    assert load_lora_into("sd3", "transformer", fresh, tensors) == []
    assert max_diff(merged_weights(fresh), merged_weights(model)) < TOLERANCE


def test_dora_without_compensation_would_be_wrong():
    """The check above can fail: writing peft's magnitude unchanged as dora_scale is off by far more."""
    model = adapted(peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["proj"]))
    tensors = export_peft_modules("sd15", {"unet": model})
    layer = adapter_layers(model)["proj"]
    tensors["lora_unet_proj.dora_scale"] = layer.lora_magnitude_vector["default"].weight.detach().reshape(-1, 1)
    assert max_diff(comfy_merge(model, tensors, "sd15", comfy_lora_delta), merged_weights(model)) > 1e-3


def test_dora_scale_follows_the_save_dtype():
    """In fp16 the norm is taken of the rounded up/down ComfyUI will read, so only fp16 rounding remains."""
    model = adapted(peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["proj", "conv"]))
    tensors = export_peft_modules("sd15", {"unet": model}, dtype=torch.float16)
    assert tensors["lora_unet_proj.lora_up.weight"].dtype == torch.float16
    assert tensors["lora_unet_proj.dora_scale"].dtype == torch.float16
    assert tensors["lora_unet_proj.alpha"].dtype == torch.float32
    assert max_diff(comfy_merge(model, tensors, "sd15", comfy_lora_delta), merged_weights(model)) < 5e-3


def test_plain_lora_alpha_matches_peft():
    model = adapted(peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                    rank_pattern={"conv": 2}, alpha_pattern={"conv": 3.0}))
    tensors = export_peft_modules("sd15", {"unet": model})
    assert float(tensors["lora_unet_conv.alpha"]) == 3.0 and float(tensors["lora_unet_proj.alpha"]) == 8.0
    assert max_diff(comfy_merge(model, tensors, "sd15", comfy_lora_delta), merged_weights(model)) < TOLERANCE


def test_swap_rule_matches_comfyui_keymaps(comfyui_reference):
    """is_scale_shift_swapped marks exactly the modules ComfyUI's SD3/Flux maps give swap_scale_shift."""
    dim = {"sd3": 1536, "flux": 3072}
    for family in ("sd3", "flux"):
        unet = comfyui_reference.keymap(family)["unet"]
        swapped = {k.removeprefix("transformer.") for k, v in unet.items()
                   if k.startswith("transformer.") and isinstance(v, list) and v[-1] == "swap_scale_shift"}
        last = {"sd3": 23, "flux": 18}[family]
        for name in swapped:
            assert is_scale_shift_swapped(family, name, (2 * dim[family], dim[family])), name
        for name in ("transformer_blocks.0.norm1_context.linear", f"transformer_blocks.{last}.norm1.linear"):
            assert not is_scale_shift_swapped(family, name, (6 * dim[family], dim[family]))
        assert swapped == ({"norm_out.linear", "transformer_blocks.23.norm1_context.linear"} if family == "sd3"
                           else {"norm_out.linear"})


# --- LoHa and LoKr -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("effective_conv", [False, True])
def test_loha_reproduces_peft_merge(effective_conv):
    config = peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS, use_effective_conv2d=effective_conv,
                             rank_pattern={"proj": 2}, alpha_pattern={"proj": 5.0})
    model = adapted(config)
    tensors = export_peft_modules("sd3", {"transformer": model})
    assert ("transformer.conv.hada_t1" in tensors) == effective_conv
    assert float(tensors["transformer.proj.alpha"]) == 5.0
    assert max_diff(comfy_merge(model, tensors, "sd3", comfy_loha_delta), merged_weights(model)) < TOLERANCE


@pytest.mark.parametrize("config", [
    peft.LoKrConfig(r=4, alpha=8, target_modules=TARGETS),  # small dims: two full Kronecker factors
    peft.LoKrConfig(r=1, alpha=3, target_modules=TARGETS, use_effective_conv2d=True),  # w2 low-rank, conv via t2
    peft.LoKrConfig(r=1, alpha=3, target_modules=TARGETS, decompose_both=True),  # w1 and w2 low-rank
], ids=["full", "w2-low-rank", "both-low-rank"])
def test_lokr_reproduces_peft_merge(config):
    model = adapted(config)
    tensors = export_peft_modules("sd15", {"unet": model})
    assert max_diff(comfy_merge(model, tensors, "sd15", comfy_lokr_delta), merged_weights(model)) < TOLERANCE
    assert not any(k.endswith(".lokr_t2") for k in tensors)  # see test_lokr_t2_is_written_dense
    if config.r == 4:  # full factors: ComfyUI ignores alpha, so peft's scale is folded into lokr_w1
        assert "lora_unet_proj.lokr_w1" in tensors and "lora_unet_proj.lokr_w2_b" not in tensors
    else:
        assert "lora_unet_proj.lokr_w2_b" in tensors


def test_lokr_t2_is_written_dense():
    """ComfyUI 0.8.0 fails on a lokr_t2 conv (torch.kron rejects einsum's non-contiguous result, the module is
    skipped with a logged error), so the exporter writes the equivalent dense 4-D lokr_w2."""
    model = adapted(peft.LoKrConfig(r=1, alpha=3, target_modules=["conv"], use_effective_conv2d=True))
    layer = adapter_layers(model)["conv"]
    raw = {"alpha": torch.tensor(3.0), **{p: getattr(layer, p)["default"].detach()
                                          for p in ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}}
    with pytest.raises(RuntimeError, match="view size"):
        comfy_lokr_delta(raw, layer.get_base_layer().weight.shape)
    tensors = export_peft_modules("sd15", {"unet": model})
    assert tensors["lora_unet_conv.lokr_w2"].dim() == 4 and "lora_unet_conv.lokr_t2" not in tensors
    assert max_diff(comfy_merge(model, tensors, "sd15", comfy_lokr_delta), merged_weights(model)) < TOLERANCE
