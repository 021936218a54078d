"""What SD3 and Flux share: rectified-flow families built from a diffusers transformer, CLIP/T5 text encoders and a
16-channel VAE, loaded from a diffusers folder or from the split files ComfyUI users keep.

Where each part comes from (nothing is ever downloaded):

============================  =====================================================================================
``model.path``                a diffusers pipeline folder, or the transformer ``.safetensors``
                              (``ComfyUI/models/diffusion_models``), in diffusers or in ComfyUI/BFL/SAI naming, with
                              or without ``model.diffusion_model.``. A full ComfyUI checkpoint may also carry the VAE
                              (``first_stage_model.`` / ``vae.``) and text encoders
                              (``text_encoders.clip_l.transformer.`` …); used unless separate files are given.
``model.text_encoder_paths``  text-encoder files (``ComfyUI/models/text_encoders``) in any order: T5 is told from CLIP
                              by its layout, CLIP-G from CLIP-L by its width (then depth). They replace the folder's.
``model.vae_path``            a VAE file (LDM layout as ``ae.safetensors``, or diffusers keys) or a diffusers folder.
tokenizers                    CLIP: :mod:`trainer.families.tokenizers`. T5: :func:`find_t5_tokenizer_dir`.
============================  =====================================================================================

Configs are derived from tensor shapes (:func:`t5_config_from_state`, :func:`clip_config_from_state`, the
families' transformer functions); weights are converted by diffusers' ``single_file_utils`` and the modules built by
:mod:`trainer.families.single_file`'s helpers, so a missing or misshapen tensor becomes a :class:`ModelLoadError`
naming the file.

:class:`FlowFamily` holds the loading, VAE, sampling and export code of both families; :mod:`.sd3` and :mod:`.flux`
add text conditioning, ``predict`` and the transformer layouts.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from abc import abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..errors import ConfigError, ModelLoadError
from . import single_file as sf
from .base import Components, ModelFamily
from .sd15 import _from_pretrained, unwrap, use_tokenizer_eos
from .tokenizers import ENV_TOKENIZER_DIR, find_clip_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from ..config import ModelConfig

DIFFUSION_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")  # SD3 and Flux ComfyUI checkpoints
TEXT_ENCODER_PREFIX = "text_encoders.{kind}.transformer."  # kind: clip_l | clip_g | t5xxl
T5_TOKENIZER_SUBDIR = Path("comfy") / "text_encoders" / "t5_tokenizer"
CLIP_G_MIN_WIDTH = 1024  # a lone CLIP file this wide is CLIP-G (1280), narrower is CLIP-L (768)
_ANCESTOR_LEVELS = 5
KIND_TITLES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}

Source = Any  # a Part (tensors in a file) or a Path (a diffusers model sub-folder)


# --- reading safetensors lazily -----------------------------------------------------------------------------------

class TensorFile:
    """A ``.safetensors`` file: names and shapes from its header at once, tensors only when :meth:`read` asks."""

    def __init__(self, path: str | Path, what: str):
        self.path = sf.check_safetensors_path(path, what)
        self.what = what
        with self._open() as handle:
            self.shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}

    @contextlib.contextmanager
    def _open(self):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as handle:
                yield handle
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{self.what} '{self.path}' is not a readable safetensors file ({exc}); it may be "
                                 "truncated or a renamed pickle. Re-download it or convert it to .safetensors") from exc

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.shapes)

    def read(self, prefix: str = "", exclude: tuple[str, ...] = (), dtype=None) -> dict[str, "torch.Tensor"]:
        """The tensors whose names start with ``prefix`` (removed from the names), skipping ``exclude`` prefixes."""
        # crucible #16 (fp8): tensor by tensor into ``dtype``; ComfyUI fp8 / scaled-fp8 files dequantized
        from ..fp8_files import read_tensors

        with self._open() as handle:
            return read_tensors(handle, self.path, prefix, exclude, dtype)


@dataclass(frozen=True)
class Part:
    """One component's tensors inside a file: those under ``prefix`` (all of them when it is empty)."""

    file: TensorFile
    prefix: str = ""
    exclude: tuple[str, ...] = ()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k[len(self.prefix):]: s for k, s in self.file.shapes.items()
                if k.startswith(self.prefix) and not k.startswith(self.exclude)}

    def read(self, dtype=None) -> dict[str, "torch.Tensor"]:
        return self.file.read(self.prefix, self.exclude, dtype)  # crucible #16: dtype

    def describe(self) -> str:
        return f"{self.file.path}" + (f" ({self.prefix}…)" if self.prefix else "")


