"""Every SD1.5 trainer option through the real loop on the tiny SD1.5-architecture model.

Each test trains for a few steps with ``trainer.loop.train`` and checks what the option promises in the written
files, the optimizer or the recorded noise: network types and target presets reload to the trained output, text
encoders train and export ComfyUI keys, block-wise learning rates and ranks, precision, gradient checkpointing and
accumulation, loss/noise options, EMA, determinism, checkpoint saving and pruning, the optional optimizers and
TensorBoard. ``tests/test_train_e2e.py`` covers the basics (loss falls, resume, cancel, NaN, caches, full export).
"""
from __future__ import annotations

import functools
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.callbacks import Callbacks
from trainer.config import ModelConfig, TrainConfig
from trainer.families import get_family
from trainer.loop import train

pytestmark = pytest.mark.slow

FAMILY = get_family("sd15")
PROMPTS = ["crucible, red circle", "blue square, crucible"]


# --- helpers ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_config_defaults() -> dict:
    """A short run (3 steps of batch 4 over the 12 demo images). Validation off: these tests count batches and model
    calls of training alone; fp32 compute: exact comparisons."""
    return {"training": {"epochs": 1, "validation_split": 0.0, "mixed_precision": "no"},
            "save": {"save_every_n_epochs": 0}}


def train_with_components(cfg: TrainConfig, callbacks: Callbacks | None = None):
    """Train on components loaded here, so the test keeps the trained model (the trainer returns none)."""
    comps = FAMILY.load(cfg.model)
    return train(cfg, callbacks, components=comps), comps


def outputs(comps) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder hidden states and UNet prediction for fixed prompts, latents and timesteps."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = FAMILY.encode_text(comps, PROMPTS)
        return cond["encoder_hidden_states"], FAMILY.predict(comps, latents, torch.tensor([100, 700]), cond)


def reloaded(cfg: TrainConfig, path: Path | None):
    """Fresh components with the run's adapter attached and ``path`` loaded (``None``: adapters off = base)."""
    from trainer.checkpoints import load_lora_file
    from trainer.network import attach_network

    comps = FAMILY.load(cfg.model)
    load_lora_file(attach_network(FAMILY, comps, cfg.network), path)
    return comps


