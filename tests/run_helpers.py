"""Small helpers shared by the training tests."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from trainer.callbacks import Callbacks

# Bases for short_run_config that several modules share (a module picks one through its run_config_defaults).
ONE_EPOCH_EXACT = {  # 3 steps of batch 4 over the 12 demo images; validation off (tests count the batches and model
    # calls of training alone); fp32 compute: exact comparisons
    "training": {"epochs": 1, "validation_split": 0.0, "mixed_precision": "no"}, "save": {"save_every_n_epochs": 0}}
SDXL_BOTH_ENCODERS = {  # SDXL with both text encoders trained; fp32 compute: exact comparisons
    "model": {"family": "sdxl"}, "network": {"train_text_encoder": True},
    "training": {"epochs": 3, "seed": 5, "mixed_precision": "no"}, "save": {"run_name": "xl", "save_every_n_epochs": 0}}


def short_run_config(model_dir: Path, data: Path, out: Path, defaults: Mapping[str, dict] | None = None, **sections):
    """The config of a short LoRA run on a tiny model over the images in ``data`` at 64 px (12 demo images: 3 steps of
    batch 4 per epoch), fp32 files so reloads compare exactly, checkpoints under ``out/loras`` and run files under
    ``out/runs``. ``defaults``, then ``sections``, update the base section by section (``training={"epochs": 1}``
    changes only the epochs). Tests get it as the ``make_config`` fixture (conftest), bound to their module's
    ``run_config_defaults``."""
    from trainer.config import TrainConfig

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
    for layer in (defaults or {}, sections):
        for key, value in layer.items():
            base[key] = {**base.get(key, {}), **value}
    return TrainConfig.from_dict(base)


class StopAt(Callbacks):
    """Presses Cancel after optimizer step ``step`` (what ComfyUI's Cancel button does)."""

    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def on_step(self, info):
        self.seen = info.step

    def should_stop(self):
        return self.seen >= self.step
