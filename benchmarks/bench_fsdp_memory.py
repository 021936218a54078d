"""Benchmark: host RAM per rank of a sharded run (FSDP2) at full size, on 2 CPU processes, against the same run
unsharded, measured in the same run.

The model is the full-size SD1.5 (random weights, ``benchmarks/model_files.py``, loaded from its single-file
checkpoint as a ComfyUI user has it), a two-image dataset at ``--res`` (512 px), batch 1 per rank, one optimizer
step, fp32 (FSDP on CPU processes computes in fp32: ``mixed_precision: no``), gradient checkpointing, the latent and
text caches on (so the encoders leave before the denoiser is read), no checkpoint written. Two kinds:

* ``full``: a full fine-tune with AdamW — one process (what one GPU would hold: the whole weights, gradients and
  AdamW states) against FSDP2 on 2 ranks (each 1/2 of them);
* ``full``, ``zero2``: the same full fine-tune under DeepSpeed ZeRO-2 (``docs/accelerate/deepspeed_zero2.yaml``,
  ``tests/deepspeed_cpu_shim.py``). Not measured at full size: in fp32 its two ranks need more than a 23 GiB machine
  has (each had passed 11.4 GiB when the kernel ended the run, 2026-12-07; one process peaks at 13.5), since each
  keeps the whole fp32 weights and gradients, DeepSpeed's gradient bucket (5e8 elements by default) and its slice
  of the fp32 copy beside its slice of the AdamW state. ``--tiny`` runs it (the test);
* ``lora``: a LoRA (rank 16, ``attn_mlp``) — data parallel on 2 ranks (each holds the whole frozen base) against
  FSDP2 on 2 ranks (each 1/2 of the base).

accelerate enables FSDP on GPUs only; ``tests/fsdp_cpu_shim.py`` (the shim the sharded tests run) switches it on
for CPU (gloo) processes and prints, per rank, the denoiser's weight bytes before and after ``prepare()``, the peak
RSS (``VmHWM``) at the end of ``prepare()`` (the caching and loading phases: rank 0 reads the whole denoiser there)
and at exit (the whole run). glibc's mmap threshold is pinned as in ``bench_memory.py``.

Each line reads ``case=sd15-<kind>-<launch> rank=<r> peak_gib=<x> prepare_peak_gib=<y> weights_gib=<w>
shard_gib=<s>``, then per kind ``case=sd15-<kind> rank=<r> sharded_peak_gib=<x> baseline_peak_gib=<y>
ratio=<x/y>``. ``--record FILE`` writes the rows as JSON. Exit status 1 when a launch fails.

Needs about 18 GiB of free RAM (the one-process full fine-tune: ~13 GiB of weights, gradients and AdamW states).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FSDP_FILE = ROOT / "docs" / "accelerate" / "fsdp2_full_finetune.yaml"
DEEPSPEED_FILE = ROOT / "docs" / "accelerate" / "deepspeed_zero2.yaml"
# per kind: the baseline, then the launches compared with it (``--launches`` picks some of them)
LAUNCHES = {"full": ("one-process", "fsdp2", "zero2"), "lora": ("ddp", "fsdp2")}
SHIM = re.compile(r"fsdp_cpu_shim: rank (\d) (weight bytes before sharding|shard bytes after sharding|"
                  r"peak rss kib|exit peak rss kib) (\d+)")
FIELDS = {"weight bytes before sharding": ("weights_gib", 2**30), "shard bytes after sharding": ("shard_gib", 2**30),
          "peak rss kib": ("prepare_peak_gib", 2**20), "exit peak rss kib": ("peak_gib", 2**20)}


def run_config(kind: str, model: dict, data: Path, out: Path, res: int) -> dict:
    """``model``: the ``model`` fields that load the files (``model_files.write_full_size_files``)."""
    network = ({"network_type": "full"} if kind == "full" else
               {"network_type": "lora", "network_dim": 16, "network_alpha": 16, "target_preset": "attn_mlp"})
    return {"model": {"family": "sd15", **model},
            "datasets": [{"path": str(data), "resolution": res}],
            "network": network, "optim": {"optimizer": "adamw", "learning_rate": 1e-5, "lr_scheduler": "constant"},
            "training": {"batch_size": 1, "max_train_steps": 1, "seed": 1, "mixed_precision": "no",
                         "gradient_checkpointing": True, "cache_latents": True, "cache_text_embeddings": True,
                         "validation_split": 0},
            "save": {"output_dir": str(out), "run_name": "bench", "save_every_n_epochs": 0, "save_last": False,
                     "save_state": False},
            "sample": {"sample_every_n_steps": 0}}


def two_image_dataset(folder: Path, res: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, colour in enumerate([(120, 90, 60), (40, 110, 170)]):
        Image.new("RGB", (res, res), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of thing {i}", encoding="utf-8")
    return folder


def launch_argv(launch: str) -> list[str]:
    """The command line of one launch of the shim (``python -m trainer train`` with the shim's reports)."""
    if launch == "one-process":
        return [sys.executable, "-m", "fsdp_cpu_shim", "train", "cfg.json"]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if not accelerate:
        raise SystemExit("accelerate's launcher is part of the accelerate package: pip install accelerate")
    how = {"fsdp2": ["--config_file", str(FSDP_FILE), "--num_processes", "2"],
           "zero2": ["--config_file", str(DEEPSPEED_FILE), "--num_processes", "2", "--mixed_precision", "no"],
           "ddp": ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]}[launch]
    shim = "deepspeed_cpu_shim" if launch == "zero2" else "fsdp_cpu_shim"
    return [accelerate, "launch", *how, "--dynamo_backend", "no", "-m", shim, "train", "cfg.json"]


