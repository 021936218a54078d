"""The Step Plan's memory estimate for the MODEL path (nodes/comfy_memory.py), with ComfyUI's stand-ins: the meta copy
of a loaded model copies no weight, weights count as stored (fp8 = 1 byte), the adapter is counted exactly as the run
attaches it, the traced activations equal what autograd really saves in a real forward of the same model, and the
node shows ComfyUI's view of the device and the switches that make a run fit. The real ComfyUI objects (and a
full-size SDXL against the diffusers-path estimate) run in tests/comfyui_e2e/checks_model_path_memory.py."""
from __future__ import annotations

import hashlib
import importlib
import sys
import types

import pytest
import torch

import comfy_stubs
from test_comfy_family import FakeBaseModel, comfy_key_map, module, sampling  # noqa: F401 - module is a fixture
from trainer.config import NetworkConfig, OptimConfig, TrainingConfig
from trainer.errors import CrucibleError

GIB = 2**30


class DeepDenoiser(torch.nn.Module):
    """A small DiT-like denoiser: patch in, a ModuleList of attention + MLP blocks (what HostedModule checkpoints),
    patch out; ComfyUI's forward signature."""

    def __init__(self, width=32, blocks=3):
        super().__init__()
        self.img_in = torch.nn.Conv2d(4, width, 2, stride=2)
        self.txt_in = torch.nn.Linear(8, width)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({
            "norm": torch.nn.LayerNorm(width), "attn_qkv": torch.nn.Linear(width, 3 * width),
            "attn_proj_out": torch.nn.Linear(width, width), "mlp_fc1": torch.nn.Linear(width, 4 * width),
            "mlp_fc2": torch.nn.Linear(4 * width, width)}) for _ in range(blocks))
        for block in self.blocks:
            block.forward = types.MethodType(_block_forward, block)
        self.out = torch.nn.ConvTranspose2d(width, 4, 2, stride=2)

    def forward(self, x, t, context=None, control=None, transformer_options=None, **kwargs):
        h = self.img_in(x)
        b, c, hh, ww = h.shape
        tokens = torch.cat([self.txt_in(context), h.flatten(2).transpose(1, 2)], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        img = tokens[:, context.shape[1]:].transpose(1, 2).reshape(b, c, hh, ww)
        return self.out(img) * (1 + t.view(-1, 1, 1, 1) / 1000)


def _block_forward(self, tokens):
    q, k, v = self["attn_qkv"](self["norm"](tokens)).chunk(3, dim=-1)
    attn = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    tokens = tokens + self["attn_proj_out"](attn)
    return tokens + self["mlp_fc2"](torch.nn.functional.gelu(self["mlp_fc1"](tokens)))


class TextStandIn:
    """ComfyUI's CLIP interface: every caption → a fixed embedding [1, 5, 8]."""

    def __init__(self):
        self.cond_stage_model = torch.nn.Linear(8, 8)  # 72 fp32 parameters: "text encoder weights"

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_dict=False):
        seed = int(hashlib.sha256(tokens.encode()).hexdigest()[:8], 16)
        return {"cond": torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(seed))}


def deep_family(module, network_type="lora"):  # noqa: F811 - the fixture's value
    base = FakeBaseModel(sampling("flow"))
    base.diffusion_model = DeepDenoiser()
    patcher = types.SimpleNamespace(model=base)
    vae = types.SimpleNamespace(first_stage_model=torch.nn.Conv2d(3, 16, 3))
    return module.ComfyModelFamily(patcher, clip=TextStandIn(), vae=vae, key_map=comfy_key_map(base)), base


@pytest.fixture(scope="module")
def memory(module):  # noqa: F811
    return importlib.import_module(f"{comfy_stubs.PACK_NAME}.nodes.comfy_memory")


def options(memory, **changes):
    from trainer.memory import MemoryOptions

    defaults = dict(family="ComfyUI test", network_type="lora", network_dim=4, target_preset="attn_mlp",
                    precision="no", optimizer="adamw", gradient_checkpointing=False, resolution=64, batch_size=2)
    return MemoryOptions(**{**defaults, **changes})


def estimator(memory, family, device="cuda"):
    cond = family.encode_text(types.SimpleNamespace(denoiser=torch.nn.Linear(1, 1)), [""])
    return memory.ModelPathEstimator(family, cond, device)


