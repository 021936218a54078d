"""Issue 15: the same knob means what kohya sd-scripts / SimpleTuner users know, and nothing is a silent no-op."""
from __future__ import annotations

import pytest
import torch

from trainer.config import OptimConfig, TrainConfig
from trainer.plan import plan_from_counts


def _sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


# --- warmup: one value, computed once --------------------------------------------------------------------------------

def test_warmup_shown_in_the_plan_is_the_warmup_applied():
    from trainer.optim import build_scheduler

    cfg = TrainConfig.from_dict({"training": {"epochs": 1}, "optim": {"lr_warmup_ratio": 0.055,
                                                                     "lr_scheduler": "constant_with_warmup"}})
    plan = plan_from_counts({(64, 64): 100}, cfg)
    assert plan.warmup_steps == 5  # ⌊0.055 × 100⌋, as kohya's int(ratio × total)
    lrs = _lrs(build_scheduler(_sgd(), cfg.optim, plan.total_steps), 8)
    assert lrs[plan.warmup_steps] == pytest.approx(1.0) and lrs[plan.warmup_steps - 1] < 1.0


def test_constant_with_warmup_is_not_shown_but_ignored():
    from trainer.optim import build_scheduler

    cfg = TrainConfig.from_dict({"training": {"epochs": 1}, "optim": {"lr_warmup_steps": 4, "lr_scheduler": "constant"}})
    plan = plan_from_counts({(64, 64): 20}, cfg)
    lrs = _lrs(build_scheduler(_sgd(), cfg.optim, plan.total_steps), 6)
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.5) and lrs[4] == pytest.approx(1.0)
    assert "constant_with_warmup" in plan.format()
    no_warmup = TrainConfig.from_dict({"optim": {"lr_scheduler": "constant"}})
    assert "constant_with_warmup" not in plan_from_counts({(64, 64): 20}, no_warmup).format()
