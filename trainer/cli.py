"""``python -m trainer …`` — the headless front end. Same config schema as the ComfyUI nodes.

    python -m trainer train CONFIG.toml [--set training.epochs=4] [--resume RUN/state] [--force-resume]
    python -m trainer plan CONFIG.toml            # the step plan, nothing trains
    python -m trainer plan CONFIG.toml --num-processes 2 --fsdp   # ... for a sharded 2-GPU launch, per rank
    python -m trainer plan CONFIG.toml --num-processes 2 --deepspeed   # ... what a ZeRO-2 launch would refuse
    python -m trainer preview CONFIG.toml         # captions exactly as training will see them
    python -m trainer sweep RUN_DIR --prompt "…" --seed 1 [--strengths 0.6,0.8,1.0] [--out strip.png]
    python -m trainer demo [--out demo_output]    # pre-trained tiny base + a LoRA on a new concept, end to end
    python -m trainer demo-base [--out DIR]       # only (re)build the demo's pre-trained tiny base model

Multi-GPU: ``accelerate launch -m trainer train CONFIG.toml`` (only rank 0 writes files).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from .errors import ConfigError, run_command
from .run_paths import run_paths


def _config(args):
    from .config import TrainConfig

    return TrainConfig.load(args.config, args.set or [])


def cmd_train(args) -> int:
    from .callbacks import ConsoleProgress
    from .loop import train

    cfg = _config(args)
    main_process = os.environ.get("RANK", "0") == "0"  # under accelerate launch only rank 0 reports
    callbacks = [ConsoleProgress()] if main_process else []
    if args.tensorboard:
        from .tb import TensorBoardCallbacks

        callbacks.append(TensorBoardCallbacks(run_paths(cfg.save).logs_dir))
    from .callbacks import MultiCallbacks

    result = train(cfg, MultiCallbacks(callbacks), resume_from=args.resume, force_resume=args.force_resume)
    if not main_process:
        return 0
    print(f"checkpoints in {result.run_dir}:")
    for ckpt in result.checkpoints:
        print(f"  step {ckpt.step:>6}  epoch {ckpt.epoch:>3}  {ckpt.path.name}")
    if result.cancelled and result.state_dir:
        print(f"stopped early; resume with: python -m trainer train {args.config} --resume {result.state_dir}")
    return 0


def cmd_plan(args) -> int:
    from .plan import compute_plan
    from .validation import training_source

    cfg = _config(args)
    if args.num_processes < 1:
        raise ConfigError(f"--num-processes must be 1 or more, not {args.num_processes}")
    if args.fsdp and args.deepspeed:
        raise ConfigError("--fsdp and --deepspeed are two different launches: give one of them")
    for flag in ("fsdp", "deepspeed"):
        if getattr(args, flag) and args.num_processes < 2:
            raise ConfigError(f"--{flag} shards the run over --num-processes N processes: give N of 2 or more")
    if args.num_processes > 1:  # what the launch would refuse, before anything is estimated
        from .defaults import resolved_settings
        from .memory_options import check_run_memory_options
        from .sharding import check_sharded_run

        check_run_memory_options(cfg, resolved_settings(cfg)["mixed_precision"], args.num_processes)
        if args.fsdp:
            check_sharded_run(cfg)
        if args.deepspeed:  # the file's own values (accumulation, clipping) are checked at launch
            from .deepspeed_zero import check_deepspeed_run

            check_deepspeed_run(cfg, {"zero_optimization": {"stage": 2}})
    source = training_source(cfg)
    print(source.report_text())
    print(compute_plan(cfg, source, args.num_processes).format())
    from .memory import memory_report

    # estimated peak memory (per rank when sharded), the device's memory, switches that would make it fit
    print(memory_report(cfg, shards=args.num_processes if args.fsdp else 1))
    if args.deepspeed:
        print("DeepSpeed ZeRO-2: the estimate above is a data-parallel rank's (whole weights, gradients and optimizer "
              "state); ZeRO-2 splits the fp32 copy, gradients and optimizer state over the ranks, which this estimate "
              "does not count (docs/multi_gpu.md)")
    return 0


def cmd_preview(args) -> int:
    from .preview_captions import caption_preview

    cfg = _config(args)
    preview = caption_preview(cfg.datasets, args.images, args.epochs, cfg.training.seed, cfg.training,
                              cfg.model.family)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in preview.rows], indent=2, ensure_ascii=False))
    else:
        print(preview.table())
    return 0


def cmd_sweep(args) -> int:
    from .sweep import sweep_run

    strengths = [float(s) for s in args.strengths.split(",")] if args.strengths else [1.0]
    out = sweep_run(args.run_dir, prompts=args.prompt or [], seeds=args.seed or [], strengths=strengths,
                    steps=args.steps, cfg_scale=args.cfg, include_base=not args.no_base, out=args.out,
                    every=args.every)
    print(f"wrote {out}")
    from .run_record import RunRecord
    from .sweep import read_checkpoint_info, recommendation

    print(recommendation([read_checkpoint_info(c.path) for c in RunRecord.load(args.run_dir).checkpoints
                          if c.path.exists()]))
    return 0


def cmd_demo_base(args) -> int:
    from .demo_base import build_demo_base

    build_demo_base(Path(args.out), seed=args.seed)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", help="TOML or JSON config (same schema as the ComfyUI nodes)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. training.epochs=4")
        return sp

    t = with_config(sub.add_parser("train", help="train a LoRA or full fine-tune"))
    t.add_argument("--resume", metavar="STATE_DIR", help="resume from a saved state folder (<run>/state)")
    t.add_argument("--force-resume", action="store_true", help="resume even if the config or dataset changed")
    t.add_argument("--tensorboard", action="store_true", help="log loss and LR to <run>/logs (needs tensorboard)")
    t.set_defaults(fn=cmd_train)
    pl = with_config(sub.add_parser("plan", help="print the dataset report, step plan and memory estimate"))
    pl.add_argument("--num-processes", type=int, default=1, metavar="N",
                    help="plan for an `accelerate launch` of N processes (GPUs): each takes every Nth batch")
    pl.add_argument("--fsdp", action="store_true",
                    help="the launch shards the denoiser over the N processes (FSDP2, docs/multi_gpu.md): the "
                         "memory estimate is per rank")
    pl.add_argument("--deepspeed", action="store_true",
                    help="the launch runs DeepSpeed ZeRO-2 (docs/accelerate/deepspeed_zero2.yaml): refuse what it "
                         "would refuse")
    pl.set_defaults(fn=cmd_plan)
    pv = with_config(sub.add_parser("preview", help="print captions exactly as training will see them"))
    pv.add_argument("--images", type=int, default=4)
    pv.add_argument("--epochs", type=int, default=2)
    pv.add_argument("--json", action="store_true", help="print the rows as JSON (for scripts)")
    pv.set_defaults(fn=cmd_preview)
    s = sub.add_parser("sweep", help="render every checkpoint of a run and compose a labelled strip/grid")
    s.add_argument("run_dir", help="the run's work folder (with run.json)")
    s.add_argument("--prompt", action="append", help="prompt (repeat for several rows)")
    s.add_argument("--seed", action="append", type=int, help="seed (repeat for several rows)")
    s.add_argument("--strengths", default="", help="LoRA strengths, e.g. 0.6,0.8,1.0")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--cfg", type=float, default=7.0)
    s.add_argument("--every", type=int, default=1, help="use every Nth checkpoint")
    s.add_argument("--no-base", action="store_true", help="leave out the base-model column")
    s.add_argument("--out", default=None, help="PNG path (default <run>/sweep.png)")
    s.set_defaults(fn=cmd_sweep)
    d = sub.add_parser("demo", help="tiny model + bundled dataset: train, sweep, strip")
    d.add_argument("--out", default="demo_output")
    d.add_argument("--epochs", type=int, default=6)
    d.set_defaults(fn=cmd_demo)
    b = sub.add_parser("demo-base", help="pre-train the demo's tiny base model on drawn shapes (a few CPU minutes)")
    b.add_argument("--out", default="demo_output/demo-base")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=cmd_demo_base)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return run_command(lambda: args.fn(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