# --- the meta copy ---------------------------------------------------------------------------------------------------
def test_the_meta_copy_copies_no_weight_and_keeps_dtypes_and_ties(memory):
    model = DeepDenoiser()
    model.blocks[0]["attn_qkv"].weight.data = model.blocks[0]["attn_qkv"].weight.data.to(torch.float8_e4m3fn)
    model.txt_in.weight = model.blocks[1]["attn_proj_out"].weight = torch.nn.Parameter(torch.randn(32, 8))
    model.blocks[1]["attn_proj_out"].weight = torch.nn.Parameter(torch.randn(32, 32))
    model.tied = model.txt_in  # the same module twice
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone = memory.meta_copy(model)
    assert all(t.device.type == "meta" for t in [*clone.parameters(), *clone.buffers()])
    assert {k: (v.shape, v.dtype) for k, v in clone.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    assert clone.tied.weight is clone.txt_in.weight
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's MODEL is untouched
    assert clone.blocks[0] is not model.blocks[0] and clone.blocks[0]._parameters is not model.blocks[0]._parameters


def test_weights_count_as_stored_fp8_as_one_byte(memory):
    model = DeepDenoiser()
    total = sum(p.numel() for p in model.parameters())
    assert memory.stored_bytes(model) == total * 4
    fc1 = model.blocks[0]["mlp_fc1"]
    fc1.weight.data = fc1.weight.data.to(torch.float8_e4m3fn)
    assert memory.stored_bytes(model) == total * 4 - fc1.weight.numel() * 3
    assert memory.stored_bytes(object()) == 0  # a CLIP stand-in without a module


# --- the parts -------------------------------------------------------------------------------------------------------
def test_the_adapter_is_counted_exactly_as_the_run_attaches_it(module, memory):  # noqa: F811
    from trainer.families.base import Components
    from trainer.network import attach_network

    for network in (NetworkConfig(network_dim=4), NetworkConfig(network_type="lokr", network_dim=4,
                                                                target_preset="all_linear")):
        family, base = deep_family(module)
        est = estimator(memory, family).estimate(options(memory, network_dim=4), network)
        comps = Components(denoiser=module.HostedModule("diffusion_model", base.diffusion_model), vae=None,
                           text_encoders=[], tokenizers=[], noise_scheduler=None, text_encoder_names=())
        real = sum(p.numel() for p in attach_network(family, comps, network).parameters())
        assert real > 0
        assert est.parts["trainable parameters"] * GIB == pytest.approx(real * (4 + 4 + 8))
        family.restore()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_traced_activations_equal_what_a_real_forward_saves(module, memory, checkpointing):  # noqa: F811
    """The meta trace (ComfyUI's apply_model on the copy, the family's conditioning) against autograd's saved tensors
    in a real forward of the same model with the same adapter, counted by the same rule."""
    from trainer.families.base import Components
    from trainer.memory import _SavedBytes
    from trainer.network import attach_network

    family, base = deep_family(module)
    network = NetworkConfig(network_dim=4)
    est = estimator(memory, family).estimate(options(memory, gradient_checkpointing=checkpointing), network)
    traced = est.parts["activations"] * GIB
    hosted = module.HostedModule("diffusion_model", base.diffusion_model)
    comps = Components(denoiser=hosted, vae=None, text_encoders=[], tokenizers=[], noise_scheduler=None,
                       text_encoder_names=())
    net = attach_network(family, comps, network)
    x = torch.randn(2, 4, 8, 8)
    cond = family.encode_text(comps, ["", ""])
    with torch.no_grad():  # predict's own load (and inference-tensor copy) happens first, so the weights listed
        family.predict(comps, x, torch.full((2,), 500), cond)  # below are the ones the measured forward reads
    weights = {p.untyped_storage()._cdata for p in base.parameters()}
    real = _SavedBytes(weights)
    units = []
    if checkpointing:  # what each checkpointed block saves while it is recomputed, and its input outside
        for block in hosted._blocks():
            def run(*args, _forward=block.forward, **kwargs):
                real.pack(args[0])
                inner = _SavedBytes(weights)
                with torch.autograd.graph.saved_tensors_hooks(inner.pack, inner.unpack):
                    out = _forward(*args, **kwargs)
                units.append(inner.total)
                return out
            block.forward = run
    with torch.autograd.graph.saved_tensors_hooks(real.pack, real.unpack):
        out = family.predict(comps, x, torch.full((2,), 500), cond)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    measured = real.total + (max(units) if units else 0)
    # the real SDPA saves the attention's inputs and output, the fused-kernel rule adds a log-sum-exp row per query
    lse = 3 * 2 * 1 * (5 + 16) * 4 if checkpointing is False else 2 * 1 * (5 + 16) * 4
    assert abs(traced - measured) <= lse, (traced, measured)
    family.restore()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_counted_storage_that_is_freed_does_not_hide_the_next_one(device):
    """The counter keys storages by address. A checkpointed block's input it counts may be kept by nothing else and
    freed; the next storage then comes back at that address (on ``meta`` every time, on the CPU as the allocator's
    history has it) and passed for one already counted: test_traced_activations_equal_what_a_real_forward_saves[True]
    failed by the order the tests ran in. Every storage counts once, whatever is freed in between."""
    from trainer.memory import _SavedBytes

    counter = _SavedBytes()
    counter.pack(torch.empty(10, device=device))  # its only reference: freed at once
    for _ in range(100):
        counter.pack(torch.empty(10, device=device))
    assert counter.total == 101 * 10 * 4
    kept = torch.empty(10, device=device)
    counter.pack(kept), counter.pack(kept[2:])  # a storage saved twice (a view) is still held once
    assert counter.total == 102 * 10 * 4


def test_checkpointing_and_resolution_move_the_activations_the_right_way(module, memory):  # noqa: F811
    family, _ = deep_family(module)
    est = estimator(memory, family)
    network = NetworkConfig(network_dim=4)
    act = {(gc, px): est.estimate(options(memory, gradient_checkpointing=gc, resolution=px), network).parts["activations"]
           for gc in (False, True) for px in (64, 128)}
    assert act[(True, 128)] < act[(False, 128)] * 0.7
    # 2×2 patches of an 8× latent: 16 → 64 image tokens, plus 5 text tokens (69 / 21 = 3.3); the convolutions 4×
    assert 3.2 < act[(False, 128)] / act[(False, 64)] < 4.0


def test_encoders_count_by_cache_and_device(module, memory):  # noqa: F811
    family, _ = deep_family(module)
    network = NetworkConfig(network_dim=4)
    clip_gib, vae_gib = 72 * 4 / GIB, (16 * 3 * 9 + 16) * 4 / GIB
    off = estimator(memory, family).estimate(options(memory), network)
    assert off.parts["text encoders"] == pytest.approx(clip_gib) and off.parts["vae"] == pytest.approx(vae_gib)
    assert off.parts["vae encode (transient)"] == pytest.approx(3 * 16 * 64 * 64 * 2 * 4 / GIB)
    assert off.caching_gib == 0
    cached = estimator(memory, family).estimate(options(memory, cache_latents=True, cache_text_embeddings=True), network)
    assert cached.parts["text encoders"] == 0 and cached.parts["vae"] == 0 and "vae encode (transient)" not in cached.parts
    weights = cached.parts["denoiser weights"]
    assert cached.caching_gib > weights + clip_gib + vae_gib  # MODEL loaded, then CLIP + VAE + the encode transient
    on_cpu = estimator(memory, family, "cpu").estimate(options(memory, cache_latents=True, cache_text_embeddings=True),
                                                       network)
    assert on_cpu.parts["text encoders"] == pytest.approx(clip_gib)  # host memory is the device: ComfyUI keeps them


def test_switches_name_what_fits_cheapest_first(module, memory):  # noqa: F811
    family, _ = deep_family(module)
    family.vae.first_stage_model = torch.nn.Conv2d(3, 1, 3)  # a small encode transient: the activations set the peak
    network = NetworkConfig(network_dim=16)
    est = estimator(memory, family)
    opts = options(memory, network_dim=16)
    full = est.estimate(opts, network).total_gib
    checkpointed = est.estimate(options(memory, network_dim=16, gradient_checkpointing=True), network).total_gib
    assert checkpointed < full
    assert memory.fitting_switches(est, opts, network, (full + checkpointed) / 2) == \
        ["gradient_checkpointing on (Training Options)"]
    everything = memory.fitting_switches(est, opts, network, 0.0)
    assert everything[-1] == "nothing available here fits"
    assert any(s.startswith("fp8 weights") for s in everything) and "network_dim 8" in everything
    fits = memory.report(est, opts, network, ("cuda", full + 1, 24.0, "NORMAL_VRAM"))
    assert "fits: ComfyUI's device cuda (NORMAL_VRAM)" in fits and "To fit" not in fits
    tight = memory.report(est, opts, network, ("cuda", (full + checkpointed) / 2, 24.0, "NORMAL_VRAM"))
    assert "will NOT fit" in tight and "ComfyUI would load the MODEL partially" in tight
    assert "To fit, switch: gradient_checkpointing on" in tight


# --- the node ------------------------------------------------------------------------------------------------------
def test_step_plan_shows_the_model_path_estimate(module, memory, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CRUCIBLE_ALLOWED_DIRS", str(tmp_path))
    from trainer.config import DatasetConfig

    nodes = importlib.import_module(f"{comfy_stubs.PACK_NAME}.nodes.dataset_nodes")
    mm = sys.modules["comfy.model_management"]
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cpu"), raising=False)
    monkeypatch.setattr(mm, "get_free_memory", lambda device=None: 8 * GIB, raising=False)
    monkeypatch.setattr(mm, "get_total_memory", lambda device=None: 16 * GIB, raising=False)
    lora = types.ModuleType("comfy.lora")
    lora.model_lora_keys_unet = lambda base, keys: comfy_key_map(base)
    monkeypatch.setitem(sys.modules, "comfy.lora", lora)
    monkeypatch.setattr(sys.modules["comfy"], "lora", lora, raising=False)
    family, base = deep_family(module)
    dataset = (DatasetConfig(path=str(_images(tmp_path)), resolution=64),)
    plan = nodes.CrucibleStepPlan()
    fields = dict(batch_size=2, epochs=1, max_train_steps=0, gradient_accumulation_steps=1, drop_last=False,
                  save_every_n_epochs=1, save_every_n_steps=0, sample_every_n_epochs=0, sample_every_n_steps=0,
                  lr_warmup_ratio=0.0, seed=1)
    out = plan.plan(dataset=dataset, comfy_model=family.patcher, comfy_clip=family.clip, comfy_vae=family.vae,
                    network=NetworkConfig(network_dim=4), optimizer=OptimConfig(),
                    training=TrainingConfig(gradient_checkpointing=True), **fields)
    text = out["result"][0] if isinstance(out, dict) else out[0]
    assert "estimated peak memory" in text and "ComfyUI FakeBaseModel lora at 64 px, batch 2" in text
    assert "gradient checkpointing on" in text and "MODEL path: weights as stored (float32)" in text
    assert "fits: ComfyUI's device cpu" in text and "8.0 GiB free of 16.0 GiB" in text
    assert "previews" not in text  # the plan samples nothing: no preview renders
    # a plan that samples: the run renders previews; here a preview's decode (a 128-wide full-resolution layer) is
    # larger than the steps' activations and the encode transient, so the previews peak is the run's and is named
    out = plan.plan(dataset=dataset, comfy_model=family.patcher, comfy_clip=family.clip, comfy_vae=family.vae,
                    network=NetworkConfig(network_dim=4), optimizer=OptimConfig(),
                    training=TrainingConfig(gradient_checkpointing=True), **{**fields, "sample_every_n_epochs": 1})
    sampled = out["result"][0] if isinstance(out, dict) else out[0]
    assert "previews peak at" in sampled and "and the VAE in the previews peak" in sampled
    with pytest.raises(CrucibleError, match="comfy_clip"):
        plan.plan(dataset=dataset, comfy_model=family.patcher, comfy_vae=family.vae, **fields)
    # the plan attached its adapter to a meta copy: the user's MODEL has none, and its weights stay where they were
    assert not [n for n, _ in base.named_modules() if "lora" in n]
    assert all(p.device.type == "cpu" for p in base.parameters())


def _images(tmp_path):
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 100, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red square")
    return folder


# --- gradient checkpointing on ComfyUI's UNet layout ---------------------------------------------------------------
class TimestepEmbedSequential(torch.nn.Sequential):
    """ComfyUI's UNet block kind: the UNet runs its layers itself (forward_timestep_embed), never its forward."""


class SpatialTransformer(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.proj_in = torch.nn.Linear(width, width)
        self.transformer_blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                torch.nn.Linear(4 * width, width)) for _ in range(3))

    def forward(self, x):
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = x + block(x)
        return x


class UNetLayout(torch.nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.input_blocks = torch.nn.ModuleList([TimestepEmbedSequential(torch.nn.Linear(width, width)),
                                                 TimestepEmbedSequential(torch.nn.Linear(width, width),
                                                                         SpatialTransformer(width))])
        self.middle_block = TimestepEmbedSequential(SpatialTransformer(width))
        self.out = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width))

    def forward(self, x):
        for block in [*self.input_blocks, self.middle_block]:
            for layer in block:  # as comfy's forward_timestep_embed
                x = layer(x)
        return self.out(x)


