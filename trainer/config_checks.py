"""The config's range and consistency checks (:func:`validate`), run by :meth:`TrainConfig.from_dict` and
:meth:`TrainConfig.replace`: each error names the field and what to do. Checks that need files run later, where
the files are read."""
from __future__ import annotations

import math

from .config import (ATTENTION, CROP_ASPECTS, CROP_STYLES, LOSS_WEIGHTING, MISSING_CAPTION, MIXED_PRECISION,
                     NETWORK_TYPES, OPTIMIZERS, PREDICTION_TYPES, SAVE_PRECISION, SCHEDULERS, TARGET_PRESETS,
                     TIMESTEP_SAMPLING, TrainConfig)
from .errors import ConfigError
from .families import known_family_names
from .fileio import caption_suffix


def _check_choice(value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{where}' is {value!r}; choose one of: {', '.join(choices)}")


def _check_range(value: float, where: str, lo: float | None = None, hi: float | None = None) -> None:
    if not math.isfinite(value):  # a dataclass built in code bypasses _coerce's check
        raise ConfigError(f"config key '{where}' is {value}; it must be a finite number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
        raise ConfigError(f"config key '{where}' is {value}; it must be {bounds}")


def validate(cfg: TrainConfig) -> None:
    """Range and consistency checks that need no files; each error names the field."""
    m, n, o, t, s, p = cfg.model, cfg.network, cfg.optim, cfg.training, cfg.save, cfg.sample
    _check_choice(m.family, known_family_names(), "model.family")  # registered + hosted (ComfyUI's MODEL path)
    if m.prediction_type:
        _check_choice(m.prediction_type, PREDICTION_TYPES, "model.prediction_type")
    _check_range(m.clip_skip, "model.clip_skip", 1, 12)
    _check_choice(m.attention, ATTENTION, "model.attention")
    _check_choice(n.network_type, NETWORK_TYPES, "network.network_type")
    _check_choice(n.target_preset, TARGET_PRESETS, "network.target_preset")
    if m.fp8_base and n.network_type == "full":
        raise ConfigError("model.fp8_base stores the frozen base weights in fp8, which a full fine-tune (network_type "
                          "'full') would have to train; turn fp8_base off or train an adapter (lora, loha, lokr)")
    if m.fp8_base and n.network_type == "dora":
        raise ConfigError("model.fp8_base does not work with DoRA (network_type 'dora'), which rebuilds every full base "
                          "weight each step; choose lora, loha or lokr, or turn fp8_base off")
    if n.network_type != "full":
        _check_range(n.network_dim, "network.network_dim", 1, 1024)
        _check_range(n.network_alpha, "network.network_alpha", 0.0)
    if not (n.train_unet or n.train_text_encoder):
        raise ConfigError("network.train_unet and network.train_text_encoder are both off: nothing would train")
    _check_choice(o.optimizer, OPTIMIZERS, "optim.optimizer")
    _check_choice(o.lr_scheduler, SCHEDULERS, "optim.lr_scheduler")
    for name in ("learning_rate", "unet_lr", "text_encoder_lr", "weight_decay", "max_grad_norm"):
        _check_range(getattr(o, name), f"optim.{name}", 0.0)
    if o.learning_rate <= 0 and not (o.unet_lr > 0 or o.text_encoder_lr > 0):
        raise ConfigError("optim.learning_rate must be > 0")
    _check_range(o.lr_warmup_steps, "optim.lr_warmup_steps", 0)
    _check_range(o.lr_warmup_ratio, "optim.lr_warmup_ratio", 0.0, 1.0)
    _check_range(o.lr_scheduler_num_cycles, "optim.lr_scheduler_num_cycles", 1)
    for item in o.optimizer_args:
        if "=" not in item:
            raise ConfigError(f"optim.optimizer_args item '{item}' must look like key=value")
    _check_range(t.batch_size, "training.batch_size", 1, 1024)
    _check_range(t.epochs, "training.epochs", 1, 100000)
    _check_range(t.max_train_steps, "training.max_train_steps", 0)
    _check_range(t.gradient_accumulation_steps, "training.gradient_accumulation_steps", 1, 1024)
    _check_choice(t.mixed_precision, MIXED_PRECISION, "training.mixed_precision")
    _check_range(t.min_snr_gamma, "training.min_snr_gamma", 0.0)
    _check_range(t.noise_offset, "training.noise_offset", 0.0, 1.0)
    _check_range(t.multires_noise_iterations, "training.multires_noise_iterations", 0, 16)
    _check_range(t.multires_noise_discount, "training.multires_noise_discount", 0.0, 1.0)
    _check_choice(t.timestep_sampling, TIMESTEP_SAMPLING, "training.timestep_sampling")
    _check_choice(t.loss_weighting, LOSS_WEIGHTING, "training.loss_weighting")
    _check_range(t.flow_shift, "training.flow_shift", 0.0, 100.0)
    _check_range(t.ema_decay, "training.ema_decay", 0.0, 1.0)
    _check_range(t.caption_variants, "training.caption_variants", 1, 64)
    _check_range(t.validation_split, "training.validation_split", 0.0, 0.5)
    _check_range(t.prior_loss_weight, "training.prior_loss_weight", 0.0, 100.0)
    _check_range(t.t5xxl_max_token_length, "training.t5xxl_max_token_length", 0, 512)
    _check_choice(s.save_precision, SAVE_PRECISION, "save.save_precision")
    _check_range(s.save_every_n_epochs, "save.save_every_n_epochs", 0)
    _check_range(s.save_every_n_steps, "save.save_every_n_steps", 0)
    _check_range(s.checkpoint_limit, "save.checkpoint_limit", 0)
    if not s.run_name.strip():
        raise ConfigError("save.run_name is empty: give the run a name")
    _check_range(p.steps, "sample.steps", 1, 1000)
    _check_range(p.width, "sample.width", 0, 8192)
    _check_range(p.height, "sample.height", 0, 8192)
    _check_range(p.guidance, "sample.guidance", 0.0, 100.0)
    for i, d in [*enumerate(cfg.datasets), *((f"v{j}", v) for j, v in enumerate(cfg.validation_datasets))]:
        w = f"datasets[{i}]" if isinstance(i, int) else f"validation_datasets[{i[1:]}]"
        _check_range(d.resolution, f"{w}.resolution", 64, 8192)
        if d.resolution % 8:
            raise ConfigError(f"config key '{w}.resolution' is {d.resolution}; it must be a multiple of 8")
        _check_range(d.repeats, f"{w}.repeats", 0, 100000)
        _check_choice(d.missing_caption, MISSING_CAPTION, f"{w}.missing_caption")
        caption_suffix(d.caption_extension, f"{w}.caption_extension")
        _check_choice(d.crop_style, CROP_STYLES, f"{w}.crop_style")
        _check_choice(d.crop_aspect, CROP_ASPECTS, f"{w}.crop_aspect")
        _check_range(d.bucket_reso_steps, f"{w}.bucket_reso_steps", 8, 1024)
        if d.min_bucket_reso > d.max_bucket_reso:
            raise ConfigError(f"{w}.min_bucket_reso ({d.min_bucket_reso}) is larger than max_bucket_reso ({d.max_bucket_reso})")
        c = d.captions
        _check_range(c.keep_tokens, f"{w}.captions.keep_tokens", 0)
        _check_range(c.caption_dropout_rate, f"{w}.captions.caption_dropout_rate", 0.0, 1.0)
        _check_range(c.caption_tag_dropout_rate, f"{w}.captions.caption_tag_dropout_rate", 0.0, 1.0)
        if c.max_token_length not in (75, 150, 225):
            raise ConfigError(f"{w}.captions.max_token_length is {c.max_token_length}; choose 75, 150 or 225")
        for item in c.replace_tags:
            if "=" not in item:
                raise ConfigError(f"{w}.captions.replace_tags item '{item}' must look like old=new")
    if t.masked_loss and not any(d.alpha_mask or d.mask_dir.strip() for d in cfg.datasets) and cfg.datasets:
        raise ConfigError("training.masked_loss is on but no dataset has masks: turn on alpha_mask (masks from the "
                          "images' transparency) or set mask_dir on a dataset")
    from .memory_options import check_memory_options

    check_memory_options(cfg)  # blocks_to_swap / fused_backward_pass / full_bf16 combinations
    from .families.settings import check_family_settings

    check_family_settings(cfg)  # settings the family cannot apply: refused here, before any model loads