@functools.lru_cache(maxsize=None)
def base_outputs(model_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`outputs` of the untrained model."""
    return outputs(FAMILY.load(ModelConfig(family="sd15", path=model_path)))


def assert_reload_reproduces(cfg: TrainConfig, trained_comps, path: Path) -> None:
    """The file in a fresh adapter gives the trained model's outputs, which differ from the base model's."""
    want, got, base = outputs(trained_comps), outputs(reloaded(cfg, path)), base_outputs(cfg.model.path)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert (want[1] - base[1]).abs().max() > 1e-4, "training did not change the UNet output"


def prefixes(path: Path) -> set[str]:
    """Module key prefixes of a LoRA file (everything before ``.lora_down.weight``, ``.alpha`` …)."""
    return {key.split(".")[0] for key in load_file(str(path))}


def keymap(reference, family: str = "sd15") -> set[str]:
    data = reference.keymap(family)
    return set(data["unet"]) | set(data["clip"])


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


def network_args(path: Path) -> dict[str, float]:
    """kohya ``ss_network_args`` as numbers."""
    return {k: float(v) for k, v in json.loads(metadata(path)["ss_network_args"]).items()}


def file_ranks(path: Path) -> dict[str, tuple[int, float]]:
    """``{prefix: (rank, alpha)}`` of a LoRA file."""
    tensors = load_file(str(path))
    ranks = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            prefix = key.removesuffix(".lora_down.weight")
            ranks[prefix] = int(down.shape[0]), float(tensors[prefix + ".alpha"])
    return ranks


def block_of_prefix(prefix: str) -> str | None:
    """kohya block id (``down_0``, ``mid``, ``up_1``) of a ``lora_unet_…`` prefix, None outside the blocks."""
    match = re.match(r"lora_unet_(down|up)_blocks_(\d+)_", prefix)
    if match:
        return f"{match[1]}_{match[2]}"
    return "mid" if prefix.startswith("lora_unet_mid_block_") else None


def find_module(root: torch.nn.Module, suffix: str) -> torch.nn.Module:
    return next(m for name, m in root.named_modules() if name.endswith(suffix))


class SpyObjective:
    """Wraps the loop's objective and records every ``noise`` call (latents, noise in, noised batch out)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, torch.Tensor, object]] = []

    def noise(self, latents, noise, generator, **kwargs):
        out = self.inner.noise(latents, noise, generator, **kwargs)
        self.calls.append((latents.detach().clone(), noise.detach().clone(), out))
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def objectives(monkeypatch) -> list[SpyObjective]:
    """Every objective the loop builds during the test, as a :class:`SpyObjective`."""
    import trainer.loop

    made: list[SpyObjective] = []
    real = trainer.loop.make_objective

    def spying(*args, **kwargs):
        made.append(SpyObjective(real(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(trainer.loop, "make_objective", spying)
    return made


class Recorder(Callbacks):
    def __init__(self):
        self.steps, self.checkpoints = [], []

    def on_step(self, info):
        self.steps.append(info)

    def on_checkpoint(self, ckpt):
        self.checkpoints.append(ckpt)


@pytest.fixture(scope="module")
def baseline(make_config, tiny_sd15, demo_dataset, tmp_path_factory):
    """The plain 3-step LoRA run the loss-option tests compare against."""
    return train(make_config(tiny_sd15, demo_dataset, tmp_path_factory.mktemp("baseline")))


# --- 1. network types, presets, text encoders, full fine-tune ------------------------------------------------------

@pytest.mark.parametrize("network_type", ["lora", "dora", "loha", "lokr"])
def test_network_type_trains_and_its_file_reloads_to_the_trained_output(make_config, network_type, tiny_sd15, demo_dataset,
                                                                        tmp_path):
    """LoCon preset (every linear and conv layer), so the conv export of each adapter type is exercised too."""
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path,
                      network={"network_type": network_type, "target_preset": "all_linear_conv"})
    result, comps = train_with_components(cfg)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    path = result.checkpoints[-1].path
    assert "lora_unet_conv_in" in prefixes(path) and "lora_unet_down_blocks_0_resnets_0_conv1" in prefixes(path)
    assert_reload_reproduces(cfg, comps, path)


def test_target_presets_grow_reload_and_stay_in_comfyui_keymap(make_config, tiny_sd15, demo_dataset, tmp_path, comfyui_reference):
    """attn ⊂ attn_mlp ⊂ all_linear ⊂ all_linear_conv; every file reloads and every prefix is a ComfyUI key."""
    accepted = keymap(comfyui_reference)
    written = []
    for preset in ("attn", "attn_mlp", "all_linear", "all_linear_conv"):
        cfg = make_config(tiny_sd15, demo_dataset, tmp_path / preset,
                          network={"target_preset": preset}, training={"max_train_steps": 2})
        result, comps = train_with_components(cfg)
        path = result.checkpoints[-1].path
        assert_reload_reproduces(cfg, comps, path)
        written.append(prefixes(path))
        assert written[-1] <= accepted, sorted(written[-1] - accepted)[:5]
    attn, attn_mlp, all_linear, all_conv = written
    assert attn < attn_mlp < all_linear < all_conv
    assert all(p.endswith(("to_q", "to_k", "to_v", "to_out_0")) for p in attn)
    assert {"lora_unet_time_embedding_linear_1", "lora_unet_down_blocks_0_attentions_0_proj_in"} <= all_linear
    convs = all_conv - all_linear
    assert {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_down_blocks_0_downsamplers_0_conv",
            "lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_down_blocks_1_resnets_0_conv_shortcut"} <= convs
    assert network_args(tmp_path / "all_linear_conv" / "loras" / "t" / "t-e0001-s000002.safetensors") == \
        {"conv_alpha": 4.0, "conv_dim": 4.0}


def test_conv_dim_and_conv_alpha_set_the_rank_of_kxk_convolutions(make_config, tiny_sd15, demo_dataset, tmp_path):
    """kohya LoCon: 3×3 convolutions get ``conv_dim``/``conv_alpha``; 1×1 convolutions count as linear layers."""
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"max_train_steps": 2},
                      network={"target_preset": "all_linear_conv", "conv_dim": 2, "conv_alpha": 1})
    result, comps = train_with_components(cfg)
    path = result.checkpoints[-1].path
    ranks = file_ranks(path)
    assert ranks["lora_unet_conv_in"] == (2, 1.0)
    assert ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == (2, 1.0)
    assert ranks["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] == (4, 4.0)  # 1x1
    assert ranks["lora_unet_down_blocks_0_attentions_0_proj_in"] == (4, 4.0)  # 1x1 in SD1.5
    assert ranks["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == (4, 4.0)
    assert network_args(path) == {"conv_alpha": 1.0, "conv_dim": 2.0}
    assert_reload_reproduces(cfg, comps, path)


def test_text_encoder_trains_with_comfyui_keys(make_config, tiny_sd15, demo_dataset, tmp_path, comfyui_reference):
    """Every prefix of the tiny model is a key of ComfyUI's full-size SD1.5 map: tiny module names (3 CLIP layers,
    two UNet levels) are a subset of the full-size ones."""
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, network={"train_text_encoder": True})
    result, comps = train_with_components(cfg)
    path = result.checkpoints[-1].path
    written = prefixes(path)
    te = {p for p in written if p.startswith("lora_te_text_model_")}
    assert "lora_te_text_model_encoder_layers_2_mlp_fc2" in te
    assert written - te and all(p.startswith("lora_unet_") for p in written - te)
    assert written <= keymap(comfyui_reference), sorted(written - keymap(comfyui_reference))[:5]
    assert_reload_reproduces(cfg, comps, path)
    base_text = base_outputs(cfg.model.path)[0]
    assert (outputs(comps)[0] - base_text).abs().max() > 1e-4, "the text encoder did not change"


def test_text_encoder_only(make_config, tiny_sd15, demo_dataset, tmp_path):
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, network={"train_unet": False, "train_text_encoder": True})
    result, comps = train_with_components(cfg)
    path = result.checkpoints[-1].path
    assert prefixes(path) and all(p.startswith("lora_te_text_model_") for p in prefixes(path))
    assert_reload_reproduces(cfg, comps, path)


def test_full_finetune_with_text_encoder_what_is_exported(make_config, tiny_sd15, demo_dataset, tmp_path, caplog):
    """A full fine-tune's checkpoint is the UNet's diffusers state dict (``family.full_export_state_dict``) for
    ComfyUI's Load Diffusion Model. A text encoder trained alongside is not in it: it lives in the training state
    (``state/state.pt``), the run warns, and ``save.single_file_dir`` writes the whole model, trained CLIP
    included, as a single-file checkpoint."""
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, network={"network_type": "full", "train_text_encoder": True},
                      optim={"learning_rate": 1e-4}, training={"max_train_steps": 2})
    result, comps = train_with_components(cfg)
    assert "exports only the unet" in caplog.text
    exported = load_file(str(result.checkpoints[-1].path))
    unet_state = FAMILY.full_export_state_dict(comps)
    assert exported.keys() == unet_state.keys()
    assert all(torch.equal(exported[k], unet_state[k]) for k in exported)
    base = FAMILY.load(cfg.model)
    assert not torch.equal(exported["conv_in.weight"], base.denoiser.conv_in.weight)
    trained_te, base_te = comps.text_encoders[0].state_dict(), base.text_encoders[0].state_dict()
    key = next(k for k in trained_te if k.endswith("layers.0.mlp.fc1.weight"))
    assert not torch.equal(trained_te[key], base_te[key])
    state = torch.load(result.state_dir / "state.pt", weights_only=True)
    assert torch.equal(state["network"]["text_encoder"][key], trained_te[key])

    caplog.clear()
    whole = cfg.replace(save={"single_file_dir": str(tmp_path / "checkpoints"), "run_name": "whole"})
    result, comps = train_with_components(whole)
    assert "exports only" not in caplog.text
    single = load_file(str(tmp_path / "checkpoints" / "whole" / result.checkpoints[-1].path.name))
    fc1 = single["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"]
    assert torch.equal(fc1, comps.text_encoders[0].state_dict()[key]) and not torch.equal(fc1, base_te[key])


