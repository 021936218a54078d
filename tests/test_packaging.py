"""What a fresh clone installs and reads: dependency lists that agree, a lock that honours them, no test data outside
the repository, and a test suite that runs whatever the checkout's folder is called."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.split("#")[0].strip() and not line.startswith("-")]


def normalized(lines) -> set[str]:
    return {str(Requirement(line)) for line in lines}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_requirements_txt_and_pyproject_agree():
    assert normalized(requirement_lines(ROOT / "requirements.txt")) == normalized(pyproject()["dependencies"])
    assert normalized(requirement_lines(ROOT / "requirements-test.txt")) == \
        normalized(pyproject()["optional-dependencies"]["dev"])


def test_requirements_have_lower_bounds_and_never_torch():
    """make test-min installs each ``>=`` bound as ``==``: every runtime requirement needs one."""
    for line in requirement_lines(ROOT / "requirements.txt"):
        req = Requirement(line)
        assert canonicalize_name(req.name) != "torch", "never pin torch: ComfyUI users bring their own build"
        assert any(s.operator == ">=" for s in req.specifier), f"{line}: no lower bound for make test-min"


def test_constraints_pin_every_requirement_within_its_bounds():
    pins = {}
    for line in requirement_lines(ROOT / "constraints.txt"):
        name, _, version = line.partition("==")
        assert version and not re.search(r"[<>~!;]", line), f"constraints.txt: {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = version
    assert "torch" not in pins, "constraints.txt must not pin torch"
    for path in ("requirements.txt", "requirements-test.txt"):
        for line in requirement_lines(ROOT / path):
            req = Requirement(line)
            if req.marker and not req.marker.evaluate():
                continue
            name = canonicalize_name(req.name)
            assert name in pins, f"{path}: {req.name} has no pin in constraints.txt (run make lock)"
            assert req.specifier.contains(pins[name], prereleases=True), \
                f"constraints.txt pins {req.name}=={pins[name]}, outside {path}'s {req.specifier}"


def test_no_test_reads_files_beside_the_repository():
    """A fresh clone has no ../shared: tests read the vendored copy (tests/data) through one fixture."""
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name.startswith("test_") and path.name != "test_packaging.py" or path.name in ("conftest.py", "workflow_builder.py",
                                                          "comfyui_reference.py"):
            text = path.read_text(encoding="utf-8")
            if re.search(r"""/\s*["']shared["']|["']\.\./shared|ROOT\.parent\b""", text):
                offenders.append(path.relative_to(ROOT).as_posix())
    assert not offenders, f"these read outside the repository: {offenders}"


def test_reference_data_is_vendored(comfyui_reference):
    assert comfyui_reference.root.is_relative_to(ROOT) and comfyui_reference.version == "0.8.0"
    assert len(comfyui_reference.core_node_names()) == 567
    sizes = {f: (len(m["unet"]), len(m["clip"])) for f in ("sd15", "sdxl", "sd3", "flux")
             for m in [comfyui_reference.keymap(f)]}
    assert sizes == {"sd15": (2697, 317), "sdxl": (6970, 963), "sd3": (3072, 1401), "flux": (3103, 974)}
    total = sum(p.stat().st_size for p in (TESTS / "data").rglob("*") if p.is_file())
    assert total < 2_000_000, f"tests/data holds {total} bytes: trim it"


@pytest.mark.slow
def test_suite_runs_in_a_checkout_whose_folder_name_is_not_a_python_name(tmp_path):
    """``git clone … ComfyUI-Crucible``: pytest imports the pack's root ``__init__.py`` as a plain module there."""
    clone = tmp_path / "ComfyUI-Crucible"
    (clone / "tests").mkdir(parents=True)
    for name in ("__init__.py", "pyproject.toml", "nodes", "trainer"):
        (clone / name).symlink_to(ROOT / name)
    for name in ("conftest.py", "comfyui_reference.py"):
        (clone / "tests" / name).symlink_to(TESTS / name)
    (clone / "tests" / "test_probe.py").write_text("def test_probe():\n    assert True\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_probe.py"],
                         cwd=clone, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout


# --- what the wheel ships ----------------------------------------------------------------------------------------------
TEST_FIXTURE_MODULES = sorted(p.stem for p in TESTS.glob("*.py") if not p.stem.startswith(("test_", "conftest")))
TEST_FIXTURE_BUILDERS = ("build_comfy_sd15", "comfy_sd15_components", "build_tiny_flow_model")


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> dict[str, bytes]:
    """Every file of the wheel setuptools builds from pyproject.toml (built offline from a copy of the sources)."""
    import shutil
    import zipfile

    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "trainer", src / "trainer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", code, str(src / "dist")], cwd=src, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with zipfile.ZipFile(src / "dist" / run.stdout.strip().splitlines()[-1]) as wheel:
        return {name: wheel.read(name) for name in wheel.namelist()}


def test_the_wheel_ships_every_trainer_module(wheel_files):
    """Sub-packages (trainer.dataset, trainer.client, ...) must be listed in pyproject.toml or they are left out."""
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "trainer").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - set(wheel_files) == set()


def test_the_wheel_ships_no_test_fixture(wheel_files):
    assert TEST_FIXTURE_MODULES  # tiny_flow, comfy_sd15, comfy_stubs, run_helpers, ...
    assert not [n for n in wheel_files if n.startswith("tests/")]
    shipped = {Path(n).stem for n in wheel_files if n.endswith(".py")}
    assert shipped & set(TEST_FIXTURE_MODULES) == set()
    for name, data in wheel_files.items():
        if not name.endswith(".py"):
            continue
        text = data.decode("utf-8")
        assert not [b for b in TEST_FIXTURE_BUILDERS if f"def {b}(" in text], f"{name} defines a test fixture"
        imported = {m for m in TEST_FIXTURE_MODULES if re.search(rf"^\s*(from|import)\s+(\S+\.)?{m}\b", text, re.M)}
        assert not imported, f"{name} imports test fixtures {imported}: move what it needs into trainer/"
