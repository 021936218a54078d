"""ComfyUI's websocket: which messages concern a prompt, the optional ``websocket-client`` connection, and the few
progress lines a sweep logs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

Log = Callable[[str], None]


@dataclass(frozen=True)
class WsEvent:
    """A websocket message relevant to one prompt.

    ``kind``: ``started`` | ``progress`` | ``executing`` | ``done`` | ``error`` | ``interrupted``.
    """

    kind: str
    data: dict = field(default_factory=dict)


def parse_ws_message(raw: str | bytes, prompt_id: str) -> WsEvent | None:
    """Interpret one ComfyUI websocket message for ``prompt_id``; None when it is irrelevant.

    Binary frames (previews), other prompts' messages, queue status and malformed JSON are ignored. A prompt is
    ``done`` on ``execution_success`` or on ``executing`` with ``node: null`` (older servers send only that).
    """
    if isinstance(raw, (bytes, bytearray)):
        return None
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
        return None
    kind, data = message.get("type"), message["data"]
    ours = data.get("prompt_id") == prompt_id
    if kind == "progress" and data.get("prompt_id") in (None, prompt_id):
        return WsEvent("progress", data)
    if not ours:
        return None
    if kind == "executing":
        return WsEvent("done" if data.get("node") is None else "executing", data)
    mapping = {"execution_start": "started", "execution_success": "done", "execution_error": "error",
               "execution_interrupted": "interrupted"}
    return WsEvent(mapping[kind], data) if kind in mapping else None


class WebSocketLost(Exception):
    """The websocket broke; the caller falls back to polling."""


class WebSocket:
    """A ``websocket-client`` connection whose ``recv(timeout)`` returns None when nothing arrived in time."""

    def __init__(self, url: str, timeout: float):
        import websocket  # optional dependency: websocket-client

        self._errors = (OSError, websocket.WebSocketException)
        self._timeout_error = websocket.WebSocketTimeoutException
        self._conn = websocket.create_connection(url, timeout=timeout)

    def recv(self, timeout: float) -> str | bytes | None:
        self._conn.settimeout(max(timeout, 0.01))
        try:
            return self._conn.recv()
        except self._timeout_error:
            return None
        except self._errors as exc:
            raise WebSocketLost(str(exc) or type(exc).__name__) from exc

    def close(self) -> None:
        try:
            self._conn.close(timeout=0.5)  # polite close, but never wait long for the server's reply
        except Exception:  # pragma: no cover - closing a broken socket
            pass



class ProgressLog:
    """Turns progress events into a few log lines (start, each quarter of a node's steps)."""

    def __init__(self, log: Log):
        self.log, self.last = log, None

    def update(self, event: WsEvent) -> None:
        if event.kind == "started":
            self.log("  running")
        elif event.kind == "progress":
            value, total = event.data.get("value"), event.data.get("max")
            if not isinstance(value, int) or not isinstance(total, int) or total <= 0:
                return
            mark = (event.data.get("node"), value * 4 // total)
            if mark != self.last:
                self.last = mark
                self.log(f"  node {event.data.get('node', '?')}: {value}/{total}")