def transformer_layout(keys: Iterable[str]) -> tuple[str, str] | None:
    """``(family, naming)`` of a transformer state dict: family ``sd3``/``flux``, naming ``diffusers`` or
    ``original`` (ComfyUI / SAI / BFL), with or without ``model.diffusion_model.``; ``None`` when neither."""
    keys = {k.removeprefix(DIFFUSION_PREFIX) for k in keys}
    if "joint_blocks.0.x_block.attn.qkv.weight" in keys:
        return "sd3", "original"
    if "double_blocks.0.img_attn.qkv.weight" in keys:
        return "flux", "original"
    if "x_embedder.weight" in keys and "transformer_blocks.0.attn.add_q_proj.weight" in keys:
        return "flux", "diffusers"
    if "pos_embed.proj.weight" in keys and "transformer_blocks.0.attn.add_q_proj.weight" in keys:
        return "sd3", "diffusers"
    return None


def encoder_kind(shapes: Mapping[str, tuple]) -> str | None:
    """``"t5xxl"``, ``"clip"`` (Hugging Face layout, with or without ``text_model.``) or ``None``."""
    names = {k.removeprefix("text_model.") for k in shapes}
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in names:
        return "t5xxl"
    if "encoder.layers.0.self_attn.q_proj.weight" in names and "embeddings.token_embedding.weight" in names:
        return "clip"
    return None


def clip_size(shapes: Mapping[str, tuple]) -> tuple[int, int]:
    """(width, layers) of a CLIP text encoder, the order CLIP-L < CLIP-G."""
    names = {k.removeprefix("text_model."): s for k, s in shapes.items()}
    return int(names["embeddings.token_embedding.weight"][1]), sf._count(names, r"encoder\.layers\.(\d+)\.")


# --- text encoders and VAE from tensors ----------------------------------------------------------------------------