# --- 2. block-wise learning rates and ranks, separate LRs ----------------------------------------------------------

def _groups(cfg: TrainConfig):
    """The optimizer groups the loop builds for ``cfg`` (same functions it calls) and every adapter parameter."""
    from trainer.network import attach_network, param_groups

    net = attach_network(FAMILY, FAMILY.load(cfg.model), cfg.network)
    named = list(net.named_trainable())
    return param_groups(FAMILY, net, cfg.optim), named


def test_block_lr_weights_scale_groups_and_freeze_zero_blocks(make_config, tiny_sd15, demo_dataset, tmp_path):
    # kohya's layout: down_lr_weight[k] = IN k, up_lr_weight[k] = OUT k. The tiny UNet's down_blocks.0 is IN01-03,
    # down_blocks.1 IN04, up_blocks.0 OUT00-02, up_blocks.1 OUT03-05.
    down = [1.0, 0.0, 0.0, 0.0, 0.5] + [1.0] * 7
    up = [1.5] * 3 + [0.25] * 3 + [1.0] * 6
    weights = dict(enumerate(down + [2.0] + up))
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, optim={"learning_rate": 1e-3, "unet_lr": 2e-3},
                      network={"target_preset": "all_linear", "down_lr_weight": down, "mid_lr_weight": 2.0,
                               "up_lr_weight": ",".join(map(str, up))},
                      training={"max_train_steps": 3}, save={"save_every_n_steps": 1})
    groups, named = _groups(cfg)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    blocks_seen = set()
    for comp, name, p in named:
        block = FAMILY.block_index(comp, name)
        blocks_seen.add(block)
        expected = 2e-3 * weights.get(block, 1.0)
        if expected == 0:
            assert id(p) not in lr_of and not p.requires_grad, name
        else:
            assert lr_of[id(p)] == pytest.approx(expected), name
    assert {1, 4, 12, 13, 16} <= blocks_seen and None in blocks_seen  # None: time embedding … (weight 1)

    result = train(cfg)
    first, last = (load_file(str(c.path)) for c in (result.checkpoints[0], result.checkpoints[-1]))
    frozen = [k for k in last if block_of_prefix(k.split(".")[0]) == "down_0"]
    moving = [k for k in last if k.endswith("lora_up.weight") and block_of_prefix(k.split(".")[0]) == "up_1"]
    assert frozen and moving
    for key in frozen:  # no gradient and no weight decay: still the initial weights
        assert torch.equal(first[key], last[key]), key
        if key.endswith("lora_up.weight"):
            assert not last[key].any(), key
    assert all(not torch.equal(first[k], last[k]) for k in moving)


