"""Optimizer and learning-rate scheduler factories, keyed by the names in :data:`trainer.config.OPTIMIZERS` /
:data:`SCHEDULERS` (the same tuples feed the node dropdowns).

Schedulers come from ``diffusers.optimization.get_scheduler``. Optional optimizers are imported lazily; a missing
package raises :class:`~trainer.errors.MissingDependencyError` naming what to ``pip install``.
"""
from __future__ import annotations

import ast
import logging
from typing import Any, Callable

import torch

from .config import OptimConfig
from .errors import ConfigError, CrucibleError, require
from .plan import StepPlan

log = logging.getLogger("crucible")


def parse_optimizer_args(items: tuple[str, ...]) -> dict[str, Any]:
    """``("betas=(0.9,0.99)", "relative_step=True")`` → kwargs (Python literals; bare words stay strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not key.isidentifier():
            raise ConfigError(f"optim.optimizer_args: '{item}' must look like name=value")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            lowered = raw.lower()
            out[key] = {"true": True, "false": False, "none": None}.get(lowered, raw)
    return out


def _adamw(groups, cfg, extra):
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **extra)


def _sgd(groups, cfg, extra):
    extra.setdefault("momentum", 0.9)
    return torch.optim.SGD(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **extra)


def _adamw8bit(groups, cfg, extra):
    if not torch.cuda.is_available():
        raise CrucibleError("optimizer 'adamw8bit' needs a CUDA GPU (bitsandbytes 8-bit states); on this machine "
                            "choose 'adamw' or 'adafactor'")
    bnb = require("bitsandbytes", "bitsandbytes", "the adamw8bit optimizer")
    return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **extra)


def _sgd_nesterov(groups, cfg, extra):
    """kohya SGDNesterov: SGD with Nesterov momentum (momentum 0.9 unless set)."""
    extra.setdefault("momentum", 0.9)
    return torch.optim.SGD(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, nesterov=True, **extra)


def _adafactor(groups, cfg, extra):
    """kohya's Adafactor: ``relative_step`` defaults to True (the optimizer finds its own step size; the learning
    rate only seeds the reported value), ``warmup_init`` True forces ``relative_step``, and ``scale_parameter``
    keeps transformers' default unless set. The usual fixed-LR recipe is ``scale_parameter=False
    relative_step=False warmup_init=False`` in optimizer_args."""
    from transformers.optimization import Adafactor

    extra.setdefault("warmup_init", False)
    relative = bool(extra.pop("relative_step", True)) or bool(extra["warmup_init"])
    lr = None if relative else cfg.learning_rate
    if relative:
        for g in groups:
            g.pop("lr", None)
    return Adafactor(groups, lr=lr, relative_step=relative, weight_decay=cfg.weight_decay, **extra)


def _lion(groups, cfg, extra):
    lion = require("lion_pytorch", "lion-pytorch", "the Lion optimizer")
    return lion.Lion(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **extra)


def _dadapt(class_name: str, experimental: bool = False):
    """A D-Adaptation optimizer, built as kohya does: the package's own defaults, optimizer_args on top."""
    def build(groups, cfg, extra):
        dadaptation = require("dadaptation", "dadaptation", "the DAdaptation optimizers")
        if experimental:
            import dadaptation.experimental as dadaptation  # noqa: F811 - kohya's DAdaptation lives here
        _warn_lr_free(class_name, cfg)
        return getattr(dadaptation, class_name)(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **extra)

    return build


def _prodigy(groups, cfg, extra):
    prodigyopt = require("prodigyopt", "prodigyopt", "the Prodigy optimizer")
    _warn_lr_free("Prodigy", cfg)
    extra.setdefault("safeguard_warmup", True)
    extra.setdefault("use_bias_correction", True)
    return prodigyopt.Prodigy(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **extra)


def _warn_lr_free(name: str, cfg: OptimConfig) -> None:
    if cfg.learning_rate < 0.1:  # kohya's threshold for "learning rate is too low" with adaptive optimizers
        log.warning("%s adapts the step size itself: learning_rate should be about 1.0 (got %g)", name,
                    cfg.learning_rate)


OPTIMIZER_FACTORIES: dict[str, Callable] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "adafactor": _adafactor,
    "lion": _lion,
    "dadaptation": _dadapt("DAdaptAdamPreprint", experimental=True),  # kohya "DAdaptation"
    "dadaptadam": _dadapt("DAdaptAdam"),
    "dadaptadagrad": _dadapt("DAdaptAdaGrad"),
    "dadaptadan": _dadapt("DAdaptAdan"),
    "dadaptadanip": _dadapt("DAdaptAdanIP", experimental=True),
    "dadaptlion": _dadapt("DAdaptLion"),
    "dadaptsgd": _dadapt("DAdaptSGD"),
    "prodigy": _prodigy,
    "sgd": _sgd,
    "sgdnesterov": _sgd_nesterov,
}


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    try:
        factory = OPTIMIZER_FACTORIES[cfg.optimizer]
    except KeyError:
        raise ConfigError(f"optim.optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZER_FACTORIES)}") from None
    extra = parse_optimizer_args(cfg.optimizer_args)
    clean = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    try:
        return factory(clean, cfg, extra)
    except TypeError as exc:  # an unknown optimizer_args key
        raise ConfigError(f"optim.optimizer_args do not fit {cfg.optimizer}: {exc}") from exc


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, plan: StepPlan):
    """``diffusers.optimization.get_scheduler`` for the run's step plan: its total steps, its warmup and the
    scheduler it names (the values the Step Plan shows, computed once in :mod:`trainer.plan`), with cycles and power
    from the config.

    Adafactor with ``relative_step=True`` computes its own step size (its groups have no ``lr``): it gets
    transformers' ``AdafactorSchedule``, which only reports that step size.
    """
    from diffusers.optimization import get_scheduler

    if any(group.get("lr") is None for group in optimizer.param_groups):
        from transformers.optimization import AdafactorSchedule

        if cfg.lr_scheduler != "constant" or plan.warmup_steps:
            log.warning("Adafactor with relative_step=True sets its own learning rate; lr_scheduler %r and warmup "
                        "are ignored", cfg.lr_scheduler)
        return AdafactorSchedule(optimizer, initial_lr=cfg.learning_rate)  # kohya: the learning rate seeds it

    return get_scheduler(plan.lr_scheduler, optimizer=optimizer, num_warmup_steps=plan.warmup_steps,
                         num_training_steps=max(plan.total_steps, 1), num_cycles=cfg.lr_scheduler_num_cycles,
                         power=cfg.lr_scheduler_power)
