"""trainer/sharding.py without launching processes: what a sharded (FSDP2) run refuses, and that a resumable state
is never loaded by a run of the other kind. The sharded runs themselves: tests/test_multi_gpu_recipe.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from trainer.config import TrainConfig
from trainer.errors import ConfigError, CrucibleError
from trainer.sharding import check_sharded_run, load_training_state


def _config(network: dict, training: dict | None = None) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"family": "sd15", "path": "unused"},
        "datasets": [{"path": "unused", "resolution": 64}],
        "network": network, "training": {"mixed_precision": "no", **(training or {})},
    })


def test_a_sharded_full_finetune_of_the_denoiser_is_accepted():
    check_sharded_run(_config({"network_type": "full"}))


@pytest.mark.parametrize("network, training, field", [
    ({"network_type": "lora"}, {}, "network.network_type"),
    ({"network_type": "lokr"}, {}, "network.network_type"),
    ({"network_type": "full", "train_text_encoder": True}, {}, "network.train_text_encoder"),
    ({"network_type": "full"}, {"ema": True}, "training.ema"),
    ({"network_type": "full"}, {"full_bf16": True, "mixed_precision": "bf16"}, "training.full_bf16"),
])
def test_what_a_sharded_run_cannot_honour_is_refused_by_name(network, training, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_sharded_run(_config(network, training))


def test_fsdp_version_1_is_refused():
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        check_sharded_run(_config({"network_type": "full"}), fsdp2=False)


def test_a_sharded_state_is_not_loaded_by_an_unsharded_run_nor_the_reverse(tmp_path):
    trainer = SimpleNamespace(sharded=False, net=None, optimizer=None)
    with pytest.raises(CrucibleError, match="saved by a sharded"):
        load_training_state(trainer, {"optimizer_keys": "names", "network": {}, "optimizer": {}}, tmp_path)
    trainer.sharded = True
    with pytest.raises(CrucibleError, match="saved by an unsharded"):
        load_training_state(trainer, {"optimizer_keys": "indices", "network": {}, "optimizer": {}}, tmp_path)
    with pytest.raises(CrucibleError, match="saved by an unsharded"):  # a state written before this format existed
        load_training_state(trainer, {"network": {}, "optimizer": {}}, tmp_path)
