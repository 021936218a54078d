"""Families own their facts: no module in trainer/ or nodes/ outside trainer/families/ branches on a family name.

An AST walk (not a regex over the text) finds every place a family name string (the registry's
``FAMILY_NAMES``) is compared (``== "sdxl"``, ``in ("sd15", …)``, ``match``), used as a dict key or index
(``{"sd15": …}``, ``table["flux"]``, ``dict(sd3=…)``), or listed with another family (``["sd3", "flux"]``).
Naming one family alone as a value (a default, the demo's chosen family) is not branching and is allowed.
"""
from __future__ import annotations

import ast
from pathlib import Path

from trainer.families import FAMILY_NAMES

ROOT = Path(__file__).resolve().parents[1]
FAMILY_DIR = ROOT / "trainer" / "families"

# Not family branching; each entry names the file and the exact expression (ast.unparse) it allows.
ALLOWED = {
    # ComfyUI's own model vocabulary (unet_config["image_model"] of comfy/model_detection.py), not a Crucible family
    ("nodes/_comfy.py", "image_model == 'flux'"),
}
ALLOWED_FILES: set[str] = set()  # whole files exempt: none (the tiny Flux/SD3 builder is a test fixture under tests/)


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for element in node.elts for s in _strings(element)]
    return []


def _names_family(node: ast.AST | None) -> bool:
    return node is not None and any(s in FAMILY_NAMES for s in _strings(node))


def family_branches(source: str) -> list[tuple[int, str]]:
    """``(line, expression)`` of every place ``source`` compares, keys, indexes or lists family names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            hit = any(_names_family(part) for part in (node.left, *node.comparators))
        elif isinstance(node, ast.Dict):
            hit = any(_names_family(key) for key in node.keys)
        elif isinstance(node, ast.Subscript):
            hit = _names_family(node.slice)
        elif isinstance(node, ast.Call):
            hit = any(kw.arg in FAMILY_NAMES for kw in node.keywords)
        elif isinstance(node, ast.MatchValue):
            hit = _names_family(node.value)
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            hit = len({s for s in _strings(node) if s in FAMILY_NAMES}) >= 2
        else:
            hit = False
        if hit:
            found.append((node.lineno, ast.unparse(node)))
    return found


def _checked_files() -> list[Path]:
    files = sorted((ROOT / "trainer").rglob("*.py")) + sorted((ROOT / "nodes").rglob("*.py"))
    return [p for p in files if FAMILY_DIR not in p.parents and p.relative_to(ROOT).as_posix() not in ALLOWED_FILES]


def test_no_module_outside_families_branches_on_a_family_name():
    offenders, used = [], set()
    for path in _checked_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, expression in family_branches(path.read_text(encoding="utf-8")):
            if (rel, expression) in ALLOWED:
                used.add((rel, expression))
            else:
                offenders.append(f"{rel}:{line}: {expression}")
    assert not offenders, ("family facts belong on the family classes (trainer/families/), not in tables or "
                           "branches elsewhere:\n" + "\n".join(offenders))
    assert used == ALLOWED, f"allow-list entries no longer needed: {sorted(ALLOWED - used)}"


def test_the_walk_finds_each_kind_of_family_branch():
    # the checker itself must be able to fail
    probe = '''
if family == "sdxl": pass
if name in ("sd15", "other"): pass
TABLE = {"sd3": 1}
x = TABLE["flux"]
y = dict(sd15=1)
z = ["sd3", "flux"]
match family:
    case "sd15": pass
'''
    lines = [line for line, _ in family_branches(probe)]
    assert {2, 3, 4, 5, 6, 7, 9} <= set(lines)
    assert family_branches('DEMO_FAMILY = "sd15"\nget_family(DEMO_FAMILY)\nfamily == other\n') == []


def test_the_registry_is_the_only_list_of_families():
    from trainer.config import FAMILIES

    assert FAMILIES == FAMILY_NAMES
    listing = [p.name for p in FAMILY_DIR.glob("*.py") if "\nFAMILY = " in p.read_text(encoding="utf-8")]
    assert sorted(listing) == sorted(f"{name}.py" for name in FAMILY_NAMES)