def test_block_lr_weights_need_one_value_per_block(make_config, tiny_sd15, demo_dataset, tmp_path):
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="down_lr_weight has 1 values; kohya's sd15 layout needs 12"):
        make_config(tiny_sd15, demo_dataset, tmp_path, network={"target_preset": "all_linear", "down_lr_weight": [1.0]})


def test_block_dims_set_per_block_ranks_in_the_file(make_config, tiny_sd15, demo_dataset, tmp_path):
    dims = {"down_0": 2, "down_1": 3, "mid": 5, "up_0": 6, "up_1": 7}
    index_of = {"down_0": (1, 2, 3), "down_1": (4,), "mid": (12,), "up_0": (13, 14, 15), "up_1": (16, 17, 18)}
    per_block = [4] * 25  # kohya's SD1.5 layout: 25 values
    alphas = [4.0] * 25
    for block, indices in index_of.items():
        for i in indices:
            per_block[i], alphas[i] = dims[block], float(dims[block] + 1)
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"max_train_steps": 1},
                      network={"target_preset": "all_linear", "block_dims": per_block, "block_alphas": alphas})
    result, comps = train_with_components(cfg)
    path = result.checkpoints[-1].path
    seen = set()
    for prefix, (rank, alpha) in file_ranks(path).items():
        block = block_of_prefix(prefix)
        seen.add(block)
        assert rank == dims.get(block, 4), prefix
        assert alpha == (rank + 1 if block else 4.0), prefix  # kohya block_alphas (network_alpha outside blocks)
    assert seen == {*dims, None}
    assert_reload_reproduces(cfg, comps, path)


