"""The model-family contract, tested once and run on every family's tiny model (diffusers' ``tests/lora/utils.py``
style: :class:`FamilyContract` holds the tests, one subclass per family gives its tiny model).

It calls every interface method the training loop, the validation pass, the sampler and the sweep call, with every
argument they can pass (``trainer/loop.py``, ``trainer/validation.py``, ``trainer/sweep.py``): ``load`` from a
diffusers folder and from ComfyUI files, ``configure_training``, ``encode_text`` with ``clip_skip`` /
``max_token_length`` / per-token ``weights`` where the family honours them, ``encode_images``, ``predict`` with the
loop's ``image_geometry``, ``flow_shift``, ``sample`` with a negative prompt and an embedded guidance,
``lora_target_modules`` and ``block_index`` for every component and preset, the LoRA export → file → import round
trip with every key one ComfyUI 0.8.0's LoraLoader maps, and the full-export state dict. A new family is one module
in ``trainer/families/`` plus one subclass here; what only one family does stays in ``tests/test_family_<name>.py``.
"""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from trainer.config import TARGET_PRESETS, ModelConfig, NetworkConfig, TrainConfig, TrainingConfig
from trainer.families import FAMILY_NAMES, all_families, get_family
from trainer.families.settings import FAMILY_SETTINGS

from family_helpers import pixels

CAPTIONS = ["a red circle", ", ".join(f"tag{i} blue square" for i in range(30))]  # the second is over 75 tokens
GEOMETRY = torch.tensor([[64, 64, 0, 0], [96, 80, 8, 4]])  # what the loop adds: original h, w, crop top, left


