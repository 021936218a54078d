"""``make demo``: the whole Crucible job end to end on the CPU, with nothing to download.

Builds a tiny randomly initialised SD1.5-architecture model from configs, trains a LoRA on the bundled shapes
dataset, saves several checkpoints, renders each one with the same prompt and seed, and writes the labelled strip.
The pictures are noise-like (the base model knows nothing), but every code path is the real one.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .callbacks import ConsoleProgress
from .config import TrainConfig

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
log = logging.getLogger("crucible")


def demo_config(model_dir: Path, out: Path, epochs: int) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"family": "sd15", "path": str(model_dir)},
        "datasets": [{"path": str(DEMO_DATA), "resolution": 64,
                      "captions": {"trigger_word": "crucible", "shuffle_caption": True, "keep_tokens": 1,
                                   "caption_dropout_rate": 0.05}}],
        "network": {"network_dim": 8, "network_alpha": 8, "target_preset": "attn_mlp"},
        "optim": {"learning_rate": 1e-3, "lr_scheduler": "cosine", "lr_warmup_ratio": 0.05},
        "training": {"batch_size": 4, "epochs": epochs, "seed": 42},
        "save": {"output_dir": str(out / "loras"), "work_dir": str(out / "runs"), "run_name": "demo",
                 "save_every_n_epochs": 1, "save_precision": "fp32"},
        "sample": {"prompts": ["crucible, red circle, white background"], "steps": 8, "cfg": 3.0, "seed": 7},
    })


def run_demo(out: Path, epochs: int = 5) -> Path:
    from .dataset import DataSource
    from .loop import train
    from .plan import compute_plan
    from .sweep import sweep_run
    from .tiny import build_tiny_pipeline

    out = Path(out).resolve()
    t0 = time.monotonic()
    print(f"1/4 building a tiny SD1.5-architecture model in {out / 'tiny-sd15'} (random weights, no download)")
    model_dir = build_tiny_pipeline(out / "tiny-sd15", family="sd15", seed=0, single_file=True)
    cfg = demo_config(model_dir, out, epochs)
    source = DataSource(cfg.datasets, seed=cfg.training.seed)
    print(source.report_text())
    print(compute_plan(cfg, source).format())
    print("2/4 training")
    result = train(cfg, ConsoleProgress(every=10))
    first, last = result.losses[: len(result.losses) // 4], result.losses[-(len(result.losses) // 4):]
    print(f"    loss {sum(first) / len(first):.4f} (first quarter) → {sum(last) / len(last):.4f} (last quarter)")
    print("3/4 rendering every checkpoint with the same prompt and seed")
    strip = sweep_run(result.work_dir, prompts=list(cfg.sample.prompts), seeds=[cfg.sample.seed], strengths=[1.0],
                      steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg, out=out / "demo_strip.png")
    print(f"4/4 done in {time.monotonic() - t0:.0f}s")
    print(f"    LoRA checkpoints : {result.run_dir}")
    for c in result.checkpoints:
        print(f"        step {c.step:>4}  epoch {c.epoch:>2}  {c.path.name}")
    print(f"    run folder       : {result.work_dir} (config.json, run.json, state/, samples/)")
    print(f"    strip            : {strip}")
    return strip
