"""SDXL end to end on the tiny SDXL-architecture model: a LoRA on the UNet and both text encoders trains, exports
ComfyUI keys, reloads to the trained output and resumes exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig
from trainer.families import get_family
from trainer.loop import train
from run_helpers import StopAt

pytestmark = pytest.mark.slow

FAMILY = get_family("sdxl")
PROMPTS = ["crucible, red circle", "blue square, crucible"]


@pytest.fixture(scope="module")
def run_config_defaults() -> dict:
    """SDXL with both text encoders trained; fp32 compute: exact comparisons."""
    return {"model": {"family": "sdxl"}, "network": {"train_text_encoder": True},
            "training": {"epochs": 3, "seed": 5, "mixed_precision": "no"}, "save": {"run_name": "xl", "save_every_n_epochs": 0}}


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    from trainer.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", family="sdxl", seed=1)


@pytest.fixture(scope="module")
def trained(make_config, tiny_sdxl, demo_dataset, tmp_path_factory):
    """30 steps (10 epochs × 3) of a LoCon-preset LoRA on the UNet and both CLIPs; the trained components kept."""
    cfg = make_config(tiny_sdxl, demo_dataset, tmp_path_factory.mktemp("xl"), training={"epochs": 10},
                      network={"target_preset": "all_linear_conv"})
    comps = FAMILY.load(cfg.model)
    return cfg, train(cfg, components=comps), comps


def outputs(comps) -> list[torch.Tensor]:
    """Both CLIPs' hidden states, CLIP-G's pooled embedding and the UNet prediction for fixed inputs."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = FAMILY.encode_text(comps, PROMPTS)
        return [cond["encoder_hidden_states"], cond["text_embeds"],
                FAMILY.predict(comps, latents, torch.tensor([100, 700]), cond)]


def reloaded(cfg: TrainConfig, path: Path | None):
    from trainer.checkpoints import load_lora_file
    from trainer.network import attach_network

    comps = FAMILY.load(cfg.model)
    load_lora_file(attach_network(FAMILY, comps, cfg.network), path)
    return comps


def test_loss_falls(trained):
    _, result, _ = trained
    losses = result.losses
    assert len(losses) == 30
    quarter = len(losses) // 4
    first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
    assert last < first * 0.8, (first, last)


def test_unet_and_both_text_encoders_export_comfyui_keys(trained, comfyui_reference):
    """Every prefix is a key of ComfyUI's full-size SDXL map: the tiny model's names (two UNet levels, a two-deep
    transformer, three CLIP layers) are a subset of the full-size ones."""
    _, result, _ = trained
    prefixes = {key.split(".")[0] for key in load_file(str(result.checkpoints[-1].path))}
    groups = {start: {p for p in prefixes if p.startswith(start)}
              for start in ("lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_")}
    assert all(groups.values()) and set().union(*groups.values()) == prefixes
    assert {"lora_unet_conv_in", "lora_unet_add_embedding_linear_1",
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"} <= groups["lora_unet_"]
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc1" in groups["lora_te2_text_model_"]
    keymap = comfyui_reference.keymap("sdxl")
    missing = sorted(prefixes - set(keymap["unet"]) - set(keymap["clip"]))
    assert not missing, missing[:5]


def test_reloaded_file_reproduces_the_trained_model(trained):
    cfg, result, comps = trained
    want, got, base = outputs(comps), outputs(reloaded(cfg, result.checkpoints[-1].path)), outputs(reloaded(cfg, None))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    for w, b in zip(want, base):  # every part trained: both text encoders and the UNet moved
        assert (w - b).abs().max() > 1e-4




def test_resume_after_a_stop_is_exact(make_config, tiny_sdxl, demo_dataset, tmp_path):
    sections = dict(optim={"lr_scheduler": "cosine", "lr_warmup_steps": 2})
    full = train(make_config(tiny_sdxl, demo_dataset, tmp_path / "a", **sections))
    cfg = make_config(tiny_sdxl, demo_dataset, tmp_path / "b", **sections)
    stopped = train(cfg, StopAt(4))
    assert stopped.cancelled and stopped.checkpoints[-1].step == 4
    resumed = train(cfg, resume_from=stopped.state_dir)
    assert not resumed.cancelled and resumed.losses == full.losses
    a, b = (load_file(str(r.checkpoints[-1].path)) for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
