"""Scaled-fp8 MODELs on the MODEL path (nodes/comfy_weights.py) without ComfyUI: ComfyUI 0.8.0 loads a scaled-fp8
file with its mixed-precision ops, whose Linear is a plain ``torch.nn.Module`` (not a ``torch.nn.Linear``) holding
fp8 data and a scale, dequantized in its own forward; where the device computes in fp8 that forward quantizes its
input and the input gradient is lost. :class:`QuantLinear` follows that (comfy/ops.py ``MixedPrecisionOps.Linear``);
the real layers run in tests/comfyui_e2e/model_path_fp8.py (case ``scaled``)."""
from __future__ import annotations

import types

import pytest
import torch

from test_comfy_family import FakeBaseModel, batch, comfy_key_map, module, sampling  # noqa: F401 - fixture
from trainer.config import NetworkConfig, TrainingConfig
from trainer.errors import CrucibleError


class QuantLinear(torch.nn.Module):
    """ComfyUI's mixed-precision Linear: fp8 ``weight`` values (``weight / scale``) + ``weight_scale``; the
    forward dequantizes unless ``_full_precision_mm`` is off (fp8 compute: the input is quantized, no gradient)."""
    comfy_cast_weights = False  # comfy.ops.CastWeightBiasOp's class attributes
    weight_function: list = []
    bias_function: list = []

    def __init__(self, linear: torch.nn.Linear, full_precision_mm: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax() / 448.0
        # fp8 values; held as float32 because a QuantizedTensor reports its original dtype (peft casts adapters to it)
        fp8 = (linear.weight.detach() / scale).to(torch.float8_e4m3fn)
        self.weight = torch.nn.Parameter(fp8.float(), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.reshape(()), requires_grad=False)
        self.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._full_precision_mm = full_precision_mm
        self.layout_type = "TensorCoreFP8E4M3Layout"

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale

    def forward(self, x):
        if self._full_precision_mm:
            return torch.nn.functional.linear(x, self.dequantized(), self.bias)
        quantized_input = x.detach().to(torch.float8_e4m3fn).float()  # no grad_fn, as QuantizedTensor.from_float
        return torch.nn.functional.linear(quantized_input, self.dequantized(), self.bias)


def quantized_base(full_precision_mm: bool = True) -> FakeBaseModel:
    """family_of's model with its three Linear layers as ComfyUI's quantized Linear (the convs stay)."""
    base = FakeBaseModel(sampling("epsilon"))
    dm = base.diffusion_model
    dm.attn1["to_q"] = QuantLinear(dm.attn1["to_q"], full_precision_mm)
    dm.attn1["to_out"] = QuantLinear(dm.attn1["to_out"], full_precision_mm)
    dm.ff = QuantLinear(dm.ff, full_precision_mm)
    return base


def family_for(module, base):  # noqa: F811
    vae = types.SimpleNamespace(first_stage_model=torch.nn.Conv2d(3, 4, 1))
    return module.ComfyModelFamily(types.SimpleNamespace(model=base), clip=object(), vae=vae,
                                   key_map=comfy_key_map(base))


def dequantized_copy(base: FakeBaseModel) -> FakeBaseModel:
    """The same model with plain Linear layers holding the quantized layers' dequantized weights."""
    import copy

    plain = copy.deepcopy(base)
    dm = plain.diffusion_model
    for parent, name in ((dm.attn1, "to_q"), (dm.attn1, "to_out"), (dm, "ff")):
        layer = parent[name] if parent is dm.attn1 else getattr(parent, name)
        linear = torch.nn.Linear(layer.in_features, layer.out_features)
        linear.weight.data, linear.bias.data = layer.dequantized().clone(), layer.bias.data.clone()
        if parent is dm.attn1:
            parent[name] = linear
        else:
            setattr(parent, name, linear)
    return plain


def load(family):
    return family.load(types.SimpleNamespace(path="", vae_path="", tokenizer_path="", text_encoder_paths=()))


def loss_and_grads(family, comps, net=None, x_grad: bool = False):
    from trainer.families.objectives import DiffusionObjective

    latents, noise, cond = batch(5)
    noised = DiffusionObjective(comps.noise_scheduler, "epsilon", TrainingConfig()).noise(
        latents, noise, torch.Generator().manual_seed(8))
    x = noised.noisy.clone().requires_grad_(x_grad)
    family.predict(comps, x, noised.timesteps, cond).square().mean().backward()
    return x.grad


QUANTIZED = ["attn1.to_out", "attn1.to_q", "ff"]


def test_recognises_comfyuis_quantized_linear_only(module):  # noqa: F811
    import sys

    weights = sys.modules[module.__name__.rsplit(".", 1)[0] + ".comfy_weights"]
    cast_linear = type("Linear", (torch.nn.Linear,), {"comfy_cast_weights": False})  # ComfyUI's other Linears
    assert weights.is_cast_linear(QuantLinear(torch.nn.Linear(4, 3)))
    assert not weights.is_cast_linear(torch.nn.Linear(4, 3))  # peft wraps these already
    assert not weights.is_cast_linear(cast_linear(4, 3))
    assert not weights.is_cast_linear(torch.nn.Conv2d(4, 3, 1))
    assert not weights.is_cast_linear(torch.nn.LayerNorm(4))


@pytest.mark.parametrize("network_type", ["lora", "loha"])
def test_a_scaled_fp8_models_linears_train_through_the_dequantizing_forward(module, network_type):  # noqa: F811
    """Before the fix the presets found no Linear on a scaled-fp8 MODEL ("matched no module"). Now peft wraps each
    quantized layer, every adapter weight gets a gradient, and the gradients equal those of the same model with plain
    Linear layers holding the dequantized weights, also where ComfyUI would compute in fp8 (``_full_precision_mm``
    off: its input quantization has no gradient)."""
    from trainer.network import attach_network

    cfg = NetworkConfig(network_type=network_type, network_dim=2, network_alpha=2.0, target_preset="all_linear")
    base = quantized_base(full_precision_mm=False)
    plain_base = dequantized_copy(base)
    results = []
    for model in (base, plain_base):
        family = family_for(module, model)
        comps = load(family)
        torch.manual_seed(0)  # the same initial adapter weights
        net = attach_network(family, comps, cfg)
        x_grad = loss_and_grads(family, comps, x_grad=True)
        results.append(({f"{c}.{n}": p.grad for c, n, p in net.named_trainable()}, x_grad, family))
    (grads, x_grad, family), (plain_grads, plain_x_grad, plain) = results
    assert sorted(n.removeprefix("diffusion_model.") for n in family.lora_target_modules("unet", "attn_mlp")) == QUANTIZED
    assert grads and grads.keys() == plain_grads.keys()
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(torch.allclose(grads[k], plain_grads[k], atol=1e-6, rtol=1e-4) for k in grads)
    assert torch.allclose(x_grad, plain_x_grad, atol=1e-7, rtol=1e-4)
    family.restore()
    plain.restore()


def test_restore_gives_each_layer_its_class_setting_and_bytes_back(module):  # noqa: F811
    from trainer.export import export_peft_modules
    from trainer.network import attach_network

    base = quantized_base(full_precision_mm=False)
    family = family_for(module, base)
    layers = {n: m for n, m in base.diffusion_model.named_modules() if isinstance(m, QuantLinear)}
    before = {k: v.clone() for k, v in base.state_dict().items()}
    comps = load(family)
    assert all(isinstance(m, torch.nn.Linear) and m._full_precision_mm for m in layers.values())  # during the run
    net = attach_network(family, comps, NetworkConfig(network_dim=2, network_alpha=2.0, target_preset="all_linear"))
    loss_and_grads(family, comps)
    keys = {k.rsplit(".", 2)[0] for k in export_peft_modules(family, net.modules) if k.endswith(".lora_up.weight")}
    assert {"lora_unet_attn1_to_q", "lora_unet_attn1_to_out", "lora_unet_ff"} <= keys  # ComfyUI's key names
    family.restore()
    now = {n: m for n, m in base.diffusion_model.named_modules() if n in layers}
    assert all(now[n] is m and type(m) is QuantLinear and m._full_precision_mm is False for n, m in layers.items())
    after = base.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_family_that_fails_to_build_leaves_the_layers_as_they_were(module, monkeypatch):  # noqa: F811
    def refuse(names, key_map):
        raise CrucibleError("no key")

    monkeypatch.setattr(module, "lora_key_names", refuse)
    base = quantized_base(full_precision_mm=False)
    with pytest.raises(CrucibleError, match="no key"):
        family_for(module, base)
    layer = base.diffusion_model.ff
    assert type(layer) is QuantLinear and layer._full_precision_mm is False


@pytest.mark.parametrize("fails", [False, True])
def test_the_step_plan_gives_the_users_model_back(module, monkeypatch, fails):  # noqa: F811
    """The Step Plan builds the same family as Train (its layers seen as Linear until restore): it restores it after
    its report, also when the report fails, so a scaled-fp8 MODEL leaves the Step Plan as it came in."""
    import importlib

    memory = importlib.import_module(module.__name__.rsplit(".", 1)[0] + ".comfy_memory")
    base = quantized_base(full_precision_mm=False)
    built = []

    def hosted_model_config(model, clip, vae, crucible_model=None, network=None):
        built.append(family_for(module, base))
        return built[-1], None, network

    def report(*args):
        assert type(base.diffusion_model.ff) is not QuantLinear  # seen as a Linear meanwhile
        if fails:
            raise CrucibleError("estimate failed")
        return "estimate"

    monkeypatch.setattr(module, "hosted_model_config", hosted_model_config)
    monkeypatch.setattr(memory, "_model_path_report", report)
    if fails:
        with pytest.raises(CrucibleError, match="estimate failed"):
            memory.model_path_memory_report(None, None, None, None, [], None, None, None, 1)
    else:
        assert memory.model_path_memory_report(None, None, None, None, [], None, None, None, 1) == "estimate"
    assert built and type(base.diffusion_model.ff) is QuantLinear and base.diffusion_model.ff._full_precision_mm is False
