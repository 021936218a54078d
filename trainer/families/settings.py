"""Settings whose effect depends on the model family: each family declares the ones it applies
(:attr:`ModelFamily.honoured_settings`); here the config is checked against that declaration.

A setting a family does not apply is either refused at config validation, before any model loads (where training
would crash or the user relies on it to shape the result), or reported as a note in the step plan (shown by the Step
Plan and Train nodes, ``python -m trainer plan`` and the log), so nothing is silently ignored. Settings that depend on
the prediction type rather than the family (min-SNR for ε/v models; σ sampling, loss weighting and shift for flow
models) are checked against the run's prediction type. Two more combinations that would do nothing silently are
reported here too: masks without ``masked_loss``, and a schedule under Adafactor's ``relative_step``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import TrainConfig

BLOCK_FIELDS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas", "conv_block_dims",
                "conv_block_alphas")


def _block_fields_set(cfg: "TrainConfig") -> list[str]:
    n = cfg.network
    return [name for name in BLOCK_FIELDS if hasattr(n, name)
            and getattr(n, name) not in ((), "", 1.0 if name == "mid_lr_weight" else ())]


@dataclass(frozen=True)
class FamilySetting:
    """A setting some families apply. ``used`` names the fields set in a config (empty = not set)."""

    name: str
    used: Callable[["TrainConfig"], list[str]]
    refuse: bool  # True: a config error; False: a note in the plan
    why: str  # what the family does instead


FAMILY_SETTINGS = (
    FamilySetting("weighted_captions", lambda c: ["datasets[].captions.weighted_captions"]
                  if any(d.captions.weighted_captions for d in c.datasets) else [], True,
                  "its text encoders take no per-token weights; turn weighted_captions off (the weight syntax is "
                  "then stripped from the captions)"),
    FamilySetting("clip_skip", lambda c: ["model.clip_skip"] if c.model.clip_skip != 1 else [], False,
                  "it uses CLIP's pooled output only, so the layer choice changes nothing"),
    FamilySetting("max_token_length", lambda c: ["datasets[].captions.max_token_length"]
                  if any(d.captions.max_token_length != 75 for d in c.datasets) else [], False,
                  "its CLIP reads the first 77 tokens and T5 has its own length"),
    FamilySetting("block_weights", lambda c: [f"network.{f}" for f in _block_fields_set(c)], True,
                  "block-wise learning rates and ranks follow kohya's UNet layout (SD1.5/SDXL only); clear them"),
    FamilySetting("t5xxl_max_token_length", lambda c: ["training.t5xxl_max_token_length"]
                  if c.training.t5xxl_max_token_length else [], False, "it has no T5 text encoder"),
    FamilySetting("guidance_scale", lambda c: ["training.guidance_scale"]
                  if c.training.guidance_scale != 1.0 else [], False,
                  "only Flux has a guidance embedding to feed"),
)


def check_family_settings(cfg: "TrainConfig") -> list[str]:
    """Raise :class:`ConfigError` for a set setting the family cannot apply and refuses; return notes for the
    ones it ignores."""
    from . import get_family

    family = get_family(cfg.model.family)
    notes = []
    for setting in FAMILY_SETTINGS:
        used = setting.used(cfg)
        if not used:
            continue
        if setting.name in family.honoured_settings:
            if setting.name == "block_weights":
                _check_block_counts(cfg, family)
            continue
        message = f"{', '.join(used)} does nothing on {family.name}: {setting.why}"
        if setting.refuse:
            raise ConfigError(f"{message}.")
        notes.append(message)
    if any(d.alpha_mask or d.mask_dir.strip() for d in cfg.datasets) and not cfg.training.masked_loss:
        notes.append("datasets[].alpha_mask / mask_dir give masks, but training.masked_loss is off: the masks are "
                     "not used (turn masked_loss on)")
    return notes + _prediction_notes(cfg, family) + _adafactor_notes(cfg)


def _adafactor_notes(cfg: "TrainConfig") -> list[str]:
    """kohya's Adafactor default (relative_step) finds its own step size: the schedule and warmup do not apply."""
    o = cfg.optim
    if o.optimizer != "adafactor":
        return []
    args = {k.strip(): v.strip().lower() for k, _, v in (a.partition("=") for a in o.optimizer_args)}
    relative = args.get("relative_step", "true") not in ("false", "0", "no") or \
        args.get("warmup_init", "false") in ("true", "1", "yes")
    if relative and (o.lr_scheduler != "constant" or o.lr_warmup_steps or o.lr_warmup_ratio):
        return [f"optimizer adafactor with relative_step (kohya's default) sets its own step size: lr_scheduler "
                f"{o.lr_scheduler!r} and warmup do not apply; for a scheduled learning rate put "
                "relative_step=False scale_parameter=False in optimizer_args"]
    return []


def _check_block_counts(cfg: "TrainConfig", family) -> None:
    """Block-wise lists must match the family's kohya layout (a wrong count names the expected one)."""
    n, layout = cfg.network, family.block_layout
    if layout is None:
        return
    layout.lr_weights(n.down_lr_weight, n.mid_lr_weight, n.up_lr_weight)
    for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        layout.per_block(getattr(n, name), name)


def _prediction_notes(cfg: "TrainConfig", family) -> list[str]:
    t = cfg.training
    prediction = cfg.model.prediction_type or family.default_prediction
    if prediction == "flow":
        return [f"training.min_snr_gamma does nothing on flow models ({family.name}): min-SNR weights ε/v "
                "losses; use training.loss_weighting instead"] if t.min_snr_gamma > 0 else []
    flow_only = [name for name, default in (("timestep_sampling", "uniform"), ("loss_weighting", "none"),
                                            ("flow_shift", 0.0)) if getattr(t, name) != default]
    return [f"training.{', training.'.join(flow_only)} apply to flow models (SD3/Flux) only; {family.name} "
            f"({prediction}) ignores them"] if flow_only else []


__all__ = ["FAMILY_SETTINGS", "FamilySetting", "check_family_settings", "BLOCK_FIELDS"]
