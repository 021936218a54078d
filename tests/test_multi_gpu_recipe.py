"""The multi-GPU recipe of docs/multi_gpu.md (issue 16, "Beyond one GPU"): the shipped accelerate config files are
what the doc says, and what of them runs on 2 CPU processes (gloo) here.

* ``docs/accelerate/fsdp2_full_finetune.yaml`` launched as is: on CPU processes accelerate 1.16 runs it as DDP
  (it enables FSDP for GPUs only); both ranks finish and the full fine-tune's checkpoint loads into the UNet.
* The same file with FSDP forced on for the CPU (``tests/fsdp_cpu_shim.py``): the denoiser is really sharded
  (FSDP2 ``fully_shard``). Training does not finish yet — see the xfail reason; the test turns into a failure
  (strict) the day it passes, so the doc and the marker get updated.
* DeepSpeed is not installed here: its file is only parsed (checked on paper).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_multiprocess import launch_two_processes

ROOT = Path(__file__).resolve().parents[1]
FSDP = ROOT / "docs" / "accelerate" / "fsdp2_full_finetune.yaml"
DEEPSPEED = ROOT / "docs" / "accelerate" / "deepspeed_zero2.yaml"


def test_the_recipe_files_are_accelerate_configs_the_doc_describes():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    fsdp = load_config_from_file(str(FSDP))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.num_processes == 2
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    ds = load_config_from_file(str(DEEPSPEED))
    assert ds.distributed_type == DistributedType.DEEPSPEED and ds.deepspeed_config["zero_stage"] == 2
    doc = (ROOT / "docs" / "multi_gpu.md").read_text(encoding="utf-8")
    for path in (FSDP, DEEPSPEED):
        assert f"--config_file {path.relative_to(ROOT).as_posix()}" in doc


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_fsdp_wraps_a_block_of_every_family(family):
    """No class list in the file: accelerate wraps the classes each denoiser names in ``_no_split_modules``; every
    one of them must exist in the full-size denoiser (accelerate raises for a name the model lacks)."""
    from trainer.full_size import ARCHITECTURES, build_meta

    model = build_meta(family, ARCHITECTURES[family][0][0])
    present = {type(m).__name__ for m in model.modules()}
    names = getattr(model, "_no_split_modules", None)
    assert names and set(names) <= present, (names, family)


def _full_finetune_config(tiny_sd15, demo_dataset, tmp_path) -> dict:
    return {"model": {"family": "sd15", "path": str(tiny_sd15)},
            "datasets": [{"path": str(demo_dataset), "resolution": 64, "repeats": 1}],
            "network": {"network_type": "full"}, "optim": {"learning_rate": 1e-5},
            "training": {"batch_size": 2, "max_train_steps": 2, "seed": 1, "mixed_precision": "no"},
            "save": {"output_dir": str(tmp_path / "out"), "run_name": "fsdp", "save_every_n_epochs": 0,
                     "save_state": False}}


@pytest.mark.slow
def test_recipe_config_runs_a_full_finetune_on_two_cpu_processes(tiny_sd15, demo_dataset, tmp_path):
    import diffusers
    import torch
    from safetensors.torch import load_file

    output = launch_two_processes(tmp_path, _full_finetune_config(tiny_sd15, demo_dataset, tmp_path),
                                  config_file=FSDP)
    digests = dict(re.findall(r"rank (\d+) trained weights sha256 (\w+)", output))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], output[-3000:]
    saved = sorted((tmp_path / "out" / "fsdp").glob("*.safetensors"))
    assert [p.name for p in saved] == ["fsdp-e0001-s000002.safetensors"]  # written once, by rank 0
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    state = load_file(str(saved[0]))
    assert not torch.equal(state["conv_in.weight"].float(), unet.state_dict()["conv_in.weight"])  # it trained
    loaded = unet.load_state_dict(state, strict=True)  # every key, every shape
    assert not loaded.missing_keys and not loaded.unexpected_keys


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "FSDP2 sharding breaks the trainer: (1) trainer/loop.py keeps `self.params = self.net.parameters()` from before "
    "accelerator.prepare(), but fully_shard replaces the parameters with DTensors, so clip_grad_norm_ fails at "
    "step 1 ('mixed torch.Tensor and DTensor'); (2) with that re-read after prepare, the 2 steps train sharded but "
    "the save hangs: validation and write_checkpoint run on rank 0 only, and a sharded forward / state_dict needs "
    "every rank (gather with accelerator.get_state_dict on all ranks first). See docs/multi_gpu.md."))
def test_fsdp2_sharded_full_finetune_on_two_cpu_processes(tiny_sd15, demo_dataset, tmp_path):
    output = launch_two_processes(tmp_path, _full_finetune_config(tiny_sd15, demo_dataset, tmp_path),
                                  config_file=FSDP, module="fsdp_cpu_shim", timeout=300, check=False,
                                  pythonpath=(ROOT / "tests",))
    assert output.count("fsdp_cpu_shim: FSDP version 2") >= 2, output[-3000:]  # really sharded, both ranks
    digests = dict(re.findall(r"rank (\d+) trained weights sha256 (\w+)", output))
    assert set(digests) == {"0", "1"}, output[-3000:]
    assert (tmp_path / "out" / "fsdp" / "fsdp-e0001-s000002.safetensors").exists(), output[-3000:]
