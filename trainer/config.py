"""The one frozen config tree that describes a run.

``TrainConfig`` is composed of small frozen dataclasses. It is the single source of truth: the ComfyUI nodes, the
CLI (TOML/JSON files plus ``--set key=value``) and the saved run metadata all go through :func:`TrainConfig.from_dict`
and :meth:`TrainConfig.to_dict`. Unknown keys and wrongly typed values are errors that name the field.

Field names follow kohya sd-scripts where one exists (``network_dim``, ``keep_tokens``, ``min_snr_gamma`` …) so
users recognise them; the node widgets use the same names.
"""
from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .families.registry import FAMILY_NAMES

CONFIG_VERSION = 1

# Choice lists: the node dropdowns and the validation below use the same tuples.
FAMILIES = FAMILY_NAMES  # the family registry's names (trainer.families lists them, without importing a family)
NETWORK_TYPES = ("lora", "dora", "loha", "lokr", "full")
TARGET_PRESETS = ("attn", "attn_mlp", "all_linear", "all_linear_conv")
# kohya sd-scripts' optimizer_type names, matched case-insensitively as kohya does ("DAdaptation" is kohya's
# DAdaptAdamPreprint; "sgd" is plain SGD with momentum 0.9).
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "lion", "dadaptation", "dadaptadam", "prodigy", "sgd",
              "dadaptadagrad", "dadaptadan", "dadaptadanip", "dadaptlion", "dadaptsgd", "sgdnesterov")
OPTIMIZER_ALIASES = {"dadaptadampreprint": "dadaptation"}
# Learning-rate-free optimizers: the learning rate multiplies the step size they find; 1.0 is the recommendation.
ADAPTIVE_OPTIMIZERS = ("prodigy", "dadaptation", "dadaptadam", "dadaptadagrad", "dadaptadan", "dadaptadanip",
                       "dadaptlion", "dadaptsgd")
DEFAULT_LEARNING_RATE = 1e-4
ADAPTIVE_LEARNING_RATE = 1.0
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16", "auto")  # auto: see trainer.defaults
SAVE_PRECISION = ("fp32", "fp16", "bf16")
CROP_STYLES = ("center", "random", "corner")
CROP_ASPECTS = ("square", "preserve")
MISSING_CAPTION = ("class_tokens", "empty", "skip")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "sigmoid", "mode")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
ATTENTION = ("sdpa", "xformers")


@dataclass(frozen=True)
class CaptionConfig:
    trigger_word: str = ""  # prepended, never shuffled or dropped ("class token" / SeaArt trigger)
    keep_tokens: int = 0  # kohya keep_tokens: first N tags stay in place
    shuffle_caption: bool = False  # kohya shuffle_caption
    separator: str = ","  # tag separator (kohya caption_separator)
    split_on_period: bool = True  # a sentence-ending period also separates tags, only when shuffle/keep-N/tag dropout need tags
    keep_tokens_separator: str = ""  # kohya keep_tokens_separator, e.g. "|||"
    caption_dropout_rate: float = 0.0  # whole caption replaced by "" (kohya caption_dropout_rate)
    caption_tag_dropout_rate: float = 0.0  # each non-kept tag dropped (kohya caption_tag_dropout_rate)
    caption_dropout_every_n_epochs: int = 0  # kohya: every Nth epoch drops all captions
    remove_tags: tuple[str, ...] = ()  # exact tags removed before anything else (SeaArt "delete tags")
    remove_tags_regex: str = ""  # tags fully matching this regex are removed
    replace_tags: tuple[str, ...] = ()  # "old=new" pairs
    weighted_captions: bool = False  # parse "(tag:1.2)" into per-token weights
    max_token_length: int = 75  # 75 / 150 / 225 (CLIP chunking)


