"""Every part of a model is read straight into the dtype the run keeps it in (``trainer.run_setup.load_dtypes``):
under mixed precision a full fine-tune's frozen text encoders and VAE in the compute dtype, its trained denoiser in
fp32 (bf16 with ``full_bf16``), SDXL's VAE in fp32. Before, a full fine-tune read every part as fp32 and cast the
frozen ones after: the full-size SD3 set-up from ComfyUI's files reached 23 GiB of RAM (T5-XXL alone 17.7 GiB as
fp32 against 8.9 as bf16) and was killed on a 23 GiB machine (benchmarks/bench_memory.py, 2026-12-07)."""
from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from trainer.families import PartDtypes, get_family
from trainer.run_setup import load_dtypes

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _cfg(network_type="lora", full_bf16=False, train_text_encoder=False, train_unet=True):
    return SimpleNamespace(network=SimpleNamespace(network_type=network_type, train_unet=train_unet,
                                                   train_text_encoder=train_text_encoder),
                           training=SimpleNamespace(full_bf16=full_bf16))


@pytest.mark.parametrize("cfg, precision, vae_fp32, expected", [
    (_cfg(), "bf16", False, PartDtypes(BF16, BF16, BF16)),  # LoRA: the frozen base in the compute dtype
    (_cfg(), "fp16", True, PartDtypes(F16, F16, F32)),  # SDXL's VAE overflows in half precision
    (_cfg(train_text_encoder=True), "bf16", False, PartDtypes(BF16, BF16, BF16)),  # adapters are fp32, not bases
    (_cfg("full"), "bf16", False, PartDtypes(F32, BF16, BF16)),  # trained fp32, frozen in the compute dtype
    (_cfg("full", full_bf16=True), "bf16", False, PartDtypes(BF16, BF16, BF16)),
    (_cfg("full", train_text_encoder=True), "bf16", True, PartDtypes(F32, F32, F32)),
    (_cfg("full", train_unet=False, train_text_encoder=True), "fp16", False, PartDtypes(F16, F32, F16)),
    (_cfg("full"), "no", False, PartDtypes(F32, F32, F32)),  # no mixed precision: every part read as fp32
    (_cfg(), "no", True, PartDtypes(F32, F32, F32)),  # an fp32 LoRA's base too (not read as stored, then upcast)
], ids=["lora", "lora-fp16-vae-fp32", "lora-text", "full", "full-bf16", "full-text", "full-text-only", "fp32",
        "lora-fp32"])
def test_each_part_is_read_in_the_dtype_the_run_keeps_it_in(cfg, precision, vae_fp32, expected):
    assert load_dtypes(cfg, precision, vae_fp32) == expected


def test_one_dtype_means_every_part():
    assert PartDtypes.of(BF16) == PartDtypes(BF16, BF16, BF16)
    assert PartDtypes.of(None) == PartDtypes()
    parts = PartDtypes(F32, BF16, F16)
    assert PartDtypes.of(parts) is parts


def _dtypes(module) -> set:
    return {p.dtype for p in module.parameters()}


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "flux"])
@pytest.mark.parametrize("source", [0, 1], ids=["folder", "files"])
def test_every_loader_reads_each_part_in_its_own_dtype(tiny_model_configs, name, source):
    comps = get_family(name).load(tiny_model_configs(name)[source], dtype=PartDtypes(F32, BF16, F16))
    assert _dtypes(comps.denoiser) == {F32}
    assert all(_dtypes(encoder) == {BF16} for encoder in comps.text_encoders)
    assert _dtypes(comps.vae) == {F16}


@pytest.mark.parametrize("name", ["sd15", "sd3"])
def test_the_reloaded_encoders_are_read_in_their_own_dtype(tiny_components, tiny_model_configs, name):
    cfg = tiny_model_configs(name)[1]
    modules = get_family(name).load_encoders(cfg, tiny_components(name, 1), dtype=PartDtypes(F32, BF16, F16))
    assert _dtypes(modules.pop("vae")) == {F16}
    assert modules and all(_dtypes(encoder) == {BF16} for encoder in modules.values())


@pytest.mark.parametrize("name, full_bf16", [("sd15", False), ("sd3", True)])
def test_a_full_fine_tune_never_reads_a_frozen_part_as_fp32(tiny_model_configs, demo_dataset, tmp_path, make_config,
                                                             monkeypatch, name, full_bf16):
    """The run's own set-up, from ComfyUI's files: what the family's loader returns, before any cast."""
    family = type(get_family(name))
    loaded, original = [], family.load

    def recording_load(self, *args, **kwargs):
        comps = original(self, *args, **kwargs)
        loaded.append({"denoiser": _dtypes(comps.denoiser), "vae": _dtypes(comps.vae),
                       "text": [_dtypes(e) for e in comps.text_encoders]})
        return comps

    monkeypatch.setattr(family, "load", recording_load)
    model = tiny_model_configs(name)[1]
    cfg = make_config(model.path, demo_dataset, tmp_path, model=asdict(model),
                      network={"network_type": "full"},
                      training={"mixed_precision": "bf16", "full_bf16": full_bf16, "epochs": 1,
                                "max_train_steps": 1, "batch_size": 1},
                      optim={"optimizer": "adafactor" if full_bf16 else "adamw", "learning_rate": 1e-4})
    from trainer.loop import train

    train(cfg)
    assert loaded == [{"denoiser": {BF16 if full_bf16 else F32}, "vae": {BF16},
                       "text": [{BF16}] * len(loaded[0]["text"])}]
