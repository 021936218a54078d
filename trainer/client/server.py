"""The HTTP side of the client: one ComfyUI server, one client id. Queue API-format workflows (``POST /prompt``),
follow them to the end (websocket, else ``/history`` polling; every wait has a deadline, so nothing hangs) and
fetch their output images (``/view``)."""
from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..errors import CrucibleError
from ..run_record import CheckpointRecord
from .errors import ComfyConnectionError, ComfyError, ComfyTimeoutError, ExecutionFailedError, PromptRejectedError
from .websocket import Log, ProgressLog, WebSocket, WebSocketLost, parse_ws_message

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..render import GridStyle
    from .sweep_result import SweepResult

DEFAULT_SERVER = "127.0.0.1:8188"


def parse_server(server: str) -> tuple[str, str]:
    """``"host:port"`` or ``"http(s)://host:port/prefix"`` → (HTTP base URL, websocket URL base)."""
    text = server.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CrucibleError(f"--server {server!r} is not a server address; use host:port, e.g. {DEFAULT_SERVER}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 8188)
    except ValueError as exc:
        raise CrucibleError(f"--server {server!r} has a bad port: {exc}") from exc
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    path = parts.path.rstrip("/")
    ws_scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{parts.scheme}://{host}:{port}{path}", f"{ws_scheme}://{host}:{port}{path}"



class ComfyClient:
    """Talks to one ComfyUI server as one client id.

    ``queue`` posts a workflow, ``wait`` follows it (websocket, else polling) until its history entry exists,
    ``images`` downloads its output images, ``sweep`` does all three for each checkpoint and composes the strip.
    The websocket is opened on the first ``wait`` and kept until :meth:`close` (or the end of the ``with`` block).
    """

    def __init__(self, server: str = DEFAULT_SERVER, client_id: str | None = None, *, use_websocket: bool = True,
                 poll_interval: float = 0.5, request_timeout: float = 30.0, log: Log | None = None,
                 ws_factory: Callable[[str, float], Any] | None = None):
        self.base_url, self._ws_base = parse_server(server)
        self.client_id = client_id or uuid.uuid4().hex
        self.use_websocket = use_websocket
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self.log: Log = log or (lambda _msg: None)
        self._ws_factory = ws_factory or WebSocket
        self._ws: Any | None = None
        self._ws_broken = False

    def __enter__(self) -> "ComfyClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the websocket, if one is open (it reopens on the next ``wait``)."""
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    @property
    def ws_url(self) -> str:
        return f"{self._ws_base}/ws?" + urllib.parse.urlencode({"clientId": self.client_id})

    # ---- HTTP
    def _request(self, method: str, path: str, *, body: Any = None, query: Mapping[str, str] | None = None,
                 timeout: float | None = None) -> bytes:
        url = self.base_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        timeout = self.request_timeout if timeout is None else max(0.05, min(timeout, self.request_timeout))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise _HttpStatus(exc.code, exc.read()) from None
        except OSError as exc:  # URLError (refused, DNS, …) and socket timeouts
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError):
                raise ComfyTimeoutError(f"ComfyUI at {self.base_url} did not answer {method} {path} within "
                                        f"{timeout:g} s; is the server overloaded or stuck?") from exc
            raise ComfyConnectionError(f"cannot reach ComfyUI at {self.base_url} ({reason}); start ComfyUI or "
                                       "pass the right --server host:port") from exc

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        raw = self._request(method, path, **kwargs)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ComfyError(f"ComfyUI answered {method} {path} with something that is not JSON: {raw[:200]!r}") \
                from exc

    def queue(self, prompt: Mapping[str, Any]) -> str:
        """POST the API-format ``prompt``; return its prompt id. HTTP 400 → :class:`PromptRejectedError`."""
        try:
            answer = self._json("POST", "/prompt", body={"prompt": prompt, "client_id": self.client_id})
        except _HttpStatus as exc:
            if exc.status == 400:
                body = exc.json()
                if isinstance(body, dict) and ("error" in body or "node_errors" in body):
                    raise PromptRejectedError(body.get("error"), body.get("node_errors", {})) from None
            raise ComfyError(f"ComfyUI answered HTTP {exc.status} to POST /prompt: {exc.text(500)}") from None
        prompt_id = answer.get("prompt_id") if isinstance(answer, dict) else None
        if not prompt_id:
            raise ComfyError(f"ComfyUI accepted the prompt but returned no prompt_id: {answer!r}")
        return str(prompt_id)

    def history(self, prompt_id: str, timeout: float | None = None) -> dict | None:
        """The history entry of a finished prompt, or None while it is queued or running."""
        try:
            answer = self._json("GET", f"/history/{urllib.parse.quote(prompt_id)}", timeout=timeout)
        except _HttpStatus as exc:
            raise ComfyError(f"ComfyUI answered HTTP {exc.status} to GET /history/{prompt_id}: {exc.text(300)}") \
                from None
        entry = answer.get(prompt_id) if isinstance(answer, dict) else None
        return entry if isinstance(entry, dict) else None

    # ---- waiting
    def wait(self, prompt_id: str, timeout: float = 600.0, *, deadline: float | None = None) -> dict:
        """Block until ``prompt_id`` finished; return its history entry.

        Raises :class:`ExecutionFailedError` when a node failed and :class:`ComfyTimeoutError` after ``timeout``
        seconds (or at the absolute ``time.monotonic()`` ``deadline`` if that comes first).
        """
        limit = _Deadline(prompt_id, timeout, deadline)
        try:
            if self.use_websocket and not self._ws_broken:
                entry = self._wait_ws(prompt_id, limit)
                if entry is not None:
                    return entry
            return self._wait_poll(prompt_id, limit)
        except ComfyTimeoutError:
            if limit.remaining() <= 0:  # a request cut short by the deadline: say which limit ran out
                limit.check()
            raise

    def _socket(self, limit: "_Deadline") -> Any | None:
        """The open websocket, connecting on first use; None (and polling from now on) if that fails."""
        if self._ws is None and not self._ws_broken:
            try:
                self._ws = self._ws_factory(self.ws_url, max(0.05, min(limit.remaining(), self.request_timeout)))
            except ImportError:
                self._give_up_ws("websocket-client is not installed")
            except Exception as exc:  # any failure to connect just means polling
                self._give_up_ws(f"websocket unavailable ({exc})")
        return self._ws

    def _give_up_ws(self, reason: str) -> None:
        self.log(f"{reason}; following progress by polling /history")
        self._ws_broken = True
        self.close()

    def _wait_ws(self, prompt_id: str, limit: "_Deadline") -> dict | None:
        """Follow the prompt over the websocket; None means 'fall back to polling'."""
        conn = self._socket(limit)
        if conn is None:
            return None
        progress = ProgressLog(self.log)
        try:
            entry = self.history(prompt_id, timeout=limit.remaining())  # finished before we listened?
            while entry is None:
                raw = conn.recv(min(limit.check(), 5.0))
                if raw is None:  # quiet for a while: make sure no message was lost
                    entry = self.history(prompt_id, timeout=limit.remaining())
                    continue
                event = parse_ws_message(raw, prompt_id)
                if event is None:
                    continue
                if event.kind in ("error", "interrupted"):
                    raise ExecutionFailedError(prompt_id, event.data)
                if event.kind == "done":
                    return self._wait_poll(prompt_id, limit)
                progress.update(event)
        except WebSocketLost as exc:
            self._give_up_ws(f"websocket lost ({exc})")
            return None
        return _checked(prompt_id, entry)

    def _wait_poll(self, prompt_id: str, limit: "_Deadline") -> dict:
        while True:
            entry = self.history(prompt_id, timeout=limit.check())
            if entry is not None:
                return _checked(prompt_id, entry)
            time.sleep(max(0.0, min(self.poll_interval, limit.check())))

    # ---- images
    def fetch_image(self, ref: Mapping[str, Any], timeout: float | None = None) -> "Image.Image":
        """Download one output image (``{filename, subfolder, type}`` from a history entry) through ``/view``."""
        from PIL import Image, UnidentifiedImageError

        query = {"filename": str(ref.get("filename", "")), "subfolder": str(ref.get("subfolder", "")),
                 "type": str(ref.get("type", "output"))}
        try:
            data = self._request("GET", "/view", query=query, timeout=timeout)
        except _HttpStatus as exc:
            raise ComfyError(f"ComfyUI answered HTTP {exc.status} for image {query['filename']!r} "
                             f"(subfolder {query['subfolder']!r}, type {query['type']!r})") from None
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise ComfyError(f"image {query['filename']!r} from ComfyUI could not be decoded: {exc}") from exc
        return image

    def images(self, entry: Mapping[str, Any], timeout: float | None = None) -> list["Image.Image"]:
        """All images a finished prompt output (SaveImage, PreviewImage …), in output-node order."""
        outputs = entry.get("outputs") or {}
        refs = [ref for out in outputs.values() if isinstance(out, dict)
                for ref in out.get("images") or [] if isinstance(ref, dict) and ref.get("filename")]
        return [self.fetch_image(ref, timeout=timeout) for ref in refs]

    def run(self, prompt: Mapping[str, Any], timeout: float = 600.0) -> list["Image.Image"]:
        """Queue ``prompt``, wait for it and return its images."""
        prompt_id = self.queue(prompt)
        return self.images(self.wait(prompt_id, timeout))

    # ---- sweep
    def sweep(self, workflow: Mapping[str, Any], checkpoints: str | Path | Sequence[CheckpointRecord], *,
              loader_title: str | None = None, loader_class: str | None = None, input_name: str | None = None,
              name_prefix: str = "", prompt_text: str | None = None, seed: int | None = None,
              timeout: float = 600.0, total_timeout: float | None = None, title: str = "",
              style: "GridStyle | None" = None) -> "SweepResult":
        """Run ``workflow`` once per checkpoint and compose a labelled strip (see
        :func:`trainer.client.sweep.run_sweep`)."""
        from .sweep import run_sweep

        return run_sweep(self, workflow, checkpoints, loader_title=loader_title, loader_class=loader_class,
                         input_name=input_name, name_prefix=name_prefix, prompt_text=prompt_text, seed=seed,
                         timeout=timeout, total_timeout=total_timeout, title=title, style=style)


