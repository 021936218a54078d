"""Benchmark: peak training memory per family and memory preset, with full-size random weights.

Each case runs in a fresh subprocess: the full-size architecture (``trainer.full_size``, random weights, no
download), a one-image dataset at the case's resolution, LoRA rank 16 on the ``attn_mlp`` preset, batch 1, and
``--steps`` real optimizer steps through ``trainer.loop.train``. Peak memory is ``torch.cuda.max_memory_allocated``
on CUDA and the process's peak resident set size (``VmHWM``) on the CPU; the RSS right after the imports (Python,
torch, diffusers) is reported too (``base_gib``), since a CUDA figure does not include it.

Presets (what the switches are; the estimate in :mod:`trainer.memory` uses the same ones):

* ``default``: the config defaults (``mixed_precision`` auto, the family's gradient checkpointing, no caches).
* ``low``: + gradient checkpointing, latent and text caches (the VAE and text encoders leave the device).
* ``lowest``: + AdamW 8-bit (CUDA). fp8 base weights and block swap are not implemented yet, so for LoRA this is
  close to ``low``.

Every line reads ``case=<family>-<kind>-<preset> res=<px> peak_gib=<x> budget_gib=<y> device=<cpu|cuda>
ok=<true|false>``; the exit status is 1 when a case is over its budget. Budgets are the issue's (1024 px on CUDA;
CPU rows run at ``--cpu-res``, 512 px by default, and say so in ``res``). ``--quick`` runs SD1.5 and SDXL;
``--cases`` picks cases by name; ``--record FILE`` writes the measurements as JSON (device, date, numbers).
On the CPU, cases whose estimate exceeds ``--max-ram-gib`` are not started (they are listed as skipped).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (family, kind, preset) -> budget GiB (issue 16)
BUDGETS = {
    ("sd15", "lora", "default"): 4.0, ("sd15", "lora", "low"): 4.0, ("sd15", "lora", "lowest"): 4.0,
    ("sdxl", "lora", "default"): 10.0, ("sdxl", "lora", "low"): 8.0, ("sdxl", "lora", "lowest"): 6.0,
    ("flux", "lora", "default"): 24.0, ("flux", "lora", "low"): 16.0, ("flux", "lora", "lowest"): 12.0,
    ("sd3", "full", "low"): 24.0, ("sd3", "full", "lowest"): 16.0,
}
BUILDABLE = ("sd15", "sdxl")  # trainer.full_size.random_components


def case_name(case) -> str:
    return "-".join(case)


def preset_training(preset: str, cuda: bool) -> tuple[dict, dict]:
    """(training section, optim section) for a preset."""
    training: dict = {}
    optim: dict = {"optimizer": "adamw"}
    if preset in ("low", "lowest"):
        training.update(gradient_checkpointing=True, cache_latents=True, cache_text_embeddings=True)
    if preset == "lowest" and cuda:
        optim["optimizer"] = "adamw8bit"
    return training, optim


def case_config(case, res: int, data: Path, out: Path, steps: int, cuda: bool):
    from trainer.config import TrainConfig

    family, kind, preset = case
    training, optim = preset_training(preset, cuda)
    return TrainConfig.from_dict({
        "model": {"family": family},
        "datasets": [{"path": str(data), "resolution": res}],
        "network": {"network_type": "lora" if kind == "lora" else "full", "network_dim": 16, "network_alpha": 16},
        "optim": {**optim, "lr_scheduler": "constant"},
        "training": {"batch_size": 1, "max_train_steps": steps, **training},
        "save": {"output_dir": str(out), "run_name": "bench", "save_every_n_epochs": 0, "save_last": False,
                 "save_state": False},
    })


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def rss_gib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 2**20


def child(case, res: int, steps: int) -> dict:
    """Runs in the fresh subprocess: one case, returns its numbers."""
    import torch
    from PIL import Image

    import diffusers  # noqa: F401 - imported before the baseline reading, as training needs it
    from trainer.defaults import resolve_mixed_precision
    from trainer.full_size import random_components
    from trainer.loop import train

    base = rss_gib("VmRSS")
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="crucible-bench-mem-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        Image.new("RGB", (res, res), (120, 90, 60)).save(data / "a.png")
        (data / "a.txt").write_text("a photo of a thing", encoding="utf-8")
        cfg = case_config(case, res, data, Path(tmp) / "out", steps, cuda)
        precision = resolve_mixed_precision(cfg.training.mixed_precision)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if case[1] == "lora" else None
        comps = random_components(case[0], dtype=dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = train(cfg, components=comps)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else rss_gib("VmHWM")
    return {"case": case_name(case), "res": res, "peak_gib": round(peak, 3), "base_gib": round(base, 3),
            "device": "cuda" if cuda else "cpu", "precision": precision, "steps": steps,
            "losses": [round(x, 5) for x in result.losses]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SD1.5 and SDXL cases only")
    parser.add_argument("--cases", nargs="*", help="case names, e.g. sd15-lora-default")
    parser.add_argument("--cpu-res", type=int, default=512)
    parser.add_argument("--cuda-res", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per case (default: 3 CUDA, 1 CPU)")
    parser.add_argument("--max-ram-gib", type=float, default=12.0, help="CPU: skip cases estimated above this")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--record", type=Path, help="write the measurements to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    res = args.cuda_res if cuda else args.cpu_res
    steps = args.steps or (3 if cuda else 1)
    if args.child:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        print("RESULT " + json.dumps(child(tuple(args.child.split("-")), res, steps)), flush=True)
        return 0

    from trainer.memory import estimate_case

    cases = [c for c in BUDGETS if not args.quick or c[0] in ("sd15", "sdxl")]
    if args.cases:
        cases = [c for c in cases if case_name(c) in args.cases]
    rows, failed = [], False
    for case in cases:
        budget = BUDGETS[case]
        estimate = estimate_case(case, res, device="cuda" if cuda else "cpu")
        if case[0] not in BUILDABLE:
            print(f"# {case_name(case)}: not measured (random full-size components are built for "
                  f"{', '.join(BUILDABLE)} only); estimate {estimate.total_gib:.2f} GiB", flush=True)
            continue
        if not cuda and estimate.total_gib > args.max_ram_gib:
            print(f"# {case_name(case)}: skipped on the CPU (estimate {estimate.total_gib:.1f} GiB > "
                  f"--max-ram-gib {args.max_ram_gib})", flush=True)
            continue
        proc = subprocess.run([sys.executable, __file__, "--child", case_name(case), "--cpu-res", str(res),
                               "--cuda-res", str(res), "--steps", str(steps)],
                              capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"# {case_name(case)}: failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}", flush=True)
            failed = True
            continue
        row = json.loads(line[len("RESULT "):])
        row.update(budget_gib=budget, ok=row["peak_gib"] <= budget, estimate_gib=round(estimate.total_gib, 3))
        rows.append(row)
        failed |= not row["ok"]
        print(f"case={row['case']} res={row['res']} peak_gib={row['peak_gib']:.2f} budget_gib={budget:g} "
              f"device={row['device']} ok={'true' if row['ok'] else 'false'}", flush=True)
        print(f"#   estimate {estimate.total_gib:.2f} GiB (trainer.memory); process baseline after imports "
              f"{row['base_gib']:.2f} GiB; precision {row['precision']}; losses {row['losses']}", flush=True)
    if args.record:
        device = torch.cuda.get_device_name() if cuda else f"CPU: {cpu_model()}, {os.cpu_count()} cores"
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps({
            "device": device, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "torch": torch.__version__, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