def clip_config_from_state(sd: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs of a Hugging Face-layout CLIP text encoder: CLIP-L uses quick-GELU, CLIP-G GELU."""
    config = sf.clip_config_from_ldm(sd, "clip_l")  # the Hugging Face layout branch
    if kind == "clip_g":
        config["hidden_act"] = "gelu"
    if "text_projection.weight" in sd:
        config["projection_dim"] = int(sd["text_projection.weight"].shape[0])
    return config


def t5_config_from_state(sd: Mapping[str, Any]) -> dict[str, Any]:
    """``T5Config`` kwargs of a T5 encoder (T5 v1.1 / XXL: gated GELU) from its tensor shapes."""
    attn = "encoder.block.0.layer.0.SelfAttention."
    vocab, d_model = sd["shared.weight"].shape
    buckets, heads = sd[attn + "relative_attention_bias.weight"].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    return {"vocab_size": int(vocab), "d_model": int(d_model),
            "d_kv": int(sd[attn + "q.weight"].shape[0]) // int(heads),
            "d_ff": int(sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"].shape[1]),
            "num_layers": sf._count(sd, r"encoder\.block\.(\d+)\."), "num_heads": int(heads),
            "relative_attention_num_buckets": int(buckets), "feed_forward_proj": "gated-gelu" if gated else "relu",
            "is_encoder_decoder": False, "use_cache": False}


def load_clip(part: Part, kind: str, dtype=None, *, projection: bool, identity_projection: bool = False):
    """A CLIP text encoder from a file: ``CLIPTextModelWithProjection`` when ``projection`` (with an identity
    projection when ``identity_projection`` or when the file has none), else ``CLIPTextModel``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = part.read(dtype)  # crucible #16: dtype
    title = f"{KIND_TITLES[kind]} text encoder"
    config = sf._derive(title, part.describe(), clip_config_from_state, sd, kind)
    if projection and (identity_projection or "text_projection.weight" not in sd):
        sd["text_projection.weight"] = torch.eye(config["hidden_size"])
        config["projection_dim"] = config["hidden_size"]
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return sf._materialize(lambda: cls(CLIPTextConfig(**config)), sd, title, part.describe(), dtype)


def load_t5(part: Part, dtype=None):
    """A ``T5EncoderModel`` from a file (``shared.weight`` and ``encoder.embed_tokens.weight`` are one tensor)."""
    from transformers import T5Config, T5EncoderModel

    sd = part.read(dtype)  # crucible #16: fp8 / scaled-fp8 T5 files are dequantized by the reader
    sd = {k: v for k, v in sd.items() if k == "shared.weight" or k.startswith("encoder.")}
    embed = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    if embed is not None:
        sd.setdefault("shared.weight", embed)
        sd.setdefault("encoder.embed_tokens.weight", embed)
    config = sf._derive("T5 text encoder", part.describe(), t5_config_from_state, sd)
    model = sf._materialize(lambda: T5EncoderModel(T5Config(**config)), sd, "T5 text encoder", part.describe(), dtype)
    model.tie_weights()
    return model


def load_vae(part: Part, factors: Mapping[str, Any], dtype=None):
    """A 16-channel ``AutoencoderKL`` from LDM-layout (``ae.safetensors``) or diffusers-layout tensors."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = part.read(dtype)  # crucible #16: dtype
    ldm = sf.vae_to_ldm(sd) if any(k.startswith("encoder.down_blocks.") for k in sd) else sd
    # vae_config_from_ldm's family only picks sample size and scaling factor, both replaced by ``factors``
    config = {**sf._derive("VAE", part.describe(), sf.vae_config_from_ldm, ldm, "sdxl"), **factors}
    if config["latent_channels"] != 16:
        raise ModelLoadError(f"the VAE '{part.describe()}' has {config['latent_channels']} latent channels; SD3 and "
                             "Flux use a 16-channel VAE (SD3: the one in the checkpoint, Flux: ae.safetensors)")
    weights = convert_ldm_vae_checkpoint(ldm, config)
    return sf._materialize(lambda: AutoencoderKL(**config), weights, "VAE", part.describe(), dtype)


# --- T5 tokenizer --------------------------------------------------------------------------------------------------

def is_t5_tokenizer_dir(folder: Path) -> bool:
    """A folder a T5 tokenizer loads from: ``spiece.model``, or ``tokenizer.json`` whose config names a T5 class."""
    if not folder.is_dir():
        return False
    if (folder / "spiece.model").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if not ((folder / "tokenizer.json").is_file() and config.is_file()):
        return False
    with contextlib.suppress(OSError, ValueError):
        return str(json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class", "")).startswith("T5")
    return False


def t5_tokenizer_candidates(cfg: "ModelConfig", subfolder: str, beside: Sequence[str | Path] = ()) -> list[Path]:
    """Every folder :func:`find_t5_tokenizer_dir` tries, in order.

    1. ``model.tokenizer_path``: its ``subfolder`` (``tokenizer_3`` SD3 / ``tokenizer_2`` Flux), ``t5_tokenizer/``,
       ``comfy/text_encoders/t5_tokenizer/``, the folder itself;
    2. a diffusers model folder's ``subfolder``;
    3. beside the model file and the T5 file (``beside``): ``<stem>_tokenizer/`` and ``t5_tokenizer/``;
    4. ``$CRUCIBLE_COMFY_TOKENIZER_DIR`` (a ComfyUI root or a tokenizer folder);
    5. ``comfy/text_encoders/t5_tokenizer`` under a ComfyUI root: the folders above the model and T5 files, the
       working directory and every ``sys.path`` entry (ComfyUI puts its root there).
    """
    found: list[Path] = []
    if cfg.tokenizer_path:
        given = Path(cfg.tokenizer_path).expanduser()
        found += [given / subfolder, given / "t5_tokenizer", given / T5_TOKENIZER_SUBDIR, given]
    model = Path(cfg.path).expanduser() if cfg.path else None
    files = [Path(p).expanduser() for p in beside]
    if model is not None and model.is_dir():
        found.append(model / subfolder)
    elif model is not None:
        files.insert(0, model)
    for file in files:
        found += [file.parent / f"{file.stem}_tokenizer", file.parent / "t5_tokenizer"]
    env = os.environ.get(ENV_TOKENIZER_DIR, "").strip()
    if env:
        hint = Path(env).expanduser()
        found += [hint, hint / T5_TOKENIZER_SUBDIR, hint.parent / "text_encoders" / "t5_tokenizer"]
    roots: list[Path] = []
    for file in ([model] if model is not None else []) + files:
        roots += list(file.resolve().parents)[:_ANCESTOR_LEVELS]
    roots += [Path.cwd(), *(Path(p) for p in sys.path if p)]
    found += [root / T5_TOKENIZER_SUBDIR for root in roots]
    return list(dict.fromkeys(found))


def find_t5_tokenizer_dir(cfg: "ModelConfig", subfolder: str, beside: Sequence[str | Path] = ()) -> Path:
    """The folder with the T5 tokenizer for ``cfg``'s model (search order: :func:`t5_tokenizer_candidates`)."""
    tried = t5_tokenizer_candidates(cfg, subfolder, beside)
    for folder in tried:
        if is_t5_tokenizer_dir(folder):
            return folder
    raise ModelLoadError(
        f"no T5 tokenizer found for model '{cfg.path}'. Tried: {'; '.join(map(str, tried))}. Provide one: set "
        f"model.tokenizer_path to a folder with tokenizer.json and tokenizer_config.json (ComfyUI ships one in "
        f"ComfyUI/comfy/text_encoders/t5_tokenizer; a diffusers model has {subfolder}/), or set the environment "
        f"variable {ENV_TOKENIZER_DIR} to your ComfyUI folder")


def load_t5_tokenizer(folder: str | Path) -> Any:
    """A fast T5 tokenizer from ``folder`` (pads with ``<pad>`` = 0 and ends with ``</s>`` = 1)."""
    from transformers import T5TokenizerFast

    try:
        return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"the T5 tokenizer in '{folder}' cannot be read ({exc}); replace it with a copy of "
                             "ComfyUI/comfy/text_encoders/t5_tokenizer") from exc


