"""``benchmarks/bench_fsdp_memory.py`` on a tiny SD1.5 (``--tiny``): every launch runs, each rank's figures are read
from the shim's reports, and they say what the sharded runs do — off rank 0 no denoiser weights before
``prepare()``, after it each rank one half of them — so the full-size figures it records mean what they say."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_per_rank_benchmark_reads_every_launch_and_the_shards_are_halves(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_fsdp_memory

    record = tmp_path / "fsdp.json"
    assert bench_fsdp_memory.main(["--tiny", "--res", "64", "--record", str(record),
                                   "--files-dir", str(tmp_path / "files")]) == 0
    data = json.loads(record.read_text(encoding="utf-8"))
    rows = {(r["case"], r["rank"]): r for r in data["rows"]}
    assert set(rows) == {("sd15-full-one-process", 0), ("sd15-full-fsdp2", 0), ("sd15-full-fsdp2", 1),
                         ("sd15-full-zero2", 0), ("sd15-full-zero2", 1),
                         ("sd15-lora-ddp", 0), ("sd15-lora-ddp", 1), ("sd15-lora-fsdp2", 0), ("sd15-lora-fsdp2", 1)}
    for kind in ("full", "lora"):
        whole, rank0, rank1 = (rows[f"sd15-{kind}-{c}", r] for c, r in
                               (("one-process" if kind == "full" else "ddp", 0), ("fsdp2", 0), ("fsdp2", 1)))
        assert rank0["weights_bytes"] == whole["weights_bytes"] > 0
        assert rank1["weights_bytes"] == 0  # rank 1 reads none of the denoiser
        assert rank0["shard_bytes"] + rank1["shard_bytes"] == whole["weights_bytes"]
        assert max(rank0["shard_bytes"], rank1["shard_bytes"]) <= 0.75 * whole["weights_bytes"]
        for r in (whole, rank0, rank1):
            assert 0 < r["prepare_peak_gib"] <= r["peak_gib"]
    for rank in (0, 1):  # ZeRO-2 keeps the weights whole on every rank (it splits the optimizer's copy and state)
        zero2 = rows["sd15-full-zero2", rank]
        assert zero2["weights_bytes"] == zero2["shard_bytes"] == rows["sd15-full-one-process", 0]["weights_bytes"]
    assert {(s["case"], s["launch"], s["rank"]) for s in data["ratios"]} == {
        (case, launch, rank) for case, launch in (("sd15-full", "fsdp2"), ("sd15-full", "zero2"),
                                                  ("sd15-lora", "fsdp2")) for rank in (0, 1)}