def test_unet_and_text_encoder_learning_rates_are_separate_groups(make_config, tiny_sd15, demo_dataset, tmp_path):
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, network={"train_text_encoder": True},
                      optim={"learning_rate": 1e-3, "unet_lr": 5e-4, "text_encoder_lr": 1e-5})
    groups, named = _groups(cfg)
    assert sorted((g["name"], g["lr"]) for g in groups) == [("text_encoder@1e-05", 1e-5), ("unet@0.0005", 5e-4)]
    by_group = {g["name"].split("@")[0]: {id(p) for p in g["params"]} for g in groups}
    for comp, _, p in named:
        assert id(p) in by_group[comp]
    defaults = make_config(tiny_sd15, demo_dataset, tmp_path, network={"train_text_encoder": True},
                           optim={"learning_rate": 1e-3})
    assert {g["lr"] for g in _groups(defaults)[0]} == {1e-3}  # 0 = learning_rate


# --- 3. precision, gradient checkpointing, accumulation --------------------------------------------------------------

def test_bf16_mixed_precision_trains_on_cpu(make_config, tiny_sd15, demo_dataset, tmp_path):
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"mixed_precision": "bf16", "max_train_steps": 4})
    result, comps = train_with_components(cfg)
    assert len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)
    assert comps.denoiser.conv_in.weight.dtype == torch.bfloat16  # frozen base in the compute dtype
    q = find_module(comps.denoiser, "attn1.to_q")
    assert q.lora_A["default"].weight.dtype == torch.float32  # the adapter trains in fp32
    assert all(v.dtype == torch.float32 for v in load_file(str(result.checkpoints[-1].path)).values())


def test_fp16_mixed_precision_on_cpu_is_a_clear_error(make_config, tiny_sd15, demo_dataset, tmp_path):
    from trainer.errors import CrucibleError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"mixed_precision": "fp16"})
    with pytest.raises(CrucibleError, match="mixed_precision 'fp16' needs a CUDA GPU.*'bf16'"):
        train(cfg)


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_precision_sets_file_dtypes_but_alpha_stays_fp32(make_config, precision, dtype, tiny_sd15, demo_dataset, tmp_path):
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, save={"save_precision": precision},
                      network={"network_type": "dora"}, training={"max_train_steps": 1})
    tensors = load_file(str(train(cfg).checkpoints[-1].path))
    alphas = {k for k in tensors if k.endswith(".alpha")}
    assert alphas and all(tensors[k].dtype == torch.float32 for k in alphas)
    assert any(k.endswith(".dora_scale") for k in tensors)
    assert all(v.dtype == dtype for k, v in tensors.items() if k not in alphas)


