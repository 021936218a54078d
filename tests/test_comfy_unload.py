"""ComfyUI unloading / re-patching the MODEL in the middle of a MODEL-path run (nodes/comfy_adapter_swap.py).

On a small GPU, loading the VAE (a training step without the latent cache), a CLIP or a preview makes ComfyUI move
the MODEL out: ``ModelPatcher.unpatch_model`` writes each backed-up weight back by key path
(``comfy.utils.set_attr_param(model, "diffusion_model.x.y.weight", …)``), and the next load re-applies the upstream
weight patches the same way. A fake patcher below does exactly that (ComfyUI 0.8.0's set_attr: getattr down the path,
then setattr of a new Parameter), with one upstream "LoRA" delta per weight. The real ComfyUI runs this in
tests/comfyui_e2e/checks_model_path_upstream.py (check_unload)."""
from __future__ import annotations

import sys
import types

import torch

from test_comfy_family import batch, family_of, module  # noqa: F401 - the stubbed pack's comfy_family
from trainer.config import NetworkConfig

CFG = types.SimpleNamespace(path="", vae_path="", tokenizer_path="", text_encoder_paths=())


def set_attr_param(obj, key: str, value: torch.Tensor) -> None:
    """comfy.utils.set_attr_param of ComfyUI 0.8.0."""
    *path, last = key.split(".")
    for name in path:
        obj = getattr(obj, name)
    setattr(obj, last, torch.nn.Parameter(value, requires_grad=False))


def get_attr(obj, key: str):
    for name in key.split("."):
        obj = getattr(obj, name)
    return obj


class FakeModelManagement:
    """load_models_gpu / unload_all_models of one MODEL with upstream weight patches, by key path."""

    def __init__(self, base: torch.nn.Module):
        self.base, self.loaded, self.backup, self.trees = base, False, {}, []
        keys = [k for k in base.state_dict() if k.startswith("diffusion_model.") and k.endswith(".weight")]
        g = torch.Generator().manual_seed(11)
        self.patches = {k: torch.randn(get_attr(base, k).shape, generator=g) * 0.1 for k in keys}

    def load_models_gpu(self, models, **kwargs):
        self.trees.append(sorted(n for n, _ in self.base.named_modules()))
        if not self.loaded:
            for key, delta in self.patches.items():
                self.backup[key] = get_attr(self.base, key).detach().clone()
                set_attr_param(self.base, key, self.backup[key] + delta)
            self.loaded = True

    def unload_all_models(self):
        self.trees.append(sorted(n for n, _ in self.base.named_modules()))
        if self.loaded:
            for key, weight in self.backup.items():
                set_attr_param(self.base, key, weight)
            self.loaded = False


def test_the_model_unloaded_mid_run_reloads_with_its_patches_and_the_adapter_survives(module, monkeypatch):  # noqa: F811
    from trainer.network import attach_network

    family, base = family_of(module, "epsilon")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    fake = FakeModelManagement(base)
    mm = sys.modules["comfy.model_management"]
    monkeypatch.setattr(mm, "load_models_gpu", fake.load_models_gpu, raising=False)
    monkeypatch.setattr(mm, "unload_all_models", fake.unload_all_models)
    base.process_latent_in = lambda latents: latents

    def encode(images):  # loading the VAE on a small GPU: ComfyUI frees the MODEL first
        mm.unload_all_models()
        return torch.zeros(images.shape[0], 4, 8, 8)

    family.vae.encode = encode
    comps = family.load(CFG)
    net = attach_network(family, comps, NetworkConfig(network_dim=2, network_alpha=2.0, target_preset="all_linear"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in net.parameters():  # a trained adapter: lora_B no longer zero
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    adapter = [p.detach().clone() for p in net.parameters()]
    latents, _, cond = batch(2)
    timesteps = torch.tensor([200, 700])
    before = family.predict(comps, latents, timesteps, cond)

    family.encode_images(comps, torch.zeros(2, 3, 64, 64))  # the old code: KeyError "attribute 'weight' already exists"
    assert not fake.loaded and all(torch.equal(get_attr(base, k), fake.backup[k]) for k in fake.patches)
    after = family.predict(comps, latents, timesteps, cond)  # reloaded, re-patched, the adapter back in
    assert fake.loaded and torch.equal(after, before)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), adapter))
    assert not any(n.endswith(("lora_A", "base_layer")) for tree in fake.trees for n in tree)  # ComfyUI's own view
    after.square().mean().backward()  # the step trains the adapter
    assert all(p.grad is not None for p in net.parameters())

    family.restore()
    mm.unload_all_models()
    now = base.state_dict()
    assert now.keys() == original.keys() and all(torch.equal(now[k], original[k]) for k in original)


def test_predict_loads_the_model_only_when_comfyui_no_longer_holds_it_loaded(module, monkeypatch):  # noqa: F811
    """ComfyUI's load_models_gpu before each training forward (with the adapter swap and the inference-tensor walk
    around it) is skipped while ComfyUI holds the MODEL as its last load left it; an unload, a partial unload
    (low-VRAM streaming), a re-patch or an extra patch model makes the next forward load it again."""
    family, base = family_of(module, "epsilon")
    patcher, state = family.patcher, types.SimpleNamespace(loaded_size=100, extra=[])
    patcher.loaded_size, patcher.model_size = (lambda: state.loaded_size), (lambda: 100)
    patcher.patches_uuid, patcher.model_patches_models = "patches-1", (lambda: state.extra)
    mm = sys.modules["comfy.model_management"]
    calls = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, **kw: calls.append(len(models)), raising=False)
    monkeypatch.setattr(mm, "current_loaded_models", [], raising=False)
    comps = family.load(CFG)
    latents, _, cond = batch(2)
    timesteps = torch.tensor([200, 700])

    def held() -> None:  # what ComfyUI 0.8.0's load leaves: the LoadedModel listed, all weights, its patches
        mm.current_loaded_models[:] = [types.SimpleNamespace(model=patcher)]
        state.loaded_size, state.extra = 100, []
        base.model_lowvram, base.current_weight_patches_uuid = False, "patches-1"

    held()
    calls.clear()
    first = family.predict(comps, latents, timesteps, cond)
    assert torch.equal(family.predict(comps, latents, timesteps, cond), first) and calls == []
    changes = {"unloaded": lambda: mm.current_loaded_models.clear(),
               "partly unloaded": lambda: setattr(state, "loaded_size", 40),
               "streamed (low VRAM)": lambda: setattr(base, "model_lowvram", True),
               "re-patched": lambda: setattr(base, "current_weight_patches_uuid", None),
               "with a patch model": lambda: state.extra.append(object())}
    for what, change in changes.items():
        held()
        change()
        calls.clear()
        assert torch.equal(family.predict(comps, latents, timesteps, cond), first), what
        assert calls == [1], what
