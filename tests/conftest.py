"""Shared fixtures: the vendored ComfyUI reference data, and the tiny models built once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
for path in (ROOT, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# pytest -n 2 runs two workers on two cores: one thread each avoids oversubscription (tiny models are 10-50x
# slower when threads contend).
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def comfyui_reference():
    """ComfyUI 0.8.0's node schemas and LoRA key maps, vendored in tests/data/comfyui-0.8.0 (see its README).

    The one way tests read ComfyUI reference data: nothing reads ``../shared``, so a fresh clone passes alone."""
    from comfyui_reference import REFERENCE

    return REFERENCE


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    """A tiny SD1.5-architecture diffusers folder (+ single-file checkpoint beside it)."""
    from trainer.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd15", family="sd15", seed=0, single_file=True)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL-architecture diffusers folder (+ single-file checkpoint beside it)."""
    from trainer.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", family="sdxl", seed=1, single_file=True)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny SD3.5-style model: diffusers folder, ComfyUI split files and a miniature ComfyUI tree."""
    from tiny_flow import build_tiny_flow_model

    return build_tiny_flow_model(tmp_path_factory.mktemp("sd3"), "sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny Flux.1-dev-style model: diffusers folder, ComfyUI split files and a miniature ComfyUI tree."""
    from tiny_flow import build_tiny_flow_model

    return build_tiny_flow_model(tmp_path_factory.mktemp("flux"), "flux", seed=0)


@pytest.fixture(scope="session")
def tiny_model_configs(request):
    """``name -> (diffusers folder config, ComfyUI file config)`` of each family's tiny model (``tiny_<name>``)."""
    from trainer.config import ModelConfig
    from trainer.families import get_family
    from trainer.tiny import single_file_path

    def configs(name: str):
        tiny = request.getfixturevalue(f"tiny_{name}")
        if get_family(name).split_file_loading:
            return tiny.folder_config(), tiny.file_config()
        return ModelConfig(family=name, path=str(tiny)), ModelConfig(family=name, path=str(single_file_path(tiny)))
    return configs


@pytest.fixture(scope="session")
def tiny_components(tiny_model_configs):
    """``(name, 0 | 1) -> Components`` of a family's tiny model loaded from its folder (0) or its file(s) (1),
    loaded once per session; tests that change a model (adapters, training) load their own."""
    from trainer.families import get_family

    loaded = {}

    def components(name: str, source: int):
        if (name, source) not in loaded:
            loaded[name, source] = get_family(name).load(tiny_model_configs(name)[source])
        return loaded[name, source]
    return components


@pytest.fixture(scope="module")
def folder_comps(request, tiny_components):
    """The tiny model of the test module's ``FAMILY``, loaded from its diffusers folder (shared, do not change it)."""
    return tiny_components(request.module.FAMILY.name, 0)


@pytest.fixture(scope="module")
def file_comps(request, tiny_components):
    """The tiny model of the test module's ``FAMILY``, loaded from its ComfyUI file(s) (shared, do not change it)."""
    return tiny_components(request.module.FAMILY.name, 1)


@pytest.fixture(scope="session")
def demo_dataset() -> Path:
    return ROOT / "trainer" / "demo_data"


@pytest.fixture(scope="module")
def run_config_defaults() -> dict:
    """Config sections a test module's short runs start from: a module overrides this fixture to change the base
    of :func:`make_config` (e.g. one epoch, no validation split) for all of its runs."""
    return {}


@pytest.fixture(scope="module")
def make_config(run_config_defaults):
    """``make_config(model_dir, data, out, **sections)``: :func:`run_helpers.short_run_config` on top of the module's
    :func:`run_config_defaults`."""
    from functools import partial

    from run_helpers import short_run_config

    return partial(short_run_config, defaults=run_config_defaults)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI's runtime modules stubbed (tests/comfy_stubs.py) under a fresh ``ComfyUI`` folder, for one test
    module (restored after it)."""
    import comfy_stubs

    stub, restore = comfy_stubs.install(tmp_path_factory.mktemp("comfyui") / "ComfyUI")
    yield stub
    restore()


@pytest.fixture(scope="module")
def nodes(comfy) -> dict:
    """The pack's NODE_CLASS_MAPPINGS, loaded as ComfyUI loads it, against :func:`comfy` (a module may define its own
    ``comfy``/``nodes``, e.g. with extra folders; pytest then uses those)."""
    import comfy_stubs

    return comfy_stubs.load_pack().NODE_CLASS_MAPPINGS
