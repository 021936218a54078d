"""Tests for trainer.client against a fake in-process ComfyUI server (HTTP + a minimal websocket).

The fake follows ComfyUI 0.8.0's wire formats: ``POST /prompt`` validates class types against the reference
``object_info.json`` and LoraLoader file names against a list, answering 400 with ``error``/``node_errors``;
``/history/<id>`` is empty until the prompt "finished"; ``/view`` serves PNG bytes; ``/ws`` pushes the
execution messages of the client's prompts.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import queue
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from trainer import client as cc
from trainer.client import (Checkpoint, ComfyClient, ComfyConnectionError, ComfyTimeoutError,
                                  ExecutionFailedError, PromptRejectedError, WorkflowError)
from trainer.client.websocket import WebSocketLost
from trainer.errors import CrucibleError, ModelLoadError
from trainer.render import read_layout

IMAGE_SIZE = (48, 32)
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

WORKFLOW = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"},
          "_meta": {"title": "Load Checkpoint"}},
    "10": {"class_type": "LoraLoader", "_meta": {"title": "Crucible checkpoint"},
           "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "placeholder.safetensors",
                      "strength_model": 1.0, "strength_clip": 1.0}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog", "clip": ["10", 1]},
          "_meta": {"title": "Positive"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["10", 1]},
          "_meta": {"title": "Negative"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 4, "cfg": 7.0, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1.0, "model": ["10", 0],
                                               "positive": ["6", 0], "negative": ["7", 0],
                                               "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "sweep", "images": ["8", 0]}},
}


def colour_of(name: str) -> tuple[int, int, int]:
    """The solid colour the fake server renders for a checkpoint name."""
    return tuple(hashlib.md5(name.encode()).digest()[:3])


def png_bytes(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", IMAGE_SIZE, color).save(buffer, format="PNG")
    return buffer.getvalue()


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload


# ----------------------------------------------------------------------------------------------- fake server

class FakeComfy:
    """A tiny ComfyUI. ``mode``: 'run' (finish after ``delay``), 'hang' (never finish), 'fail' (node error)."""

    def __init__(self, known_classes: frozenset[str], loras=(), mode="run", delay=0.15, images_per_prompt=1,
                 websocket=True):
        self.known_classes = known_classes  # ComfyUI 0.8.0's core node classes
        self.loras, self.mode, self.delay = list(loras), mode, delay
        self.images_per_prompt, self.websocket = images_per_prompt, websocket
        self.bodies: list[dict] = []  # every POST /prompt body
        self.ws_clients: list[str] = []  # clientId of every websocket connection
        self.history_calls = 0
        self.stall = 0.0  # seconds POST /prompt waits before answering
        self._history: dict[str, dict] = {}
        self._files: dict[tuple[str, str, str], bytes] = {}
        self._sockets: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timers: list[threading.Timer] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "FakeComfy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for timer in self._timers:
            timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- /prompt
    def validate(self, prompt: dict) -> tuple[dict, dict] | None:
        for node_id, node in prompt.items():
            if node.get("class_type") not in self.known_classes:
                return ({"type": "invalid_prompt", "message": f"Cannot execute because node "
                         f"{node.get('class_type')} does not exist.", "details": f"Node ID '#{node_id}'",
                         "extra_info": {}}, {})
        node_errors = {}
        for node_id, node in prompt.items():
            name = node["inputs"].get("lora_name")
            if node["class_type"] == "LoraLoader" and name not in self.loras:
                node_errors[node_id] = {"errors": [{
                    "type": "value_not_in_list", "message": "Value not in list",
                    "details": f"lora_name: '{name}' not in {self.loras}",
                    "extra_info": {"input_name": "lora_name", "received_value": name}}],
                    "dependent_outputs": ["9"], "class_type": "LoraLoader"}
        if node_errors:
            details = "\n".join(f"{e['message']}: {e['details']}" for n in node_errors.values() for e in n["errors"])
            return ({"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                     "details": details, "extra_info": {}}, node_errors)
        return None

    def accept(self, body: dict) -> str:
        prompt_id = str(uuid.uuid4())
        if self.mode != "hang":
            timer = threading.Timer(self.delay, self._finish, (prompt_id, body))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
        return prompt_id

    def _finish(self, prompt_id: str, body: dict) -> None:
        prompt, client = body["prompt"], body.get("client_id")
        lora = next((n["inputs"]["lora_name"] for n in prompt.values() if n["class_type"] == "LoraLoader"), "")
        start = {"prompt_id": prompt_id, "timestamp": 0}
        self.send(client, {"type": "execution_start", "data": start})
        self.send(client, {"type": "execution_cached", "data": {"nodes": [], "prompt_id": prompt_id}})
        for step in range(1, 5):
            self.send(client, {"type": "progress", "data": {"value": step, "max": 4, "prompt_id": prompt_id,
                                                             "node": "3"}})
            self.send_binary(client, b"\x00\x00\x00\x01preview-bytes")
        if self.mode == "fail":
            error = {"prompt_id": prompt_id, "node_id": "3", "node_type": "KSampler", "executed": ["4", "10"],
                     "exception_message": "Expected all tensors to be on the same device",
                     "exception_type": "RuntimeError", "traceback": [], "current_inputs": {},
                     "current_outputs": []}
            entry = {"prompt": [0, prompt_id, prompt, {}, ["9"]], "outputs": {}, "meta": {},
                     "status": {"status_str": "error", "completed": False,
                                "messages": [["execution_start", start], ["execution_error", error]]}}
            with self._lock:
                self._history[prompt_id] = entry
            self.send(client, {"type": "execution_error", "data": error})
        else:
            refs = []
            for i in range(self.images_per_prompt):
                ref = {"filename": f"sweep_{prompt_id[:8]}_{i:05}_.png", "subfolder": "crucible", "type": "output"}
                shade = tuple(min(255, c + 40 * i) for c in colour_of(lora))
                self._files[(ref["filename"], ref["subfolder"], ref["type"])] = png_bytes(shade)
                refs.append(ref)
            entry = {"prompt": [0, prompt_id, prompt, {}, ["9"]], "outputs": {"9": {"images": refs}}, "meta": {},
                     "status": {"status_str": "success", "completed": True,
                                "messages": [["execution_start", start],
                                             ["execution_success", {"prompt_id": prompt_id}]]}}
            with self._lock:
                self._history[prompt_id] = entry
            self.send(client, {"type": "executed", "data": {"node": "9", "display_node": "9",
                                                             "output": {"images": refs}, "prompt_id": prompt_id}})
            self.send(client, {"type": "execution_success", "data": {"prompt_id": prompt_id}})
        self.send(client, {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}})

    def history(self, prompt_id: str) -> dict:
        with self._lock:
            self.history_calls += 1
            entry = self._history.get(prompt_id)
        return {prompt_id: entry} if entry else {}

    def file(self, filename: str, subfolder: str, kind: str) -> bytes | None:
        return self._files.get((filename, subfolder, kind))

    # -- websocket
    def send(self, client: str | None, message: dict) -> None:
        self._push(client, ws_frame(json.dumps(message).encode()))

    def send_binary(self, client: str | None, data: bytes) -> None:
        self._push(client, ws_frame(data, opcode=0x2))

    def _push(self, client, frame: bytes) -> None:
        with self._lock:
            target = self._sockets.get(client)
        if target is not None:  # like ComfyUI: messages for a client that is not connected are dropped
            target.put(frame)

    def serve_ws(self, client: str, wfile) -> None:
        outbox: queue.Queue = queue.Queue()
        with self._lock:
            self.ws_clients.append(client)
            self._sockets[client] = outbox
        try:
            wfile.write(ws_frame(json.dumps({"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": 0}}, "sid": client}}).encode()))
            wfile.flush()
            while not self._stop.is_set():
                try:
                    frame = outbox.get(timeout=0.05)
                except queue.Empty:
                    continue
                wfile.write(frame)
                wfile.flush()
        except OSError:
            pass  # client went away
        finally:
            with self._lock:
                if self._sockets.get(client) is outbox:
                    del self._sockets[client]


def _make_handler(fake: FakeComfy):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _json(self, status: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            if self.path != "/prompt":
                return self._json(404, {})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.bodies.append(body)
            fake._stop.wait(fake.stall)
            problem = fake.validate(body["prompt"])
            if problem:
                return self._json(400, {"error": problem[0], "node_errors": problem[1]})
            self._json(200, {"prompt_id": fake.accept(body), "number": len(fake.bodies), "node_errors": {}})

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            if url.path.startswith("/history/"):
                return self._json(200, fake.history(urllib.parse.unquote(url.path[len("/history/"):])))
            if url.path == "/view":
                data = fake.file(query.get("filename", ""), query.get("subfolder", ""), query.get("type", ""))
                if data is None:
                    return self._json(404, {})
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return None
            if url.path == "/ws" and fake.websocket and self.headers.get("Upgrade", "").lower() == "websocket":
                key = self.headers["Sec-WebSocket-Key"]
                accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
                self.send_response(101, "Switching Protocols")
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.wfile.flush()
                self.close_connection = True
                return fake.serve_ws(query.get("clientId", ""), self.wfile)
            return self._json(404, {})

    return Handler


@pytest.fixture
def make_fake(comfyui_reference):
    fakes = []

    def factory(**kwargs) -> FakeComfy:
        fakes.append(FakeComfy(comfyui_reference.core_node_names(), **kwargs).start())
        return fakes[-1]

    yield factory
    for fake in fakes:
        fake.stop()


def save_checkpoint(path: Path, **metadata: str) -> Path:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path), metadata=metadata or None)
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """Three checkpoints whose names are NOT in step order (the step is only in the metadata)."""
    folder = tmp_path / "myrun"
    folder.mkdir()
    save_checkpoint(folder / "run-a.safetensors", crucible_step="300")
    save_checkpoint(folder / "run-b.safetensors", ss_steps="100")  # a kohya file
    save_checkpoint(folder / "run-c.safetensors", crucible_step="200")
    (folder / "notes.txt").write_text("not a checkpoint")
    return folder


LORAS = ["myrun/run-a.safetensors", "myrun/run-b.safetensors", "myrun/run-c.safetensors"]
STEP_ORDER = ["myrun/run-b.safetensors", "myrun/run-c.safetensors", "myrun/run-a.safetensors"]


def requires_websocket_client():
    return pytest.importorskip("websocket", reason="websocket-client not installed")


# ------------------------------------------------------------------------------------------- workflow edits

def test_find_loader_by_title_class_and_default():
    by_title = cc.find_loader(WORKFLOW, title="Crucible checkpoint")
    assert (by_title.node_id, by_title.input_name) == ("10", "lora_name")
    by_class = cc.find_loader(WORKFLOW, class_type="CheckpointLoaderSimple")
    assert (by_class.node_id, by_class.input_name) == ("4", "ckpt_name")
    assert cc.find_loader(WORKFLOW).node_id == "10"  # default title
    renumbered = {str(int(k) + 100): v for k, v in WORKFLOW.items()}  # ids are never hard-coded
    assert cc.find_loader(renumbered, class_type="LoraLoader").node_id == "110"
    unet = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "x", "weight_dtype": "default"}}}
    assert cc.find_loader(unet).input_name == "unet_name"


@pytest.mark.parametrize("kwargs, match", [
    ({"title": "Nope"}, "no node with title 'Nope'"),
    ({"class_type": "UNETLoader"}, "no node with class 'UNETLoader'"),
    ({"class_type": "CLIPTextEncode"}, "2 nodes match class 'CLIPTextEncode'"),
    ({"class_type": "KSampler"}, "file-name input is not known; pass --input-name"),
    ({"class_type": "KSampler", "input_name": "positive"}, "connected to another node"),
    ({"class_type": "KSampler", "input_name": "nope"}, "has no input 'nope'"),
])
def test_find_loader_errors(kwargs, match):
    with pytest.raises(WorkflowError, match=match):
        cc.find_loader(WORKFLOW, **kwargs)


def test_find_loader_default_is_ambiguous_without_the_title():
    untitled = copy.deepcopy(WORKFLOW)
    del untitled["10"]["_meta"]
    with pytest.raises(WorkflowError, match="2 nodes match"):
        cc.find_loader(untitled)


def test_prompt_and_seed_patch_only_the_positive_encoder_and_sampler():
    patched = cc.prepare_workflow(WORKFLOW, prompt_text="a watercolor fox", seed=7)
    assert patched["6"]["inputs"]["text"] == "a watercolor fox"
    assert patched["7"]["inputs"]["text"] == "blurry"
    assert patched["3"]["inputs"]["seed"] == 7
    assert WORKFLOW["6"]["inputs"]["text"] == "a photo of sks dog"  # the original is untouched


def test_prompt_patch_follows_flux_guidance_and_sdxl_encoders():
    flux = {
        "1": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["9", 0], "clip_l": "a", "t5xxl": "a",
                                                             "guidance": 3.5}},
        "2": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["1", 0], "guidance": 3.5}},
        "3": {"class_type": "BasicGuider", "inputs": {"model": ["9", 0], "conditioning": ["2", 0]}},
        "4": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "5": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "g", "text_l": "l", "width": 1024}},
        "6": {"class_type": "KSamplerAdvanced", "inputs": {"noise_seed": 3, "positive": ["5", 0],
                                                          "negative": ["7", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "neg"}},
    }
    assert cc.positive_text_nodes(flux) == ["1", "5"]
    patched = cc.prepare_workflow(flux, prompt_text="new", seed=11)
    assert patched["1"]["inputs"]["clip_l"] == patched["1"]["inputs"]["t5xxl"] == "new"
    assert patched["5"]["inputs"]["text_g"] == patched["5"]["inputs"]["text_l"] == "new"
    assert patched["5"]["inputs"]["width"] == 1024 and patched["7"]["inputs"]["text"] == "neg"
    assert patched["4"]["inputs"]["noise_seed"] == patched["6"]["inputs"]["noise_seed"] == 11


def test_prompt_or_seed_without_a_target_is_an_error():
    bare = {"1": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}}}
    with pytest.raises(WorkflowError, match="--prompt"):
        cc.prepare_workflow(bare, prompt_text="x")
    with pytest.raises(WorkflowError, match="--seed"):
        cc.prepare_workflow(bare, seed=1)


def test_load_workflow_accepts_api_format_and_explains_ui_format(tmp_path):
    api = tmp_path / "api.json"
    api.write_text(json.dumps(WORKFLOW))
    assert cc.load_workflow(api) == WORKFLOW
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"prompt": WORKFLOW, "client_id": "x"}))
    assert cc.load_workflow(body) == WORKFLOW
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(WorkflowError, match="Save \\(API\\)"):
        cc.load_workflow(ui)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(WorkflowError, match="broken.json' is not valid JSON"):
        cc.load_workflow(broken)
    with pytest.raises(WorkflowError, match="cannot read workflow"):
        cc.load_workflow(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------- checkpoints

def test_checkpoints_sorted_by_metadata_step_not_name(run_dir):
    found = cc.list_checkpoints(run_dir)
    assert [c.path.name for c in found] == ["run-b.safetensors", "run-c.safetensors", "run-a.safetensors"]
    assert [c.step for c in found] == [100, 200, 300]
    assert [c.label for c in found] == ["step 100", "step 200", "step 300"]
    assert found[0].value("myrun") == found[0].value("myrun/") == "myrun/run-b.safetensors"
    assert found[0].value() == "run-b.safetensors"


def test_checkpoints_without_step_fall_back_to_name_order(tmp_path):
    save_checkpoint(tmp_path / "x10.safetensors")
    save_checkpoint(tmp_path / "x2.safetensors", note="no step here")
    save_checkpoint(tmp_path / "step-999.safetensors", crucible_step="5")  # the name is never parsed
    found = cc.list_checkpoints(tmp_path)
    assert [(c.path.name, c.step) for c in found] == [("step-999.safetensors", 5), ("x2.safetensors", None),
                                                      ("x10.safetensors", None)]
    assert found[1].label == "x2.safetensors"


def test_safetensors_header_is_parsed_directly(tmp_path):
    header = json.dumps({"__metadata__": {"crucible_step": "42", "ss_steps": "7"}}).encode()
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert cc.read_safetensors_metadata(path) == {"crucible_step": "42", "ss_steps": "7"}
    assert cc.checkpoint_step({"crucible_step": "42", "ss_steps": "7"}) == 42
    assert cc.checkpoint_step({"ss_steps": "1200"}) == 1200
    assert cc.checkpoint_step({"crucible_step": "\"64\""}) == 64
    assert cc.checkpoint_step({"crucible_step": "soon"}) is None


@pytest.mark.parametrize("content, match", [
    (b"", "bad header size"),
    (struct.pack("<Q", 10**12) + b"{}", "bad header size"),
    (struct.pack("<Q", 3) + b"{no", "corrupt safetensors header"),
])
def test_bad_checkpoint_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=match) as info:
        cc.list_checkpoints(tmp_path)
    assert "bad.safetensors" in str(info.value)


def test_empty_or_missing_checkpoint_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no .safetensors files"):
        cc.list_checkpoints(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        cc.list_checkpoints(tmp_path / "nope")


# ------------------------------------------------------------------------------------------ websocket parsing

RECORDED = [  # (message, expected kind) as ComfyUI 0.8.0 sends them for prompt "p1"
    ('{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}, "sid": "c1"}}', None),
    ('{"type": "execution_start", "data": {"prompt_id": "p1", "timestamp": 1}}', "started"),
    ('{"type": "execution_cached", "data": {"nodes": ["4"], "prompt_id": "p1", "timestamp": 1}}', None),
    ('{"type": "executing", "data": {"node": "3", "display_node": "3", "prompt_id": "p1"}}', "executing"),
    ('{"type": "progress", "data": {"value": 2, "max": 20, "prompt_id": "p1", "node": "3"}}', "progress"),
    ('{"type": "progress", "data": {"value": 2, "max": 20, "prompt_id": "other", "node": "3"}}', None),
    ('{"type": "executing", "data": {"node": null, "prompt_id": "other"}}', None),
    ('{"type": "execution_success", "data": {"prompt_id": "other", "timestamp": 2}}', None),
    ('{"type": "executing", "data": {"node": "8"}}', None),  # reconnect notice, no prompt id
    (b"\x00\x00\x00\x01\xff\xd8jpeg-preview", None),
    ("not json", None),
    ('["a list"]', None),
    ('{"type": "execution_error", "data": {"prompt_id": "p1", "node_id": "3", "node_type": "KSampler",'
     ' "exception_message": "boom"}}', "error"),
    ('{"type": "execution_interrupted", "data": {"prompt_id": "p1", "node_id": "3"}}', "interrupted"),
    ('{"type": "execution_success", "data": {"prompt_id": "p1", "timestamp": 3}}', "done"),
    ('{"type": "executing", "data": {"node": null, "prompt_id": "p1"}}', "done"),
]


@pytest.mark.parametrize("raw, kind", RECORDED)
def test_parse_ws_message(raw, kind):
    event = cc.parse_ws_message(raw, "p1")
    assert (event.kind if event else None) == kind


class RecordedSocket:
    """Stands in for a websocket connection: replays messages, then reports silence (None)."""

    def __init__(self, messages):
        self.messages, self.closed = list(messages), False

    def recv(self, timeout):
        if self.messages:
            item = self.messages.pop(0)
            if isinstance(item, Exception):
                raise item
            return item
        time.sleep(min(timeout, 0.01))
        return None

    def close(self):
        self.closed = True


def test_ws_error_message_raises_execution_failed(make_fake):
    fake = make_fake(mode="hang", websocket=False)
    socket_ = RecordedSocket([raw for raw, _ in RECORDED if _ not in ("done",)])
    logs = []
    client = ComfyClient(fake.address, "c1", log=logs.append, ws_factory=lambda url, timeout: socket_)
    with pytest.raises(ExecutionFailedError, match="node 3 \\(KSampler\\): boom"):
        client.wait("p1", timeout=5)
    assert not socket_.closed  # a failed prompt does not break the connection
    client.close()
    assert socket_.closed
    assert "  node 3: 2/20" in logs and "  running" in logs


def test_without_websocket_client_progress_is_polled(make_fake, run_dir):
    fake = make_fake(loras=LORAS, websocket=False)
    logs = []

    def no_package(url, timeout):
        raise ModuleNotFoundError("No module named 'websocket'")

    client = ComfyClient(fake.address, poll_interval=0.02, log=logs.append, ws_factory=no_package)
    result = client.sweep(WORKFLOW, run_dir, name_prefix="myrun/", timeout=10)
    assert len(result.prompt_ids) == 3
    assert [line for line in logs if "websocket" in line] == [
        "websocket-client is not installed; following progress by polling /history"]


class FinishThenLose(RecordedSocket):
    """The prompt finishes only once the client listens on the socket, which is lost at that moment: the fallback to
    polling is always taken (with a timer, a loaded machine could finish the prompt before the client listened)."""

    def __init__(self, fake, error):
        super().__init__([error])
        self.fake, self.prompt_id = fake, None

    def recv(self, timeout):
        self.fake._finish(self.prompt_id, self.fake.bodies[-1])
        return super().recv(timeout)


def test_lost_websocket_falls_back_to_polling(make_fake, run_dir):
    fake = make_fake(loras=LORAS, websocket=False, mode="hang")
    logs = []
    lost = FinishThenLose(fake, WebSocketLost("connection reset"))
    client = ComfyClient(fake.address, poll_interval=0.02, log=logs.append, ws_factory=lambda url, timeout: lost)
    prompt = cc.prepare_workflow(WORKFLOW)
    prompt["10"]["inputs"]["lora_name"] = LORAS[0]
    lost.prompt_id = client.queue(prompt)
    entry = client.wait(lost.prompt_id, timeout=5)
    assert entry["status"]["status_str"] == "success"
    assert any("websocket lost (connection reset)" in line for line in logs)


# ------------------------------------------------------------------------------------------- HTTP + waiting

@pytest.mark.parametrize("use_websocket", [False, True])
def test_sweep_makes_one_column_per_checkpoint_in_step_order(make_fake, run_dir, use_websocket):
    if use_websocket:
        requires_websocket_client()
    fake = make_fake(loras=LORAS)
    logs = []
    client = ComfyClient(fake.address, "sweep-client", use_websocket=use_websocket, poll_interval=0.02,
                         log=logs.append)
    result = client.sweep(WORKFLOW, run_dir, name_prefix="myrun/", prompt_text="a fox", seed=5, timeout=10,
                          title="myrun")
    sent = [b["prompt"]["10"]["inputs"]["lora_name"] for b in fake.bodies]
    assert sent == STEP_ORDER
    assert all(b["client_id"] == "sweep-client" for b in fake.bodies)
    assert all(b["prompt"]["6"]["inputs"]["text"] == "a fox" and b["prompt"]["3"]["inputs"]["seed"] == 5
               for b in fake.bodies)
    layout = result.composite.layout
    assert layout["cols"] == 3 and layout["rows"] == 1
    assert layout["col_labels"] == ["step 100", "step 200", "step 300"]
    for cell, name in zip(layout["cells"], STEP_ORDER):
        x0, y0, x1, y1 = cell["image_box"]
        assert result.composite.image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == colour_of(name)
        assert cell["caption"] == Path(name).name
    assert len(result.prompt_ids) == 3 and all(len(imgs) == 1 for imgs in result.images)
    if use_websocket:
        assert fake.ws_clients and set(fake.ws_clients) == {"sweep-client"}
        assert "  node 3: 4/4" in logs  # progress came over the socket
    else:
        assert fake.ws_clients == []
    assert any(line.startswith("[3/3] step 300: 1 image(s)") for line in logs)


def test_several_images_per_checkpoint_become_rows(make_fake, run_dir):
    fake = make_fake(loras=LORAS, images_per_prompt=2, websocket=False)
    client = ComfyClient(fake.address, use_websocket=False, poll_interval=0.02)
    result = client.sweep(WORKFLOW, run_dir, name_prefix="myrun/", timeout=10)
    assert (result.composite.layout["rows"], result.composite.layout["cols"]) == (2, 3)
    assert result.composite.layout["row_labels"] == ["image 1", "image 2"]


def test_rejected_prompt_reports_node_errors_verbatim_and_stops(make_fake, run_dir):
    fake = make_fake(loras=LORAS)  # the sweep forgets --name-prefix, so every name is "not in list"
    client = ComfyClient(fake.address, use_websocket=False)
    with pytest.raises(PromptRejectedError) as info:
        client.sweep(WORKFLOW, run_dir, timeout=10)
    assert len(fake.bodies) == 1  # stopped at the first rejection
    expected_error, expected_nodes = fake.validate(fake.bodies[0]["prompt"])
    assert info.value.error == expected_error and info.value.node_errors == expected_nodes
    message = str(info.value)
    assert json.dumps(expected_nodes) in message and json.dumps(expected_error) in message
    assert "lora_name: 'run-b.safetensors' not in" in message


def test_unknown_node_class_is_rejected_with_comfys_message(make_fake):
    fake = make_fake()
    bad = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    with pytest.raises(PromptRejectedError, match="Cannot execute because node NoSuchNode does not exist"):
        ComfyClient(fake.address).queue(bad)


@pytest.mark.parametrize("use_websocket", [False, True])
def test_execution_error_is_reported(make_fake, use_websocket):
    if use_websocket:
        requires_websocket_client()
    fake = make_fake(loras=LORAS, mode="fail")
    client = ComfyClient(fake.address, use_websocket=use_websocket, poll_interval=0.02)
    prompt = copy.deepcopy(WORKFLOW)
    prompt["10"]["inputs"]["lora_name"] = LORAS[0]
    with pytest.raises(ExecutionFailedError, match="KSampler.*same device") as info:
        client.wait(client.queue(prompt), timeout=10)
    assert info.value.details["exception_type"] == "RuntimeError"


@pytest.mark.parametrize("use_websocket", [False, True])
def test_prompt_that_never_finishes_times_out_cleanly(make_fake, use_websocket):
    if use_websocket:
        requires_websocket_client()
    fake = make_fake(loras=LORAS, mode="hang")
    client = ComfyClient(fake.address, use_websocket=use_websocket, poll_interval=0.05)
    prompt = copy.deepcopy(WORKFLOW)
    prompt["10"]["inputs"]["lora_name"] = LORAS[0]
    prompt_id = client.queue(prompt)
    start = time.monotonic()
    with pytest.raises(ComfyTimeoutError, match=f"{prompt_id} within 0.6 s \\(--timeout\\)"):
        client.wait(prompt_id, timeout=0.6)
    assert 0.5 <= time.monotonic() - start < 3.0


def test_server_that_does_not_answer_times_out(make_fake):
    fake = make_fake()
    fake.stall = 5.0
    client = ComfyClient(fake.address, request_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(ComfyTimeoutError, match="did not answer POST /prompt within 0.3 s"):
        client.queue(WORKFLOW)
    assert time.monotonic() - start < 2.0


def test_sweep_total_timeout(make_fake, run_dir):
    fake = make_fake(loras=LORAS, mode="hang", websocket=False)
    client = ComfyClient(fake.address, use_websocket=False, poll_interval=0.05)
    start = time.monotonic()
    with pytest.raises(ComfyTimeoutError, match="total time limit"):
        client.sweep(WORKFLOW, run_dir, name_prefix="myrun/", timeout=60, total_timeout=0.5)
    assert time.monotonic() - start < 3.0


def test_missing_websocket_endpoint_falls_back_to_polling(make_fake, run_dir):
    requires_websocket_client()
    fake = make_fake(loras=LORAS, websocket=False)  # /ws answers 404
    logs = []
    client = ComfyClient(fake.address, poll_interval=0.02, log=logs.append)
    result = client.sweep(WORKFLOW, run_dir, name_prefix="myrun/", timeout=10)
    assert len(result.prompt_ids) == 3
    assert sum("websocket unavailable" in line for line in logs) == 1  # said once, then polling only


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ComfyClient(f"127.0.0.1:{port}")
    with pytest.raises(ComfyConnectionError, match=f"cannot reach ComfyUI at http://127.0.0.1:{port}"):
        client.queue(WORKFLOW)


def test_images_come_from_view(make_fake):
    fake = make_fake(loras=LORAS)
    fake._files[("a.png", "sub", "temp")] = png_bytes((1, 2, 3))
    client = ComfyClient(fake.address)
    entry = {"outputs": {"9": {"images": [{"filename": "a.png", "subfolder": "sub", "type": "temp"}]},
                         "12": {"text": ["not an image"]}}}
    [image] = client.images(entry)
    assert image.size == IMAGE_SIZE and image.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(cc.ComfyError, match="HTTP 404 for image 'gone.png'"):
        client.images({"outputs": {"9": {"images": [{"filename": "gone.png", "subfolder": "", "type": "output"}]}}})


@pytest.mark.parametrize("server, base, ws", [
    ("127.0.0.1:8190", "http://127.0.0.1:8190", "ws://127.0.0.1:8190"),
    ("localhost", "http://localhost:8188", "ws://localhost:8188"),
    ("https://comfy.example.org/api/", "https://comfy.example.org:443/api", "wss://comfy.example.org:443/api"),
    ("[::1]:9000", "http://[::1]:9000", "ws://[::1]:9000"),
])
def test_parse_server(server, base, ws):
    assert cc.parse_server(server) == (base, ws)


def test_client_id_goes_into_the_websocket_url():
    client = ComfyClient("127.0.0.1:9999", "my id")
    assert client.ws_url == "ws://127.0.0.1:9999/ws?clientId=my+id"
    with pytest.raises(CrucibleError, match="not a server address"):
        ComfyClient("ftp://x")


# ------------------------------------------------------------------------------------------------------ CLI

def test_cli_sweep_writes_a_labelled_strip(make_fake, run_dir, tmp_path, capsys):
    fake = make_fake(loras=LORAS)
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(WORKFLOW))
    out = tmp_path / "out" / "strip.png"
    code = cc.main(["sweep", "--server", fake.address, "--workflow", str(workflow), "--checkpoints", str(run_dir),
                    "--loader-class", "LoraLoader", "--name-prefix", "myrun/", "--client-id", "cli-1",
                    "--timeout", "10", "--poll-interval", "0.02", "--no-websocket", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    layout = read_layout(out)
    assert layout["col_labels"] == ["step 100", "step 200", "step 300"] and layout["title"] == "myrun"
    with Image.open(out) as image:
        sweep_meta = json.loads(image.text["crucible_sweep"])
    assert [c["value"] for c in sweep_meta["checkpoints"]] == STEP_ORDER
    assert sweep_meta["loader"] == {"node_id": "10", "input": "lora_name"}
    assert "[1/3] step 100: queued myrun/run-b.safetensors" in printed and f"wrote {out}" in printed
    assert {b["client_id"] for b in fake.bodies} == {"cli-1"}


def test_cli_reports_node_errors_and_exit_code(make_fake, run_dir, tmp_path, capsys):
    fake = make_fake(loras=[])
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(WORKFLOW))
    code = cc.main(["sweep", "--server", fake.address, "--workflow", str(workflow), "--checkpoints", str(run_dir),
                    "--no-websocket", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ComfyUI rejected the workflow (HTTP 400)") and '"node_errors"' not in err
    assert "node_errors: {\"10\": {\"errors\": [{\"type\": \"value_not_in_list\"" in err
    assert not (tmp_path / "x.png").exists()


def test_cli_bad_input_exit_code(tmp_path, capsys):
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(WORKFLOW))
    code = cc.main(["sweep", "--workflow", str(workflow), "--checkpoints", str(tmp_path / "none"),
                    "--out", str(tmp_path / "x.png")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_checkpoint_sequence_can_be_given_directly(make_fake, tmp_path):
    fake = make_fake(loras=["a.safetensors"], websocket=False)
    client = ComfyClient(fake.address, use_websocket=False, poll_interval=0.02)
    result = client.sweep(WORKFLOW, [Checkpoint(tmp_path / "a.safetensors", 3)], timeout=10)
    assert result.composite.layout["col_labels"] == ["step 3"]
    assert fake.bodies[0]["prompt"]["10"]["inputs"]["lora_name"] == "a.safetensors"
