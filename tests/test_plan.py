"""The step plan: counting rules, save/sample points, and agreement with DataSource.epoch_batches."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer.config import DatasetConfig, TrainConfig
from trainer.dataset import DataSource
from trainer.errors import DatasetError
from trainer.plan import compute_plan, plan_from_counts


def config(training=None, save=None, sample=None, optim=None) -> TrainConfig:
    return TrainConfig.from_dict({"training": training or {}, "save": save or {}, "sample": sample or {},
                                  "optim": optim or {}})


SEED_RECIPE = {(512, 512): 476 * 10}


def test_seed_recipe_numbers():
    keep = plan_from_counts(SEED_RECIPE, config({"batch_size": 6, "epochs": 10}))
    assert (keep.samples_per_epoch, keep.batches_per_epoch, keep.steps_per_epoch) == (4760, 794, 794)
    assert keep.total_steps == 7940 and keep.epochs == 10
    drop = plan_from_counts(SEED_RECIPE, config({"batch_size": 6, "epochs": 10, "drop_last": True}))
    assert drop.steps_per_epoch == 793 and drop.total_steps == 7930


def test_partial_batches_are_counted_per_bucket():
    counts = {(512, 512): 10, (640, 384): 7, (384, 640): 1}
    assert plan_from_counts(counts, config({"batch_size": 4})).batches_per_epoch == 3 + 2 + 1
    dropped = plan_from_counts(counts, config({"batch_size": 4, "drop_last": True}))
    assert dropped.batches_per_epoch == 2 + 1 + 0
    assert "leaves out 6 sample(s)" in dropped.format()  # 10 % 4 + 7 % 4 + 1


def test_gradient_accumulation_rounds_up_per_epoch():
    plan = plan_from_counts(SEED_RECIPE, config({"batch_size": 6, "gradient_accumulation_steps": 4, "epochs": 2}))
    assert plan.steps_per_epoch == 199 and plan.total_steps == 398
    assert plan.micro_batches_in_step(1) == 4
    assert plan.micro_batches_in_step(199) == 794 - 198 * 4 == 2
    assert plan.micro_batches_in_step(200) == 4  # a new epoch starts a fresh group


def test_max_train_steps_sets_epochs():
    plan = plan_from_counts(SEED_RECIPE, config({"batch_size": 6, "epochs": 99, "max_train_steps": 1000}))
    assert plan.total_steps == 1000 and plan.epochs == 2
    assert plan.epoch_of(794) == 1 and plan.epoch_of(795) == 2 and plan.epoch_of(1000) == 2
    assert plan.is_epoch_end(794) and not plan.is_epoch_end(1000)
    short = plan_from_counts(SEED_RECIPE, config({"batch_size": 6, "max_train_steps": 50}))
    assert (short.epochs, short.total_steps) == (1, 50)


def test_warmup():
    def warmup(**optim):
        return plan_from_counts({(64, 64): 100}, config({"epochs": 1}, optim=optim)).warmup_steps

    assert warmup(lr_warmup_steps=10) == 10
    assert warmup(lr_warmup_steps=10, lr_warmup_ratio=0.29) == 29  # ratio wins; no float truncation to 28
    assert warmup(lr_warmup_ratio=0.055) == 5
    assert warmup(lr_warmup_steps=5000) == 100  # capped to the total


def test_save_points_epochs_steps_and_last():
    plan = plan_from_counts({(64, 64): 10}, config({"epochs": 5, "batch_size": 2},
                                                   save={"save_every_n_epochs": 2, "save_every_n_steps": 7}))
    # 5 steps per epoch, 25 in all: epoch ends 10 and 20, every 7th step, and the last step
    assert plan.save_points == ((7, 2), (10, 2), (14, 3), (20, 4), (21, 5), (25, 5))
    assert [s for s in range(1, 26) if plan.is_save_step(s)] == [s for s, _ in plan.save_points]
    off = plan_from_counts({(64, 64): 10}, config({"epochs": 3, "batch_size": 2},
                                                  save={"save_every_n_epochs": 0, "save_last": False}))
    assert off.save_points == () and "nothing will be saved" in off.format()


def test_save_last_not_duplicated_and_partial_epoch_not_an_epoch_end():
    plan = plan_from_counts({(64, 64): 10}, config({"epochs": 2, "batch_size": 2}))
    assert plan.save_points == ((5, 1), (10, 2))
    cut = plan_from_counts({(64, 64): 10}, config({"max_train_steps": 12, "batch_size": 2},
                                                  save={"save_every_n_epochs": 1}))
    assert cut.save_points == ((5, 1), (10, 2), (12, 3))


def test_sample_points():
    plan = plan_from_counts({(64, 64): 10}, config({"epochs": 4, "batch_size": 2},
                                                   sample={"sample_every_n_epochs": 2, "sample_every_n_steps": 3}))
    expected = [s for s in range(1, 21) if s % 3 == 0 or s in (10, 20)]
    assert [s for s, _ in plan.sample_points] == expected
    assert all(plan.is_sample_step(s) == (s in expected) for s in range(1, 21))
    none = plan_from_counts({(64, 64): 10}, config({"epochs": 4, "batch_size": 2}))
    assert none.sample_points == () and not any(none.is_sample_step(s) for s in range(1, 21))


def test_step_bounds_are_checked():
    plan = plan_from_counts({(64, 64): 10}, config({"epochs": 1, "batch_size": 2}))
    for bad in (0, 6):
        with pytest.raises(ValueError, match="outside the plan"):
            plan.is_save_step(bad)


def test_no_full_batch_is_an_error():
    with pytest.raises(DatasetError, match="batch_size=8"):
        plan_from_counts({(64, 64): 5, (64, 128): 7}, config({"batch_size": 8, "drop_last": True}))
    with pytest.raises(DatasetError, match="no samples"):
        plan_from_counts({}, config())


def test_to_dict_and_format():
    plan = plan_from_counts({(512, 512): 40, (640, 384): 3}, config({"batch_size": 4, "epochs": 2},
                                                                    optim={"lr_warmup_ratio": 0.1}))
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["bucket_counts"] == {"512x512": 40, "640x384": 3}
    assert data["total_steps"] == 22 and data["warmup_steps"] == 2
    assert data["save_points"] == [[11, 1], [22, 2]]
    text = plan.format()
    for needle in ("43 samples per epoch", "11 batches per epoch", "11 optimizer steps per epoch x 2 epoch(s) = 22",
                   "warmup: 2", "11 (epoch 1), 22 (epoch 2)"):
        assert needle in text


@given(st.dictionaries(st.tuples(st.sampled_from([256, 320, 512]), st.sampled_from([256, 384, 512])),
                       st.integers(1, 60), min_size=1, max_size=5),
       st.integers(1, 9), st.integers(1, 5), st.booleans(), st.integers(1, 4))
@settings(max_examples=150, deadline=None)
def test_property_micro_batches_add_up(counts, batch_size, accum, drop_last, epochs):
    cfg = config({"batch_size": batch_size, "gradient_accumulation_steps": accum, "drop_last": drop_last,
                  "epochs": epochs})
    try:
        plan = plan_from_counts(counts, cfg)
    except DatasetError:
        assert drop_last and all(n < batch_size for n in counts.values())
        return
    per_epoch = [plan.micro_batches_in_step(s) for s in range(1, plan.steps_per_epoch + 1)]
    assert sum(per_epoch) == plan.batches_per_epoch and all(1 <= m <= accum for m in per_epoch)
    assert plan.total_steps == epochs * plan.steps_per_epoch
    assert plan.save_points[-1] == (plan.total_steps, epochs)
    assert plan.steps_per_epoch == math.ceil(plan.batches_per_epoch / accum)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan") / "data"
    sizes = {"7_wide": (96, 48), "3_tall": (48, 96), "5_square": (64, 64)}
    counts = {"7_wide": 3, "3_tall": 4, "5_square": 2}
    for folder, size in sizes.items():
        (root / folder).mkdir(parents=True)
        for i in range(counts[folder]):
            Image.new("RGB", size).save(root / folder / f"{i}.png")
    cfg = DatasetConfig(path=str(root), resolution=128, crop_aspect="preserve", min_bucket_reso=64,
                        max_bucket_reso=256, bucket_reso_steps=32)
    return DataSource([cfg], seed=11)


@pytest.mark.parametrize("batch_size", [1, 2, 4, 5, 6, 32])
@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_agrees_with_epoch_batches(source, batch_size, drop_last):
    cfg = config({"batch_size": batch_size, "drop_last": drop_last, "epochs": 3})
    try:
        plan = compute_plan(cfg, source)
    except DatasetError:
        assert drop_last and not source.epoch_batches(1, batch_size, drop_last)
        return
    assert plan.samples_per_epoch == source.samples_per_epoch == 7 * 3 + 3 * 4 + 5 * 2
    for epoch in (1, 2, 3):
        assert len(source.epoch_batches(epoch, batch_size, drop_last)) == plan.batches_per_epoch
