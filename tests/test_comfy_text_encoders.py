"""Text-encoder training on the MODEL path (nodes/comfy_text.py, nodes/comfy_family.py) without ComfyUI: the CLIP's
CLIP towers train through its own encode path (with gradients, from weights loaded under inference mode, with
ComfyUI's in-place residual adds), export under ComfyUI's CLIP key names (kohya ``lora_te_`` / ``lora_te1_`` /
``lora_te2_``), T5/LLM encoders stay frozen or are refused, ``text_encoder_lr`` applies, and ``restore()`` leaves the
user's CLIP as it came. ComfyUI's CLIP object and ``comfy.lora.model_lora_keys_clip`` are stood in by fakes that
follow ComfyUI 0.8.0 (comfy/sd.py CLIP, comfy/sd1_clip.py, comfy/clip_model.py, comfy/lora.py); the real ones run in
tests/comfyui_e2e/checks_model_path_text.py."""
from __future__ import annotations

import types

import pytest
import torch

from test_comfy_family import FakeBaseModel, batch, comfy_key_map, module, sampling  # noqa: F401  (fixture)
from trainer.config import NetworkConfig, OptimConfig, TrainingConfig
from trainer.errors import CrucibleError

WIDTH, LAYERS, TOKENS, VOCAB = 8, 2, 6, 64
CLIP_MAP = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


# --- fakes of ComfyUI's CLIP ---------------------------------------------------------------------------------------
class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (torch.nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x):
        weights = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / WIDTH ** 0.5, dim=-1)
        return self.out_proj(weights @ self.v_proj(x))


class Layer(torch.nn.Module):
    """comfy/clip_model.py's CLIPLayer: pre-norm residual blocks updated in place (``x += …``)."""

    def __init__(self):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = torch.nn.LayerNorm(WIDTH), torch.nn.LayerNorm(WIDTH)
        self.self_attn = Attention()
        self.mlp = torch.nn.ModuleDict({"fc1": torch.nn.Linear(WIDTH, 2 * WIDTH), "fc2": torch.nn.Linear(2 * WIDTH, WIDTH)})

    def forward(self, x):
        x += self.self_attn(self.layer_norm1(x))
        x += self.mlp["fc2"](torch.nn.functional.gelu(self.mlp["fc1"](self.layer_norm2(x))))
        return x


class TextModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = torch.nn.Embedding(VOCAB, WIDTH)
        self.encoder = torch.nn.Module()
        self.encoder.layers = torch.nn.ModuleList([Layer() for _ in range(LAYERS)])
        self.final_layer_norm = torch.nn.LayerNorm(WIDTH)

    def forward(self, tokens, layer_idx=None):
        x = self.embeddings(tokens)
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x)
            if layer_idx is not None and i == LAYERS + layer_idx:
                return x
        return self.final_layer_norm(x)


class ClipTower(torch.nn.Module):
    """sd1_clip.SDClipModel: ``.transformer.text_model``; encode → (hidden states, pooled)."""

    def __init__(self):
        super().__init__()
        self.transformer = torch.nn.Module()
        self.transformer.text_model = TextModel()
        self.layer_idx = None

    def encode(self, tokens):  # SDClipModel.encode: self(tokens), so forward hooks on the tower run
        return self(tokens)

    def forward(self, tokens):
        z = self.transformer.text_model(tokens, self.layer_idx)
        return z, z[:, -1]


class T5(torch.nn.Module):
    """A non-CLIP encoder (T5-XXL, an LLM): ``.transformer.encoder.block…``."""

    def __init__(self):
        super().__init__()
        self.transformer = torch.nn.Module()
        self.transformer.encoder = torch.nn.Linear(WIDTH, WIDTH)
        self.transformer.shared = torch.nn.Embedding(VOCAB, WIDTH)

    def encode(self, tokens):
        z = self.transformer.encoder(self.transformer.shared(tokens))
        return z, None


class CondStage(torch.nn.Module):
    """SD1ClipModel / SDXLClipModel / FluxClipModel: one child per text encoder; hidden states concatenated."""

    def __init__(self, children):
        super().__init__()
        for name, kind in children:
            setattr(self, name, kind())

    def encode_token_weights(self, tokens):
        outs = [child.encode(tokens) for child in self.children()]
        pooled = [p for _, p in outs if p is not None]
        return torch.cat([z for z, _ in outs], dim=-1), (pooled[-1] if pooled else None)