def t5_token_ids(tokenizer, captions: Sequence[str], length: int) -> "torch.Tensor":
    """T5 ids ``[B, length]``: the caption, ``</s>``, then ``<pad>`` up to ``length`` (cut to fit), as ComfyUI pads."""
    return tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                     add_special_tokens=True, return_tensors="pt").input_ids


def encode_t5(encoder, ids: "torch.Tensor") -> "torch.Tensor":
    """T5's last hidden state for ``ids`` (no attention mask: ComfyUI and diffusers attend to the padding too)."""
    return encoder(input_ids=ids.to(unwrap(encoder).device)).last_hidden_state


# --- the family base -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderSpec:
    """One text encoder of a family: its pipeline component name, kind, and whether the family can do without it."""

    component: str  # text_encoder | text_encoder_2 | text_encoder_3
    kind: str  # clip_l | clip_g | t5xxl
    required: bool = True

    @property
    def tokenizer_subfolder(self) -> str:
        return self.component.replace("text_encoder", "tokenizer")


@dataclass
class LoadPlan:
    """Where each component comes from (resolved before any weight is read)."""

    transformer: Source
    layout: str  # diffusers | original
    vae: Source
    encoders: dict[str, Source] = field(default_factory=dict)  # kind -> source (absent: not available)
    scheduler: dict[str, Any] = field(default_factory=dict)  # a diffusers folder's scheduler config
    format: str = "diffusers"  # diffusers | single_file


