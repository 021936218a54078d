from __future__ import annotations

import json

import pytest

from trainer.config import TrainConfig, apply_override
from trainer.errors import ConfigError


def test_round_trip_is_identity():
    cfg = TrainConfig.from_dict({"datasets": [{"path": "/d", "captions": {"keep_tokens": 2, "remove_tags": ["a", "b"]}}],
                                 "network": {"network_dim": 8, "network_alpha": 4},
                                 "optim": {"optimizer_args": ["betas=(0.9,0.99)"]}})
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert again.datasets[0].captions.remove_tags == ("a", "b")
    assert again.network.network_dim == 8


def test_frozen():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.training.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("data, needle", [
    ({"trainig": {}}, "trainig"),
    ({"training": {"sed": 1}}, "training.sed"),
    ({"datasets": [{"path": "x", "captions": {"keep_tokenz": 1}}]}, "datasets[0].captions.keep_tokenz"),
])
def test_unknown_keys_are_named(data, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig.from_dict(data)


@pytest.mark.parametrize("data, needle", [
    ({"training": {"batch_size": 0}}, "training.batch_size"),
    ({"network": {"network_dim": 0}}, "network.network_dim"),
    ({"training": {"batch_size": "two"}}, "training.batch_size"),
    ({"optim": {"optimizer": "adam9000"}}, "optim.optimizer"),
    ({"datasets": [{"path": "x", "captions": {"caption_dropout_rate": -0.1}}]}, "caption_dropout_rate"),
    ({"datasets": [{"path": "x", "resolution": 500}]}, "resolution"),
    ({"network": {"train_unet": False, "train_text_encoder": False}}, "nothing would train"),
    ({"optim": {"lr_warmup_ratio": 1.5}}, "lr_warmup_ratio"),
])
def test_bad_values_are_named(data, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.from_dict(data)


def test_overrides_and_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[training]\nepochs = 3\n[[datasets]]\npath = "/data"\nresolution = 256\n')
    cfg = TrainConfig.load(path, ["training.epochs=7", "datasets.0.resolution=512", "save.run_name=abc"])
    assert cfg.training.epochs == 7 and cfg.dataset.resolution == 512 and cfg.save.run_name == "abc"
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override({}, "no-equals")


def test_newer_version_refused():
    with pytest.raises(ConfigError, match="newer"):
        TrainConfig.from_dict({"version": 99})


def test_replace_validates():
    cfg = TrainConfig()
    assert cfg.replace(training={"epochs": 3}).training.epochs == 3
    with pytest.raises(ConfigError):
        cfg.replace(training={"epochs": 0})


def test_attention_choice_is_validated_and_xformers_needs_its_package(monkeypatch):
    import builtins

    from trainer.errors import MissingDependencyError
    from trainer.run_setup import use_attention

    with pytest.raises(ConfigError, match="model.attention"):
        TrainConfig.from_dict({"model": {"attention": "flash9"}})
    real_import = builtins.__import__

    def no_xformers(name, *args, **kwargs):
        if name == "xformers":
            raise ImportError("no module named xformers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    with pytest.raises(MissingDependencyError, match="pip install xformers"):
        use_attention(object(), "xformers")
    use_attention(object(), "sdpa")  # the default needs nothing
