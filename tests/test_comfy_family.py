"""The MODEL path's family (nodes/comfy_family.py) without ComfyUI: the loop's noise conventions mapped onto ComfyUI's
σ conventions (ε, v, flow), LoRA key names from a ComfyUI key map, the adapter removed again, and the run-time
registration (``trainer.hosted_family``). ComfyUI's ``model_sampling`` and ``BaseModel.apply_model`` are stood in by
small fakes that follow ComfyUI 0.8.0's formulas (comfy/model_sampling.py, comfy/model_base.py); the real objects run
in tests/comfyui_e2e/checks_model_path.py."""
from __future__ import annotations

import importlib
import math
import sys
import types

import pytest
import torch

import comfy_stubs
from trainer.config import NetworkConfig, TrainingConfig
from trainer.errors import ConfigError, CrucibleError


# --- fakes of ComfyUI's model_sampling and BaseModel ---------------------------------------------------------------
def _shape(sigma, x):
    return sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))


class EPS:
    sigma_data = 1.0

    def calculate_input(self, sigma, noise):
        return noise / (_shape(sigma, noise) ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * _shape(sigma, model_output)


class V_PREDICTION(EPS):
    def calculate_denoised(self, sigma, model_output, model_input):
        s, d = _shape(sigma, model_output), self.sigma_data
        return model_input * d ** 2 / (s ** 2 + d ** 2) - model_output * s * d / (s ** 2 + d ** 2) ** 0.5


class CONST:
    def calculate_input(self, sigma, noise):
        return noise

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * _shape(sigma, model_output)


class EDM(V_PREDICTION):
    pass


class X0(EPS):
    pass


class ModelSamplingDiscrete(torch.nn.Module):
    """SD1.5's scaled-linear schedule as ComfyUI tabulates it (σ per integer timestep, log-linear in between)."""

    def __init__(self):
        super().__init__()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("sigmas", (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float())
        self.register_buffer("log_sigmas", self.sigmas.log())

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), 0, len(self.sigmas) - 1)
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


class ModelSamplingDiscreteFlow(torch.nn.Module):
    def __init__(self, shift=3.0, multiplier=1000):
        super().__init__()
        self.shift, self.multiplier = shift, multiplier

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        t = timestep / self.multiplier
        return self.shift * t / (1 + (self.shift - 1) * t)


class ModelSamplingFlux(ModelSamplingDiscreteFlow):
    pass


class ModelSamplingDiscreteEDM(ModelSamplingDiscrete):
    pass


class StableCascadeSampling(ModelSamplingDiscrete):
    pass


class Cond:
    """comfy.conds.CONDRegular/CONDCrossAttn: process_cond per batch, concat across samples."""

    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, **kwargs):
        return self

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [o.cond for o in others])


class Constant(Cond):
    """comfy.conds.CONDConstant: one value for the whole batch; samples with different values never batch."""

    def can_concat(self, other):
        return self.cond == other.cond

    def concat(self, others):
        return self.cond


def cond_equal_size(c1, c2):  # comfy.samplers (0.8.0)
    return c1 is c2 or (c1.keys() == c2.keys() and all(c1[k].can_concat(c2[k]) for k in c1))


def cond_cat(c_list):  # comfy.samplers (0.8.0)
    return {k: c_list[0][k].concat([c[k] for c in c_list[1:]]) for k in c_list[0]}


class TinyDenoiser(torch.nn.Module):
    """Records what it is called with; its output depends on the input, the timestep and the context."""

    def __init__(self):
        super().__init__()
        self.attn1 = torch.nn.ModuleDict({"to_q": torch.nn.Linear(4, 4), "to_out": torch.nn.Linear(4, 4)})
        self.ff = torch.nn.Linear(4, 4)
        self.proj_in = torch.nn.Conv2d(4, 4, 1)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.norm = torch.nn.LayerNorm(4)
        self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)])
        self.calls = []
        self.in_place = False  # ComfyUI's inference style: residual streams updated in place (Flux's img += …)

    def forward(self, x, t, context=None, control=None, transformer_options=None, **kwargs):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        h = self.conv(self.proj_in(x))
        for block in self.blocks:
            if self.in_place:
                h += block(h)
            else:
                h = block(h) + h
        h = h.movedim(1, -1)
        h = self.ff(self.attn1["to_out"](self.attn1["to_q"](self.norm(h)))).movedim(-1, 1)
        return h * (1 + t.view(-1, 1, 1, 1) / 1000) + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


