"""DeepSpeed ZeRO-2 full fine-tunes (issue 16, "Beyond one GPU"): ``docs/accelerate/deepspeed_zero2.yaml`` launched
on 2 CPU processes (gloo) with DeepSpeed's engine really in charge (``tests/deepspeed_cpu_shim.py``: accelerate turns
DeepSpeed on for GPUs only). Each run is compared with the same config launched as data parallel (DDP): ZeRO-2
splits the optimizer's fp32 copy, state and gradients over the ranks, so it must train the same weights.

Before these tests the recipe was "checked on paper": its first launch failed in ``prepare()`` ("You can't customize
device placements with DeepSpeed"), and accumulating over micro-batches would have entered ``no_sync``, which ZeRO-2
refuses. The refusals (:func:`trainer.deepspeed_zero.check_deepspeed_run`) need no DeepSpeed and always run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from test_multi_gpu_recipe import (DEEPSPEED, ROOT, _assert_same_training, _base_unet, _checkpoint,
                                   _full_finetune_config, _launch, _run_record)
from test_multiprocess import assert_ranks_agree, launch_two_processes
from trainer.config import TrainConfig
from trainer.deepspeed_zero import check_deepspeed_run
from trainer.errors import ConfigError

needs_deepspeed = pytest.mark.skipif(
    not __import__("importlib.util").util.find_spec("deepspeed"),
    reason="DeepSpeed is not installed (pip install deepspeed; requirements-test.txt installs it)")

ZERO2 = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}


def _config(**sections) -> TrainConfig:
    raw = {"model": {"family": "sd15", "path": "unused"}, "datasets": [{"path": "unused"}],
           "network": {"network_type": "full"}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return TrainConfig.from_dict(raw)


def test_a_full_finetune_with_adamw_passes_the_checks():
    check_deepspeed_run(_config(), ZERO2)
    check_deepspeed_run(_config(optim={"optimizer": "Lion"}), ZERO2)  # kohya's names, any case
    check_deepspeed_run(_config(training={"gradient_accumulation_steps": 4}),
                        {**ZERO2, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"})


@pytest.mark.parametrize("sections, field", [
    ({"network": {"network_type": "lora"}}, "network.network_type"),
    ({"network": {"train_text_encoder": True}}, "network.train_text_encoder"),
    ({"training": {"full_bf16": True, "mixed_precision": "bf16"}}, "training.full_bf16"),
    ({"training": {"ema": True}}, "training.ema"),
    ({"optim": {"optimizer": "adafactor"}}, "optim.optimizer"),
    ({"optim": {"optimizer": "prodigy"}}, "optim.optimizer"),
    ({"optim": {"optimizer": "AdamW8bit"}}, "optim.optimizer"),
])
def test_what_zero2_cannot_honour_is_refused_by_name(sections, field):
    with pytest.raises(ConfigError, match=re.escape(field)) as err:
        check_deepspeed_run(_config(**sections), ZERO2)
    assert "docs/multi_gpu.md" in str(err.value)


@pytest.mark.parametrize("ds_config, says", [
    ({**ZERO2, "zero_optimization": {"stage": 3}}, "ZeRO stage 3"),
    ({**ZERO2, "gradient_accumulation_steps": 2}, "gradient_accumulation_steps is 2"),
    ({**ZERO2, "gradient_clipping": 0.5}, "gradient_clipping is 0.5"),
])
def test_a_config_file_that_disagrees_with_the_run_is_refused(ds_config, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        check_deepspeed_run(_config(), ds_config)


def test_plan_refuses_what_a_zero2_launch_would_refuse(tmp_path, tiny_sd15, demo_dataset, capsys):
    from test_sharded_memory import _plan_config
    from trainer.cli import main

    full = _plan_config(tmp_path, tiny_sd15, demo_dataset)
    assert main(["plan", full, "--num-processes", "2", "--deepspeed"]) == 0
    assert "DeepSpeed ZeRO-2: the estimate above is a data-parallel rank's" in capsys.readouterr().out
    (tmp_path / "lora").mkdir()
    lora = _plan_config(tmp_path / "lora", tiny_sd15, demo_dataset, network="lora")
    assert main(["plan", lora, "--num-processes", "2", "--deepspeed"]) != 0
    assert "network.network_type is 'lora'" in capsys.readouterr().err
    assert main(["plan", full, "--deepspeed"]) != 0
    assert "--num-processes" in capsys.readouterr().err
    assert main(["plan", full, "--num-processes", "2", "--deepspeed", "--fsdp"]) != 0
    assert "two different launches" in capsys.readouterr().err


def _zero2_launch(folder: Path, cfg: dict, config_file: Path = DEEPSPEED, **kwargs) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    output = launch_two_processes(folder, cfg, config_file=config_file, module="deepspeed_cpu_shim", timeout=500,
                                  pythonpath=(ROOT / "tests",), **kwargs)
    engines = set(re.findall(r"deepspeed_cpu_shim: rank (\d) trains through \['DeepSpeedEngine'\] with "
                             r"DeepSpeedZeroOptimizer", output))
    assert engines == {"0", "1"}, output[-3000:]  # DeepSpeed's engine and ZeRO optimizer on both ranks
    (folder / "launch.log").write_text(output, encoding="utf-8")
    return output


def _accumulating_config_file(folder: Path, steps: int) -> Path:
    text = DEEPSPEED.read_text(encoding="utf-8").replace("gradient_accumulation_steps: 1",
                                                         f"gradient_accumulation_steps: {steps}")
    assert f"gradient_accumulation_steps: {steps}" in text
    path = folder / "deepspeed_zero2.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _three_step_config(tiny_sd15, demo_dataset, out: Path, accumulation: int = 1) -> dict:
    cfg = _full_finetune_config(tiny_sd15, demo_dataset, out)
    cfg["training"].update(max_train_steps=3, gradient_accumulation_steps=accumulation)
    cfg["save"]["run_name"] = "fsdp"  # the recipe tests' checkpoint names (_checkpoint)
    return cfg


@pytest.fixture(scope="module")
def ddp_and_zero2_runs(tiny_sd15, demo_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """The same 3-step full fine-tune launched as data parallel and under ZeRO-2: their run folders."""
    runs = []
    for name in ("ddp", "zero2"):
        folder = tmp_path_factory.mktemp(name)
        cfg = _three_step_config(tiny_sd15, demo_dataset, folder / "out")
        output = _launch(folder, cfg, sharded=False) if name == "ddp" else _zero2_launch(folder, cfg)
        assert_ranks_agree(output)
        runs.append(folder / "out" / "fsdp")
    return runs[0], runs[1]


@needs_deepspeed
@pytest.mark.slow
def test_a_zero2_full_finetune_trains_and_saves_as_the_data_parallel_run(ddp_and_zero2_runs, tiny_sd15):
    import diffusers

    ddp, zero2 = ddp_and_zero2_runs
    reference, record = _run_record(ddp), _run_record(zero2)
    assert record["status"] == "finished" and len(record["losses"]) == 3
    assert record["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    validation = [c["val_loss"] for c in record["checkpoints"]]
    assert None not in validation and validation == pytest.approx([c["val_loss"] for c in reference["checkpoints"]],
                                                                  rel=1e-5)
    assert [p.name for p in sorted(zero2.glob("*.safetensors"))] == ["fsdp-e0001-s000003.safetensors"]
    saved, base = _checkpoint(zero2, 3), _base_unet(tiny_sd15)
    _assert_same_training(saved, _checkpoint(ddp, 3), base)
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    loaded = unet.load_state_dict(saved, strict=True)  # every key, every shape: the whole UNet
    assert not loaded.missing_keys and not loaded.unexpected_keys


@needs_deepspeed
@pytest.mark.slow
def test_a_zero2_state_holds_the_whole_optimizer_state_by_name(ddp_and_zero2_runs, tiny_sd15):
    """Gathered from both ranks' slices: every weight's AdamW moments, whole, under the weight's name, and the fp32
    master weights, which are the checkpoint's weights."""
    import torch

    _, zero2 = ddp_and_zero2_runs
    payload = torch.load(zero2 / "state" / "state.pt", weights_only=True)
    assert payload["optimizer_keys"] == "names" and payload["step"] == 3
    (weights,) = payload["network"].values()
    base = _base_unet(tiny_sd15)
    assert weights.keys() == base.keys() and all(w.dtype == torch.float32 for w in weights.values())
    state = payload["optimizer"]["state"]
    assert state.keys() == base.keys()
    for name, entry in state.items():
        assert entry["exp_avg"].shape == entry["exp_avg_sq"].shape == base[name].shape, name
        assert float(entry["step"]) == 3
    assert sum(float(e["exp_avg_sq"].abs().sum()) for e in state.values()) > 0  # real moments, not zeros
    checkpoint = _checkpoint(zero2, 3)
    assert all(torch.equal(checkpoint[k], weights[k]) for k in weights)


