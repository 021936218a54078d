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


@pytest.fixture(scope="module")
def run_config_defaults() -> dict:
    """Config sections a test module's short runs start from: a module overrides this fixture to change the base
    of :func:`make_config` (e.g. one epoch, no validation split) for all of its runs."""
    return {}


@pytest.fixture(scope="module")
def make_config(run_config_defaults):
    """``make_config(model_dir, data, out, **sections)``: the config of a short LoRA run on a tiny model over the
    images in ``data`` at 64 px (12 demo images: 3 steps of batch 4 per epoch), fp32 files so reloads compare
    exactly, checkpoints under ``out/loras`` and run files under ``out/runs``. The module's
    :func:`run_config_defaults`, then ``sections``, update the base section by section (``training={"epochs": 1}``
    changes only the epochs)."""
    from trainer.config import TrainConfig

    def make(model_dir: Path, data: Path, out: Path, **sections) -> TrainConfig:
        base = {
            "model": {"family": "sd15", "path": str(model_dir)},
            "datasets": [{"path": str(data), "resolution": 64, "repeats": 1,
                          "captions": {"trigger_word": "crucible", "shuffle_caption": True, "keep_tokens": 1}}],
            "network": {"network_dim": 4, "network_alpha": 4, "target_preset": "attn_mlp"},
            "optim": {"learning_rate": 1e-2, "lr_scheduler": "constant"},
            "training": {"batch_size": 4, "epochs": 8, "seed": 3},
            "save": {"output_dir": str(out / "loras"), "work_dir": str(out / "runs"), "run_name": "t",
                     "save_every_n_epochs": 4, "save_precision": "fp32"},
        }
        for layer in (run_config_defaults, sections):
            for key, value in layer.items():
                base[key] = {**base.get(key, {}), **value}
        return TrainConfig.from_dict(base)

    return make
