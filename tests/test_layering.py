"""trainer/ never imports ComfyUI; in nodes/ only _comfy.py and the MODEL-path adapter (comfy_family.py and its
memory estimate comfy_memory.py, which import ComfyUI inside functions only) touch ComfyUI's runtime modules."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "folder_paths", "server", "nodes", "comfy_api", "comfy_extras", "execution"}


def imported_roots(path: Path, top_level_only: bool = False) -> set[str]:
    """The top-level package names a module imports (absolute imports); ``top_level_only``: only those its body
    runs at import time, not the ones inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_trainer_never_imports_comfyui():
    offenders = {}
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        bad = imported_roots(path) & COMFY_MODULES
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"trainer/ must not import ComfyUI: {offenders}"


def test_only_the_comfy_modules_touch_comfyui():
    touching = [p.name for p in sorted((ROOT / "nodes").glob("*.py")) if imported_roots(p) & COMFY_MODULES]
    assert touching == ["_comfy.py", "comfy_family.py", "comfy_memory.py"], touching


def test_the_model_path_adapter_imports_comfyui_lazily():
    assert not imported_roots(ROOT / "nodes" / "comfy_family.py", top_level_only=True) & COMFY_MODULES
    assert not imported_roots(ROOT / "nodes" / "comfy_memory.py", top_level_only=True) & COMFY_MODULES
    assert imported_roots(ROOT / "tests" / "test_layering.py", top_level_only=True) == {"__future__", "ast", "pathlib"}  # can fail


def test_import_walk_detects_a_comfy_import(tmp_path):
    # the checker itself must be able to fail
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import folder_paths\n    from comfy.sd import load_lora_for_models\n")
    assert imported_roots(probe) >= {"folder_paths", "comfy"}


def test_importing_trainer_is_light():
    import subprocess
    import sys

    code = ("import sys, trainer, trainer.config, trainer.errors, trainer.fileio, trainer.render, trainer.sweep;"
            "heavy = [m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the trainer's light modules pulled in {out.stdout.strip()}"


MAX_MODULE_LINES = 500  # issue 14: a module a reader can hold in mind; split along a seam before growing past it


def test_no_module_in_trainer_or_nodes_is_over_500_lines():
    long = {p.relative_to(ROOT).as_posix(): n for p in [*(ROOT / "trainer").rglob("*.py"), *(ROOT / "nodes").rglob("*.py")]
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these modules along a seam (more than {MAX_MODULE_LINES} lines): {long}"