@needs_deepspeed
@pytest.mark.slow
def test_zero2_cancel_stops_every_rank_and_resume_ends_as_the_uninterrupted_run(ddp_and_zero2_runs, tiny_sd15,
                                                                                demo_dataset, tmp_path):
    _, uninterrupted = ddp_and_zero2_runs
    cfg = _three_step_config(tiny_sd15, demo_dataset, tmp_path / "out")
    run_dir = tmp_path / "out" / "fsdp"
    assert_ranks_agree(_zero2_launch(tmp_path, cfg, env={"CRUCIBLE_TEST_CANCEL_AT_STEP": "1"}))
    record = _run_record(run_dir)
    assert record["status"] == "cancelled" and len(record["losses"]) == 1
    assert json.loads((run_dir / "state" / "state.json").read_text())["step"] == 1

    assert_ranks_agree(_zero2_launch(tmp_path, cfg, args=("--resume", str(run_dir / "state"))))
    resumed, reference = _run_record(run_dir), _run_record(uninterrupted)
    assert resumed["status"] == "finished"
    assert resumed["losses"] == pytest.approx(reference["losses"], rel=1e-6)
    _assert_same_training(_checkpoint(run_dir, 3), _checkpoint(uninterrupted, 3), _base_unet(tiny_sd15))


