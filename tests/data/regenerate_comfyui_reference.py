"""Regenerate ``tests/data/comfyui-0.8.0/``: the ComfyUI reference data the tests read (see the README there).

Two sources:

* ``--reference DIR`` (the default is ``../shared/comfyui`` beside the repository, when present): a folder holding a
  ComfyUI server's ``object_info.json`` and ``lora_keymaps/<family>.json`` as produced for 0.8.0.
* ``--comfyui TREE --python PY``: a ComfyUI source tree and a Python that can run it (for example the venv made by
  ``shared/comfyui-0.8.0/install_cpu.sh``). The server is started on the CPU with no custom nodes and its
  ``GET /object_info`` is read; the key maps cannot be rebuilt this way (they need full-size models), so they are
  kept from the current vendored copy, or taken from ``--reference`` when it is given too.

What is written, trimmed to what the tests read:

* ``object_info.json``: the schemas of the core nodes whose class name appears quoted in ``workflows/``,
  ``tests/``, ``trainer/`` or ``nodes/`` (``indent=1, sort_keys=True``, as ComfyUI's data was written);
* ``core_nodes.json``: the names of every core node class (so a pack node id that shadows a core node is caught);
* ``lora_keymaps/<family>.json.gz``: the complete key maps, unchanged, gzip-compressed (mtime 0: reproducible).

Usage (from the repository root)::

    .venv/bin/python tests/data/regenerate_comfyui_reference.py             # from ../shared/comfyui
    .venv/bin/python tests/data/regenerate_comfyui_reference.py --check     # exit 1 when the vendored copy differs
    .venv/bin/python tests/data/regenerate_comfyui_reference.py --comfyui /tmp/comfy080/ComfyUI-0.8.0 \\
        --python /tmp/comfy080/venv/bin/python
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "comfyui-0.8.0"
DEFAULT_REFERENCE = ROOT.parent / "shared" / "comfyui"
FAMILIES = ("sd15", "sdxl", "sd3", "flux")
SCANNED = ("workflows", "tests", "trainer", "nodes")
QUOTED_NAME = re.compile(r"""["']([A-Za-z_][A-Za-z0-9_]*)["']""")


def used_core_nodes(core_names: set[str]) -> set[str]:
    """Core node classes named (as a quoted string) anywhere in the pack's workflows, tests or code."""
    used: set[str] = set()
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".json", ".js") and path.is_file() and OUT not in path.parents:
                used |= core_names & set(QUOTED_NAME.findall(path.read_text(encoding="utf-8", errors="ignore")))
    return used


def core_only(object_info: dict) -> dict:
    return {name: info for name, info in object_info.items()
            if not str(info.get("python_module", "")).startswith("custom_nodes")}


def gz_bytes(text: str) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(text.encode("utf-8"))
    return buffer.getvalue()


def render(object_info: dict, keymaps: dict[str, str], extra_names: set[str] = frozenset()) -> dict[str, bytes]:
    """Relative path -> file content of the vendored folder (README excluded: written by hand)."""
    core = core_only(object_info)
    used = used_core_nodes(set(core))
    names = sorted(set(core) | set(extra_names))
    files = {
        "object_info.json": json.dumps({n: core[n] for n in sorted(used)}, indent=1, sort_keys=True) + "\n",
        "core_nodes.json": json.dumps({"comfyui_version": "0.8.0", "count": len(names), "names": names},
                                      indent=1) + "\n",
    }
    out = {name: text.encode("utf-8") for name, text in files.items()}
    for family, text in keymaps.items():
        json.loads(text)  # must be JSON
        out[f"lora_keymaps/{family}.json.gz"] = gz_bytes(text)
    return out


def keymaps_from(folder: Path) -> dict[str, str]:
    return {f: (folder / "lora_keymaps" / f"{f}.json").read_text(encoding="utf-8") for f in FAMILIES}


def vendored_keymaps() -> dict[str, str]:
    return {f: gzip.decompress((OUT / "lora_keymaps" / f"{f}.json.gz").read_bytes()).decode("utf-8")
            for f in FAMILIES}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def object_info_from_server(tree: Path, python: str, timeout: float = 600.0) -> dict:
    """Start ComfyUI (CPU, no custom nodes) from ``tree``, read ``GET /object_info``, stop it."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="comfyui-ref-") as base:
        # Everything the server writes (user folder, database, output) stays in the scratch folder, and its model
        # folders are empty: file-list COMBOs come out empty, as in the vendored data.
        cmd = [python, str(tree / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-all-custom-nodes", "--base-directory", base, "--database-url", "sqlite:///:memory:"]
        with open(Path(base) / "server.log", "wb") as log:
            server = subprocess.Popen(cmd, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + timeout
                while True:
                    if server.poll() is not None:
                        raise SystemExit(f"ComfyUI exited ({server.returncode}):\n"
                                         + (Path(base) / "server.log").read_text(errors="replace")[-4000:])
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=60) as r:
                            return json.loads(r.read())
                    except OSError:
                        if time.monotonic() > deadline:
                            raise SystemExit(f"ComfyUI did not answer on port {port} within {timeout:.0f}s")
                        time.sleep(2)
            finally:
                server.terminate()
                server.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, help=f"folder with object_info.json + lora_keymaps/ "
                                                        f"(default {DEFAULT_REFERENCE} when present)")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI source tree: read /object_info from a server")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs --comfyui")
    parser.add_argument("--check", action="store_true", help="exit 1 when the vendored files differ")
    args = parser.parse_args(argv)
    reference = args.reference or (DEFAULT_REFERENCE if DEFAULT_REFERENCE.is_dir() and not args.comfyui else None)
    if args.comfyui:
        object_info = object_info_from_server(args.comfyui.resolve(), args.python)
    elif reference:
        object_info = json.loads((reference / "object_info.json").read_text(encoding="utf-8"))
    else:
        parser.error(f"no source: give --reference DIR or --comfyui TREE ({DEFAULT_REFERENCE} is absent)")
    keymaps = keymaps_from(reference) if reference else vendored_keymaps()
    extra: set[str] = set()
    if args.comfyui and (OUT / "core_nodes.json").is_file():
        # A CPU install lacks some optional node modules (no torchaudio: the audio nodes fail to import). Keep the
        # names the vendored list has; say which.
        extra = set(json.loads((OUT / "core_nodes.json").read_text(encoding="utf-8"))["names"]) - set(core_only(object_info))
        if extra:
            print(f"not loaded by this server, kept from the vendored list: {', '.join(sorted(extra))}")
    files = render(object_info, keymaps, extra)
    stale = [name for name, data in files.items()
             if not (OUT / name).is_file() or (OUT / name).read_bytes() != data]
    if args.check:
        print("\n".join(f"out of date: {OUT / n}" for n in stale) or "vendored ComfyUI reference data is current")
        return 1 if stale else 0
    for name, data in files.items():
        (OUT / name).parent.mkdir(parents=True, exist_ok=True)
        (OUT / name).write_bytes(data)
    print(f"wrote {len(files)} files to {OUT} ({len(stale)} changed); "
          f"{len(json.loads(files['object_info.json']))} node schemas kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
