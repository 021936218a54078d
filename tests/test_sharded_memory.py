"""The memory estimate of a sharded run (FSDP2 over N processes, ``trainer/sharded_memory.py``), per rank: the units
FSDP2 shards, the documented formula, the switches it suggests, and ``python -m trainer plan --num-processes N
--fsdp``."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from trainer.config import TrainConfig
from trainer.full_size import ARCHITECTURES, build_meta, param_counts
from trainer.memory import GIB, MemoryOptions, estimate, fitting_switches
from trainer.memory_options import check_run_memory_options
from trainer.memory_presets import option_path
from trainer.sharding import check_sharded_run
from trainer.sharded_memory import fsdp_unit_params

FAMILIES = ("sd15", "sdxl", "sd3", "flux")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_units_hold_every_parameter_of_the_denoiser_once(family):
    denoiser = ARCHITECTURES[family][0][0]
    root, units = fsdp_unit_params(family)
    assert root + sum(units) == param_counts(family)[denoiser]
    model = build_meta(family, denoiser)
    wrapped = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    assert len(units) == len(wrapped) and list(units) == sorted(units, reverse=True)
    assert 0 < root < units[0] * 2  # the root holds what no block does: embeddings, in/out layers, norms


def test_a_sharded_estimate_divides_what_fsdp2_shards_and_keeps_what_it_does_not():
    one = MemoryOptions("flux", network_type="full", precision="bf16", resolution=1024, cache_latents=True,
                        cache_text_embeddings=True)
    counts, (root, units) = param_counts("flux"), fsdp_unit_params("flux")
    whole = estimate(one)
    for n in (2, 8):
        per_rank = estimate(replace(one, shards=n))
        gathered = (root + units[0] + units[1]) * 2  # gathered in bf16, the compute dtype
        assert per_rank.parts["denoiser weights"] == pytest.approx((counts["transformer"] * 4 // n + gathered) / GIB)
        # fp32 gradients and AdamW's two fp32 moments, sharded; the largest unit's whole gradient while reduced
        assert per_rank.parts["gradients + optimizer state"] == pytest.approx(
            (counts["transformer"] * 12 // n + units[0] * 4) / GIB)
        for unchanged in ("text encoders", "vae", "activations"):
            assert per_rank.parts[unchanged] == whole.parts[unchanged]
        assert per_rank.caching_gib == whole.caching_gib  # every rank holds the encoders whole while caching
        # rank 0 reads the fp32 transformer whole into host memory (a GPU's estimate does not count it) ...
        assert per_rank.loading_gib == pytest.approx(counts["transformer"] * 4 / GIB)
        assert per_rank.total_gib == max(per_rank.training_gib, per_rank.caching_gib)
        assert "rank 0 first reads it whole: 44.3 GiB of host memory" in per_rank.format()
    # ... on the CPU the device is host memory: the whole transformer and rank 0's shard at once
    cpu = estimate(replace(one, shards=2), "cpu")
    assert cpu.loading_gib == pytest.approx(counts["transformer"] * 4 * 1.5 / GIB)
    assert cpu.total_gib >= cpu.loading_gib
    # a Flux full fine-tune over 8 GPUs: ~25 GiB each (a 32 GB card), where one GPU would need ~177 GiB
    assert estimate(replace(one, shards=8)).total_gib < 32 < 170 < whole.total_gib


def test_a_sharded_loras_adapters_and_frozen_base_are_both_sharded():
    one = MemoryOptions("flux", precision="bf16", resolution=1024, cache_latents=True, cache_text_embeddings=True)
    root, units = fsdp_unit_params("flux")
    whole, per_rank = estimate(one), estimate(replace(one, shards=4))
    assert per_rank.parts["trainable parameters"] == pytest.approx(whole.parts["trainable parameters"] / 4, rel=1e-6)
    assert per_rank.parts["denoiser weights"] == pytest.approx(
        whole.parts["denoiser weights"] / 4 + (root + units[0] + units[1]) * 2 / GIB, rel=1e-6)
    assert per_rank.loading_gib == pytest.approx(whole.parts["denoiser weights"])  # the bf16 base, whole


def test_switches_for_a_sharded_run_name_only_what_it_honours():
    refused = ("fp8_base", "full_bf16", "fused_backward_pass", "blocks_to_swap")
    for kind in ("lora", "full"):
        cfg = TrainConfig.from_dict({"model": {"family": "flux"}, "datasets": [{"path": "x", "resolution": 1024}],
                                     "network": {"network_type": kind}})
        alone = fitting_switches(cfg, 1.0)
        assert any(r in s for s in alone for r in refused), alone  # one GPU: they are offered
        sharded = fitting_switches(cfg, 1.0, shards=2)
        assert not any(r in s for s in sharded for r in refused), sharded
        assert sharded[-1] == "nothing available here fits"
        # and the launch's own checks accept the config with every switch it suggests applied
        data = {"model": {"family": "flux"}, "datasets": [{"path": "x", "resolution": 1024}],
                "network": {"network_type": kind}, "training": {}, "optim": {}}
        for switch in sharded[:-1]:
            for name, value in zip(*[iter(switch.replace(" with ", " ").split())] * 2):
                path = option_path(name)
                if path:  # "a lower resolution (768)" and "mixed_precision bf16" name no config field to set
                    section, field = path.split(".")
                    data[section][field] = {"on": True}.get(value, int(value) if value.isdigit() else value)
        switched = TrainConfig.from_dict(data)
        check_sharded_run(switched)
        check_run_memory_options(switched, "bf16", 2)


def _plan_config(tmp_path, tiny_sd15, demo_dataset, training=None, network="full", **model) -> str:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"family": "sd15", "path": str(tiny_sd15), **model},
                                "datasets": [{"path": str(demo_dataset), "resolution": 64}],
                                "network": {"network_type": network},
                                "training": {"batch_size": 2, "epochs": 1, **(training or {})}}),
                    encoding="utf-8")
    return str(path)


def test_plan_for_a_sharded_launch_is_per_rank(tmp_path, tiny_sd15, demo_dataset, capsys):
    from trainer.cli import main

    cfg = _plan_config(tmp_path, tiny_sd15, demo_dataset)
    assert main(["plan", cfg]) == 0
    alone = capsys.readouterr().out
    assert main(["plan", cfg, "--num-processes", "2", "--fsdp"]) == 0
    sharded = capsys.readouterr().out
    assert "sharded over 2 processes" in sharded and "sharded over" not in alone
    assert "rank 0 first reads it whole" in sharded

    def peak(text: str) -> float:
        return float(text.split("estimated peak memory ")[1].split(" GiB")[0])
    assert peak(sharded) < peak(alone)
    assert main(["plan", cfg, "--num-processes", "2"]) == 0  # data parallel: every rank holds the whole model
    assert peak(capsys.readouterr().out) == peak(alone)


def test_plan_refuses_what_a_sharded_launch_would_refuse(tmp_path, tiny_sd15, demo_dataset, capsys):
    from trainer.cli import main

    assert main(["plan", _plan_config(tmp_path, tiny_sd15, demo_dataset, fp8_base=True), "--num-processes", "2",
                 "--fsdp"]) != 0
    assert "model.fp8_base" in capsys.readouterr().err
    assert main(["plan", _plan_config(tmp_path, tiny_sd15, demo_dataset), "--fsdp"]) != 0
    assert "--num-processes" in capsys.readouterr().err
    # refused for every multi-process launch, sharded or not (trainer.memory_options)
    swap = _plan_config(tmp_path, tiny_sd15, demo_dataset, training={"blocks_to_swap": 2}, network="lora")
    assert main(["plan", swap, "--num-processes", "2"]) != 0
    assert "training.blocks_to_swap is for one GPU" in capsys.readouterr().err
    assert main(["plan", swap]) == 0  # one process: swapping is allowed


def test_the_per_rank_estimate_is_within_15_percent_of_each_measured_rank(monkeypatch):
    """benchmarks/results/fsdp-memory-cpu.json (``benchmarks/bench_fsdp_memory.py``): the full-size SD1.5, one step on
    2 CPU processes. The estimate of each rank (plus the process's own RSS, ``base_gib`` of the single-process rows
    from files, the same machine and torch) is within 15% of its peak: rank 0's includes its loading (the whole
    denoiser and its shard at once: the CPU is the device), the other rank's does not; a data-parallel rank holds
    what one process does."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    from bench_fsdp_memory import run_config

    record = json.loads((root / "benchmarks" / "results" / "fsdp-memory-cpu.json").read_text(encoding="utf-8"))
    files = json.loads((root / "benchmarks" / "results" / "memory-cpu-files.json").read_text(encoding="utf-8"))
    assert record["torch"] == files["torch"] and "gloo" in record["device"]
    base = max(r["base_gib"] for r in files["rows"])
    rows = {(r["case"], r["rank"]): r for r in record["rows"]}
    compared = 0
    for (case, rank), row in rows.items():
        kind, launch = case.split("-")[1], case.split("-", 2)[2]
        cfg = TrainConfig.from_dict(run_config(kind, {"path": "x"}, Path("data"), Path("out"), record["res"]))
        est = estimate(MemoryOptions.from_config(cfg, shards=2 if launch == "fsdp2" else 1), "cpu")
        expected = (est.total_gib if rank == 0 else est.other_ranks_gib) + base
        assert abs(expected - row["peak_gib"]) <= 0.15 * row["peak_gib"], (case, rank, expected, row["peak_gib"])
        if launch == "fsdp2" and rank == 0:  # its prepare() peak: the whole denoiser read, its shard kept
            assert abs(est.loading_gib + base - row["prepare_peak_gib"]) <= 0.15 * row["prepare_peak_gib"], case
        compared += 1
    assert compared == 7  # the one-process full fine-tune, both data-parallel ranks and both ranks of each sharded run
