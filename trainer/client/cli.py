"""``python -m trainer.client sweep …``: render one workflow per checkpoint through a running ComfyUI and write a
labelled strip (``python -m trainer.comfy_client`` is the same command under its older name)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ..errors import CrucibleError, run_command
from .errors import ComfyError
from .server import DEFAULT_SERVER, ComfyClient
from .workflow import DEFAULT_LOADER_TITLE, load_workflow


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.client",
                                     description="Drive a running ComfyUI server through its /prompt API.")
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser("sweep", help="render one workflow per checkpoint and write a labelled strip")
    sweep.add_argument("--server", default=DEFAULT_SERVER, help="ComfyUI host:port (default %(default)s)")
    sweep.add_argument("--workflow", required=True, help="API-format workflow JSON ('Save (API)' in ComfyUI)")
    sweep.add_argument("--checkpoints", required=True, help="folder with the run's .safetensors checkpoints")
    which = sweep.add_mutually_exclusive_group()
    which.add_argument("--loader-title", help=f"title of the loader node to patch (default '{DEFAULT_LOADER_TITLE}', "
                                              "else the one stock loader node)")
    which.add_argument("--loader-class", help="class of the loader node to patch, e.g. LoraLoader")
    sweep.add_argument("--input-name", help="loader input that takes the file name (default: by class, "
                                            "e.g. lora_name)")
    sweep.add_argument("--name-prefix", default="", help="sub-folder of ComfyUI's models folder holding the files, "
                                                         "e.g. 'myrun/' so LoraLoader sees 'myrun/x.safetensors'")
    sweep.add_argument("--prompt", help="replace the positive prompt text")
    sweep.add_argument("--seed", type=int, help="replace the sampler seed")
    sweep.add_argument("--client-id", help="websocket client id (default: random)")
    sweep.add_argument("--timeout", type=float, default=600.0, help="seconds per checkpoint (default %(default)s)")
    sweep.add_argument("--total-timeout", type=float, help="seconds for the whole sweep (default: no limit)")
    sweep.add_argument("--poll-interval", type=float, default=0.5, help="seconds between /history polls")
    sweep.add_argument("--no-websocket", action="store_true", help="poll /history instead of using the websocket")
    sweep.add_argument("--title", help="title above the strip (default: the checkpoint folder name)")
    sweep.add_argument("--out", default="crucible_sweep.png", help="output PNG (default %(default)s)")
    return parser


def _cli_sweep(args: argparse.Namespace) -> int:
    from .. import render

    def log(message: str) -> None:
        print(message, flush=True)

    workflow = load_workflow(args.workflow)
    client = ComfyClient(args.server, args.client_id, use_websocket=not args.no_websocket,
                         poll_interval=args.poll_interval, log=log)
    title = args.title if args.title is not None else Path(args.checkpoints).resolve().name
    log(f"sweeping {args.checkpoints} through {client.base_url} (client id {client.client_id})")
    result = client.sweep(workflow, args.checkpoints, loader_title=args.loader_title, loader_class=args.loader_class,
                          input_name=args.input_name, name_prefix=args.name_prefix, prompt_text=args.prompt,
                          seed=args.seed, timeout=args.timeout, total_timeout=args.total_timeout, title=title)
    meta = {"crucible_sweep": {"server": client.base_url, "workflow": str(args.workflow),
                               **result.metadata(args.name_prefix)}}
    out = render.save_png(result.composite, args.out, extra_metadata=meta)
    log(f"wrote {out} ({len(result.checkpoints)} checkpoints)")
    best = result.best
    if best is not None:
        log(f"recommended: {best.path.name} (step {best.step}, lowest validation loss {best.val_loss:.4f})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 ComfyUI/run error, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: _cli_sweep(args), ((ComfyError, 1), (CrucibleError, 2)))