def measure(launch: str, cfg: dict, folder: Path, timeout: int) -> dict:
    """Run one launch in ``folder``: ``{rank: {field: GiB}}`` from the shim's reports (``SystemExit`` if it failed)."""
    from bench_memory import child_env

    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg), encoding="utf-8")
    env = child_env(dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                         OMP_NUM_THREADS="1", FSDP_CPU_SHIM_DIGEST="0"))
    proc = subprocess.run(launch_argv(launch), cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    (folder / "launch.log").write_text(output, encoding="utf-8")
    if proc.returncode != 0 or "exit peak rss kib" not in output:
        raise SystemExit(f"{launch} failed (exit {proc.returncode}): {output[-2000:]}")
    ranks: dict[int, dict] = {}
    for rank, what, value in SHIM.findall(output):
        name, unit = FIELDS[what]
        row = ranks.setdefault(int(rank), {})
        row[name] = round(int(value) / unit, 3)
        if unit == 2**30:  # the weight bytes themselves too
            row[name.replace("_gib", "_bytes")] = int(value)
    return ranks


def result_line(case: str, rank: int, row: dict) -> str:
    values = " ".join(f"{k}={row[k]:.2f}" for k in ("peak_gib", "prepare_peak_gib", "weights_gib", "shard_gib")
                      if k in row)
    return f"case={case} rank={rank} {values}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="*", default=list(LAUNCHES), choices=list(LAUNCHES))
    parser.add_argument("--launches", nargs="*", help="only these of each kind's launches (its baseline always "
                        f"runs): {sorted({x for v in LAUNCHES.values() for x in v[1:]})}")
    parser.add_argument("--res", type=int, default=512)
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--files-dir", type=Path, help="where the model file is written (default: a temp folder)")
    parser.add_argument("--record", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--tiny", action="store_true", help="a tiny SD1.5 instead of the full-size one (the test)")
    args = parser.parse_args(argv)

    import torch
    from bench_memory import cpu_model
    from model_files import write_full_size_files

    tmp = Path(tempfile.mkdtemp(prefix="crucible-bench-fsdp-"))
    try:
        files = args.files_dir or tmp / "files"
        if args.tiny:
            from trainer.tiny import build_tiny_pipeline, single_file_path

            model = {"path": str(single_file_path(build_tiny_pipeline(files / "tiny-sd15", family="sd15", seed=0,
                                                                      single_file=True)))}
        else:
            print(f"# writing the full-size random sd15 model file to {files} ...", flush=True)
            model = write_full_size_files("sd15", files / "sd15")  # the checkpoint and its tokenizer
        data = two_image_dataset(tmp / "data", args.res)
        rows, summary = [], []
        for kind in args.kinds:
            baseline_launch, *compared = LAUNCHES[kind]
            compared = [c for c in compared if not args.launches or c in args.launches]
            measured = {}
            for launch in [baseline_launch, *compared]:
                case = f"sd15-{kind}-{launch}"
                ranks = measure(launch, run_config(kind, model, data, tmp / case / "out", args.res), tmp / case,
                                args.timeout)
                measured[launch] = ranks
                for rank, row in sorted(ranks.items()):
                    print(result_line(case, rank, row), flush=True)
                    rows.append({"case": case, "rank": rank, "res": args.res, **row})
            baseline = measured[baseline_launch]
            for launch in compared:
                for rank, row in sorted(measured[launch].items()):
                    base = baseline.get(rank, baseline[0])  # one process: rank 0 is what one GPU's host would hold
                    ratio = row["peak_gib"] / base["peak_gib"]
                    print(f"case=sd15-{kind} launch={launch} rank={rank} peak_gib={row['peak_gib']:.2f} "
                          f"baseline_peak_gib={base['peak_gib']:.2f} baseline={baseline_launch} ratio={ratio:.2f}",
                          flush=True)
                    summary.append({"case": f"sd15-{kind}", "launch": launch, "rank": rank,
                                    "sharded_peak_gib": row["peak_gib"], "baseline": baseline_launch,
                                    "baseline_peak_gib": base["peak_gib"], "ratio": round(ratio, 3)})
        if args.record:
            args.record.write_text(json.dumps({
                "device": f"CPU: {cpu_model()}, {os.cpu_count()} cores, 2 processes (gloo)",
                "date": datetime.date.today().isoformat(), "torch": torch.__version__, "res": args.res,
                "model": "tiny sd15" if args.tiny else "full-size sd15 (random weights, single file)",
                "method": "peak RSS per rank (VmHWM at the end of prepare() and at exit), one step",
                "rows": rows, "ratios": summary}, indent=1) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