@dataclass(frozen=True)
class DatasetConfig:
    path: str = ""  # root folder; kohya "10_concept" sub-folders set repeats
    resolution: int = 512
    repeats: int = 0  # 0 = from the folder name (default 1)
    caption_extension: str = ".txt"
    missing_caption: str = "class_tokens"
    crop_style: str = "center"
    crop_aspect: str = "square"
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    flip_aug: bool = False
    color_aug: bool = False
    background_color: str = "#ffffff"
    is_reg: bool = False  # regularization images (kohya reg_data_dir)
    alpha_mask: bool = False  # kohya alpha_mask: the image's alpha channel is its loss mask (training.masked_loss)
    mask_dir: str = ""  # same-name mask images (kohya conditioning_data_dir); relative = inside the dataset folder
    captions: CaptionConfig = field(default_factory=CaptionConfig)


@dataclass(frozen=True)
class ModelConfig:
    family: str = "sd15"
    path: str = ""  # diffusers folder or single-file .safetensors checkpoint / transformer file
    vae_path: str = ""  # optional separate VAE file
    text_encoder_paths: tuple[str, ...] = ()  # optional separate text-encoder files (SD3/Flux)
    tokenizer_path: str = ""  # folder with tokenizer files; empty = next to the model or ComfyUI's own
    prediction_type: str = ""  # "" = the family default; epsilon | v_prediction | flow
    zero_terminal_snr: bool = False
    clip_skip: int = 1  # 1 = last layer, 2 = penultimate (kohya clip_skip)
    attention: str = "sdpa"  # sdpa (torch scaled-dot-product, diffusers' default) | xformers (kohya --xformers)
    fp8_base: bool = False  # kohya --fp8_base: frozen denoiser (and T5) Linear weights stored as fp8 (trainer.quantized)


