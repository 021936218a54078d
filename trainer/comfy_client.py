"""A small client for a running ComfyUI server: queue API-format workflows, follow them, fetch their images.

Its main job is the checkpoint sweep: run one workflow once per saved checkpoint (patching the loader node's file
name) and compose the results into one labelled strip::

    python -m trainer.comfy_client sweep --server 127.0.0.1:8188 --workflow workflows/api/sd15_lora.json \\
        --checkpoints ComfyUI/models/loras/myrun --name-prefix myrun/ --out strip.png

Only the standard library is needed. Progress is followed over ComfyUI's websocket when the optional
``websocket-client`` package is installed (``pip install websocket-client``); otherwise, or when the socket fails,
``/history/<prompt_id>`` is polled. Every wait has a deadline, so nothing hangs.

ComfyUI endpoints used: ``POST /prompt``, ``GET /history/<id>``, ``GET /view``, ``GET /ws?clientId=<id>``.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import re
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .errors import CrucibleError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .render import Composite, GridStyle

DEFAULT_SERVER = "127.0.0.1:8188"
DEFAULT_LOADER_TITLE = "Crucible checkpoint"
# Which input of a stock loader node holds the file name.
LOADER_INPUTS = {
    "LoraLoader": "lora_name",
    "LoraLoaderModelOnly": "lora_name",
    "UNETLoader": "unet_name",
    "CheckpointLoaderSimple": "ckpt_name",
}
# Where a sampler takes its positive conditioning, and where it takes its seed.
POSITIVE_INPUTS = {"KSampler": "positive", "KSamplerAdvanced": "positive", "SamplerCustom": "positive",
                   "CFGGuider": "positive", "BasicGuider": "conditioning", "DualCFGGuider": "cond1"}
SEED_INPUTS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed", "SamplerCustom": "noise_seed",
               "RandomNoise": "noise_seed"}
# Prompt-text inputs of the stock text encoders (CLIPTextEncode, …SDXL, …SD3, …Flux).
TEXT_INPUTS = ("text", "text_g", "text_l", "clip_l", "clip_g", "t5xxl")
STEP_KEYS = ("crucible_step", "ss_steps")
MAX_HEADER_BYTES = 100 * 1024 * 1024

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------------- errors

class ComfyError(CrucibleError):
    """ComfyUI refused, failed or did not answer."""


class ComfyConnectionError(ComfyError):
    """The server could not be reached."""


class ComfyTimeoutError(ComfyError, TimeoutError):
    """A prompt (or the whole sweep) did not finish within its time limit."""


class PromptRejectedError(ComfyError):
    """``POST /prompt`` answered HTTP 400; ``error`` and ``node_errors`` are ComfyUI's own, unchanged."""

    def __init__(self, error: Any, node_errors: Any):
        self.error, self.node_errors = error, node_errors
        super().__init__("ComfyUI rejected the workflow (HTTP 400).\n"
                         f"error: {json.dumps(error, ensure_ascii=False)}\n"
                         f"node_errors: {json.dumps(node_errors, ensure_ascii=False)}\n"
                         "Fix the inputs named above; a 'not in list' file name usually means the checkpoint is not "
                         "in ComfyUI's models folder or --name-prefix is wrong")


class ExecutionFailedError(ComfyError):
    """A node raised while ComfyUI ran the prompt; ``details`` is ComfyUI's ``execution_error`` message."""

    def __init__(self, prompt_id: str, details: Mapping[str, Any]):
        self.prompt_id, self.details = prompt_id, dict(details)
        node = f"node {details.get('node_id', '?')} ({details.get('node_type', '?')})"
        reason = details.get("exception_message") or "interrupted"
        super().__init__(f"ComfyUI failed to run prompt {prompt_id} at {node}: {str(reason).strip()}. "
                         "See the ComfyUI console for the traceback")


class WorkflowError(CrucibleError):
    """The workflow file cannot be used as asked (wrong format, loader node not found, …)."""