class FlowFamily(ModelFamily):
    """The shared half of SD3 and Flux (subclasses fill in the class attributes and the abstract hooks)."""

    default_prediction = "flow"
    vae_scale_factor = 8
    latent_channels = 16
    title = ""  # "SD3" / "Flux" in messages
    encoders: tuple[EncoderSpec, ...] = ()
    vae_factors: dict[str, Any] = {}  # AutoencoderKL config values shapes cannot tell (scaling/shift factor)
    t5_length = 256  # T5 tokens per caption (ComfyUI's padding length)

    # hooks ------------------------------------------------------------------------------------------------------
    @abstractmethod
    def transformer_class(self):
        """The diffusers transformer class."""

    @abstractmethod
    def to_diffusers(self, sd: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        """A transformer state dict in ComfyUI/original naming converted to diffusers naming."""

    @abstractmethod
    def transformer_config(self, sd: Mapping[str, "torch.Tensor"]) -> dict[str, Any]:
        """Transformer constructor kwargs from a diffusers-named state dict."""

    @abstractmethod
    def scheduler_config(self, transformer_config: Mapping[str, Any]) -> dict[str, Any]:
        """The ``FlowMatchEulerDiscreteScheduler`` config of a model loaded from files."""

    @abstractmethod
    def text_widths(self, encoders: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
        """``{what: (width the text encoders give, width the transformer takes)}`` for :meth:`check_fit`;
        ``encoders`` maps a kind to its loaded module."""

    def model_extras(self, transformer) -> dict[str, Any]:
        """Config values ``predict``/``encode_text`` need, kept in ``Components.extras`` (the denoiser may be
        DDP-wrapped when they run)."""
        return {}

    def encoder_class(self, kind: str):
        """The transformers class of a text encoder kind."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

        return {"clip_l": CLIPTextModel, "clip_g": CLIPTextModelWithProjection, "t5xxl": T5EncoderModel}[kind]

    def load_clip_file(self, part: Part, kind: str, dtype):
        return load_clip(part, kind, dtype, projection=kind == "clip_g")

    # loading ----------------------------------------------------------------------------------------------------
    def load(self, cfg: "ModelConfig", device: "torch.device | str" = "cpu",
             dtype: "torch.dtype | None" = None) -> Components:
        """Load from a diffusers folder or split files (see the module docstring); never touches the network."""
        if not cfg.path:
            raise ModelLoadError(f"model.path is empty: choose a diffusers {self.title} folder or the {self.title} "
                                 "transformer .safetensors (ComfyUI/models/diffusion_models)")
        if cfg.prediction_type not in ("", "flow"):
            raise ConfigError(f"model.prediction_type '{cfg.prediction_type}' does not apply to {self.title}, a "
                              "flow-matching model; leave it empty or set 'flow'")
        path = Path(cfg.path).expanduser()
        plan = self._folder_plan(path) if path.is_dir() else self._file_plan(path)
        self._apply_overrides(plan, cfg)
        self._check_complete(plan, cfg)
        tokenizers = self._find_tokenizers(cfg, plan)  # cheap: fail before reading gigabytes
        transformer = self._load_transformer(plan, dtype)
        specs = [s for s in self.encoders if s.kind in plan.encoders]
        encoders = [self._load_encoder(plan.encoders[s.kind], s, dtype) for s in specs]
        for spec, encoder, tokenizer in zip(specs, encoders, tokenizers):
            _check_vocab(spec, encoder, tokenizer, path)
            if spec.kind != "t5xxl":
                use_tokenizer_eos(encoder, tokenizer)  # CLIP pools at the tokenizer's EOS
        self.check_fit(transformer, dict(zip((s.kind for s in specs), encoders)), plan)
        vae = self._load_vae(plan.vae, dtype)
        scheduler = make_flow_scheduler(plan.scheduler or self.scheduler_config(transformer.config))
        extras = {"family": self.name, "format": plan.format, "clip_skip": cfg.clip_skip,
                  "t5_length": self.t5_length, **self.model_extras(transformer)}
        comps = Components(denoiser=transformer, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                           noise_scheduler=scheduler, denoiser_name="transformer",
                           text_encoder_names=tuple(s.component for s in specs), source=str(path), extras=extras)
        for module in (comps.denoiser, comps.vae, *comps.text_encoders):
            module.to(device)
        return comps

    def _folder_plan(self, folder: Path) -> LoadPlan:
        if not (folder / "transformer").is_dir():
            raise ModelLoadError(f"model.path '{folder}' is not a diffusers {self.title} folder (no transformer/); "
                                 f"give the folder that holds model_index.json, or the transformer .safetensors file")
        index = folder / "model_index.json"
        if index.is_file():
            cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
            other = _family_of_pipeline(cls)
            if other and other != self.name:
                raise ModelLoadError(f"model.path '{folder}' holds a {cls}; set model.family to '{other}'")
        schedule = folder / "scheduler" / "scheduler_config.json"
        return LoadPlan(transformer=folder / "transformer", layout="diffusers",
                        vae=folder / "vae" if (folder / "vae").is_dir() else None,
                        encoders={s.kind: folder / s.component for s in self.encoders
                                  if (folder / s.component).is_dir()},
                        scheduler=json.loads(schedule.read_text(encoding="utf-8")) if schedule.is_file() else {},
                        format="diffusers")

    def _file_plan(self, path: Path) -> LoadPlan:
        file = TensorFile(path, "model.path")
        found = transformer_layout(file.shapes)
        if found is None:
            other = sf.detect_family(file.shapes)
            hint = f"; it looks like a {other} checkpoint, set model.family to '{other}'" \
                if other in ("sd15", "sdxl") else ""
            raise ModelLoadError(f"model.path '{path}' holds no {self.title} transformer weights{hint}. Give the "
                                 f"{self.title} transformer file (ComfyUI/models/diffusion_models) or a diffusers "
                                 "folder")
        family, layout = found
        if family != self.name:
            raise ModelLoadError(f"model.path '{path}' is a {family} transformer, but model.family is '{self.name}'; "
                                 f"set model.family to '{family}'")
        embedded = [TEXT_ENCODER_PREFIX.format(kind=s.kind) for s in self.encoders] + list(VAE_PREFIXES)
        prefix = DIFFUSION_PREFIX if file.has_prefix(DIFFUSION_PREFIX) else ""
        encoders = {s.kind: Part(file, TEXT_ENCODER_PREFIX.format(kind=s.kind)) for s in self.encoders
                    if file.has_prefix(TEXT_ENCODER_PREFIX.format(kind=s.kind))}
        vae = next((Part(file, p) for p in VAE_PREFIXES if file.has_prefix(p)), None)
        return LoadPlan(transformer=Part(file, prefix, exclude=tuple(embedded) if not prefix else ()), layout=layout,
                        vae=vae, encoders=encoders, format="single_file")

    def _apply_overrides(self, plan: LoadPlan, cfg: "ModelConfig") -> None:
        """``model.text_encoder_paths`` and ``model.vae_path`` replace what the folder or checkpoint holds."""
        plan.encoders.update(self._encoder_files(cfg.text_encoder_paths))
        if cfg.vae_path:
            vae = Path(cfg.vae_path).expanduser()
            if vae.is_dir():
                plan.vae = vae / "vae" if (vae / "vae" / "config.json").is_file() else vae
            else:
                plan.vae = Part(TensorFile(vae, "model.vae_path"))

    def _encoder_files(self, paths: Sequence[str]) -> dict[str, Part]:
        """Sort text-encoder files into this family's kinds (T5 by layout; CLIP-L/G by width, then depth)."""
        wanted = {s.kind for s in self.encoders}
        clip_kinds = [k for k in ("clip_l", "clip_g") if k in wanted]
        found: dict[str, Part] = {}
        clips: list[Part] = []
        for i, raw in enumerate(paths):
            part = Part(TensorFile(raw, f"model.text_encoder_paths[{i}]"))
            kind = encoder_kind(part.shapes())
            if kind is None:
                raise ModelLoadError(f"model.text_encoder_paths[{i}] '{raw}' is not a CLIP or T5 text encoder in "
                                     "Hugging Face layout; give clip_l / clip_g / t5xxl files from "
                                     "ComfyUI/models/text_encoders")
            if kind == "clip":
                clips.append(part)
            else:
                _add_encoder(found, kind, part, self.title, wanted)
        clips.sort(key=lambda p: clip_size(p.shapes()))
        if len(clips) > len(clip_kinds):
            raise ModelLoadError(f"model.text_encoder_paths has {len(clips)} CLIP files but {self.title} uses "
                                 f"{' and '.join(KIND_TITLES[k] for k in clip_kinds)}; remove the extra one")
        if len(clips) == 2 and clip_size(clips[0].shapes()) == clip_size(clips[1].shapes()):
            raise ModelLoadError(f"model.text_encoder_paths: '{clips[0].file.path}' and '{clips[1].file.path}' are "
                                 "CLIP encoders of the same size, so which is CLIP-L and which CLIP-G cannot be told")
        if len(clips) == len(clip_kinds):
            kinds = clip_kinds
        else:  # one CLIP file for a family with two: tell it by its width
            kinds = ["clip_g" if clip_size(p.shapes())[0] >= CLIP_G_MIN_WIDTH else "clip_l" for p in clips]
        for kind, part in zip(kinds, clips):
            _add_encoder(found, kind, part, self.title, wanted)
        return found

    def _check_complete(self, plan: LoadPlan, cfg: "ModelConfig") -> None:
        missing = [KIND_TITLES[s.kind] for s in self.encoders if s.required and s.kind not in plan.encoders]
        if missing:
            raise ModelLoadError(f"{self.title} needs the {' and '.join(missing)} text encoder(s), which '{cfg.path}' "
                                 f"does not contain: set model.text_encoder_paths to {self._encoder_hint()} from "
                                 "ComfyUI/models/text_encoders")
        if plan.vae is None:
            raise ModelLoadError(f"'{cfg.path}' has no VAE: set model.vae_path to the {self.title} VAE "
                                 "(ComfyUI/models/vae, e.g. ae.safetensors for Flux) or a diffusers folder")

    def _encoder_hint(self) -> str:
        names = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}
        return ", ".join(names[s.kind] + ("" if s.required else " (optional)") for s in self.encoders)

    def _find_tokenizers(self, cfg: "ModelConfig", plan: LoadPlan) -> list[Any]:
        tokenizers = []
        for spec in self.encoders:
            source = plan.encoders.get(spec.kind)
            if source is None:
                continue
            if spec.kind == "t5xxl":
                beside = [source.file.path] if isinstance(source, Part) else []
                tokenizers.append(load_t5_tokenizer(find_t5_tokenizer_dir(cfg, spec.tokenizer_subfolder, beside)))
            else:
                tokenizers.append(_find_clip_tokenizer(cfg, spec.kind, source))
        return tokenizers

    def check_fit(self, transformer, encoders: Mapping[str, Any], plan: LoadPlan) -> None:
        """Refuse text encoders whose output widths do not fit the transformer (files of another model)."""
        for what, (given, expected) in self.text_widths({**encoders, "transformer": transformer}).items():
            if given != expected:
                sources = ", ".join(f"'{_describe(plan.encoders[k])}'" for k in encoders)
                raise ModelLoadError(f"the text encoders ({sources}) do not fit the {self.title} transformer: its "
                                     f"{what} is {expected} wide but they give {given}. Use the text encoders that "
                                     f"belong to this model")

    def _load_transformer(self, plan: LoadPlan, dtype):
        source = plan.transformer
        if isinstance(source, Path):
            return _from_pretrained(self.transformer_class(), source.parent, source.name, dtype)
        sd = source.read(dtype)  # crucible #16: dtype
        where = source.describe()
        if plan.layout == "original":
            sd = sf._derive(f"{self.title} transformer", where, self.to_diffusers, sd)
        config = sf._derive(f"{self.title} transformer", where, self.transformer_config, sd)
        cls = self.transformer_class()
        return sf._materialize(lambda: cls(**config), sd, f"{self.title} transformer", where, dtype)

    def _load_encoder(self, source: Source, spec: EncoderSpec, dtype):
        if isinstance(source, Path):
            return _from_pretrained(self.encoder_class(spec.kind), source.parent, source.name, dtype)
        if spec.kind == "t5xxl":
            return load_t5(source, dtype)
        return self.load_clip_file(source, spec.kind, dtype)

    def _load_vae(self, source: Source, dtype):
        from diffusers import AutoencoderKL

        if isinstance(source, Path):
            return _from_pretrained(AutoencoderKL, source.parent, source.name, dtype, what="VAE")
        return load_vae(source, self.vae_factors, dtype)

    # training ---------------------------------------------------------------------------------------------------
    def encode_images(self, comps: Components, pixels: "torch.Tensor",
                      generator: "torch.Generator | None" = None) -> "torch.Tensor":
        """Latents ``(mean − shift_factor) × scaling_factor`` (a sample drawn with ``generator`` when given)."""
        vae = unwrap(comps.vae)
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = dist.sample(generator) if generator is not None else dist.mean
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def flow_shift(self, comps: Components, latents: "torch.Tensor") -> float | None:
        """The family's own σ shift for latents of this size, or ``None`` to use ``training.flow_shift``."""
        return None

    guidance_distilled = False  # Flux: sampling takes an embedded guidance value instead of classifier-free cfg

    def configure_training(self, comps: Components, training) -> None:
        """Take what ``predict`` needs from the :class:`~trainer.config.TrainingConfig`: the T5 token length
        (kohya ``t5xxl_max_token_length``; 0 = the family's ComfyUI padding). Flux adds its guidance."""
        comps.extras["t5_length"] = int(training.t5xxl_max_token_length or self.t5_length)

    def lora_target_modules(self, component: str, preset: str) -> list[str]:
        from ..lora_targets import lora_target_modules

        return lora_target_modules(self.name, component, preset)

    # sampling ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def prompt_kwargs(self, comps: Components, prompt: str, negative_prompt: str, cfg: float) -> dict[str, Any]:
        """Pipeline keyword arguments carrying the prompt embeddings (encoded exactly as in training) and ``cfg``."""

    def pipeline_latents(self, latents: "torch.Tensor", height: int, width: int) -> "torch.Tensor":
        """The pipeline's ``output_type="latent"`` result as ``[B, 16, h, w]`` latents."""
        return latents

    def sample(self, comps: Components, prompts: Sequence[str], *, seed: int, steps: int, cfg: float,
               width: int, height: int, negative_prompt: str = "", guidance: float | None = None) -> list["Image.Image"]:
        """Render one image per prompt with a fixed CPU seed; the VAE decode happens here, in the VAE's dtype."""
        import torch

        if width % 16 or height % 16:
            raise ConfigError(f"sample size {width}x{height}: {self.title} needs width and height that are multiples "
                              "of 16 (sample.width / sample.height or the dataset resolution)")
        pipe = self.pipeline(comps)
        pipe.set_progress_bar_config(disable=True)
        images = []
        with torch.no_grad():
            for prompt in prompts:
                scale = guidance if guidance is not None and self.guidance_distilled else cfg
                kwargs = self.prompt_kwargs(comps, prompt, negative_prompt, scale)
                generator = torch.Generator("cpu").manual_seed(seed)
                latents = pipe(**kwargs, num_inference_steps=steps, width=width, height=height, generator=generator,
                               output_type="latent").images
                images.extend(self.decode_latents(comps, self.pipeline_latents(latents, height, width)))
        return images

    def decode_latents(self, comps: Components, latents: "torch.Tensor") -> list["Image.Image"]:
        """PIL images from scaled latents (the inverse of :meth:`encode_images`)."""
        from diffusers.image_processor import VaeImageProcessor

        vae = unwrap(comps.vae)
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        decoded = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor).postprocess(decoded.float(), output_type="pil")

    def sampling_scheduler(self, comps: Components):
        """A fresh Euler flow-matching scheduler with the model's config (pipelines change their scheduler)."""
        return make_flow_scheduler(dict(comps.noise_scheduler.config))

    # export -----------------------------------------------------------------------------------------------------
    def full_export_state_dict(self, comps: Components) -> dict[str, "torch.Tensor"]:
        """The diffusers transformer state dict: ComfyUI's *Load Diffusion Model* detects SD3 and Flux from it."""
        state = unwrap(comps.denoiser).state_dict()
        if any(".lora_" in k or ".base_layer." in k for k in state):
            raise ModelLoadError("the transformer carries LoRA adapter layers; merge or remove the adapter before "
                                 "exporting the full transformer")
        return dict(state)