class FakeClip:
    """comfy.sd.CLIP: tokenize, encode_from_tokens (return_dict), clone (sharing cond_stage_model), clip_layer."""

    def __init__(self, children=(("clip_l", ClipTower),), cond_stage_model=None):
        self.cond_stage_model = cond_stage_model or CondStage(children)
        self.patcher = types.SimpleNamespace(model=self.cond_stage_model)
        self.layer_idx = None

    def tokenize(self, text):
        return [(sum(map(ord, text)) * (i + 1)) % VOCAB for i in range(TOKENS)]

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        for child in self.cond_stage_model.children():
            child.layer_idx = self.layer_idx
        cond, pooled = self.cond_stage_model.encode_token_weights(torch.tensor([tokens]))
        return {"cond": cond, "pooled_output": pooled}

    def clone(self):
        return FakeClip(cond_stage_model=self.cond_stage_model)

    def clip_layer(self, layer_idx):
        self.layer_idx = layer_idx


def comfy_clip_key_map(cond_stage_model) -> dict[str, str]:
    """comfy.lora.model_lora_keys_clip for CLIP-L/CLIP-G (+ T5) encoders: the generic text_encoders.<name> of every
    weight, kohya lora_te_/lora_te1_ for clip_l, lora_te2_ for clip_g beside a clip_l (lora_te_ without one)."""
    sdk = cond_stage_model.state_dict().keys()
    keys = {"text_encoders." + k[:-len(".weight")]: k for k in sdk if k.endswith(".weight")}
    clip_l = any(k.startswith("clip_l.transformer.text_model.encoder.layers.") for k in sdk)
    for b in range(32):
        for c in CLIP_MAP:
            rest = f"text_model_encoder_layers_{b}_{c.replace('.', '_')}"
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                keys["lora_te_" + rest] = keys["lora_te1_" + rest] = k
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                keys[("lora_te2_" if clip_l else "lora_te_") + rest] = k
    return keys


def family_with_clip(module, children=(("clip_l", ClipTower),), inference=False):
    with torch.inference_mode(inference):
        base = FakeBaseModel(sampling("epsilon"))
        clip = FakeClip(children)
    patcher = types.SimpleNamespace(model=base)
    vae = types.SimpleNamespace(first_stage_model=torch.nn.Conv2d(3, 4, 1))
    family = module.ComfyModelFamily(patcher, clip, vae, key_map=comfy_key_map(base), train_text_encoder=True,
                                     clip_key_map=comfy_clip_key_map(clip.cond_stage_model))
    return family, base, clip


def loaded(family):
    return family.load(types.SimpleNamespace(path="", vae_path="", tokenizer_path="", text_encoder_paths=()))


def text_loss(family, comps, captions=("a red circle", "a blue square")):
    latents, _, _ = batch(5)
    cond = family.encode_text(comps, list(captions))
    timesteps = torch.tensor([300, 700])
    return family.predict(comps, latents, timesteps, cond).square().mean()


