"""Validation loss: a held-out set scored at every save on identical inputs, stored with each checkpoint, plotted,
and used by every sweep to label the columns and mark the recommended one."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from trainer.callbacks import Callbacks
from trainer.config import DatasetConfig, TrainConfig
from trainer.dataset import DataSource
from trainer.errors import ConfigError
from trainer.loop import Trainer, train
from trainer.plan import compute_plan
from trainer.render import BEST_MARK, compose_grid, read_layout, save_png
from trainer.sweep import best_index, plan_sweep, read_checkpoint_info, recommendation, select_checkpoints
from trainer.validation import FRACTIONS, MIN_IMAGES_FOR_SPLIT, holdout_items, training_source
from run_helpers import StopAt

RUN = "v"


def config(model: Path, data: Path, out: Path, family: str = "sd15", model_section: dict | None = None,
           **sections) -> TrainConfig:
    base = {
        "model": model_section or {"family": family, "path": str(model)},
        "datasets": [{"path": str(data), "resolution": 64, "repeats": 1,
                      "captions": {"shuffle_caption": True, "caption_tag_dropout_rate": 0.1}}],
        "network": {"network_dim": 4, "network_alpha": 4},
        "optim": {"learning_rate": 1e-2, "lr_scheduler": "constant"},
        "training": {"batch_size": 4, "epochs": 4, "seed": 5, "validation_split": 0.2},
        "save": {"output_dir": str(out / "models"), "work_dir": str(out / "work"), "run_name": RUN,
                 "save_every_n_epochs": 1, "save_precision": "fp32"},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.from_dict(base)


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


def val_losses(result) -> list[float]:
    return [c.val_loss for c in result.checkpoints]


@pytest.fixture(scope="module")
def sd15_run(tiny_sd15, demo_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("val")
    cfg = config(tiny_sd15, demo_dataset, out)
    trainer = Trainer(cfg, Callbacks())
    result = trainer.run(None, False, None)
    return cfg, trainer, result, out


# --- the split ---------------------------------------------------------------------------------------------------
def test_split_is_chosen_by_the_seed_never_trained_and_not_counted_by_the_plan(tiny_sd15, demo_dataset, tmp_path):
    cfg = config(tiny_sd15, demo_dataset, tmp_path)
    source = training_source(cfg)
    held = source.validation_items
    assert len(held) == round(0.2 * 12) == 2
    assert held == training_source(cfg).validation_items  # deterministic
    other = training_source(cfg.replace(training={"seed": 6})).validation_items
    assert other != held  # the seed decides (these two seeds pick different images)
    trained_items = {s.item for b in source.epoch_batches(1, 4) for s in b}
    assert trained_items == set(range(12)) - set(held)
    assert compute_plan(cfg, source).samples_per_epoch == 10
    assert "2 of 12 training images held out" in source.report_text()


def test_split_is_off_for_a_small_dataset_and_says_so(demo_dataset, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for image in sorted(Path(demo_dataset).rglob("*.png"))[: MIN_IMAGES_FOR_SPLIT - 1]:
        shutil.copy(image, small / image.name)
        shutil.copy(image.with_suffix(".txt"), small / image.with_suffix(".txt").name)
    source = DataSource([DatasetConfig(path=str(small), resolution=64)], seed=0, validation_split=0.1)
    assert source.validation_items == () and source.samples_per_epoch == MIN_IMAGES_FOR_SPLIT - 1
    assert f"fewer than {MIN_IMAGES_FOR_SPLIT}" in source.report_text()


def test_regularization_images_are_never_held_out(demo_dataset):
    items = DataSource([DatasetConfig(path=str(demo_dataset))], seed=0).items
    mixed = list(items) + [dataclasses.replace(item, is_reg=True, dataset_index=1) for item in items]
    chosen, _ = holdout_items(mixed, 0.5, 0)
    assert len(chosen) == 6 and all(i < len(items) for i in chosen)
    assert holdout_items([dataclasses.replace(i, is_reg=True) for i in items], 0.5, 0)[0] == ()


def test_validation_split_is_range_checked():
    with pytest.raises(ConfigError, match="training.validation_split"):
        TrainConfig.from_dict({"training": {"validation_split": 0.9}})
    cfg = TrainConfig.from_dict({"validation_datasets": [{"path": "/v"}], "training": {"validation_split": 0.25}})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # strict round trip


# --- the loss -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_validation_loss_falls_and_is_identical_when_recomputed(sd15_run):
    _, trainer, result, _ = sd15_run
    losses = val_losses(result)
    assert len(losses) == 4 and all(v is not None for v in losses)
    assert losses[-1] < losses[0]  # learnable data: the held-out images get easier to denoise
    again = trainer.validator.evaluate()
    assert again.loss == losses[-1]  # the last checkpoint's weights, scored a second time: bit-identical
    assert trainer.validator.evaluate().per_point == result.checkpoints[-1].val_loss_t
    assert list(result.checkpoints[-1].val_loss_t) == [f"{f:.2f}" for f in FRACTIONS]


@pytest.mark.slow
def test_metadata_run_json_and_curve_carry_it(sd15_run):
    _, _, result, out = sd15_run
    manifest = json.loads((out / "work" / RUN / "run.json").read_text())
    for info, entry in zip(result.checkpoints, manifest["checkpoints"]):
        meta = metadata(info.path)
        assert float(meta["crucible_val_loss"]) == pytest.approx(info.val_loss, abs=1e-6)
        assert json.loads(meta["crucible_val_loss_t"]) == pytest.approx(info.val_loss_t, abs=1e-6)
        assert entry["val_loss"] == info.val_loss and entry["val_loss_t"] == info.val_loss_t
        assert read_checkpoint_info(info.path)["val_loss"] == pytest.approx(info.val_loss, abs=1e-6)
    best = min(result.checkpoints, key=lambda c: c.val_loss)
    assert manifest["validation"]["best"] == best.path.name and manifest["validation"]["images"] == 2
    assert (out / "work" / RUN / "loss_curve.png").is_file()
    assert f"saved {best.path}" in best.summary and f"val loss {best.val_loss:.4f}" in best.summary


@pytest.mark.slow
def test_resume_gives_the_same_validation_losses(sd15_run, tmp_path):
    cfg, _, reference, _ = sd15_run
    cfg = config(Path(cfg.model.path), Path(cfg.dataset.path), tmp_path)
    stopped = train(cfg, StopAt(5))
    assert stopped.cancelled
    finished = train(cfg, resume_from=stopped.state_dir)
    by_step = {c.step: c.val_loss for c in finished.checkpoints}
    for c in reference.checkpoints:
        assert by_step[c.step] == c.val_loss, c.step
    assert finished.losses == reference.losses


@pytest.mark.slow
def test_validation_does_not_change_training(tiny_sd15, demo_dataset, tmp_path):
    """A separate validation set (training data unchanged) vs none: the same training losses, bit for bit."""
    val_dir = tmp_path / "valset"
    val_dir.mkdir()
    for image in sorted(Path(demo_dataset).rglob("*.png"))[:2]:
        shutil.copy(image, val_dir / image.name)
        shutil.copy(image.with_suffix(".txt"), val_dir / image.with_suffix(".txt").name)
    short = {"epochs": 2, "seed": 5}
    off = train(config(tiny_sd15, demo_dataset, tmp_path / "off", training={**short, "validation_split": 0.0}))
    on = train(config(tiny_sd15, demo_dataset, tmp_path / "on", training=short,
                      validation_datasets=[{"path": str(val_dir), "resolution": 64}]))
    assert all(v is None for v in val_losses(off)) and all(v is not None for v in val_losses(on))
    assert on.losses == off.losses
    manifest = json.loads((tmp_path / "on" / "work" / RUN / "run.json").read_text())
    assert manifest["validation"]["images"] == 2


@pytest.mark.slow
def test_full_finetune_gets_a_validation_loss(tiny_sd15, demo_dataset, tmp_path):
    cfg = config(tiny_sd15, demo_dataset, tmp_path, network={"network_type": "full"},
                 optim={"learning_rate": 1e-3}, training={"epochs": 2, "seed": 5, "validation_split": 0.2})
    result = train(cfg)
    assert [c.kind for c in result.checkpoints] == ["full", "full"]
    assert all(isinstance(c.val_loss, float) for c in result.checkpoints)
    assert "crucible_val_loss" in metadata(result.checkpoints[-1].path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_families_get_a_falling_validation_loss(demo_dataset, tmp_path, family):
    from tiny_flow import build_tiny_flow_model

    tiny = build_tiny_flow_model(tmp_path / family, family, seed=0)
    model = dataclasses.asdict(tiny.folder_config())
    cfg = config(None, demo_dataset, tmp_path, model_section=model,
                 training={"epochs": 3, "seed": 3, "validation_split": 0.2})
    result = train(cfg)
    losses = val_losses(result)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert set(result.checkpoints[0].val_loss_t) == {"0.25", "0.50", "0.75", "1.00"}


@pytest.mark.slow
def test_sdxl_gets_a_falling_validation_loss(demo_dataset, tmp_path):
    from trainer.tiny import build_tiny_pipeline

    tiny = build_tiny_pipeline(tmp_path / "sdxl", family="sdxl", seed=1)
    result = train(config(tiny, demo_dataset, tmp_path / "run", family="sdxl",
                          training={"epochs": 8, "seed": 3, "validation_split": 0.2},
                          save={"save_every_n_epochs": 4}))
    losses = val_losses(result)
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    assert set(result.checkpoints[0].val_loss_t) == {"0.25", "0.50", "0.75", "1.00"}


# --- labels and the recommendation ----------------------------------------------------------------------------------
def test_sweep_labels_carry_the_validation_loss_and_mark_the_lowest():
    ckpts = [{"path": "/r/a.safetensors", "step": 10, "epoch": 1, "val_loss": 0.30},
             {"path": "/r/b.safetensors", "step": 20, "epoch": 2, "val_loss": 0.21},
             {"path": "/r/c.safetensors", "step": 30, "epoch": 3, "val_loss": 0.25}]
    items = plan_sweep(ckpts, prompts=["p"], seeds=[1], strengths=[1.0])
    labels = {i.column: i.label for i in items}
    assert labels[0] == "base"
    assert labels[1] == "step 10 · ep 1 · val 0.3000"
    assert labels[2] == f"step 20 · ep 2 · val 0.2100 {BEST_MARK}"
    assert BEST_MARK not in labels[3]
    assert recommendation(ckpts) == "recommended: b.safetensors (step 20, lowest validation loss 0.2100)"
    # every_nth keeps the recommended checkpoint even when it would skip it
    assert [c["step"] for c in select_checkpoints(ckpts, every_nth=2)] == [10, 20, 30]
    assert best_index([None, None]) is None
    assert "no validation loss" in recommendation([{"path": "/x", "step": 1}])


def test_grid_highlights_the_best_column(tmp_path):
    from PIL import Image

    cells = [[Image.new("RGB", (64, 64), (40, 40, 40)) for _ in range(3)]]
    labels = ["base", "step 1 · val 0.2", f"step 2 · val 0.1 {BEST_MARK}"]
    composite = compose_grid(cells, col_labels=labels)
    path = save_png(composite, tmp_path / "g.png")
    layout = read_layout(path)
    assert layout["col_labels"][2].endswith(BEST_MARK)
    x0, y0, x1, y1 = layout["cells"][2]["box"]
    image = Image.open(path).convert("RGB")
    highlight = (255, 176, 0)
    assert image.getpixel((x0 - 1, (y0 + y1) // 2)) == highlight  # a frame around the recommended column
    bx0, by0, _, by1 = layout["cells"][1]["box"]
    assert image.getpixel((bx0 - 1, (by0 + by1) // 2)) != highlight
    label_band = image.crop((x0, 0, x1, y0))
    assert highlight in {c for _, c in label_band.getcolors(1 << 16)}  # the label itself is drawn in the colour


def test_comfy_client_reads_the_validation_loss_from_metadata(tmp_path):
    import torch

    from trainer.client import compose_sweep, list_checkpoints
    from trainer.fileio import save_safetensors

    folder = tmp_path / "run"
    for step, val in ((5, "0.400000"), (10, "0.123400"), (15, "0.200000")):
        save_safetensors(folder / f"r-s{step}.safetensors", {"w": torch.zeros(1)},
                         {"crucible_step": str(step), "crucible_val_loss": val})
    ckpts = list_checkpoints(folder)
    assert [c.val_loss for c in ckpts] == [0.4, 0.1234, 0.2]
    from PIL import Image

    composite = compose_sweep(ckpts, [[Image.new("RGB", (32, 32))] for _ in ckpts])
    assert composite.layout["col_labels"] == ["step 5 · val 0.4000", f"step 10 · val 0.1234 {BEST_MARK}",
                                              "step 15 · val 0.2000"]


def test_the_comfyui_stage_check_reads_the_grid_and_the_lora_metadata(tmp_path):
    """tests/comfyui_e2e/checks_validation.py, run on a ComfyUI folder laid out as the stage leaves it."""
    import sys

    import torch
    from PIL import Image

    from trainer.fileio import save_safetensors

    sys.path.insert(0, str(Path(__file__).parent / "comfyui_e2e"))
    from checks_validation import problems_for

    root, pack = tmp_path / "ComfyUI", Path(__file__).resolve().parents[1]
    assert problems_for(root, pack)[0] is None  # nothing ran: a SKIP, not a FAIL
    ckpts = []
    for step, val in ((2, 0.31), (4, 0.27)):
        path = root / "models" / "loras" / "ci_sweep" / f"ci_sweep-s{step}.safetensors"
        save_safetensors(path, {"w": torch.zeros(1)}, {"crucible_step": str(step), "crucible_val_loss": f"{val:.6f}"})
        ckpts.append(read_checkpoint_info(path))
    items = plan_sweep(ckpts, prompts=["p"], seeds=[1], strengths=[1.0])
    cells = [[Image.new("RGB", (32, 32)) for _ in range(3)]]
    grid = root / "output" / "crucible" / "ci_lora_sweep_1.png"
    save_png(compose_grid(cells, col_labels=[i.label for i in items]), grid)
    problems, detail = problems_for(root, pack)
    assert problems == [] and "val 0.2700" in detail
    save_png(compose_grid(cells, col_labels=["base", "step 2", f"step 4 {BEST_MARK}"]), grid)
    problems, _ = problems_for(root, pack)
    assert len(problems) == 2 and "0.3100" in problems[0]