def test_gradient_checkpointing_recomputes_and_gives_the_same_training(make_config, tiny_sd15, demo_dataset, tmp_path):
    """Checkpointed blocks run their forward again in the backward pass (UNet and trained text encoder); the losses
    and the trained weights are those of a run without checkpointing (same float operations: rtol 1e-5)."""
    runs = {}
    for checkpointing in (False, True):
        cfg = make_config(tiny_sd15, demo_dataset, tmp_path / str(checkpointing), network={"train_text_encoder": True},
                          training={"gradient_checkpointing": checkpointing})
        comps = FAMILY.load(cfg.model)
        calls = {"unet": 0, "text": 0}
        watched = {"unet": find_module(comps.denoiser, "transformer_blocks.0.attn1.to_k"),
                   "text": find_module(comps.text_encoders[0], "layers.0.self_attn.k_proj")}
        for key, module in watched.items():
            module.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
        result = train(cfg, components=comps)
        runs[checkpointing] = result, calls
    (plain, plain_calls), (ckpt, ckpt_calls) = runs[False], runs[True]
    assert plain_calls == {"unet": 3, "text": 3}
    assert ckpt_calls == {"unet": 6, "text": 6}
    torch.testing.assert_close(torch.tensor(ckpt.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    a, b = load_file(str(plain.checkpoints[-1].path)), load_file(str(ckpt.checkpoints[-1].path))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_plan_and_micro_batches(make_config, tiny_sd15, demo_dataset, tmp_path, objectives):
    """12 images, batch 4, accumulation 2: 3 micro-batches per epoch make 2 optimizer steps (the second short)."""
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"gradient_accumulation_steps": 2, "epochs": 2})
    result = train(cfg)
    assert (result.plan.batches_per_epoch, result.plan.steps_per_epoch, result.plan.total_steps) == (3, 2, 4)
    assert len(result.losses) == 4
    assert [len(call[0]) for call in objectives[0].calls] == [4] * 6