class FakeBaseModel(torch.nn.Module):
    """comfy.model_base.BaseModel's _apply_model: σ in, x0 out, the diffusion model fed calculate_input(σ, x)."""

    def __init__(self, sampling):
        super().__init__()
        self.diffusion_model = TinyDenoiser()
        self.model_sampling = sampling
        self.latent_format = types.SimpleNamespace(latent_channels=4)

    def extra_conds(self, **kwargs):
        return {"c_crossattn": Cond(kwargs["cross_attn"])}

    def apply_model(self, x, t, c_crossattn=None, transformer_options=None, **kwargs):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        out = self.diffusion_model(xc, self.model_sampling.timestep(t).float(), context=c_crossattn)
        return self.model_sampling.calculate_denoised(sigma, out.float(), x)


def sampling(kind: str):
    mixes = {"epsilon": (EPS, ModelSamplingDiscrete), "v_prediction": (V_PREDICTION, ModelSamplingDiscrete),
             "flow": (CONST, ModelSamplingDiscreteFlow), "edm": (EDM, ModelSamplingDiscreteEDM)}[kind]
    return type("ModelSampling", mixes, {})()


def comfy_key_map(base: torch.nn.Module) -> dict[str, str]:
    """The generic part of comfy.lora.model_lora_keys_unet: lora_unet_<name> and diffusion_model.<name> per weight."""
    keys = {}
    for k in base.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            keys["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
            keys[k[:-len(".weight")]] = k
    return keys


# --- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def module(tmp_path_factory):
    stub, restore = comfy_stubs.install(tmp_path_factory.mktemp("comfyui"))
    fakes = {"comfy.model_sampling": types.ModuleType("comfy.model_sampling"), "comfy.conds": types.ModuleType("comfy.conds"),
             "comfy.samplers": types.ModuleType("comfy.samplers")}
    for name, value in dict(globals()).items():
        if isinstance(value, type) and value.__module__ == __name__:
            setattr(fakes["comfy.model_sampling"], name, value)
    fakes["comfy.conds"].CONDCrossAttn = Cond
    fakes["comfy.samplers"].cond_equal_size, fakes["comfy.samplers"].cond_cat = cond_equal_size, cond_cat
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    sys.modules["comfy.model_management"].load_models_gpu = lambda models, **kw: None
    try:
        comfy_stubs.load_pack()
        yield importlib.import_module(f"{comfy_stubs.PACK_NAME}.nodes.comfy_family")
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
        restore()


def family_of(module, kind: str, key_map=None):
    base = FakeBaseModel(sampling(kind))
    patcher = types.SimpleNamespace(model=base)
    vae = types.SimpleNamespace(first_stage_model=torch.nn.Conv2d(3, 4, 1))
    return module.ComfyModelFamily(patcher, clip=object(), vae=vae, key_map=key_map or comfy_key_map(base)), base


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    return latents, noise, {"encoder_hidden_states": torch.randn(2, 3, 8, generator=g)}


# --- the loop's conventions onto ComfyUI's -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddpm_models_see_the_loops_noisy_latent_and_return_the_raw_output(module, kind):
    from trainer.families.objectives import DiffusionObjective

    family, base = family_of(module, kind)
    assert family.default_prediction == kind
    comps = family.load(types.SimpleNamespace(path="", vae_path="", tokenizer_path="", text_encoder_paths=()))
    ms = base.model_sampling
    assert torch.allclose(comps.noise_scheduler.alphas_cumprod.double(), 1 / (1 + ms.sigmas.double() ** 2), atol=1e-6)
    latents, noise, cond = batch()
    noised = DiffusionObjective(comps.noise_scheduler, kind, TrainingConfig()).noise(latents, noise,
                                                                                    torch.Generator().manual_seed(3))
    pred = family.predict(comps, noised.noisy, noised.timesteps, cond)
    seen_x, seen_t = base.diffusion_model.calls[-1]
    assert torch.allclose(seen_x, noised.noisy, atol=1e-5)  # the model input equals the loop's √ᾱ·x0 + √(1-ᾱ)·ε
    assert torch.equal(seen_t.long(), noised.timesteps)  # and its timestep the loop's t
    raw = base.diffusion_model(seen_x, seen_t, context=cond["encoder_hidden_states"])
    assert torch.allclose(pred, raw, atol=1e-4), (pred - raw).abs().max()


def test_flow_models_get_sigma_and_return_the_velocity(module):
    from trainer.families.objectives import FlowMatchingObjective

    family, base = family_of(module, "flow")
    comps = family.load(types.SimpleNamespace(path="", vae_path="", tokenizer_path="", text_encoder_paths=()))
    latents, noise, cond = batch(1)
    assert family.flow_shift(comps, latents) == 3.0  # the model's own shift is "auto"
    objective = FlowMatchingObjective(comps.noise_scheduler, TrainingConfig(), shift_fn=lambda l: family.flow_shift(comps, l))
    noised = objective.noise(latents, noise, torch.Generator().manual_seed(4))
    pred = family.predict(comps, noised.noisy, noised.timesteps, cond)
    seen_x, seen_t = base.diffusion_model.calls[-1]
    assert torch.allclose(seen_x, noised.noisy, atol=1e-6)
    assert torch.allclose(seen_t, noised.timesteps, atol=1e-3)  # σ·1000, ComfyUI's multiplier
    raw = base.diffusion_model(seen_x, seen_t, context=cond["encoder_hidden_states"])
    assert torch.allclose(pred, raw, atol=1e-3), (pred - raw).abs().max()


@pytest.mark.parametrize("size", [32, 64, 128])
def test_flux_dev_auto_shift_follows_the_resolution_as_the_diffusers_path_does(module, size):
    """A stock Flux dev MODEL (ModelSamplingFlux shift 1.15, guidance embedding) trains with the diffusers path's
    resolution-dependent shift at every latent size (it used the fixed e^1.15 before); without a guidance embedding
    (schnell, Chroma) the model's own e^shift stays."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from trainer.families import get_family
    from trainer.families.base import Components
    from trainer.families.flux import DEV_SCHEDULER

    family, base = family_of(module, "flow")
    base.model_sampling = type("ModelSampling", (CONST, ModelSamplingFlux), {})(shift=1.15)
    latents = torch.zeros(1, 16, size, size)
    diffusers_comps = Components(denoiser=None, vae=None, text_encoders=[], tokenizers=[], denoiser_name="transformer",
                                 noise_scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), text_encoder_names=())
    expected = get_family("flux").flow_shift(diffusers_comps, latents)
    base.diffusion_model.params = types.SimpleNamespace(guidance_embed=True)
    assert family.flow_shift(None, latents) == pytest.approx(expected, rel=1e-9)
    base.diffusion_model.params = types.SimpleNamespace(guidance_embed=False)
    assert family.flow_shift(None, latents) == pytest.approx(math.exp(1.15))


def test_guidance_scale_counts_as_used_only_on_a_guidance_distilled_model(module, make_config, tiny_sd15,
                                                                          demo_dataset, tmp_path):
    """The settings check warned "training.guidance_scale does nothing on comfy" on a Flux dev MODEL, whose guidance
    embedding it feeds."""
    from dataclasses import replace

    from trainer.families import hosted_family
    from trainer.families.settings import check_family_settings as unused_settings

    family, base = family_of(module, "flow")
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path)
    cfg = replace(cfg, model=replace(cfg.model, family="comfy", path=""),
                  training=replace(cfg.training, guidance_scale=2.0))
    with hosted_family(family):
        assert any("guidance_scale" in m for m in unused_settings(cfg))
        base.diffusion_model.params = types.SimpleNamespace(guidance_embed=True)
        assert not any("guidance_scale" in m for m in unused_settings(cfg))


def test_a_sampling_the_loop_cannot_express_is_refused_by_name(module):
    with pytest.raises(CrucibleError, match="ModelSampling.*neither"):
        family_of(module, "edm")


# --- LoRA: targets, export keys, removal ---------------------------------------------------------------------------
def test_presets_choose_modules_by_kind_and_only_mapped_ones(module):
    family, base = family_of(module, "epsilon")
    names = lambda preset: sorted(n.removeprefix("diffusion_model.") for n in family.lora_target_modules("unet", preset))
    assert names("attn") == ["attn1.to_out", "attn1.to_q"]
    assert names("attn_mlp") == ["attn1.to_out", "attn1.to_q", "ff"]
    # + the 1×1 conv proj_in (SD1.5's transformers' per-pixel linear map); other 1×1 convs only with LoCon
    assert names("all_linear") == ["attn1.to_out", "attn1.to_q", "ff", "proj_in"]
    assert names("all_linear_conv") == ["attn1.to_out", "attn1.to_q", "blocks.0", "blocks.1", "conv", "ff", "proj_in"]
    narrow = {k: v for k, v in comfy_key_map(base).items() if ".ff." not in v}
    family, _ = family_of(module, "epsilon", narrow)
    assert "diffusion_model.ff" not in family.lora_target_modules("unet", "all_linear")  # ComfyUI would not load it
    with pytest.raises(CrucibleError, match="not 'text_encoder'"):  # no CLIP tower was asked for
        family.lora_target_modules("text_encoder", "attn")


def test_key_names_prefer_kohya_then_generic_and_refuse_unmapped(module):
    key_map = {"lora_unet_a_b": "diffusion_model.a.b.weight", "diffusion_model.a.b": "diffusion_model.a.b.weight",
               "diffusion_model.c": "diffusion_model.c.weight", "lora_unet_down_blocks_0": "diffusion_model.d.weight"}
    names = module.lora_key_names(["diffusion_model.a.b", "diffusion_model.c"], key_map)
    assert names == {"diffusion_model.a.b": "lora_unet_a_b", "diffusion_model.c": "diffusion_model.c"}
    with pytest.raises(CrucibleError, match="diffusion_model.d"):
        module.lora_key_names(["diffusion_model.d"], {"lora_unet_x": "diffusion_model.x.weight"})


def test_export_uses_comfyuis_keys_and_restore_leaves_the_model_as_it_was(module):
    from trainer.export import export_peft_modules
    from trainer.network import attach_network

    family, base = family_of(module, "epsilon")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    key_map = comfy_key_map(base)
    comps = family.load(types.SimpleNamespace(path="", vae_path="", tokenizer_path="", text_encoder_paths=()))
    comps.to(dtype=torch.float16)  # the loop's casts do not reach ComfyUI's weights
    net = attach_network(family, comps, NetworkConfig(network_dim=2, network_alpha=2.0, target_preset="all_linear_conv"))
    tensors = export_peft_modules(family, net.modules)
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert prefixes == {"lora_unet_attn1_to_q", "lora_unet_attn1_to_out", "lora_unet_ff", "lora_unet_proj_in",
                        "lora_unet_conv", "lora_unet_blocks_0", "lora_unet_blocks_1"} and prefixes <= set(key_map)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    family.restore()
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# --- registration and the node's refusals ---------------------------------------------------------------------------
def test_a_hosted_family_is_known_only_while_registered(module, make_config, tiny_sd15, demo_dataset, tmp_path):
    from dataclasses import replace

    from trainer.config_checks import validate
    from trainer.families import get_family, hosted_family

    family, _ = family_of(module, "epsilon")
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path)
    cfg = replace(cfg, model=replace(cfg.model, family="comfy", path=""))
    with hosted_family(family):
        validate(cfg)
        assert get_family("comfy") is family
    with pytest.raises(ConfigError, match="'model.family' is 'comfy'"):
        validate(cfg)
    with pytest.raises(ValueError, match="registered name"):
        with hosted_family(types.SimpleNamespace(name="sd15")):
            pass


def test_the_model_path_refuses_what_it_cannot_train(module):
    patcher = object()
    with pytest.raises(CrucibleError, match="missing comfy_clip, comfy_vae"):
        module.hosted_model_config(patcher, None, None)
    with pytest.raises(CrucibleError, match="not both"):
        module.hosted_model_config(patcher, object(), object(), crucible_model=object())
    with pytest.raises(CrucibleError, match="network_type 'full'"):
        module.hosted_model_config(patcher, object(), object(), network=NetworkConfig(network_type="full"))
    # train_text_encoder trains the CLIP's CLIP towers (tests/test_comfy_text_encoders.py)


def test_gradient_checkpointing_keeps_the_gradients_and_is_undone(module):
    from trainer.families.objectives import DiffusionObjective
    from trainer.network import attach_network

    family, base = family_of(module, "epsilon")
    comps = family.load(types.SimpleNamespace(path="", vae_path="", tokenizer_path="", text_encoder_paths=()))
    net = attach_network(family, comps, NetworkConfig(network_dim=2, network_alpha=2.0, target_preset="all_linear_conv"))
    latents, noise, cond = batch(2)
    noised = DiffusionObjective(comps.noise_scheduler, "epsilon", TrainingConfig()).noise(
        latents, noise, torch.Generator().manual_seed(5))

    def grads():
        for p in net.parameters():
            p.grad = None
        family.predict(comps, noised.noisy, noised.timesteps, cond).square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)  # lora_B starts at zero: make every gradient non-trivial
    plain = grads()
    comps.denoiser.enable_gradient_checkpointing()
    assert all("forward" in vars(b) for b in base.diffusion_model.blocks)
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
    family.restore()
    assert not any("forward" in vars(b) for b in base.diffusion_model.blocks)


def test_blocks_that_update_their_residual_stream_in_place_train(module):
    """ComfyUI's DiT blocks add to their residual streams in place, which autograd refuses once the stream was saved;
    predict runs them out of place (nodes/comfy_autograd.py), checkpointed or not, with the out-of-place gradients."""
    from trainer.network import attach_network

    family, base = family_of(module, "flow")
    comps = family.load(types.SimpleNamespace(path="", vae_path="", tokenizer_path="", text_encoder_paths=()))
    net = attach_network(family, comps, NetworkConfig(network_dim=2, network_alpha=2.0, target_preset="all_linear_conv"))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    latents, noise, cond = batch(4)
    noisy, timesteps = 0.5 * latents + 0.5 * noise, torch.tensor([500.0, 250.0])

    def grads(in_place):
        base.diffusion_model.in_place = in_place
        for p in net.parameters():
            p.grad = None
        family.predict(comps, noisy, timesteps, cond).square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    reference = grads(False)
    base.diffusion_model.in_place = True
    with pytest.raises(RuntimeError, match="inplace"):  # ComfyUI's apply_model as it is
        base.apply_model(noisy, timesteps / 1000, c_crossattn=cond["encoder_hidden_states"]).square().mean().backward()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(reference, grads(True)))
    comps.denoiser.enable_gradient_checkpointing()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(reference, grads(True)))
    family.restore()


def test_a_model_loaded_in_inference_mode_trains(module):
    """ComfyUI executes nodes under torch.inference_mode(): its loaders' weights are inference tensors, which
    autograd refuses to save for the backward pass (the real-server failure this guards against)."""
    from trainer.families.objectives import DiffusionObjective
    from trainer.network import attach_network

    with torch.inference_mode():
        family, base = family_of(module, "epsilon")
    assert base.diffusion_model.ff.weight.is_inference()
    comps = family.load(types.SimpleNamespace(path="", vae_path="", tokenizer_path="", text_encoder_paths=()))
    assert not any(t.is_inference() for t in base.diffusion_model.state_dict().values())
    net = attach_network(family, comps, NetworkConfig(network_dim=2, network_alpha=2.0, target_preset="all_linear"))
    latents, noise, cond = batch(3)
    noised = DiffusionObjective(comps.noise_scheduler, "epsilon", TrainingConfig()).noise(
        latents, noise, torch.Generator().manual_seed(6))
    family.predict(comps, noised.noisy, noised.timesteps, cond).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_the_latent_cache_key_follows_the_graphs_vae_weights(module):
    """The MODEL path has no model file to name in the disk cache's key: the VAE's weights decide it, so latents of
    another VAE are never reused (and the same VAE's are)."""
    family, _ = family_of(module, "epsilon")
    same, _ = family_of(module, "epsilon")
    same.vae.first_stage_model.load_state_dict(family.vae.first_stage_model.state_dict())
    other, _ = family_of(module, "epsilon")
    with torch.no_grad():
        other.vae.first_stage_model.weight.copy_(family.vae.first_stage_model.weight + 1e-3)
    ident = family.latent_cache_identity(None, None)
    assert ident == same.latent_cache_identity(None, None)
    assert ident != other.latent_cache_identity(None, None)


# --- DoRA, LoHa and LoKr on the MODEL path -------------------------------------------------------------------------
ADAPTER_KEYS = {  # the tensors ComfyUI 0.8.0's weight adapters read per module (comfy/weight_adapter/*.py)
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"},
}


@pytest.mark.parametrize("network_type", ["dora", "loha", "lokr"])
def test_other_adapter_types_train_export_comfy_keys_and_are_removed(module, network_type):
    """DoRA, LoHa and LoKr train on ComfyUI's modules through apply_model (every adapter weight gets a gradient),
    export under ComfyUI's key names with each type's own tensor names, and restore() leaves the MODEL bit-identical."""
    from trainer.export import export_peft_modules
    from trainer.families.objectives import DiffusionObjective
    from trainer.network import attach_network

    family, base = family_of(module, "epsilon")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    key_map = comfy_key_map(base)
    comps = family.load(types.SimpleNamespace(path="", vae_path="", tokenizer_path="", text_encoder_paths=()))
    net = attach_network(family, comps, NetworkConfig(network_type=network_type, network_dim=2, network_alpha=2.0,
                                                      target_preset="all_linear_conv"))
    latents, noise, cond = batch(4)
    noised = DiffusionObjective(comps.noise_scheduler, "epsilon", TrainingConfig()).noise(
        latents, noise, torch.Generator().manual_seed(7))
    family.predict(comps, noised.noisy, noised.timesteps, cond).square().mean().backward()
    params = net.parameters()
    assert params and all(p.grad is not None for p in params)
    tensors = export_peft_modules(family, net.modules)
    by_prefix: dict[str, set[str]] = {}
    for key in tensors:
        prefix = next(p for p in key_map if key.startswith(p + "."))
        by_prefix.setdefault(prefix, set()).add(key[len(prefix) + 1:])
    assert set(by_prefix) == {"lora_unet_attn1_to_q", "lora_unet_attn1_to_out", "lora_unet_ff", "lora_unet_proj_in",
                              "lora_unet_conv", "lora_unet_blocks_0", "lora_unet_blocks_1"}
    for prefix, names in by_prefix.items():
        assert names <= ADAPTER_KEYS[network_type], (prefix, names)
    if network_type == "dora":
        assert all("dora_scale" in names for names in by_prefix.values())
    family.restore()
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# --- captions of different lengths (LLM text encoders: Qwen3, Gemma 2, T5 do not pad) ------------------------------
class WordsClip:
    """ComfyUI's CLIP interface for an encoder that does not pad: one token per word (features seeded by the word),
    an all-ones attention mask of the same length, no pooled output (Qwen3 / Gemma 2 through ComfyUI)."""

    def tokenize(self, text):
        return text.split() or [""]

    def encode_from_tokens(self, tokens, return_dict=False):
        rows = [torch.randn(8, generator=torch.Generator().manual_seed(sum(map(ord, w)) + 1)) for w in tokens]
        return {"cond": torch.stack(rows)[None], "pooled_output": None,
                "attention_mask": torch.ones(1, len(tokens), dtype=torch.long)}


class TokenCountModel(FakeBaseModel):
    """Lumina 2 / Z-Image's extra_conds: num_tokens is a per-batch constant (ComfyUI never batches different
    lengths); the model refuses a batch whose features are longer than num_tokens, and its output depends on every
    token (zero padding would change it). Like Flux's encode_adm (Chroma), it reads pooled_output unconditionally:
    ComfyUI's conditioning carries the key, None for an encoder without a pooled output (T5, LLMs)."""

    def extra_conds(self, **kwargs):
        assert kwargs["pooled_output"] is None
        mask = kwargs.get("attention_mask")
        return {"c_crossattn": Cond(kwargs["cross_attn"]),
                "num_tokens": Constant(int(mask.sum()) if mask is not None else kwargs["cross_attn"].shape[1])}

    def apply_model(self, x, t, c_crossattn=None, num_tokens=None, transformer_options=None, **kwargs):
        assert c_crossattn.shape[1] == num_tokens, (c_crossattn.shape, num_tokens)
        return super().apply_model(x, t, c_crossattn=c_crossattn)


def words_family(module):
    base = TokenCountModel(sampling("flow"))
    vae = types.SimpleNamespace(first_stage_model=torch.nn.Conv2d(3, 4, 1))
    family = module.ComfyModelFamily(types.SimpleNamespace(model=base), clip=WordsClip(), vae=vae,
                                     key_map=comfy_key_map(base))
    return family, family.load(types.SimpleNamespace(path="", vae_path="", tokenizer_path="", text_encoder_paths=()))


CAPTIONS = ["a red circle", "a small blue square on black", "dot"]


def test_captions_of_different_lengths_each_predict_as_comfyui_computes_them_alone(module):
    """A batch of captions of 3, 6 and 1 tokens (an LLM encoder does not pad): each sample's prediction equals the
    prediction for that caption alone, because each gets its own unpadded features and attention mask back and
    samples run together only where ComfyUI's sampler would batch them. Before, ComfyUI's CONDCrossAttn batching
    was applied to the captions: an error on this model (or features repeated to a common length)."""
    family, comps = words_family(module)
    g = torch.Generator().manual_seed(5)
    x, timesteps = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([200.0, 500.0, 800.0])
    cond = family.encode_text(comps, CAPTIONS)
    assert cond["encoder_hidden_states"].shape == (3, 6, 8)
    assert cond["comfy_tokens"].tolist() == [3, 6, 1]
    assert cond["comfy_token:attention_mask"].tolist()[2] == [1, 0, 0, 0, 0, 0]
    together = family.predict(comps, x, timesteps, cond)
    for i, caption in enumerate(CAPTIONS):
        alone = family.predict(comps, x[i:i + 1], timesteps[i:i + 1], family.encode_text(comps, [caption]))
        assert torch.allclose(together[i:i + 1], alone, atol=1e-6), caption


def test_cached_captions_of_different_lengths_batch_and_predict_alike(module):
    """The text cache encodes captions one item at a time and batches the cached rows later: rows of different
    lengths are zero-padded (trainer.cache.cat_rows) and the lengths travel with them, so a batch from the cache
    predicts exactly as the same batch encoded at once."""
    from trainer.cache import cat_rows

    family, comps = words_family(module)
    rows = [family.encode_text(comps, [c]) for c in CAPTIONS]
    cached = {k: cat_rows([r[k] for r in rows]) for k in rows[0]}
    direct = family.encode_text(comps, CAPTIONS)
    assert cached.keys() == direct.keys() and all(torch.equal(cached[k], direct[k]) for k in direct)
    g = torch.Generator().manual_seed(6)
    x, timesteps = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([300.0, 600.0, 900.0])
    assert torch.equal(family.predict(comps, x, timesteps, cached), family.predict(comps, x, timesteps, direct))


def test_equal_lengths_run_as_one_batch(module):
    """Captions of equal length (every CLIP family pads to 77) still run as one apply_model call."""
    family, comps = words_family(module)
    base = family.patcher.model
    cond = family.encode_text(comps, ["a red circle", "one blue square"])
    base.diffusion_model.calls.clear()
    family.predict(comps, torch.randn(2, 4, 8, 8), torch.tensor([100.0, 700.0]), cond)
    assert len(base.diffusion_model.calls) == 1
