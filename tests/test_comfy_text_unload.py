"""ComfyUI unloading / partly unloading / re-patching the CLIP in the middle of a MODEL-path run that trains its text
encoder (nodes/comfy_adapter_swap.py: each trained CLIP tower is a root of the family's AdapterSwap).

On a small GPU ComfyUI moves the CLIP out whenever the MODEL or the VAE loads, and ``clip.encode_from_tokens`` loads
it back itself (``CLIP.load_model``) before it encodes. Unloading writes each backed-up weight back by key path
(``comfy.utils.set_attr_param(cond_stage_model, "clip_l.transformer.….q_proj.weight", …)``), a partial unload does
it for part of the weights, and the next load re-applies the upstream patches (a LoraLoader's CLIP LoRA) the same
way, under ``torch.inference_mode`` as ComfyUI's nodes run. A fake model management below does exactly that on the
fake CLIP of test_comfy_text_encoders (whose encode, like 0.8.0's, loads the CLIP first). The real ComfyUI runs this
in tests/comfyui_e2e/model_path_text_training.py (``check_unload``)."""
from __future__ import annotations

import sys

import pytest
import torch

from test_comfy_family import FakeBaseModel, batch, comfy_key_map, module, sampling  # noqa: F401  (fixture)
from test_comfy_text_encoders import FakeClip, comfy_clip_key_map, loaded
from test_comfy_unload import get_attr, set_attr_param
from trainer.config import NetworkConfig


class LoadingClip(FakeClip):
    """comfy.sd.CLIP.encode_from_tokens: ``self.load_model()`` (load_models_gpu of its patcher), then encode."""

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        sys.modules["comfy.model_management"].load_models_gpu([self.patcher])
        return super().encode_from_tokens(tokens, return_pooled, return_dict)

    def clone(self):
        return LoadingClip(cond_stage_model=self.cond_stage_model)


class FakeClipManagement:
    """load_models_gpu / unload_all_models / a partial unload of one CLIP with upstream weight patches, by key path."""

    def __init__(self, clip):
        self.root, self.patcher = clip.cond_stage_model, clip.patcher
        keys = sorted(k for k in self.root.state_dict() if ".encoder.layers." in k and k.endswith(".weight")
                      and get_attr(self.root, k).ndim == 2)
        g = torch.Generator().manual_seed(12)
        self.patches = {k: torch.randn(get_attr(self.root, k).shape, generator=g) * 0.2 for k in keys}
        self.backup, self.patched, self.trees, self.loads = {}, set(), [], 0

    def _seen(self):
        self.trees.append(sorted(n for n, _ in self.root.named_modules()))

    def load_models_gpu(self, models, **kwargs):
        if not any(m is self.patcher for m in models):
            return
        self._seen()
        self.loads += 1
        with torch.inference_mode():  # ComfyUI patches inside a node: the loader's inference tensors again
            for key in sorted(set(self.patches) - self.patched):
                self.backup.setdefault(key, get_attr(self.root, key).detach().clone())
                set_attr_param(self.root, key, self.backup[key] + self.patches[key])
                self.patched.add(key)

    def partially_unload(self):
        self._seen()
        for key in sorted(self.patched)[::2]:
            set_attr_param(self.root, key, self.backup[key])
            self.patched.discard(key)

    def unload_all_models(self):
        self._seen()
        for key in sorted(self.patched):
            set_attr_param(self.root, key, self.backup[key])
        self.patched.clear()


def _family(module):  # noqa: F811
    base = FakeBaseModel(sampling("epsilon"))
    base.process_latent_in = lambda latents: latents
    with torch.inference_mode():
        clip = LoadingClip()
    patcher = type("Patcher", (), {"model": base})()
    vae = type("Vae", (), {"first_stage_model": torch.nn.Conv2d(3, 4, 1)})()
    family = module.ComfyModelFamily(patcher, clip, vae, key_map=comfy_key_map(base), train_text_encoder=True,
                                     clip_key_map=comfy_clip_key_map(clip.cond_stage_model))
    return family, clip, vae