class FixedNoiseObjective:
    """The same noise and timestep for every sample, whatever its place in a batch: a sample's loss then depends on
    the sample alone, so batch 4 and 2 micro-batches of 2 must give the same gradient."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def noise(self, latents, noise, generator, **kwargs):
        from trainer.families.objectives import NoisedBatch

        fixed = torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(0)).expand_as(latents)
        t = torch.full((latents.shape[0],), 500, dtype=torch.long)
        return NoisedBatch(self.scheduler.add_noise(latents, fixed, t), t, fixed.contiguous(), None)


def test_accumulation_averages_like_one_big_batch(make_config, tiny_sd15, demo_dataset, tmp_path, monkeypatch):
    """Batch 4 vs batch 2 × accumulation 2 over the same 4 images: the first SGD update (lora_up = -lr·grad, as
    lora_up starts at zero) agrees to float rounding, rtol 1e-4. Summing instead of averaging would double it."""
    import trainer.loop

    monkeypatch.setattr(trainer.loop, "make_objective", lambda _p, scheduler, *_a, **_k: FixedNoiseObjective(scheduler))
    four = tmp_path / "data" / "1_shapes"
    four.mkdir(parents=True)
    for png in sorted((demo_dataset / "10_crucible shapes").glob("*.png"))[:4]:
        shutil.copy(png, four / png.name)
        shutil.copy(png.with_suffix(".txt"), four / png.with_suffix(".txt").name)
    files, losses = [], []
    for batch, accum in ((4, 1), (2, 2)):
        cfg = make_config(tiny_sd15, tmp_path / "data", tmp_path / f"b{batch}",
                          optim={"optimizer": "sgd", "learning_rate": 0.5, "weight_decay": 0.0, "max_grad_norm": 0.0},
                          training={"batch_size": batch, "gradient_accumulation_steps": accum, "max_train_steps": 1})
        result = train(cfg)
        assert result.plan.steps_per_epoch == 1
        files.append(load_file(str(result.checkpoints[-1].path)))
        losses.append(result.losses[0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    ups = [k for k in files[0] if k.endswith("lora_up.weight")]
    assert max(files[0][k].abs().max() for k in ups) > 1e-4  # the step moved something
    for key in files[0]:
        torch.testing.assert_close(files[1][key], files[0][key], rtol=1e-4, atol=1e-8)


# --- 4. loss and noise options --------------------------------------------------------------------------------------

def test_min_snr_gamma_down_weights_the_loss(make_config, tiny_sd15, demo_dataset, tmp_path, baseline, objectives):
    """Same seed, same noise and timesteps: kohya's min-SNR weights are ≤ 1, so the weighted loss is lower.
    (γ = 1 rather than the usual 5 so that some of step 1's four timesteps have an SNR above γ.)"""
    result = train(make_config(tiny_sd15, demo_dataset, tmp_path, training={"min_snr_gamma": 1.0,
                                                                            "max_train_steps": 1}))
    weights = objectives[0].calls[0][2].weights
    assert weights is not None and (weights <= 1).all() and (weights < 1).any()
    assert result.losses[0] < baseline.losses[0]


def _spatial_stats(noise: torch.Tensor) -> tuple[float, float]:
    """Spread of the per-(sample, channel) means and the correlation of horizontal neighbours."""
    means = noise.mean(dim=(2, 3)).std().item()
    left, right = noise[..., :-1].flatten(), noise[..., 1:].flatten()
    return means, torch.corrcoef(torch.stack([left, right]))[0, 1].item()


def test_noise_offset_and_multires_noise_reach_the_objective(make_config, tiny_sd15, demo_dataset, tmp_path, baseline,
                                                             objectives):
    """The loop hands the objective white noise by default, per-channel-shifted noise with ``noise_offset`` and
    spatially correlated unit-variance noise with multires (pyramid) noise; either changes the loss."""
    for name, options in (("plain", {}), ("offset", {"noise_offset": 1.0}),
                          ("multires", {"multires_noise_iterations": 3, "multires_noise_discount": 0.8})):
        result = train(make_config(tiny_sd15, demo_dataset, tmp_path / name,
                                   training={**options, "max_train_steps": 1}))
        if name != "plain":
            assert result.losses[0] != pytest.approx(baseline.losses[0], rel=1e-3), name
    (plain, offset, multires) = (spy.calls[0][1] for spy in objectives)
    plain_means, plain_corr = _spatial_stats(plain)
    assert plain_means < 0.3 and abs(plain_corr) < 0.15
    assert _spatial_stats(offset)[0] > 0.5
    assert _spatial_stats(multires)[1] > 0.3
    assert multires.std(dim=(1, 2, 3)) == pytest.approx(torch.ones(4), abs=1e-3)


def test_v_prediction_with_zero_terminal_snr(make_config, tiny_sd15, demo_dataset, tmp_path, objectives):
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"max_train_steps": 2},
                      model={"prediction_type": "v_prediction", "zero_terminal_snr": True})
    result, comps = train_with_components(cfg)
    scheduler = comps.noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.alphas_cumprod[-1].item() == 0.0  # zero terminal SNR: pure noise at t=999
    assert scheduler.alphas_cumprod[0].item() > 0.99
    assert all(math.isfinite(x) for x in result.losses)
    latents, noise, out = objectives[0].calls[0]
    abar = scheduler.alphas_cumprod[out.timesteps].view(-1, 1, 1, 1)
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * latents  # v = √ᾱ·ε − √(1−ᾱ)·x₀
    torch.testing.assert_close(out.target, velocity, rtol=1e-5, atol=1e-6)


def test_ema_weights_are_exported_not_the_raw_ones(make_config, tiny_sd15, demo_dataset, tmp_path):
    from trainer.network import attach_network

    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"ema": True, "ema_decay": 0.9})
    result = train(cfg)
    state = torch.load(result.state_dir / "state.pt", weights_only=True)
    net = attach_network(FAMILY, FAMILY.load(cfg.model), cfg.network)
    names = [name for _, name, _ in net.named_trainable()]  # the order the EMA's shadow list follows
    shadow = dict(zip(names, state["ema"]["shadow_params"], strict=True))
    from trainer.checkpoints import load_lora_file

    load_lora_file(net, result.checkpoints[-1].path)
    exported = {name: p for _, name, p in net.named_trainable()}
    raw = state["network"]["unet"]
    differs = 0
    for name, value in exported.items():
        torch.testing.assert_close(value, shadow[name], rtol=1e-6, atol=1e-8)
        differs += not torch.allclose(value, raw[name.replace(".default", "")], atol=1e-6)
    assert differs > len(exported) // 4  # the raw weights moved on; the file holds the average


