"""DoRA, LoHa and LoKr under FSDP2 (2 CPU processes, gloo, ``tests/fsdp_cpu_shim.py``), as the sharded LoRA of
``tests/test_multi_gpu_recipe.py``: the frozen UNet and its adapters sharded together; each trains as the same run
unsharded (DDP) does (same losses and validation loss, the same LoRA file: every ComfyUI key, tensors within float
noise), its resumable state holds the adapters whole, and a run Cancelled after step 1 and resumed from its sharded
state ends where the uninterrupted sharded run did.

What breaks without trainer/sharding.py's gathering: DoRA's export reads each adapted layer's base weight (its
``dora_scale`` is the magnitude over the norm of base + update), which in a sharded run is one rank's shard.

``model.fp8_base`` stays refused sharded; the data-parallel launch the refusal names trains it (last test)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_multi_gpu_recipe import (_cancel_then_resume, _checkpoint, _lora_config, _run_record,
                                   _unsharded_and_sharded)

ADAPTERS = ["dora", "loha", "lokr"]
TRAINED_KEYS = {"dora": ("lora_down.weight", "lora_up.weight", "dora_scale"),
                "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
                "lokr": ("lokr_w1", "lokr_w2")}
ZERO_AT_START = {"dora": "lora_up.weight", "loha": "hada_w2_b", "lokr": "lokr_w1"}  # peft's init: no change at step 0
TOLERANCE = 1e-5
# The tiny UNet's 32-channel resnets have 32 GroupNorm groups: norm2 cancels the time embedding's per-channel shift
# exactly, so their time_emb_proj gradient is float noise, which AdamW scales to a step of its own (different noise,
# different step, sharded or not). Those modules are in the file with the same keys and shapes; not compared.
NOISE_ONLY = re.compile(r"lora_unet_(down_blocks_0|up_blocks_1)_resnets_\d+_time_emb_proj\.")


def _adapter_config(network_type: str, tiny_sd15, demo_dataset, out: Path) -> dict:
    cfg = _lora_config(tiny_sd15, demo_dataset, out)
    cfg["network"].update(network_type=network_type, target_preset="all_linear_conv")  # 2-D and 4-D base weights
    return cfg


@pytest.fixture(scope="module", params=ADAPTERS)
def adapter_runs(request, tiny_sd15, demo_dataset, tmp_path_factory) -> tuple[str, Path, Path]:
    """(network type, unsharded run folder, sharded run folder)."""
    kind = request.param
    unsharded, sharded = _unsharded_and_sharded(
        lambda out: _adapter_config(kind, tiny_sd15, demo_dataset, out), tmp_path_factory, kind)
    return kind, unsharded, sharded


def _assert_same_file(kind: str, state: dict, reference: dict) -> None:
    """The same LoRA file up to float noise: identical keys (this adapter's kind, on linear and conv layers), each
    tensor within ``TOLERANCE``, and training moved the factor peft starts at zero far beyond that tolerance."""
    assert state.keys() == reference.keys()
    for suffix in TRAINED_KEYS[kind]:
        assert any(k.endswith("." + suffix) for k in state), (kind, suffix, sorted(state)[:8])
    assert any(k.startswith("lora_unet_conv_in.") for k in state), sorted(state)[:8]  # a 3×3 conv is adapted
    assert all(state[k].shape == reference[k].shape for k in state)
    compared = [k for k in state if not NOISE_ONLY.match(k)]
    skipped = {NOISE_ONLY.match(k).group(0) for k in state if NOISE_ONLY.match(k)}  # module key prefixes
    assert len(skipped) == 3, sorted(skipped)  # down_blocks.0.resnets.0, up_blocks.1.resnets.0 and .1
    off = {k: float((state[k].float() - reference[k].float()).abs().max()) for k in compared}
    assert max(off.values()) <= TOLERANCE, sorted(off.items(), key=lambda kv: -kv[1])[:3]
    moved = max(float(reference[k].float().abs().max()) for k in compared if k.endswith("." + ZERO_AT_START[kind]))
    assert moved > 10 * TOLERANCE, (kind, moved)  # the comparison is finer than one training step


@pytest.mark.slow
def test_fsdp2_adapter_trains_and_saves_the_unsharded_runs_file(adapter_runs):
    import torch

    kind, unsharded, sharded = adapter_runs
    record, reference = _run_record(sharded), _run_record(unsharded)
    assert record["status"] == "finished" and len(record["losses"]) == 2
    assert record["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert record["checkpoints"][0]["val_loss"] == pytest.approx(reference["checkpoints"][0]["val_loss"], rel=1e-5)
    state, want = _checkpoint(sharded, 2), _checkpoint(unsharded, 2)
    _assert_same_file(kind, state, want)
    # the resumable state: the adapters alone (no frozen base weight), whole, and their AdamW moments by name
    blob = torch.load(sharded / "state" / "state.pt", map_location="cpu", weights_only=True)
    reference_blob = torch.load(unsharded / "state" / "state.pt", map_location="cpu", weights_only=True)
    adapters, reference_adapters = blob["network"]["unet"], reference_blob["network"]["unet"]
    assert adapters and not any(k.endswith("base_layer.weight") for k in adapters)
    assert sorted(v.shape for v in adapters.values()) == sorted(v.shape for v in reference_adapters.values())
    assert blob["optimizer_keys"] == "names" and set(blob["optimizer"]["state"]) == set(adapters)


@pytest.mark.slow
@pytest.mark.parametrize("adapter_runs", ["dora"], indirect=True)
def test_fsdp2_adapter_resumes_where_the_uninterrupted_run_ended(adapter_runs, tiny_sd15, demo_dataset, tmp_path):
    """Cancel after step 1, resume from the sharded state: DoRA only, to keep CI short (LoHa's and LoKr's state takes
    the adapters-by-name path of the sharded LoRA, whose resume tests/test_multi_gpu_recipe.py checks)."""
    kind, _, sharded = adapter_runs
    run_dir = _cancel_then_resume(_adapter_config(kind, tiny_sd15, demo_dataset, tmp_path / "out"), tmp_path)
    resumed, uninterrupted = _run_record(run_dir), _run_record(sharded)
    assert resumed["status"] == "finished"
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-6)
    _assert_same_file(kind, _checkpoint(run_dir, 2), _checkpoint(sharded, 2))


@pytest.mark.slow
def test_an_fp8_base_lora_trains_with_data_parallelism_as_the_sharded_refusal_says(tiny_sd15, demo_dataset,
                                                                                  tmp_path):
    """FSDP2 refuses ``model.fp8_base`` and names ``accelerate launch --multi_gpu`` instead (tests/test_sharding.py):
    that launch trains a LoRA on an fp8 base on 2 processes, both ranks ending with the same weights; its losses are
    near the fp32-base run's and not equal to them (the base really was fp8)."""
    from test_multiprocess import assert_ranks_agree, launch_two_processes

    losses = {}
    for fp8 in (True, False):
        folder = tmp_path / f"fp8-{fp8}"
        folder.mkdir()
        cfg = _lora_config(tiny_sd15, demo_dataset, folder / "out")
        cfg["model"]["fp8_base"] = fp8
        cfg["save"]["save_state"] = False
        assert_ranks_agree(launch_two_processes(folder, cfg))
        record = _run_record(folder / "out" / "fsdp")
        assert record["status"] == "finished" and (folder / "out" / "fsdp" / "fsdp-e0001-s000002.safetensors").is_file()
        losses[fp8] = record["losses"]
    assert losses[True] != losses[False] and losses[True] == pytest.approx(losses[False], rel=0.05)