@dataclass(frozen=True)
class NetworkConfig:
    network_type: str = "lora"  # lora | dora | loha | lokr | full (full fine-tune)
    network_dim: int = 16  # LoRA rank
    network_alpha: float = 16.0
    target_preset: str = "attn_mlp"
    train_unet: bool = True
    train_text_encoder: bool = False
    conv_dim: int = 0  # LoCon conv rank, 0 = same as network_dim
    conv_alpha: float = 0.0
    # Block-wise settings in kohya's layout (trainer.families.kohya_blocks): SD1.5 12 IN + MID + 12 OUT, SDXL 9+3+9.
    down_lr_weight: str = ""  # kohya down_lr_weight: 12 (SDXL 9) numbers, or cosine/sine/linear/reverse_linear/zeros[+n]
    mid_lr_weight: float = 1.0  # kohya mid_lr_weight (SDXL: its three middle parts)
    up_lr_weight: str = ""  # kohya up_lr_weight, deep to shallow
    block_dims: tuple[int, ...] = ()  # kohya block_dims: one rank per block (SD1.5 25, SDXL 23 values)
    block_alphas: tuple[float, ...] = ()  # kohya block_alphas (default network_alpha)
    conv_block_dims: tuple[int, ...] = ()  # kohya conv_block_dims: 3x3 convolution ranks per block
    conv_block_alphas: tuple[float, ...] = ()  # kohya conv_block_alphas (default conv_alpha)


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"  # kohya optimizer_type, any case (see OPTIMIZERS)
    learning_rate: float = DEFAULT_LEARNING_RATE  # adaptive optimizers: the untouched default means 1.0
    unet_lr: float = 0.0  # 0 = learning_rate
    text_encoder_lr: float = 0.0  # 0 = learning_rate
    weight_decay: float = 1e-2
    optimizer_args: tuple[str, ...] = ()  # "key=value" extras passed to the optimizer
    max_grad_norm: float = 1.0  # 0 disables clipping
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    lr_warmup_ratio: float = 0.0  # fraction of total steps; overrides lr_warmup_steps when > 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, str):  # kohya names in any case, and kohya's aliases
            name = self.optimizer.strip().lower()
            object.__setattr__(self, "optimizer", OPTIMIZER_ALIASES.get(name, name))
        if self.optimizer in ADAPTIVE_OPTIMIZERS and self.learning_rate == DEFAULT_LEARNING_RATE:
            object.__setattr__(self, "learning_rate", ADAPTIVE_LEARNING_RATE)


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 42
    batch_size: int = 1
    epochs: int = 10
    max_train_steps: int = 0  # > 0 overrides epochs
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"  # bf16 where supported, fp16 + scaler on older GPUs (trainer.defaults)
    gradient_checkpointing: bool | None = None  # None ("auto"): the family default (SDXL, SD3, Flux; SD1.5 > 512 px)
    drop_last: bool = False  # drop a bucket's last partial batch
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    timestep_sampling: str = "uniform"  # flow families
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float = 0.0  # σ shift for flow models; 0 = auto (Flux dev: resolution-dependent, else 1.0)
    loss_weighting: str = "none"
    guidance_scale: float = 1.0  # Flux guidance embedding value during training
    t5xxl_max_token_length: int = 0  # SD3/Flux T5 tokens per caption; 0 = ComfyUI's padding (SD3 77, Flux 256)
    ema: bool = False
    ema_decay: float = 0.999
    cache_latents: bool | None = None  # kohya cache_latents (not with flip/colour/random-crop augmentation); None
    # ("auto"): the family default (SD3, Flux) where the augmentation allows (trainer.defaults)
    cache_latents_to_disk: bool = False  # kohya cache_latents_to_disk: safetensors under <work_dir>/<run>/cache
    cache_text_embeddings: bool | None = None  # kohya cache_text_encoder_outputs, but shuffle/dropout keep working;
    # None ("auto"): the family default (SD3, Flux: T5 never trains), off while a text encoder trains
    caption_variants: int = 4  # text-cache variants per image, so shuffle/dropout keep working
    # after the caches fill, drop the encoders they replace from host memory too (trainer.encoder_residency);
    # previews render from prompts encoded before (trainer.sample_prompts). False: they wait in host memory
    release_encoders: bool = True
    # Held-out validation images (never trained on, chosen by the seed), scored at every save. Applies only when
    # the training images number at least trainer.validation.MIN_IMAGES_FOR_SPLIT and no validation_datasets are
    # given; 0 = no split. See trainer/validation.py.
    validation_split: float = 0.1
    prior_loss_weight: float = 1.0  # kohya prior_loss_weight: loss multiplier of regularization (is_reg) samples
    masked_loss: bool = False  # kohya masked_loss: weight the loss by each image's mask (datasets' alpha_mask/mask_dir)
    blocks_to_swap: int = 0  # kohya blocks_to_swap: denoiser blocks kept in CPU memory, streamed in ahead of use (LoRA)
    fused_backward_pass: bool = False  # kohya fused_backward_pass: step each weight as its gradient arrives
    full_bf16: bool = False  # kohya full_bf16: full fine-tune weights in bf16, updated with stochastic rounding


@dataclass(frozen=True)
class SaveConfig:
    output_dir: str = "output"  # checkpoints go to <output_dir>/<run_name>/
    run_name: str = "crucible-run"
    work_dir: str = ""  # state, samples, config.json, run.json, loss curve: <work_dir>/<run_name>/ ("" = next to checkpoints)
    save_every_n_epochs: int = 1
    save_every_n_steps: int = 0
    save_last: bool = True
    checkpoint_limit: int = 0  # keep at most N checkpoints (oldest pruned, the last one kept); 0 = all
    save_precision: str = "fp16"
    save_state: bool = True  # write resumable training state next to the checkpoints
    single_file_dir: str = ""  # full fine-tunes: also write a whole-model single-file checkpoint to <dir>/<run>/


@dataclass(frozen=True)
class SampleConfig:
    prompts: tuple[str, ...] = ()
    negative_prompt: str = ""
    seed: int = 1234
    steps: int = 20
    cfg: float = 7.0
    width: int = 0  # 0 = the first dataset's resolution
    height: int = 0
    sample_every_n_epochs: int = 0  # with prompts and no cadence at all: one preview per epoch (see trainer.plan)
    sample_every_n_steps: int = 0
    guidance: float = 3.5  # Flux previews: embedded guidance (ComfyUI FluxGuidance, kohya --g); cfg for the others