# --- 5. determinism --------------------------------------------------------------------------------------------------

def test_same_seed_same_losses_other_seed_other_losses(make_config, tiny_sd15, demo_dataset, tmp_path, baseline):
    again = train(make_config(tiny_sd15, demo_dataset, tmp_path / "again"))
    other = train(make_config(tiny_sd15, demo_dataset, tmp_path / "other", training={"seed": 4}))
    assert again.losses == baseline.losses
    assert other.losses != baseline.losses
    a = load_file(str(again.checkpoints[-1].path))
    b = load_file(str(baseline.checkpoints[-1].path))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- 6. saving -------------------------------------------------------------------------------------------------------

def test_step_and_epoch_saves_with_checkpoint_limit(make_config, tiny_sd15, demo_dataset, tmp_path):
    """3 steps per epoch × 4 epochs; every 5 steps and every 2nd epoch → steps 5, 6, 10, 12. Limit 2 keeps the two
    newest (the last always among them) and deletes the older files."""
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"epochs": 4},
                      save={"save_every_n_steps": 5, "save_every_n_epochs": 2, "checkpoint_limit": 2})
    recorder = Recorder()
    result = train(cfg, recorder)
    assert [(c.step, c.epoch) for c in recorder.checkpoints] == [(5, 2), (6, 2), (10, 4), (12, 4)]
    assert [c.path.name for c in recorder.checkpoints] == [
        "t-e0002-s000005.safetensors", "t-e0002-s000006.safetensors",
        "t-e0004-s000010.safetensors", "t-e0004-s000012.safetensors"]
    folder = tmp_path / "loras" / "t"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [c.path.name for c in recorder.checkpoints[2:]]
    assert [c.step for c in result.checkpoints] == [10, 12] and result.checkpoints[-1].final
    manifest = json.loads((result.work_dir / "run.json").read_text())
    assert [c["step"] for c in manifest["checkpoints"]] == [10, 12]
    for ckpt in result.checkpoints:
        meta = metadata(ckpt.path)
        assert (meta["crucible_step"], meta["ss_steps"]) == (str(ckpt.step),) * 2
        assert (meta["crucible_epoch"], meta["ss_epoch"]) == (str(ckpt.epoch),) * 2


# --- 7. optimizers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optim", [
    {"optimizer": "adafactor", "optimizer_args": ["relative_step=True"]},
    {"optimizer": "prodigy", "learning_rate": 1.0},
    {"optimizer": "lion", "learning_rate": 1e-4},
    {"optimizer": "dadaptation", "learning_rate": 1.0},
], ids=lambda o: o["optimizer"])
def test_optional_optimizers_train_through_the_loop(make_config, optim, tiny_sd15, demo_dataset, tmp_path):
    recorder = Recorder()
    result = train(make_config(tiny_sd15, demo_dataset, tmp_path, optim=optim), recorder)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert all(math.isfinite(s.lr) and s.lr > 0 for s in recorder.steps)
    tensors = load_file(str(result.checkpoints[-1].path))
    assert any(v.any() for k, v in tensors.items() if k.endswith("lora_up.weight"))  # the adapter moved off zero


# --- 9. TensorBoard --------------------------------------------------------------------------------------------------

def test_tensorboard_writes_event_files(make_config, tiny_sd15, demo_dataset, tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pytest.skip("tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.tb import TensorBoardCallbacks

    logs = tmp_path / "tb"
    train(make_config(tiny_sd15, demo_dataset, tmp_path), TensorBoardCallbacks(logs))
    assert list(logs.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(logs))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert {"loss", "lr"} <= set(events.Tags()["scalars"])
