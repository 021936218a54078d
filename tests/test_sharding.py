"""trainer/sharding.py without launching processes: what a sharded (FSDP2) run refuses, and that a resumable state
is never loaded by a run of the other kind. The sharded runs themselves: tests/test_multi_gpu_recipe.py."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from trainer.config import NETWORK_TYPES, TrainConfig
from trainer.errors import ConfigError, CrucibleError
from trainer.sharding import RAM_EFFICIENT_ENV, check_sharded_run, load_training_state, rank0_loading


def _config(network: dict, training: dict | None = None) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"family": "sd15", "path": "unused"},
        "datasets": [{"path": "unused", "resolution": 64}],
        "network": network, "training": {"mixed_precision": "no", **(training or {})},
    })


def test_every_network_type_of_the_denoiser_is_accepted_sharded_with_or_without_ema():
    """DoRA, LoHa and LoKr train sharded as LoRA does (tests/test_fsdp_adapters.py runs them)."""
    for kind in NETWORK_TYPES:
        network = {"network_type": kind}
        check_sharded_run(_config(network))
        check_sharded_run(_config(network, {"ema": True}))


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_fp8_base_is_refused_when_sharded_pointing_to_data_parallelism(kind):
    import dataclasses

    cfg = _config({"network_type": kind})
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fp8_base=True))
    with pytest.raises(ConfigError, match=r"model\.fp8_base") as refused:
        check_sharded_run(cfg)
    message = str(refused.value)
    assert "accelerate launch --multi_gpu" in message and "not checked" not in message


@pytest.mark.parametrize("network, training, field", [
    ({"network_type": "full", "train_text_encoder": True}, {}, "network.train_text_encoder"),
    ({"network_type": "full"}, {"full_bf16": True, "mixed_precision": "bf16"}, "training.full_bf16"),
])
def test_what_a_sharded_run_cannot_honour_is_refused_by_name(network, training, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_sharded_run(_config(network, training))


def test_fsdp_version_1_is_refused():
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        check_sharded_run(_config({"network_type": "full"}), fsdp2=False)


def test_a_sharded_state_is_not_loaded_by_an_unsharded_run_nor_the_reverse(tmp_path):
    trainer = SimpleNamespace(sharded=False, deepspeed=False, net=None, optimizer=None)
    with pytest.raises(CrucibleError, match="saved by a sharded"):
        load_training_state(trainer, {"optimizer_keys": "names", "network": {}, "optimizer": {}}, tmp_path)
    trainer.deepspeed = True  # DeepSpeed ZeRO-2 reads a state gathered by name only
    with pytest.raises(CrucibleError, match="saved by a run on one GPU or with --multi_gpu"):
        load_training_state(trainer, {"optimizer_keys": "indices", "network": {}, "optimizer": {}}, tmp_path)
    trainer.deepspeed = False
    trainer.sharded = True
    with pytest.raises(CrucibleError, match="saved by an unsharded"):
        load_training_state(trainer, {"optimizer_keys": "indices", "network": {}, "optimizer": {}}, tmp_path)
    with pytest.raises(CrucibleError, match="saved by an unsharded"):  # a state written before this format existed
        load_training_state(trainer, {"network": {}, "optimizer": {}}, tmp_path)


@pytest.mark.parametrize("name, main", [("sd15", True), ("sd15", False), ("sdxl", False), ("sd3", False),
                                          ("flux", False)])
def test_rank0_loading_builds_the_denoiser_empty_off_rank0_and_loads_the_encoders_whole(name, main, request,
                                                                                       monkeypatch):
    """Rank 0 loads the model as always; another rank gets the UNet / transformer as shapes only (meta parameters, real buffers,
    the state dict's keys, shapes and dtypes) and its text encoder and VAE whole, equal to rank 0's, even where the
    launcher set ``FSDP_CPU_RAM_EFFICIENT_LOADING`` (transformers 4.x builds its models empty off rank 0 then;
    rank0_loading holds it off); accelerate's rank-0 broadcast is switched on."""
    from trainer.config import ModelConfig
    from trainer.families import get_family

    tiny = request.getfixturevalue(f"tiny_{name}")
    path = str(getattr(tiny, "folder", tiny))  # the diffusers folder (SD3/Flux fixtures hold split files too)
    family = get_family(name)
    reference = family.load(ModelConfig(family=name, path=path))
    acc = SimpleNamespace(is_main_process=main, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
        cpu_ram_efficient_loading=False)))
    monkeypatch.setenv(RAM_EFFICIENT_ENV, "true")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    # as under accelerate launch: a process group and this process's local rank (transformers reads both)
    monkeypatch.setenv("LOCAL_RANK", "0" if main else "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with rank0_loading(acc):
        comps = family.load(ModelConfig(family=name, path=path))
    assert os.environ[RAM_EFFICIENT_ENV] == "true"  # as the launcher left it
    monkeypatch.undo()
    assert acc.state.fsdp_plugin.cpu_ram_efficient_loading is True
    unet = comps.denoiser
    assert all(p.is_meta for p in unet.parameters()) is not main
    assert not any(b.is_meta for b in unet.buffers())
    assert {k: (v.shape, v.dtype) for k, v in unet.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in reference.denoiser.state_dict().items()}
    for module, expected in [(comps.vae, reference.vae), *zip(comps.text_encoders, reference.text_encoders)]:
        state, want = module.state_dict(), expected.state_dict()
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