# --- what trains -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("network_type", ["lora", "dora", "loha", "lokr"])
def test_the_clip_tower_trains_through_the_clips_own_encode_path(module, network_type):
    """The CLIP-L of a CLIP loaded under inference mode (as ComfyUI's loaders run), whose layers add to their
    residual stream in place, trains: every text-encoder adapter weight gets a gradient through encode_from_tokens."""
    from trainer.network import attach_network

    family, _, clip = family_with_clip(module, inference=True)
    comps = loaded(family)
    assert comps.text_encoder_names == ("text_encoder",)
    net = attach_network(family, comps, NetworkConfig(network_type=network_type, network_dim=2, network_alpha=2.0,
                                                      train_text_encoder=True, target_preset="attn_mlp"))
    assert set(net.modules) == {"unet", "text_encoder"}
    with torch.no_grad():
        for p in net.modules["text_encoder"].parameters():
            if p.requires_grad:
                p.add_(0.05)  # LoRA's up matrix starts at zero: make every gradient non-trivial
    text_loss(family, comps).backward()
    text_params = [(n, p) for n, p in net.modules["text_encoder"].named_parameters() if p.requires_grad]
    assert len(text_params) >= LAYERS * len(CLIP_MAP) * 2
    missing = [n for n, p in text_params if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing[:4]
    family.restore()


def test_without_train_text_encoder_the_clip_is_not_a_component(module):
    base = FakeBaseModel(sampling("epsilon"))
    family = module.ComfyModelFamily(types.SimpleNamespace(model=base), FakeClip(),
                                     types.SimpleNamespace(first_stage_model=torch.nn.Conv2d(3, 4, 1)),
                                     key_map=comfy_key_map(base))
    assert loaded(family).text_encoders == [] and set(family.key_styles) == {"unet"}


@pytest.mark.parametrize("preset, per_layer", [("attn", 4), ("attn_mlp", 6), ("all_linear", 6),
                                               ("all_linear_conv", 6)])
def test_presets_choose_the_diffusers_families_clip_modules(module, preset, per_layer):
    from trainer.lora_targets import CLIP

    family, _, _ = family_with_clip(module)
    targets = family.lora_target_modules("text_encoder", preset)
    assert len(targets) == LAYERS * per_layer
    assert all(any(t.endswith("." + s) for s in CLIP[preset]) for t in targets)
    assert all(t.startswith("clip_l.transformer.text_model.encoder.layers.") for t in targets)


# --- export keys ---------------------------------------------------------------------------------------------------------
def _exported_prefixes(module, family, comps, network_type="lora"):
    from trainer.export import export_peft_modules
    from trainer.network import attach_network

    net = attach_network(family, comps, NetworkConfig(network_type=network_type, network_dim=2, network_alpha=2.0,
                                                      train_text_encoder=True, target_preset="attn_mlp"))
    tensors = export_peft_modules(family, net.modules)
    return {k.split(".")[0] for k in tensors}, tensors


def test_sd15_clip_keys_are_kohya_lora_te_names_comfyui_maps(module):
    family, base, clip = family_with_clip(module)
    key_map = {**comfy_key_map(base), **comfy_clip_key_map(clip.cond_stage_model)}  # of the models as loaded
    prefixes, tensors = _exported_prefixes(module, family, loaded(family))
    te = {p for p in prefixes if p.startswith("lora_te")}
    assert len(te) == LAYERS * len(CLIP_MAP) and all(p.startswith("lora_te_text_model_encoder_layers_") for p in te)
    assert prefixes <= set(key_map)  # the stock loader finds every key
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    family.restore()


@pytest.mark.parametrize("network_type", ["lora", "dora", "loha", "lokr"])
def test_sdxl_clip_l_and_clip_g_export_as_lora_te1_and_lora_te2(module, network_type):
    family, base, clip = family_with_clip(module, (("clip_l", ClipTower), ("clip_g", ClipTower)))
    key_map = {**comfy_key_map(base), **comfy_clip_key_map(clip.cond_stage_model)}
    comps = loaded(family)
    assert comps.text_encoder_names == ("text_encoder", "text_encoder_2")
    prefixes, _ = _exported_prefixes(module, family, comps, network_type)
    te = {p for p in prefixes if p.startswith("lora_te")}
    assert {p[:len("lora_teN_")] for p in te} == {"lora_te1_", "lora_te2_"}
    assert len(te) == 2 * LAYERS * len(CLIP_MAP)
    assert prefixes <= key_map.keys()
    family.restore()


def test_key_names_prefer_the_kohya_name_for_the_encoder_count_then_generic_and_refuse_unmapped(module):
    import importlib

    text = importlib.import_module(module.__name__.rsplit(".", 1)[0] + ".comfy_text")
    name = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    weight = name + ".weight"
    key_map = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": weight, "text_encoders." + name: weight,
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": weight, "text_encoder.x": weight}
    assert text.clip_key_names([name], key_map, numbered=False)[name].startswith("lora_te_")
    assert text.clip_key_names([name], key_map, numbered=True)[name].startswith("lora_te1_")
    generic = {k: v for k, v in key_map.items() if not k.startswith("lora_te")}
    assert text.clip_key_names([name], generic, numbered=True) == {name: "text_encoders." + name}
    with pytest.raises(CrucibleError, match="no key for 'clip_l.transformer"):
        text.clip_key_names([name], {"text_encoder.x": weight}, numbered=False)


def test_t5_stays_frozen_and_a_clip_without_a_clip_tower_is_refused(module, caplog):
    import logging

    family, _, _ = family_with_clip(module, (("clip_l", ClipTower), ("t5xxl", T5)))  # Flux's CLIP
    assert [t.child for t in family.towers] == ["clip_l"] and family.frozen_encoders == ["t5xxl"]
    with caplog.at_level(logging.WARNING, logger="crucible"):
        comps = loaded(family)
    assert comps.text_encoder_names == ("text_encoder",)
    assert any("t5xxl stay frozen" in r.getMessage() for r in caplog.records)
    prefixes, _ = _exported_prefixes(module, family, comps)
    assert {p[:len("lora_te1_")] for p in prefixes if p.startswith("lora_te")} == {"lora_te1_"}  # kohya Flux CLIP-L
    family.restore()
    with pytest.raises(CrucibleError, match="gemma2_2b.*no CLIP text models.*train_text_encoder off"):
        family_with_clip(module, (("gemma2_2b", T5),))


# --- learning rates, clip skip, restore --------------------------------------------------------------------------------
def test_text_encoder_lr_applies_to_the_clip(module):
    from trainer.network import attach_network, param_groups

    family, _, _ = family_with_clip(module)
    net = attach_network(family, loaded(family), NetworkConfig(network_dim=2, train_text_encoder=True))
    groups = {g["name"]: g for g in param_groups(family, net, OptimConfig(learning_rate=1e-3, text_encoder_lr=5e-5))}
    assert set(groups) == {"unet@0.001", "text_encoder@5e-05"}
    assert len(groups["text_encoder@5e-05"]["params"]) == len(family.lora_target_modules("text_encoder", "attn_mlp")) * 2
    family.restore()


def test_clip_skip_encodes_through_the_same_adapted_towers(module):
    from trainer.network import attach_network

    family, _, clip = family_with_clip(module)
    comps = loaded(family)
    attach_network(family, comps, NetworkConfig(network_dim=2, train_text_encoder=True))
    text_loss(family, comps).backward()  # the clone shares cond_stage_model: the adapter is in it
    skipped = family.encode_text(comps, ["a red circle"], clip_skip=2)["encoder_hidden_states"]
    assert skipped.requires_grad
    family.restore()


def test_restore_takes_the_adapter_out_of_the_users_clip(module):
    """After the run (the Train node calls restore() in a finally: also after Cancel or an error) the CLIP has its
    own modules and weights again, and encodes as before."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from trainer.network import attach_network

    family, _, clip = family_with_clip(module, (("clip_l", ClipTower), ("clip_g", ClipTower)), inference=True)
    before_state = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    with torch.no_grad():
        before = clip.encode_from_tokens(clip.tokenize("a red circle"), return_dict=True)["cond"]
    comps = loaded(family)
    net = attach_network(family, comps, NetworkConfig(network_type="dora", network_dim=2, train_text_encoder=True))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
        changed = clip.encode_from_tokens(clip.tokenize("a red circle"), return_dict=True)["cond"]
    assert not torch.allclose(changed, before)  # the adapter was in the CLIP
    family.restore()
    assert not any(isinstance(m, BaseTunerLayer) for m in clip.cond_stage_model.modules())
    after_state = clip.cond_stage_model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    with torch.no_grad():
        assert torch.equal(clip.encode_from_tokens(clip.tokenize("a red circle"), return_dict=True)["cond"], before)


def test_the_node_passes_train_text_encoder_through(module):
    base = FakeBaseModel(sampling("epsilon"))
    patcher = types.SimpleNamespace(model=base)
    vae = types.SimpleNamespace(first_stage_model=torch.nn.Conv2d(3, 4, 1))
    lora = types.ModuleType("comfy.lora")
    lora.model_lora_keys_unet = lambda model, key_map: comfy_key_map(model)
    lora.model_lora_keys_clip = lambda model, key_map: comfy_clip_key_map(model)
    import sys

    sys.modules["comfy.lora"], saved = lora, sys.modules.get("comfy.lora")
    sys.modules["comfy"].lora = lora
    try:
        family, _, network = module.hosted_model_config(patcher, FakeClip(), vae,
                                                        network=NetworkConfig(train_text_encoder=True))
        assert network.train_text_encoder and [t.component for t in family.towers] == ["text_encoder"]
        with pytest.raises(CrucibleError, match="t5xxl.*no CLIP text models"):
            module.hosted_model_config(patcher, FakeClip((("t5xxl", T5),)), vae,
                                       network=NetworkConfig(train_text_encoder=True))
    finally:
        del sys.modules["comfy"].lora
        if saved is None:
            sys.modules.pop("comfy.lora", None)
        else:
            sys.modules["comfy.lora"] = saved


# --- through the loop: the whole run, and Cancel → resume ---------------------------------------------------------------
def _comfy_objects():
    with torch.random.fork_rng(devices=[]), torch.inference_mode():  # as ComfyUI's loaders hand them over
        torch.manual_seed(11)
        base = FakeBaseModel(sampling("epsilon"))
        clip = FakeClip()
        encoder = torch.nn.Conv2d(3, 4, 1)
    base.process_latent_in = lambda latents: latents
    vae = types.SimpleNamespace(first_stage_model=encoder, encode=lambda images: torch.nn.functional.avg_pool2d(
        encoder(images.movedim(-1, 1)), 8))
    return types.SimpleNamespace(model=base), clip, vae


def _run(module, objects, out, demo_dataset, callbacks=None, resume_from=None):
    from trainer.config import TrainConfig
    from trainer.families import hosted_family
    from trainer.loop import train

    patcher, clip, vae = objects
    family = module.ComfyModelFamily(patcher, clip, vae, key_map=comfy_key_map(patcher.model), train_text_encoder=True,
                                     clip_key_map=comfy_clip_key_map(clip.cond_stage_model))
    with hosted_family(family):
        cfg = TrainConfig.from_dict({
            "model": {"family": "comfy"},
            "datasets": [{"path": str(demo_dataset), "resolution": 64, "repeats": 1}],
            "network": {"network_dim": 2, "network_alpha": 2, "target_preset": "attn_mlp", "train_text_encoder": True},
            "optim": {"learning_rate": 1e-2, "text_encoder_lr": 5e-3, "lr_scheduler": "constant"},
            "training": {"batch_size": 4, "max_train_steps": 4, "seed": 3, "mixed_precision": "no",
                         "validation_split": 0.0},
            "save": {"output_dir": str(out / "loras"), "work_dir": str(out / "runs"), "run_name": "te",
                     "save_every_n_epochs": 0, "save_precision": "fp32"}})
        try:
            return train(cfg, callbacks, resume_from=resume_from)
        finally:
            family.restore()  # as the Train node does, also after Cancel and errors


def test_text_encoder_training_resumes_exactly_and_leaves_the_clip_as_it_came(module, demo_dataset, tmp_path):
    """Through the loop: the CLIP's adapter trains beside the UNet's (its keys in the file), a run cancelled after
    step 2 and resumed ends with the uninterrupted run's losses and LoRA, and after every run (finished or
    cancelled) the user's CLIP holds its own weights again."""
    from safetensors.torch import load_file

    from run_helpers import StopAt

    objects = _comfy_objects()
    clip_before = {k: v.clone() for k, v in objects[1].cond_stage_model.state_dict().items()}

    def clip_unchanged():
        after = objects[1].cond_stage_model.state_dict()
        return after.keys() == clip_before.keys() and all(torch.equal(after[k], clip_before[k]) for k in clip_before)

    whole = _run(module, objects, tmp_path / "whole", demo_dataset)
    assert clip_unchanged()
    first = _run(module, objects, tmp_path / "cut", demo_dataset, StopAt(2))
    assert clip_unchanged() and first.losses == whole.losses[:2]
    resumed = _run(module, objects, tmp_path / "cut", demo_dataset, resume_from=first.state_dir)
    assert clip_unchanged() and resumed.losses == whole.losses
    a, b = load_file(str(whole.checkpoints[-1].path)), load_file(str(resumed.checkpoints[-1].path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    te = [k for k in a if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert len(te) == LAYERS * len(CLIP_MAP) and all(a[k].abs().sum() > 0 for k in te)  # trained, not left at zero