def _randomize_adapters(module: torch.nn.Module, seed: int) -> None:
    """peft starts LoRA ``B`` at zero (no effect); give every adapter weight a value so a round trip can show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


class FamilyContract:
    """The tests every family passes. Subclasses set ``family_name`` (and ``training`` / ``network``: the family's
    own settings for the loop runs, ``captions`` the dataset's); the tiny models come from tests/conftest.py."""

    family_name = ""
    training: dict = {}
    network: dict = {}
    captions: dict = {}

    @pytest.fixture(scope="class")
    def model_configs(self, tiny_model_configs) -> tuple[ModelConfig, ModelConfig]:
        """``(diffusers folder, ComfyUI file(s))`` model configs of the family's tiny model (tests/conftest.py)."""
        return tiny_model_configs(self.family_name)

    @pytest.fixture(scope="class")
    def family(self):
        return get_family(self.family_name)

    @pytest.fixture(scope="class")
    def comps(self, family, tiny_components):
        comps = tiny_components(family.name, 0)
        family.configure_training(comps, TrainingConfig())  # the defaults: what loading already set
        return comps

    # --- facts ---------------------------------------------------------------------------------------------------
    def test_facts_are_declared_and_consistent(self, family):
        components = {family.denoiser_name, *(spec.component for spec in family.encoders)}
        assert family.name == self.family_name and family.title
        assert set(family.key_styles) == set(family.lora_targets) == components
        for component, presets in family.lora_targets.items():
            assert set(presets) == set(TARGET_PRESETS), component
            assert all(presets[component_preset] for component_preset in presets), component
        assert family.base_model_version and family.modelspec_architecture and family.modelspec_implementation
        assert set(family.honoured_settings) <= {s.name for s in FAMILY_SETTINGS}
        names = [name for name, _ in family.full_size_components]
        assert names[0] == family.denoiser_name and names[-1] == "vae" and set(names) == components | {"vae"}
        assert family.vae_factors["scaling_factor"] > 0
        # detection rules are exclusive: exactly this family owns its pipeline class
        assert [f.name for f in all_families() if f.owns_pipeline_class(family.pipeline_class_name)] == [family.name]

    # --- loading -------------------------------------------------------------------------------------------------
    def test_folder_and_files_load_the_same_model(self, family, tiny_components, comps):
        files = tiny_components(family.name, 1)
        assert (comps.extras["format"], files.extras["format"]) == ("diffusers", "single_file")
        assert comps.extras["family"] == files.extras["family"] == family.name
        assert comps.denoiser_name == files.denoiser_name == family.denoiser_name
        assert comps.text_encoder_names == files.text_encoder_names
        assert set(comps.text_encoder_names) <= {spec.component for spec in family.encoders}
        ours = dict(comps.modules(), vae=comps.vae)
        for name, module in dict(files.modules(), vae=files.vae).items():
            theirs = ours[name].state_dict()
            assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items()), name
        assert files.vae.config.scaling_factor == family.vae_factors["scaling_factor"]
        assert comps.noise_scheduler.config.get("prediction_type", "flow") in ("epsilon", "flow", "v_prediction")

    @pytest.mark.parametrize("source", [0, 1], ids=["folder", "files"])
    def test_the_denoiser_read_apart_is_the_one_load_reads(self, family, model_configs, tiny_components, source):
        """A run loads the model with the denoiser as shapes only, and reads it after caching with ``load_denoiser``
        (trainer.run_setup): the same config, scheduler and extras as a whole load; then the same weights, in the
        dtype asked for, and nothing of the denoiser read before."""
        from trainer.families import PartDtypes
        from trainer.families.weights import denoiser_shapes_only

        whole = tiny_components(family.name, source)
        with denoiser_shapes_only():
            apart = family.load(model_configs[source], dtype=PartDtypes(denoiser=torch.bfloat16))
        assert all(p.is_meta for p in apart.denoiser.parameters())  # shapes only: nothing read
        config = {k: v for k, v in whole.denoiser.config.items() if k != "_name_or_path"}
        assert {k: v for k, v in apart.denoiser.config.items() if k != "_name_or_path"} == config
        assert apart.extras == whole.extras and dict(apart.noise_scheduler.config) == dict(whole.noise_scheduler.config)
        denoiser = family.load_denoiser(model_configs[source], apart, dtype=PartDtypes(denoiser=torch.bfloat16))
        theirs = whole.denoiser.state_dict()
        mine = denoiser.state_dict()
        assert set(mine) == set(theirs) and not any(t.is_meta for t in mine.values())
        assert all(v.dtype == torch.bfloat16 and torch.equal(v, theirs[k].to(torch.bfloat16))
                   for k, v in mine.items() if v.is_floating_point())

    def test_single_file_layout_is_told_apart(self, family, model_configs):
        from trainer.families.weights import checkpoint_keys

        keys = checkpoint_keys(model_configs[1].path)
        assert [f.name for f in all_families() if f.matches_single_file(keys)] == [family.name]

    # --- training: what the loop and the validation pass call ----------------------------------------------------
    @pytest.mark.parametrize("max_token_length", [75, 150, 225])
    def test_encode_text_takes_every_loop_argument(self, family, comps, max_token_length):
        clip_skips = (1, 2) if "clip_skip" in family.honoured_settings else (1,)
        for clip_skip in clip_skips:
            with torch.no_grad():
                cond = family.encode_text(comps, CAPTIONS, clip_skip=clip_skip, max_token_length=max_token_length)
            assert cond and all(v.shape[0] == len(CAPTIONS) and torch.isfinite(v).all() for v in cond.values())
        if "weighted_captions" in family.honoured_settings:
            weights = [(("a red circle", 1.0),), (("tag0 blue", 1.5), (" square", 0.5))]
            with torch.no_grad():
                plain = family.encode_text(comps, CAPTIONS, max_token_length=max_token_length)
                weighted = family.encode_text(comps, CAPTIONS, max_token_length=max_token_length, weights=weights)
            assert weighted.keys() == plain.keys()
            assert all(weighted[k].shape == plain[k].shape for k in plain)

    def test_encode_images_and_predict(self, family, comps):
        with torch.no_grad():
            latents = family.encode_images(comps, pixels())
            again = family.encode_images(comps, pixels())
            drawn = family.encode_images(comps, pixels(), generator=torch.Generator().manual_seed(1))
            cond = family.encode_text(comps, CAPTIONS)
            cond["image_geometry"] = GEOMETRY  # the loop adds it for every family
            early = family.predict(comps, latents, torch.tensor([10.0, 10.0]), cond)
            late = family.predict(comps, latents, torch.tensor([900.0, 900.0]), cond)
        size = 64 // family.vae_scale_factor
        assert latents.shape == (2, family.latent_channels, size, size) and torch.equal(latents, again)
        assert drawn.shape == latents.shape and not torch.equal(drawn, latents)  # a sample, not the mean
        assert early.shape == latents.shape and torch.isfinite(early).all() and not torch.allclose(early, late)
        shift = family.flow_shift(comps, latents)
        assert shift is None or (math.isfinite(shift) and shift > 0)

    def test_lora_targets_and_blocks_cover_every_component(self, family, comps):
        modules = comps.modules()
        for component, module in modules.items():
            names = [n for n, _ in module.named_modules()]
            for preset in TARGET_PRESETS[:-1]:  # the tiny models lack some convolutions; full size: test_export_keys
                targets = family.lora_target_modules(component, preset)
                missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
                assert targets and not missing, (component, preset, missing)
            blocks = {family.block_index(component, n) for n in names}
            if component != family.denoiser_name or family.block_layout is None:
                assert blocks == {None}, component

    # --- sampling: the preview sampler and the sweep -------------------------------------------------------------
    def test_sample_is_deterministic_and_takes_every_argument(self, family, comps):
        kwargs = dict(seed=3, steps=2, width=64, height=64)
        first = family.sample(comps, ["a red circle", CAPTIONS[1]], cfg=3.0, negative_prompt="blurry",
                              guidance=2.5, **kwargs)  # the second prompt is longer than one CLIP window
        again = family.sample(comps, ["a red circle"], cfg=3.0, negative_prompt="blurry", guidance=2.5, **kwargs)
        plain = family.sample(comps, ["a red circle"], cfg=1.0, **kwargs)
        assert [im.size for im in first] == [(64, 64), (64, 64)] and first[0].mode == "RGB"
        assert first[0].tobytes() == again[0].tobytes() != first[1].tobytes()
        assert plain[0].size == (64, 64)

    # --- export --------------------------------------------------------------------------------------------------
    def test_lora_export_is_comfyui_loadable_and_round_trips(self, family, model_configs, comfyui_reference,
                                                            tmp_path):
        from safetensors.torch import load_file

        from trainer.checkpoints import load_lora_file
        from trainer.export import export_peft_modules
        from trainer.fileio import save_safetensors
        from trainer.network import attach_network

        cfg = NetworkConfig(network_dim=2, network_alpha=4, target_preset="attn", train_text_encoder=True)
        trained = family.load(model_configs[0])
        net = attach_network(family, trained, cfg)
        for seed, module in enumerate(net.modules.values()):
            _randomize_adapters(module, seed)
        path = save_safetensors(tmp_path / "lora.safetensors", export_peft_modules(family, net.modules))
        keys = list(load_file(str(path)))
        keymap = comfyui_reference.keymap(family.name)
        accepted = set(keymap["unet"]) | set(keymap["clip"])
        prefixes = {re.sub(r"\.(lora_(down|up|A|B)\.weight|alpha)$", "", k) for k in keys}
        assert prefixes <= accepted, sorted(prefixes - accepted)[:3]
        assert all(any(family.key_styles[c].owns(k) for k in keys) for c in net.modules)  # every component exported

        fresh = family.load(model_configs[0])
        fresh_net = attach_network(family, fresh, cfg)
        load_lora_file(fresh_net, path)
        with torch.no_grad():
            outputs = []
            for comps in (trained, fresh):
                family.configure_training(comps, TrainingConfig())
                cond = family.encode_text(comps, CAPTIONS)
                latents = torch.randn(2, family.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
                outputs.append(family.predict(comps, latents, torch.tensor([500.0, 500.0]), cond))
        assert torch.allclose(outputs[0], outputs[1], atol=1e-5)

    def test_full_export_is_the_denoiser_state(self, family, comps):
        state = family.full_export_state_dict(comps)
        own = comps.denoiser.state_dict()
        assert state.keys() == own.keys() and all(torch.equal(state[k], own[k]) for k in own)


    # --- through the real training loop -------------------------------------------------------------------------
    def train_config(self, model: ModelConfig, data, out, network: dict, steps: int, lr: float) -> TrainConfig:
        return TrainConfig.from_dict({
            "model": dataclasses.asdict(model),
            "datasets": [{"path": str(data), "resolution": 64, "repeats": 1, "captions": self.captions}],
            "network": {"network_dim": 4, "network_alpha": 4, "target_preset": "attn_mlp", **self.network, **network},
            "optim": {"learning_rate": lr, "lr_scheduler": "constant"},
            "training": {"batch_size": 4, "max_train_steps": steps, "seed": 3, "mixed_precision": "no",
                         **self.training},
            "save": {"output_dir": str(out / "models"), "work_dir": str(out / "runs"), "run_name": "t",
                     "save_every_n_epochs": 0, "save_every_n_steps": steps, "save_precision": "fp32"},
        })

    @pytest.fixture(scope="class")
    def lora_run(self, family, model_configs, demo_dataset, tmp_path_factory):
        from trainer.loop import train

        cfg = self.train_config(model_configs[0], demo_dataset, tmp_path_factory.mktemp("lora"), {}, 30, 1e-2)
        comps = family.load(cfg.model)
        return cfg, comps, train(cfg, components=comps)

    def test_loop_lora_training_lowers_the_loss(self, lora_run):
        losses = lora_run[2].losses
        assert len(losses) == 30 and all(map(math.isfinite, losses))
        assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8, losses

    def test_loop_lora_file_is_comfyui_shaped_and_reloads(self, family, lora_run, comfyui_reference):
        from safetensors.torch import load_file

        from trainer.checkpoints import load_lora_file
        from trainer.network import attach_network

        cfg, trained, result = lora_run
        tensors = load_file(str(result.checkpoints[-1].path))
        prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
        styles = [family.key_styles[c] for c in trained.modules() if c == family.denoiser_name or cfg.network.train_text_encoder]
        assert all(any(style.owns(k) for style in styles) for k in tensors)  # only what trained
        assert all(f"{p}.alpha" in tensors and any(f"{p}.{s.down_up[1]}" in tensors for s in styles) for p in prefixes)
        keymap = comfyui_reference.keymap(family.name)
        accepted = set(keymap["unet"]) | set(keymap["clip"])
        assert prefixes <= accepted, sorted(prefixes - accepted)[:3]
        latents = torch.randn(1, family.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500.0])

        def output(comps):
            with torch.no_grad():
                return family.predict(comps, latents, t, family.encode_text(comps, ["red circle"]))

        fresh = family.load(cfg.model)
        family.configure_training(fresh, cfg.training)  # what the loop did to the trained model
        base = output(fresh)
        load_lora_file(attach_network(family, fresh, cfg.network), result.checkpoints[-1].path)
        reloaded = output(fresh)
        assert torch.allclose(reloaded, output(trained), atol=1e-5)
        assert (reloaded - base).abs().max() > 1e-3  # the LoRA changed the model

    def test_loop_full_finetune_exports_the_trained_denoiser(self, family, model_configs, demo_dataset, tmp_path):
        from safetensors.torch import load_file

        from trainer.loop import train

        cfg = self.train_config(model_configs[0], demo_dataset, tmp_path, {"network_type": "full"}, 3, 1e-3)
        comps = family.load(cfg.model)
        before = {k: v.clone() for k, v in comps.denoiser.state_dict().items()}
        result = train(cfg, components=comps)
        assert result.checkpoints[-1].kind == "full"
        state = load_file(str(result.checkpoints[-1].path))
        trained = comps.denoiser.state_dict()
        assert state.keys() == trained.keys() and all(torch.equal(v, trained[k]) for k, v in state.items())
        assert any(not torch.equal(before[k], v) for k, v in state.items())
        if family.split_file_loading:  # ComfyUI's Load Diffusion Model file: the loader reads it back
            again = family.load(dataclasses.replace(model_configs[1], path=str(result.checkpoints[-1].path)))
            assert all(torch.equal(v, trained[k]) for k, v in again.denoiser.state_dict().items())


class TestSD15(FamilyContract):
    family_name = "sd15"


class TestSDXL(FamilyContract):
    family_name = "sdxl"
    training = {"seed": 5}
    network = {"train_text_encoder": True, "target_preset": "all_linear_conv"}  # both CLIPs train too (lora_te1/2_)
    captions = {"trigger_word": "crucible", "shuffle_caption": True, "keep_tokens": 1}


class TestSD3(FamilyContract):
    family_name = "sd3"
    training = {"timestep_sampling": "logit_normal"}


class TestFlux(FamilyContract):
    family_name = "flux"
    training = {"timestep_sampling": "logit_normal", "guidance_scale": 3.5}


def test_every_registered_family_runs_the_contract():
    covered = {cls.family_name for cls in FamilyContract.__subclasses__()}
    assert covered == set(FAMILY_NAMES)
