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
def demo_dataset() -> Path:
    return ROOT / "trainer" / "demo_data"