def test_checkpointing_reaches_the_layers_comfyuis_unet_runs_itself(module):  # noqa: F811
    """Wrapping a TimestepEmbedSequential's forward did nothing (ComfyUI runs its layers itself): the UNet's
    checkpointing saved exactly as much as no checkpointing. Now its layers, the middle block and each transformer
    block are the units."""
    from trainer.memory import _SavedBytes

    torch.manual_seed(0)
    unet = UNetLayout()
    for p in unet.parameters():
        p.requires_grad_(False)
    unet.input_blocks[1][1].transformer_blocks[0][1].weight.requires_grad_(True)  # something to train
    hosted = module.HostedModule("diffusion_model", unet)
    x = torch.randn(2, 64, 16)

    def saved():
        counter = _SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            out = unet(x)
        out.pow(2).mean().backward()
        return counter.total, out.detach()

    plain, out_plain = saved()
    hosted.enable_gradient_checkpointing()
    units = hosted._blocks()
    assert len(units) == 1 + 1 + 3 + 3  # a Linear, a Linear, 3 + 3 transformer blocks (proj_in outside)
    checkpointed, out_checkpointed = saved()
    assert torch.equal(out_plain, out_checkpointed)
    assert checkpointed < plain / 2, (checkpointed, plain)
    hosted.disable_gradient_checkpointing()
    assert saved()[0] == plain