@needs_deepspeed
@pytest.mark.slow
def test_zero2_accumulating_micro_batches_trains_as_the_data_parallel_run(tiny_sd15, demo_dataset, tmp_path):
    """Two micro-batches per step: ZeRO-2 reduces each into its owner's slice and steps once, at the last (the
    trainer marks it); DDP skips the all-reduce of the first (``no_sync``). The same losses and weights."""
    from safetensors.torch import load_file

    runs = {}
    for name in ("ddp", "zero2"):
        folder = tmp_path / name
        folder.mkdir()
        cfg = _three_step_config(tiny_sd15, demo_dataset, folder / "out", accumulation=2)
        cfg["sample"]["sample_every_n_steps"] = 0
        if name == "ddp":
            assert_ranks_agree(_launch(folder, cfg, sharded=False))
        else:
            assert_ranks_agree(_zero2_launch(folder, cfg, config_file=_accumulating_config_file(folder, 2)))
        runs[name] = folder / "out" / "fsdp"
    reference, record = _run_record(runs["ddp"]), _run_record(runs["zero2"])
    assert len(record["losses"]) == 3
    assert record["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    (zero2,), (ddp,) = (sorted(runs[n].glob("*.safetensors")) for n in ("zero2", "ddp"))
    assert zero2.name == ddp.name == "fsdp-e0002-s000003.safetensors"  # 2 micro-batches a step: 2 steps an epoch
    _assert_same_training(load_file(str(zero2)), load_file(str(ddp)), _base_unet(tiny_sd15))


@needs_deepspeed
@pytest.mark.slow
def test_zero2_under_bf16_steps_fp32_master_weights_and_exports_them(tiny_sd15, demo_dataset, tmp_path):
    """``mixed_precision: bf16`` (the config file's): DeepSpeed keeps the module in bf16 and steps an fp32 master
    copy. The checkpoint (save_precision fp32) is that master copy, not the bf16 module rounded back up, and the
    run tracks the data-parallel bf16 run (autocast over fp32 weights) within bf16's rounding."""
    import torch
    from safetensors.torch import load_file

    losses = {}
    for name in ("ddp", "zero2"):
        cfg = _three_step_config(tiny_sd15, demo_dataset, tmp_path / name / "out")
        cfg["training"]["mixed_precision"] = "bf16"
        cfg["sample"]["sample_every_n_steps"] = 0
        output = _launch(tmp_path / name, cfg, sharded=False) if name == "ddp" else \
            _zero2_launch(tmp_path / name, cfg)
        assert_ranks_agree(output)
        losses[name] = _run_record(tmp_path / name / "out" / "fsdp")["losses"]
    assert losses["zero2"] == pytest.approx(losses["ddp"], rel=1e-2)
    run_dir = tmp_path / "zero2" / "out" / "fsdp"
    saved = load_file(str(run_dir / "fsdp-e0001-s000003.safetensors"))
    trained = [t for k, t in saved.items() if not torch.equal(t, _base_unet(tiny_sd15)[k])]
    assert trained and all(t.dtype == torch.float32 for t in trained)
    off_bf16 = sum(int((t != t.to(torch.bfloat16).float()).sum()) for t in trained)
    assert off_bf16 > 0  # fp32 values no bf16 holds: the master weights, not the bf16 module's
    (weights,) = torch.load(run_dir / "state" / "state.pt", weights_only=True)["network"].values()
    assert all(torch.equal(saved[k], weights[k]) for k in weights)


@needs_deepspeed
@pytest.mark.slow
def test_zero2_with_lion_trains_as_data_parallel_and_resumes_exactly(tiny_sd15, demo_dataset, tmp_path):
    """Another elementwise optimizer (kohya's ``Lion``: one moment, no step count): the state's keys come from the
    optimizer, not from AdamW's, and a resumed run ends as the uninterrupted one."""
    import torch

    def config(out: Path) -> dict:
        cfg = _three_step_config(tiny_sd15, demo_dataset, out)
        cfg["optim"].update(optimizer="Lion", learning_rate=1e-5)
        cfg["sample"]["sample_every_n_steps"] = 0
        return cfg

    runs = {}
    for name in ("ddp", "zero2"):
        cfg = config(tmp_path / name / "out")
        output = _launch(tmp_path / name, cfg, sharded=False) if name == "ddp" else _zero2_launch(tmp_path / name, cfg)
        assert_ranks_agree(output)
        runs[name] = tmp_path / name / "out" / "fsdp"
    reference = _run_record(runs["ddp"])["losses"]
    assert _run_record(runs["zero2"])["losses"] == pytest.approx(reference, rel=1e-5)
    _assert_same_training(_checkpoint(runs["zero2"], 3), _checkpoint(runs["ddp"], 3), _base_unet(tiny_sd15))
    state = torch.load(runs["zero2"] / "state" / "state.pt", weights_only=True)["optimizer"]["state"]
    assert {tuple(sorted(entry)) for entry in state.values()} == {("exp_avg",)}

    cfg = config(tmp_path / "resumed" / "out")
    run_dir = tmp_path / "resumed" / "out" / "fsdp"
    assert_ranks_agree(_zero2_launch(tmp_path / "resumed", cfg, env={"CRUCIBLE_TEST_CANCEL_AT_STEP": "1"}))
    assert_ranks_agree(_zero2_launch(tmp_path / "resumed", cfg, args=("--resume", str(run_dir / "state"))))
    assert _run_record(run_dir)["losses"] == pytest.approx(_run_record(runs["zero2"])["losses"], rel=1e-6)
