"""Python-level checks that import ComfyUI itself (``comfy.sd``, ``comfy.lora``…) rather than talk to its server.

A check module (``checks_<name>.py``) that needs ComfyUI's own code runs itself as a script in a fresh process of
the ComfyUI venv (the driver's interpreter), with ComfyUI and the installed pack importable::

    async def run_checks(ctx):
        await run_script(ctx, Path(__file__), timeout=900)

    if __name__ == "__main__":
        args = setup_comfy()          # parses --comfy-root/--pack-dir/--comfy-version, prepares sys.path/argv
        report("pass", "my check", "detail")

Each :func:`report` line travels back over stdout and becomes a PASS/FAIL/SKIP of the stage's results. A script that
crashes, prints no result or runs past its timeout is one FAIL quoting the end of its output.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

MARK = "@@crucible-check@@"
STATUSES = ("pass", "fail", "skip")


# --- the script's side ---------------------------------------------------------------------------------------------
def setup_comfy(argv: list[str] | None = None, comfy_flags: tuple[str, ...] = ()) -> argparse.Namespace:
    """Parse the arguments :func:`run_script` passes, then make ``import comfy.*`` work as in the server and
    ``import trainer`` reach the installed pack's library: ComfyUI's root and the pack on ``sys.path`` (the server
    itself never puts the pack there; the pack's nodes import it relatively), ``--cpu`` plus ``comfy_flags`` as
    ComfyUI's command line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy-root", required=True)
    ap.add_argument("--pack-dir", required=True)
    ap.add_argument("--comfy-version", default="unknown")
    ap.add_argument("--only", default="", help="comma-separated subset of the script's cases")
    args = ap.parse_args(argv)
    os.chdir(args.comfy_root)
    sys.argv = [os.path.join(args.comfy_root, "main.py"), "--cpu", *comfy_flags]  # comfy.cli_args parses it
    sys.path[:0] = [args.comfy_root, args.pack_dir]
    try:
        import comfy.options  # 0.8.0 parses the command line only when asked; the 2024 tree always does

        comfy.options.enable_args_parsing()
    except ImportError:
        pass
    return args


def report(status: str, name: str, detail: str = "") -> None:
    """One result line for the stage (``status``: pass, fail or skip)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    print(MARK + json.dumps({"status": status, "name": name, "detail": detail}), flush=True)


class LogCapture(logging.Handler):
    """``with LogCapture() as log:`` keeps every message logged meanwhile in ``log.messages`` (ComfyUI reports
    missing weights and unloaded LoRA keys as warnings)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "LogCapture":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().removeHandler(self)

    def matching(self, *needles: str) -> list[str]:
        return [m for m in self.messages if any(n.lower() in m.lower() for n in needles)]


# --- the driver's side -----------------------------------------------------------------------------------------------
def parse_report(line: str) -> dict[str, Any] | None:
    """The result a :func:`report` line carries, or None for any other output line."""
    if not line.startswith(MARK):
        return None
    try:
        item = json.loads(line[len(MARK):])
    except ValueError:
        return None
    if not isinstance(item, dict) or item.get("status") not in STATUSES or not isinstance(item.get("name"), str):
        return None
    return item


def record(results: Any, item: dict[str, Any], prefix: str) -> None:
    name, detail = f"{prefix}{item['name']}", str(item.get("detail", ""))
    if item["status"] == "pass":
        results.ok(name, detail)
    elif item["status"] == "skip":
        results.skip(name, detail or "skipped")
    else:
        results.fail(name, detail or "failed")


async def run_script(ctx: Any, script: Path, timeout: float, extra: list[str] | None = None) -> None:
    """Run ``script`` with the driver's interpreter and turn its report lines into results (see the module doc)."""
    prefix = f"{script.stem.removeprefix('checks_')}: "
    cmd = [sys.executable, str(script), "--comfy-root", str(ctx.comfy_root), "--pack-dir", str(ctx.pack_dir),
           "--comfy-version", str(ctx.comfy_version), *(extra or [])]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # no \r-joined progress lines
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, cwd=str(ctx.comfy_root), env=env,
                                                limit=1 << 22)
    tail: list[str] = []
    seen = 0

    async def pump() -> None:
        nonlocal seen
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            item = parse_report(line)
            if item is None:
                tail.append(line)
                del tail[:-60]
            else:
                seen += 1
                record(ctx.results, item, prefix)

    try:
        await asyncio.wait_for(pump(), timeout)
        rc = await proc.wait()
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        ctx.results.fail(f"{prefix}finished in time", f"killed after {timeout:g}s; its last output:\n"
                         + "\n".join(tail))
        return
    if rc != 0 or seen == 0:
        ctx.results.fail(f"{prefix}script exit", f"{script.name} exited with status {rc} after {seen} result(s); "
                         "its last output:\n" + "\n".join(tail))