# ----------------------------------------------------------------------------------------------------- workflow

def load_workflow(path: str | Path) -> dict:
    """Read an API-format workflow (``{node_id: {class_type, inputs, _meta}}``) from a JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkflowError(f"cannot read workflow '{path}': {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise WorkflowError(f"workflow '{path}' is not valid JSON: {exc}") from exc
    return validate_workflow(data, source=str(path))


def validate_workflow(workflow: Any, source: str = "workflow") -> dict:
    """Check ``workflow`` is API format; a UI-format file gets a message saying how to export the right one."""
    if isinstance(workflow, dict) and "prompt" in workflow and isinstance(workflow["prompt"], dict) \
            and "class_type" not in workflow["prompt"]:
        workflow = workflow["prompt"]  # a saved /prompt request body
    if isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow:
        raise WorkflowError(f"{source} is a UI-format workflow; export it with 'Save (API)' "
                            "(enable dev mode options in older ComfyUI) and pass that file")
    if not isinstance(workflow, dict) or not workflow:
        raise WorkflowError(f"{source} is not an API-format workflow: expected a JSON object of nodes")
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"{source}: node {node_id!r} has no class_type/inputs; "
                                "is this an API-format export ('Save (API)')?")
    return workflow


def _title(node: Mapping) -> str:
    meta = node.get("_meta")
    return str(meta.get("title", "")) if isinstance(meta, dict) else ""


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


@dataclass(frozen=True)
class LoaderRef:
    """The loader node the sweep patches: node id, input name and how it was found (for messages)."""

    node_id: str
    input_name: str
    class_type: str
    found_by: str


def find_loader(workflow: Mapping[str, Any], *, title: str | None = None, class_type: str | None = None,
                input_name: str | None = None) -> LoaderRef:
    """Find the one node whose file-name input the sweep patches, by ``_meta.title`` or by ``class_type``.

    With neither given, the title ``"Crucible checkpoint"`` is tried first, then the stock loader classes
    (:data:`LOADER_INPUTS`). The input defaults to the class's file-name input (``lora_name`` for LoraLoader, …).
    Never matches by node id, so re-exported workflows keep working.
    """
    if title and class_type:
        raise WorkflowError("give either a loader title or a loader class, not both")
    if title:
        matches, how = [k for k, n in workflow.items() if _title(n) == title], f"title {title!r}"
    elif class_type:
        matches, how = [k for k, n in workflow.items() if n["class_type"] == class_type], f"class {class_type!r}"
    else:
        matches, how = [k for k, n in workflow.items() if _title(n) == DEFAULT_LOADER_TITLE], \
            f"title {DEFAULT_LOADER_TITLE!r}"
        if not matches:
            matches = [k for k, n in workflow.items() if n["class_type"] in LOADER_INPUTS]
            how = "a loader class (" + ", ".join(LOADER_INPUTS) + ")"
    if not matches:
        raise WorkflowError(f"no node with {how} in the workflow; set the loader node's title to "
                            f"'{DEFAULT_LOADER_TITLE}' or pass --loader-title / --loader-class")
    if len(matches) > 1:
        found = ", ".join(f"{k} ({workflow[k]['class_type']} '{_title(workflow[k])}')" for k in matches)
        raise WorkflowError(f"{len(matches)} nodes match {how}: {found}; give the one to patch a unique title "
                            "and pass it with --loader-title")
    node_id = matches[0]
    node = workflow[node_id]
    name = input_name or LOADER_INPUTS.get(node["class_type"])
    if name is None:
        raise WorkflowError(f"node {node_id} is a {node['class_type']}, whose file-name input is not known; "
                            "pass --input-name")
    inputs = node.get("inputs", {})
    if name not in inputs:
        raise WorkflowError(f"node {node_id} ({node['class_type']}) has no input '{name}' "
                            f"(it has: {', '.join(inputs) or 'none'}); pass the right --input-name")
    if _is_link(inputs[name]):
        raise WorkflowError(f"input '{name}' of node {node_id} is connected to another node; "
                            "make it a plain widget value so it can be patched")
    return LoaderRef(node_id, name, node["class_type"], how)


def positive_text_nodes(workflow: Mapping[str, Any]) -> list[str]:
    """Ids of the text-encoder nodes wired (possibly through conditioning nodes) to a sampler's positive input."""
    queue = [node["inputs"][name][0] for node in workflow.values()
             if (name := POSITIVE_INPUTS.get(node["class_type"])) and _is_link(node.get("inputs", {}).get(name))]
    found, seen = [], set()
    while queue:
        node_id = queue.pop(0)
        if node_id in seen or node_id not in workflow:
            continue
        seen.add(node_id)
        inputs = workflow[node_id].get("inputs", {})
        if any(isinstance(inputs.get(key), str) for key in TEXT_INPUTS):
            found.append(node_id)
            continue
        queue += [value[0] for key, value in inputs.items() if _is_link(value) and
                  ("cond" in key or key == "positive")]
    return sorted(found, key=_natural_key)