@dataclass(frozen=True)
class TrainConfig:
    version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: tuple[DatasetConfig, ...] = ()
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    validation_datasets: tuple[DatasetConfig, ...] = ()  # a separate validation set (overrides validation_split)

    # --- (de)serialisation -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        data = migrate(dict(data))
        cfg = _build(cls, data, "")
        from .config_checks import validate  # the checks read these classes: imported when first used

        validate(cfg)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str | Path, overrides: typing.Iterable[str] = ()) -> "TrainConfig":
        """Read a TOML or JSON file, apply ``key.sub=value`` overrides, validate."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".toml":
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python < 3.11
                    import tomli as tomllib  # type: ignore[no-redef]
                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"config file '{path}' is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {exc}") from exc
        for item in overrides:
            data = apply_override(data, item)
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with top-level sections replaced (each value a dataclass or a dict of that section's fields)."""
        updates = {}
        for name, value in changes.items():
            current = getattr(self, name)
            if isinstance(value, Mapping) and is_dataclass(current):
                value = replace(current, **value)
            updates[name] = value
        cfg = replace(self, **updates)
        from .config_checks import validate  # the checks read these classes: imported when first used

        validate(cfg)
        return cfg

    @property
    def dataset(self) -> DatasetConfig:
        """The first dataset (most runs have one)."""
        if not self.datasets:
            raise ConfigError("no dataset configured: set datasets[0].path to a folder of images")
        return self.datasets[0]


# --- helpers -------------------------------------------------------------------------------------------------------

def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Upgrade older config dicts to :data:`CONFIG_VERSION`."""
    version = data.get("version", CONFIG_VERSION)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ConfigError(f"config 'version' {version!r} is newer than this Crucible understands ({CONFIG_VERSION}); update Crucible")
    # Version 1 is the first; later versions add steps here.
    data["version"] = CONFIG_VERSION
    if "dataset" in data and "datasets" not in data:  # convenience: a single dataset section
        data["datasets"] = [data.pop("dataset")]
    network = data.get("network")
    if isinstance(network, dict):  # kohya block LR weights as a list of numbers (TOML/JSON) → the text form
        for key in ("down_lr_weight", "up_lr_weight"):
            if isinstance(network.get(key), (list, tuple)):
                network[key] = ",".join(str(v) for v in network[key])
    return data


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls, data: Any, where: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{where or 'root'}' must be a table/object, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; known keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str):
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.splitlines()) if v] if args[0] is str else \
                [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(value, str) and value.lower() == "auto":  # an optional field's "auto" = unset (TOML has no null)
            return None
        return None if value is None else _coerce(args[0], value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"config key '{where}' must be an integer, got {value!r}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{where}' must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{where}' must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"config key '{where}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"config key '{where}' holds characters that are not valid text (lone surrogates); "
                              "retype it") from None
        return value
    return value


def _to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def apply_override(data: dict[str, Any], item: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` override (value parsed as JSON when possible, else a string).

    ``datasets.0.path=...`` addresses list items by index.
    """
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    data = json.loads(json.dumps(data))  # deep copy of plain data
    node: Any = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            idx = int(part)
            while len(node) <= idx:
                node.append({})
            node = node[idx]
        else:
            node = node.setdefault(part, [] if part in ("datasets", "validation_datasets") else {})
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        while len(node) <= idx:
            node.append({})
        node[idx] = value
    else:
        node[last] = value
    return data


__all__ = [name for name in dir() if name.endswith("Config")] + [
    "CONFIG_VERSION", "apply_override", "FAMILIES", "NETWORK_TYPES", "TARGET_PRESETS", "OPTIMIZERS",
    "OPTIMIZER_ALIASES", "ADAPTIVE_OPTIMIZERS", "DEFAULT_LEARNING_RATE", "ADAPTIVE_LEARNING_RATE",
    "SCHEDULERS", "MIXED_PRECISION", "SAVE_PRECISION", "CROP_STYLES", "CROP_ASPECTS", "MISSING_CAPTION",
    "PREDICTION_TYPES", "TIMESTEP_SAMPLING", "LOSS_WEIGHTING", "ATTENTION",
]