class _HttpStatus(Exception):
    """A non-2xx HTTP answer (internal; turned into a :class:`ComfyError` with context)."""

    def __init__(self, status: int, body: bytes):
        super().__init__(status)
        self.status, self.body = status, body

    def text(self, limit: int) -> str:
        return self.body[:limit].decode("utf-8", "replace").strip() or "(empty body)"

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class _Deadline:
    """The earlier of a per-prompt timeout and an overall deadline; ``check`` raises once it has passed."""

    def __init__(self, prompt_id: str, timeout: float, overall: float | None):
        self.prompt_id, self.timeout = prompt_id, timeout
        own = time.monotonic() + timeout
        self.overall_first = overall is not None and overall < own
        self.at = overall if self.overall_first else own

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def check(self) -> float:
        left = self.remaining()
        if left <= 0:
            what = "the sweep's total time limit (--total-timeout)" if self.overall_first \
                else f"{self.timeout:g} s (--timeout)"
            raise ComfyTimeoutError(f"ComfyUI did not finish prompt {self.prompt_id} within {what}. It may still be "
                                    "queued or running: check the ComfyUI console, or raise the limit")
        return left



def _checked(prompt_id: str, entry: dict) -> dict:
    """Return ``entry``, or raise :class:`ExecutionFailedError` when its status says the run failed."""
    status = entry.get("status") or {}
    if status.get("status_str") == "error" or status.get("completed") is False:
        messages = [m for m in status.get("messages") or [] if isinstance(m, (list, tuple)) and len(m) == 2]
        details = next((data for kind, data in messages if kind in ("execution_error", "execution_interrupted")), {})
        raise ExecutionFailedError(prompt_id, details if isinstance(details, dict) else {})
    return entry
