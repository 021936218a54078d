"""How the pack reaches its library: by relative imports from the pack package, never through ``sys.path``.

A PyPI package named ``trainer`` (coqui-tts installs one; it is common beside ComfyUI) must not shadow the pack's
own ``trainer/``, and ``nodes/`` uses only the names ``trainer/__init__.py`` exports (its public API).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import comfy_stubs

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# ComfyUI 0.8.0's nodes.load_custom_node, for a folder: the module name is the folder's path with "." -> "_x_",
# the spec comes from <folder>/__init__.py and the module is registered in sys.modules before it runs.
LOAD_LIKE_COMFYUI = textwrap.dedent("""
    import importlib.util, json, os, sys
    decoy, tests, module_path, base = sys.argv[1:5]
    sys.path.insert(0, decoy)   # the decoy 'trainer' (and 'nodes') packages come first, like a PyPI install
    sys.path.append(tests)
    import comfy_stubs
    comfy_stubs.install(base)
    sys_module_name = module_path.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(sys_module_name, os.path.join(module_path, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[sys_module_name] = module
    spec.loader.exec_module(module)
    library = sys.modules[sys_module_name + ".trainer"]
    print(json.dumps({"nodes": sorted(module.NODE_CLASS_MAPPINGS), "library": library.__file__,
                      "top_level_trainer": "trainer" in sys.modules and sys.modules["trainer"].__file__}))
""")


def _decoy(tmp_path: Path) -> Path:
    decoy = tmp_path / "site-packages"
    for name in ("trainer", "nodes"):
        (decoy / name).mkdir(parents=True)
        decoy_init = f"raise ImportError('decoy {name}: the PyPI package, not the pack')\n"
        (decoy / name / "__init__.py").write_text(decoy_init)
    return decoy


def test_pack_loads_every_node_with_a_decoy_trainer_first_on_sys_path(tmp_path):
    """ComfyUI loads ``custom_nodes/ComfyUI-Crucible`` (a hyphenated folder) with a PyPI ``trainer`` installed."""
    expected = sorted(comfy_stubs.load_pack().NODE_CLASS_MAPPINGS)
    assert len(expected) >= 11
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    pack_dir = custom_nodes / "ComfyUI-Crucible"
    pack_dir.symlink_to(ROOT, target_is_directory=True)
    script = tmp_path / "load_like_comfyui.py"
    script.write_text(LOAD_LIKE_COMFYUI)
    out = subprocess.run([sys.executable, str(script), str(_decoy(tmp_path)), str(TESTS), str(pack_dir),
                          str(tmp_path / "comfyui")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "could not load" not in out.stderr, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["nodes"] == expected, out.stderr
    assert Path(loaded["library"]).resolve() == ROOT / "trainer" / "__init__.py"
    assert loaded["top_level_trainer"] is False, "the pack must not import a top-level 'trainer'"


def test_python_m_trainer_runs_from_the_repository_root():
    out = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "python -m trainer" in out.stdout


# --- nodes/ uses trainer's public API ------------------------------------------------------------------------------
def trainer_imports(path: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """``(line, module, names)`` of every import in ``path`` that reaches the pack's ``trainer`` package: relative
    (``from ..trainer import x``, ``from ..trainer.loop import x``) or absolute (``import trainer.x``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            relative_trainer = node.level >= 2 and (module == "trainer" or module.startswith("trainer."))
            absolute_trainer = node.level == 0 and module.split(".")[0] == "trainer"
            if relative_trainer or absolute_trainer:
                found.append((node.lineno, "." * node.level + module, tuple(a.name for a in node.names)))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, ()) for a in node.names if a.name.split(".")[0] == "trainer"]
    return found


def public_api_problems(folder: Path, public: set[str]) -> list[str]:
    problems = []
    for path in sorted(folder.glob("*.py")):
        for line, module, names in trainer_imports(path):
            where = f"{path.name}:{line}"
            if module != "..trainer":
                problems.append(f"{where}: imports {module!r}; use 'from ..trainer import NAME' (public API)")
            else:
                problems += [f"{where}: {name!r} is not in trainer.__all__" for name in names if name not in public]
    return problems


def test_nodes_import_only_trainers_public_names():
    import trainer

    problems = public_api_problems(ROOT / "nodes", set(trainer.__all__))
    assert not problems, "\n".join(problems)


def test_public_api_check_can_fail(tmp_path):
    (tmp_path / "bad.py").write_text("from trainer.loop import train\nfrom ..trainer.dataset import DataSource\n"
                                     "import trainer.config\ndef f():\n    from ..trainer import _private\n")
    problems = public_api_problems(tmp_path, {"train"})
    assert len(problems) == 4, problems


def test_every_public_name_resolves_and_import_stays_light():
    code = ("import sys, trainer;"
            "light = [m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules];"
            "missing = [n for n in trainer.__all__ if not hasattr(trainer, n)];"
            "print(light, missing, sorted(set(dir(trainer)) >= set(trainer.__all__) and ['dir ok'] or []))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[] [] ['dir ok']", out.stdout
