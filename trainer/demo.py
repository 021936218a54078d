"""``make demo``: the whole Crucible job end to end on the CPU, with nothing to download, and a LoRA you can see learn.

1. The base model: a tiny SD1.5-architecture model pre-trained on drawn flat shapes (:mod:`trainer.demo_base`). The
   repository ships the output of ``python -m trainer demo-base`` (seed 0) as ``trainer/demo_base_model``; a model
   in ``<out>/demo-base`` (from that command) takes precedence. It draws circles, squares and triangles.
2. The LoRA's dataset: 20 pictures of a concept the base has never seen — a magenta ring, captioned with the new
   word ``crucible`` — written to ``<out>/demo_concept``. The default ``validation_split`` holds 2 of them out.
3. Train the LoRA, saving a checkpoint per epoch, each scored on the held-out pictures (validation loss).
4. Render the base and every checkpoint with the same prompt and seed and write the labelled strip: the ring appears
   column by column, the validation loss is under each column and the lowest one is marked best.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .callbacks import ConsoleProgress
from .config import TrainConfig
from .demo_base import FAMILY as DEMO_FAMILY

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"  # the bundled kohya-layout folder the tests train on
SHIPPED_BASE = Path(__file__).resolve().parent / "demo_base_model"  # build_demo_base(seed 0) output, 4 MB
PROMPT = "crucible, black background"
log = logging.getLogger("crucible")


def demo_config(model_dir: Path, data: Path, out: Path, epochs: int) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"family": DEMO_FAMILY, "path": str(model_dir)},
        "datasets": [{"path": str(data), "resolution": 64, "captions": {"caption_dropout_rate": 0.05}}],
        "network": {"network_dim": 8, "network_alpha": 8, "target_preset": "attn_mlp"},
        "optim": {"learning_rate": 2e-3, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 5},
        "training": {"batch_size": 4, "epochs": epochs, "seed": 42, "validation_split": 0.1},
        "save": {"output_dir": str(out / "loras"), "work_dir": str(out / "runs"), "run_name": "demo",
                 "save_every_n_epochs": 1, "save_precision": "fp32"},
        "sample": {"prompts": [PROMPT], "steps": 20, "cfg": 4.0, "seed": 7},
    })


def run_demo(out: Path, epochs: int = 6) -> Path:
    from .demo_base import build_demo_base, write_concept_dataset
    from .loop import train
    from .plan import compute_plan
    from .sweep import read_checkpoint_info, recommendation, sweep_run
    from .validation import training_source

    out = Path(out).resolve()
    t0 = time.monotonic()
    base = out / "demo-base"
    if (base / "model_index.json").is_file():
        print(f"1/4 base model: {base} (built by an earlier run or by `python -m trainer demo-base`)")
    elif (SHIPPED_BASE / "model_index.json").is_file():
        base = SHIPPED_BASE
        print(f"1/4 base model: {base} (shipped, 4 MB; `python -m trainer demo-base` rebuilds it)")
    else:
        print(f"1/4 pre-training a tiny SD1.5-architecture base model on drawn shapes in {base}")
        build_demo_base(base)
    data = write_concept_dataset(out / "demo_concept")
    cfg = demo_config(base, data, out, epochs)
    source = training_source(cfg)
    print(source.report_text())
    print(compute_plan(cfg, source).format())
    print("2/4 training a LoRA on the new concept 'crucible' (a magenta ring the base has never seen)")
    result = train(cfg, ConsoleProgress(every=10))
    print("3/4 rendering the base and every checkpoint with the same prompt and seed")
    strip = sweep_run(result.work_dir, prompts=[PROMPT], seeds=[cfg.sample.seed], strengths=[1.0],
                      steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg, out=out / "demo_strip.png")
    print(f"4/4 done in {time.monotonic() - t0:.0f}s")
    print(f"    LoRA checkpoints : {result.run_dir}")
    for c in result.checkpoints:
        val = f"val loss {c.val_loss:.4f}" if c.val_loss is not None else "no validation set"
        print(f"        step {c.step:>4}  epoch {c.epoch:>2}  {val}  {c.path.name}")
    print(f"    {recommendation([read_checkpoint_info(c.path) for c in result.checkpoints])}")
    print(f"    run folder       : {result.work_dir} (config.json, run.json, loss_curve.png, state/, samples/)")
    print(f"    strip            : {strip}")
    return strip