def make_flow_scheduler(config: Mapping[str, Any]):
    """``FlowMatchEulerDiscreteScheduler`` from a config (a diffusers folder's, or the family defaults)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(dict(config))


def components_by_name(comps: Components) -> dict[str, tuple[Any, Any]]:
    """``{component name: (text encoder, tokenizer)}``."""
    return {name: (enc, tok) for name, enc, tok in zip(comps.text_encoder_names, comps.text_encoders, comps.tokenizers)}


def _add_encoder(found: dict[str, Part], kind: str, part: Part, title: str, wanted: set[str]) -> None:
    if kind not in wanted:
        raise ModelLoadError(f"'{part.file.path}' is a {KIND_TITLES[kind]} text encoder, which {title} does not use; "
                             "remove it from model.text_encoder_paths")
    if kind in found:
        raise ModelLoadError(f"model.text_encoder_paths has two {KIND_TITLES[kind]} files ('{found[kind].file.path}' "
                             f"and '{part.file.path}'); keep one")
    found[kind] = part


def _find_clip_tokenizer(cfg: "ModelConfig", kind: str, source: Source) -> Any:
    """The CLIP tokenizer searched from the model path, then (unless ``model.tokenizer_path`` is set) from the CLIP
    file's own place: a CLIP in ComfyUI/models/text_encoders finds ComfyUI's tokenizer even when the transformer
    file lies elsewhere."""
    try:
        return find_clip_tokenizer(cfg, kind)
    except ModelLoadError as first:
        if cfg.tokenizer_path or not isinstance(source, Part) or source.file.path == Path(cfg.path).expanduser():
            raise
        try:
            return find_clip_tokenizer(replace(cfg, path=str(source.file.path)), kind)
        except ModelLoadError:
            raise first from None


def _describe(source: Source) -> str:
    return source.describe() if isinstance(source, Part) else str(source)


def _check_vocab(spec: EncoderSpec, encoder, tokenizer, path: Path) -> None:
    vocab = int(encoder.config.vocab_size)
    if len(tokenizer) > vocab:
        raise ModelLoadError(f"the tokenizer found for '{path}' has {len(tokenizer)} tokens but its "
                             f"{KIND_TITLES[spec.kind]} text encoder knows only {vocab}; set model.tokenizer_path to "
                             "the tokenizer that belongs to this model")


def _family_of_pipeline(class_name: str) -> str | None:
    """The family a diffusers pipeline class belongs to (``None`` when unknown)."""
    if "StableDiffusion3" in class_name:
        return "sd3"
    if class_name.startswith("Flux"):
        return "flux"
    if "XL" in class_name:
        return "sdxl"
    if class_name.startswith("StableDiffusion"):
        return "sd15"
    return None


__all__ = ["FlowFamily", "EncoderSpec", "Part", "TensorFile", "LoadPlan", "transformer_layout", "encoder_kind",
           "clip_config_from_state", "t5_config_from_state", "load_clip", "load_t5", "load_vae",
           "find_t5_tokenizer_dir", "load_t5_tokenizer", "t5_token_ids", "encode_t5", "make_flow_scheduler",
           "components_by_name", "is_t5_tokenizer_dir", "t5_tokenizer_candidates"]