@pytest.mark.parametrize("disturbance", ["unload_all_models", "partial unload"])
def test_the_clip_unloaded_mid_run_reloads_with_its_patches_and_its_adapter_trains_on(module, monkeypatch,  # noqa: F811
                                                                                     disturbance):
    from trainer.network import attach_network

    family, clip, vae = _family(module)
    fake = FakeClipManagement(clip)
    mm = sys.modules["comfy.model_management"]
    monkeypatch.setattr(mm, "load_models_gpu", fake.load_models_gpu, raising=False)
    monkeypatch.setattr(mm, "unload_all_models", fake.unload_all_models, raising=False)
    original = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}

    def encode(images):  # loading the VAE on a small GPU: ComfyUI frees the CLIP first
        fake.unload_all_models() if disturbance == "unload_all_models" else fake.partially_unload()
        return torch.zeros(images.shape[0], 4, 8, 8)

    vae.encode = encode
    comps = loaded(family)
    assert fake.patched == set(fake.patches)  # the upstream patches are in the CLIP's weights
    net = attach_network(family, comps, NetworkConfig(network_dim=2, network_alpha=2.0, target_preset="attn_mlp",
                                                      train_text_encoder=True))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in net.modules["text_encoder"].parameters():  # a trained adapter: lora_B no longer zero
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    adapter = [p.detach().clone() for p in net.parameters() if p.requires_grad]
    captions = ["a red circle", "a blue square"]
    with torch.no_grad():
        before = family.encode_text(comps, captions)["encoder_hidden_states"]

    family.encode_images(comps, torch.zeros(2, 3, 64, 64))  # the old code: KeyError "attribute 'weight' already exists"
    assert fake.patched != set(fake.patches)  # ComfyUI took (some of) the upstream patches out
    cond = family.encode_text(comps, captions)  # reloaded, re-patched, the adapter back in for the encode
    assert fake.patched == set(fake.patches)
    assert torch.allclose(cond["encoder_hidden_states"], before, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(p, q) for p, q in zip((p for p in net.parameters() if p.requires_grad), adapter))
    assert not any(n.endswith(("lora_A", "base_layer")) for tree in fake.trees for n in tree)  # ComfyUI's own view
    latents, _, _ = batch(5)
    family.predict(comps, latents, torch.tensor([300, 700]), cond).square().mean().backward()  # trains through it
    text = [(n, p) for n, p in net.modules["text_encoder"].named_parameters() if p.requires_grad]
    assert text and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in text)

    family.restore()
    fake.unload_all_models()
    now = clip.cond_stage_model.state_dict()
    assert now.keys() == original.keys() and all(torch.equal(now[k], original[k]) for k in original)
    assert not any(m._forward_hooks or m._forward_pre_hooks or "_crucible_swapped_in" in vars(m)
                   for m in clip.cond_stage_model.modules())


def test_an_error_inside_the_towers_forward_leaves_the_adapter_where_comfyui_expects_it(module):  # noqa: F811
    """A forward that raises inside a ComfyUI call: the tower's adapter goes out again with ComfyUI's call, back in
    after it, and no hook or mark is left on the CLIP."""
    from trainer.network import attach_network

    family, clip, _ = _family(module)
    comps = loaded(family)
    attach_network(family, comps, NetworkConfig(network_dim=2, network_alpha=2.0, target_preset="attn_mlp",
                                                train_text_encoder=True))
    tower = clip.cond_stage_model.clip_l
    layers = sum(1 for n, _ in tower.named_modules() if n.endswith("lora_A"))
    swap = family._swap

    def fail(module, args):
        raise RuntimeError("inside the tower")

    handle = tower.transformer.text_model.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="inside the tower"):
            with swap.comfy_owns_model(), swap.adapter_in_forwards([tower]):
                clip.encode_from_tokens(clip.tokenize("x"), return_dict=True)
    finally:
        handle.remove()
    assert not swap.out and sum(1 for n, _ in tower.named_modules() if n.endswith("lora_A")) == layers
    assert not any(m._forward_hooks or m._forward_pre_hooks or "_crucible_swapped_in" in vars(m)
                   for m in clip.cond_stage_model.modules())
    family.restore()
    assert not any(n.endswith("lora_A") for n, _ in tower.named_modules())