def seed_nodes(workflow: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(node_id, input_name)`` of every sampler/noise seed widget."""
    return [(k, name) for k, node in sorted(workflow.items(), key=lambda kv: _natural_key(kv[0]))
            if (name := SEED_INPUTS.get(node["class_type"])) and isinstance(node.get("inputs", {}).get(name), int)]


def prepare_workflow(workflow: Mapping[str, Any], *, prompt_text: str | None = None,
                     seed: int | None = None) -> dict:
    """A copy of ``workflow`` with the positive prompt text and/or the sampler seed replaced."""
    patched = copy.deepcopy(dict(workflow))
    if prompt_text is not None:
        encoders = positive_text_nodes(patched)
        if not encoders:
            raise WorkflowError("--prompt was given but no text encoder (CLIPTextEncode…) is wired to a sampler's "
                                "positive input; edit the prompt in the workflow instead")
        for node_id in encoders:
            inputs = patched[node_id]["inputs"]
            for key in TEXT_INPUTS:
                if isinstance(inputs.get(key), str):
                    inputs[key] = prompt_text
    if seed is not None:
        targets = seed_nodes(patched)
        if not targets:
            raise WorkflowError("--seed was given but the workflow has no KSampler/RandomNoise seed widget")
        for node_id, name in targets:
            patched[node_id]["inputs"][name] = int(seed)
    return patched


# -------------------------------------------------------------------------------------------------- checkpoints

def _natural_key(text: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text))


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` dict of a safetensors file, read from its header (8-byte little-endian size + JSON)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            valid = 0 < size <= min(MAX_HEADER_BYTES, path.stat().st_size - 8)
            raw = fh.read(size) if valid else b""
    except OSError as exc:
        raise ModelLoadError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    if not valid:
        raise ModelLoadError(f"'{path}' is not a safetensors file (bad header size); move it out of the folder")
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # includes UnicodeDecodeError
        raise ModelLoadError(f"'{path}' has a corrupt safetensors header ({exc}); move it out of the folder") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def checkpoint_val_loss(metadata: Mapping[str, str]) -> float | None:
    """The validation loss Crucible stored in a checkpoint (``crucible_val_loss``), or None."""
    try:
        value = float(str(metadata.get("crucible_val_loss", "")).strip())
    except ValueError:
        return None
    return value if value == value else None


def checkpoint_step(metadata: Mapping[str, str]) -> int | None:
    """Training step stored in checkpoint metadata (``crucible_step``, else kohya's ``ss_steps``), or None."""
    for key in STEP_KEYS:
        raw = str(metadata.get(key, "")).strip().strip('"')
        try:
            step = int(float(raw))
        except ValueError:
            continue
        if step >= 0:
            return step
    return None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file and the training step read from its metadata (None when it has none)."""

    path: Path
    step: int | None = None
    val_loss: float | None = None  # crucible_val_loss from the metadata

    @property
    def label(self) -> str:
        return f"step {self.step}" if self.step is not None else self.path.name

    def value(self, name_prefix: str = "") -> str:
        """The file name as ComfyUI's loader lists it: ``name_prefix`` (a models sub-folder) + file name."""
        if name_prefix and not name_prefix.endswith(("/", "\\")):
            name_prefix += "/"
        return f"{name_prefix}{self.path.name}"


def list_checkpoints(folder: str | Path) -> list[Checkpoint]:
    """Every ``*.safetensors`` in ``folder``, in training-step order (from metadata), then by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"checkpoint folder '{folder}' does not exist; pass the run's output folder")
    found = []
    for p in folder.iterdir():
        if p.suffix.lower() == ".safetensors" and p.is_file():
            meta = read_safetensors_metadata(p)
            found.append(Checkpoint(p, checkpoint_step(meta), checkpoint_val_loss(meta)))
    if not found:
        raise ModelLoadError(f"no .safetensors files in '{folder}'; pass the folder the training run saved into")
    return sorted(found, key=lambda c: (c.step is None, c.step or 0, _natural_key(c.path.name)))


# ---------------------------------------------------------------------------------------------------- websocket

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


class _WsLost(Exception):
    """The websocket broke; the caller falls back to polling."""


class _WebSocket:
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
            raise _WsLost(str(exc) or type(exc).__name__) from exc

    def close(self) -> None:
        try:
            self._conn.close(timeout=0.5)  # polite close, but never wait long for the server's reply
        except Exception:  # pragma: no cover - closing a broken socket
            pass


# ------------------------------------------------------------------------------------------------------- client

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


@dataclass
class SweepResult:
    """What :meth:`ComfyClient.sweep` produced: the composite and, per checkpoint, its prompt id and images."""

    composite: "Composite"
    checkpoints: list[Checkpoint]
    prompt_ids: list[str]
    images: list[list["Image.Image"]]
    loader: LoaderRef

    @property
    def best(self) -> Checkpoint | None:
        """The checkpoint with the lowest validation loss (its metadata's ``crucible_val_loss``), if any has one."""
        from .sweep import best_index

        index = best_index([c.val_loss for c in self.checkpoints])
        return None if index is None else self.checkpoints[index]

    def metadata(self, name_prefix: str = "") -> dict:
        """JSON-able description for the PNG's text chunks."""
        best = self.best
        return {"loader": {"node_id": self.loader.node_id, "input": self.loader.input_name},
                "checkpoints": [{"file": c.path.name, "step": c.step, "value": c.value(name_prefix), "prompt_id": p,
                                 "val_loss": c.val_loss} for c, p in zip(self.checkpoints, self.prompt_ids)],
                "best": best.path.name if best is not None else None}


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
        self._ws_factory = ws_factory or _WebSocket
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
        if self.use_websocket and not self._ws_broken:
            entry = self._wait_ws(prompt_id, limit)
            if entry is not None:
                return entry
        return self._wait_poll(prompt_id, limit)

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
        progress = _ProgressLog(self.log)
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
        except _WsLost as exc:
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
    def sweep(self, workflow: Mapping[str, Any], checkpoints: str | Path | Sequence[Checkpoint], *,
              loader_title: str | None = None, loader_class: str | None = None, input_name: str | None = None,
              name_prefix: str = "", prompt_text: str | None = None, seed: int | None = None,
              timeout: float = 600.0, total_timeout: float | None = None, title: str = "",
              style: "GridStyle | None" = None) -> SweepResult:
        """Run ``workflow`` once per checkpoint (patched into the loader node) and compose a labelled strip.

        Columns follow the checkpoints' step order, labelled "step N · val <loss>" (or the file name; the validation
        loss from the files' metadata), the lowest validation loss marked best, captioned with the file name.
        When a run outputs several images they become rows. ``timeout`` applies to each prompt,
        ``total_timeout`` to the whole sweep.
        """
        base = validate_workflow(workflow)
        loader = find_loader(base, title=loader_title, class_type=loader_class, input_name=input_name)
        base = prepare_workflow(base, prompt_text=prompt_text, seed=seed)
        ckpts = list_checkpoints(checkpoints) if isinstance(checkpoints, (str, Path)) else list(checkpoints)
        if not ckpts:
            raise ModelLoadError("no checkpoints to sweep; pass a folder with .safetensors files")
        overall = time.monotonic() + total_timeout if total_timeout else None
        try:
            prompt_ids, images = self._run_all(base, loader, ckpts, name_prefix, timeout, overall)
        finally:
            self.close()
        composite = compose_sweep(ckpts, images, title=title, style=style)
        return SweepResult(composite, ckpts, prompt_ids, images, loader)

    def _run_all(self, base: dict, loader: LoaderRef, ckpts: Sequence[Checkpoint], name_prefix: str,
                 timeout: float, overall: float | None) -> tuple[list[str], list[list["Image.Image"]]]:
        prompt_ids: list[str] = []
        images: list[list["Image.Image"]] = []
        for i, ckpt in enumerate(ckpts, 1):
            tag = f"[{i}/{len(ckpts)}] {ckpt.label}"
            prompt = copy.deepcopy(base)
            prompt[loader.node_id]["inputs"][loader.input_name] = ckpt.value(name_prefix)
            started = time.monotonic()
            prompt_id = self.queue(prompt)
            self.log(f"{tag}: queued {ckpt.value(name_prefix)} as {prompt_id}")
            entry = self.wait(prompt_id, timeout, deadline=overall)
            outputs = self.images(entry, timeout=None if overall is None else overall - time.monotonic())
            if not outputs:
                raise ComfyError(f"prompt {prompt_id} ({ckpt.path.name}) produced no images; "
                                 "add a SaveImage or PreviewImage node to the workflow")
            self.log(f"{tag}: {len(outputs)} image(s) in {time.monotonic() - started:.1f} s")
            prompt_ids.append(prompt_id)
            images.append(outputs)
        return prompt_ids, images


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


class _ProgressLog:
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


def _checked(prompt_id: str, entry: dict) -> dict:
    """Return ``entry``, or raise :class:`ExecutionFailedError` when its status says the run failed."""
    status = entry.get("status") or {}
    if status.get("status_str") == "error" or status.get("completed") is False:
        messages = [m for m in status.get("messages") or [] if isinstance(m, (list, tuple)) and len(m) == 2]
        details = next((data for kind, data in messages if kind in ("execution_error", "execution_interrupted")), {})
        raise ExecutionFailedError(prompt_id, details if isinstance(details, dict) else {})
    return entry


def compose_sweep(checkpoints: Sequence[Checkpoint], images: Sequence[Sequence[Any]], *, title: str = "",
                  style: "GridStyle | None" = None) -> "Composite":
    """One column per checkpoint; a strip when each gave one image, else one row per output image."""
    from . import render

    from .sweep import best_index, column_label

    style = style or render.GridStyle()
    best = best_index([c.val_loss for c in checkpoints])
    labels = [column_label({"step": c.step, "val_loss": c.val_loss, "path": str(c.path)}, i == best)
              for i, c in enumerate(checkpoints)]
    captions = [c.path.name for c in checkpoints]
    if all(len(imgs) == 1 for imgs in images):
        return render.compose_strip([imgs[0] for imgs in images], labels, title=title, captions=captions, style=style)
    rows = max(len(imgs) for imgs in images)
    cells = [[imgs[r] if r < len(imgs) else None for imgs in images] for r in range(rows)]
    return render.compose_grid(cells, col_labels=labels, row_labels=[f"image {r + 1}" for r in range(rows)],
                               title=title, cell_captions=[captions] + [[""] * len(images)] * (rows - 1),
                               style=style)


# ---------------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.comfy_client",
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
    from . import render

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
    try:
        return _cli_sweep(args)
    except ComfyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except CrucibleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
