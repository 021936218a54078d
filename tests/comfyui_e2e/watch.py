"""Helpers for the check modules: run a prompt while recording every websocket event (and acting on them), and
sample a process's resident memory while it runs. Stdlib + aiohttp (ComfyUI's own requirement)."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class Watched:
    """One posted prompt: its HTTP answer, every websocket event for it, and its /history entry."""

    status: int
    body: Any
    prompt_id: str | None = None
    events: list[tuple[str, dict]] = field(default_factory=list)
    history: dict | None = None
    timed_out: bool = False

    def progress(self, node: str) -> list[int]:
        return [d["value"] for e, d in self.events if e == "progress" and str(d.get("node")) == str(node)]

    def texts(self, node: str) -> list[str]:
        """The ``text`` of every ``executed`` message for ``node`` (what the pack's web extension shows)."""
        out = []
        for event, data in self.events:
            if event == "executed" and str(data.get("node")) == str(node):
                out += list((data.get("output") or {}).get("text") or [])
        return out

    @property
    def interrupted(self) -> bool:
        return any(e == "execution_interrupted" for e, _ in self.events)

    @property
    def error(self) -> dict | None:
        return next((d for e, d in self.events if e == "execution_error"), None)

    @property
    def succeeded(self) -> bool:
        status = (self.history or {}).get("status", {})
        return self.status == 200 and status.get("status_str") == "success"

    def describe(self) -> str:
        if self.status != 200:
            return f"POST /prompt -> {self.status}: {json.dumps(self.body)[:3000]}"
        if self.error:
            keep = {k: self.error.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message")}
            return f"execution_error {json.dumps(keep)}\n" + "".join(self.error.get("traceback") or [])[-2500:]
        return f"status {(self.history or {}).get('status')}" + (" (timed out)" if self.timed_out else "")


async def run_watched(server, prompt: dict, timeout: float,
                      on_event: Callable[[str, dict], None] | None = None) -> Watched:
    """POST ``prompt`` and follow its events until it ends (success, error or interrupt); ``on_event(type, data)``
    is called for each JSON event of this prompt as it arrives."""
    import aiohttp

    ws_url = server.url.replace("http", "ws", 1) + f"/ws?clientId={server.client_id}"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, heartbeat=30) as ws:
        status, body = server.post_prompt(prompt)
        run = Watched(status, body)
        if status != 200 or (isinstance(body, dict) and body.get("node_errors")):
            return run
        run.prompt_id = body["prompt_id"]

        async def follow() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return
                event = json.loads(msg.data)
                kind, data = event.get("type"), event.get("data") or {}
                if data.get("prompt_id") not in (None, run.prompt_id):
                    continue
                run.events.append((kind, data))
                if on_event is not None:
                    on_event(kind, data)
                if kind in ("execution_error", "execution_interrupted"):
                    return
                if kind == "executing" and data.get("node") is None and data.get("prompt_id") == run.prompt_id:
                    return

        try:
            await asyncio.wait_for(follow(), timeout)
        except asyncio.TimeoutError:
            run.timed_out = True
            server.request("/interrupt", {})
    for _ in range(200):
        run.history = server.history(run.prompt_id)
        if run.history and run.history.get("status", {}).get("completed") is not None:
            break
        await asyncio.sleep(0.1)
    return run


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's RSS on a thread (every ``interval`` seconds) between ``start()`` and ``stop()``."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(rss_kib(self.pid))
            except (OSError, RuntimeError):
                return
            time.sleep(self.interval)

    def start(self) -> "RssSampler":
        self.samples.append(rss_kib(self.pid))
        self._thread.start()
        return self

    def stop(self) -> tuple[int, int]:
        """(RSS at start, peak RSS) in KiB."""
        self._stop.set()
        self._thread.join()
        return self.samples[0], max(self.samples)


def server_pid(port: int | None = None) -> int | None:
    """The ComfyUI server's pid: ``CRUCIBLE_COMFY_PID`` (exported by the stage script), else the process listening
    on ``port`` (found through /proc/net/tcp and the fds of this user's processes)."""
    pid = os.environ.get("CRUCIBLE_COMFY_PID", "").strip()
    if pid.isdigit() and Path(f"/proc/{pid}").is_dir():
        return int(pid)
    if port is None:
        return None
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":  # 0A = LISTEN
                inodes.add(parts[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None
