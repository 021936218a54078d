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

Which tensors of a file are which component, and the CLIP encoders and VAE built from them, is
:mod:`.split_files`; T5 is :mod:`.t5_text`; configs are derived from tensor shapes and modules built by
:mod:`.weights`, so a missing or misshapen tensor becomes a :class:`ModelLoadError` naming the file.

This module is :class:`FlowFamily` alone: the loading, VAE, sampling and export code of both families;
:mod:`.sd3` and :mod:`.flux` add text conditioning, ``predict`` and the transformer layouts.
"""
from __future__ import annotations

import json
from abc import abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import ConfigError, ModelLoadError
from . import FAMILY_NAMES
from . import single_file as sf
from .base import Components, EncoderSpec, ModelFamily, PartDtypes
from .clip_text import use_tokenizer_eos
from .split_files import (CLIP_G_MIN_WIDTH, DIFFUSION_PREFIX, KIND_TITLES, TEXT_ENCODER_PREFIX, VAE_PREFIXES, Source,
                          clip_size, encoder_kind, load_clip, load_vae, transformer_layout)
from .t5_text import find_t5_tokenizer_dir, load_t5, load_t5_tokenizer
from .tokenizers import find_clip_tokenizer
from .weights import Part, TensorFile, denoiser_tensors, from_pretrained, load_denoiser, place, unwrap

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from ..config import ModelConfig


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
    denoiser_name = "transformer"
    split_file_loading = True
    t5_length = 256  # T5 tokens per caption (ComfyUI's padding length)
    # naming (diffusers | original) -> tensor names (without model.diffusion_model.) that mark this family's
    # transformer in that naming (exclusive across families: transformer_layout)
    transformer_markers: Mapping[str, tuple[str, ...]] = {}

    def matches_single_file(self, keys) -> bool:
        return transformer_layout(keys) == (self.name, "original")

    def scale_shift_swapped(self, module_name: str, weight_shape: tuple[int, ...]) -> bool:
        """``norm_out.linear`` (diffusers' ``AdaLayerNormContinuous``, ``(scale, shift)`` against ComfyUI's
        ``(shift, scale)``)."""
        return module_name == "norm_out.linear"

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
             dtype: "torch.dtype | PartDtypes | None" = None) -> Components:
        """Load from a diffusers folder or split files (see the module docstring); never touches the network."""
        dtype = PartDtypes.of(dtype)
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
        transformer = self._load_transformer(plan, dtype.denoiser)
        specs = [s for s in self.encoders if s.kind in plan.encoders]
        encoders = [self._load_encoder(plan.encoders[s.kind], s, dtype.text_encoders) for s in specs]
        for spec, encoder, tokenizer in zip(specs, encoders, tokenizers):
            _check_vocab(spec, encoder, tokenizer, path)
            if spec.kind != "t5xxl":
                use_tokenizer_eos(encoder, tokenizer)  # CLIP pools at the tokenizer's EOS
        self.check_fit(transformer, dict(zip((s.kind for s in specs), encoders)), plan)
        vae = self._load_vae(plan.vae, dtype.vae)
        scheduler = make_flow_scheduler(plan.scheduler or self.scheduler_config(transformer.config))
        extras = {"family": self.name, "format": plan.format, "clip_skip": cfg.clip_skip,
                  "t5_length": self.t5_length, **self.model_extras(transformer)}
        comps = Components(denoiser=transformer, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                           noise_scheduler=scheduler, denoiser_name=self.denoiser_name,
                           text_encoder_names=tuple(s.component for s in specs), source=str(path), extras=extras)
        for module in (comps.denoiser, comps.vae, *comps.text_encoders):
            place(module, device)
        return comps

    def load_denoiser(self, cfg: "ModelConfig", comps: Components, device: "torch.device | str" = "cpu",
                      dtype: "torch.dtype | PartDtypes | None" = None) -> Any:
        """The transformer alone, from the folder or file :meth:`load` read it from (see
        :meth:`ModelFamily.load_denoiser`)."""
        transformer = self._load_transformer(self._plan(cfg), PartDtypes.of(dtype).denoiser)
        place(transformer, device)
        return transformer

    def _plan(self, cfg: "ModelConfig") -> LoadPlan:
        """Where each part is read from (``model.path`` and its overrides)."""
        path = Path(cfg.path).expanduser()
        plan = self._folder_plan(path) if path.is_dir() else self._file_plan(path)
        self._apply_overrides(plan, cfg)
        return plan

    def load_encoders(self, cfg: "ModelConfig", comps: Components, dtype=None) -> dict[str, Any]:
        """The VAE and text encoders from the files and folders :meth:`load` read them from (never the
        transformer's weights)."""
        dtype = PartDtypes.of(dtype)
        plan = self._plan(cfg)
        kinds = {s.component: s for s in self.encoders}
        modules = {"vae": self._load_vae(plan.vae, dtype.vae)}
        for name, tokenizer in zip(comps.text_encoder_names, comps.tokenizers):
            spec = kinds[name]
            modules[name] = self._load_encoder(plan.encoders[spec.kind], spec, dtype.text_encoders)
            if spec.kind != "t5xxl":
                use_tokenizer_eos(modules[name], tokenizer)  # as load does: CLIP pools at the tokenizer's EOS
        return modules

    def _folder_plan(self, folder: Path) -> LoadPlan:
        if not (folder / "transformer").is_dir():
            raise ModelLoadError(f"model.path '{folder}' is not a diffusers {self.title} folder (no transformer/); "
                                 f"give the folder that holds model_index.json, or the transformer .safetensors file")
        self.check_pipeline_index(folder)
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
                if other in FAMILY_NAMES else ""
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
            return load_denoiser(self.transformer_class(), source.parent, source.name, dtype)
        sd = denoiser_tensors(source, dtype)  # meta stand-ins on a sharded run's ranks > 0
        where = source.describe()
        if plan.layout == "original":
            sd = sf._derive(f"{self.title} transformer", where, self.to_diffusers, sd)
        config = sf._derive(f"{self.title} transformer", where, self.transformer_config, sd)
        cls = self.transformer_class()
        return sf._materialize(lambda: cls(**config), sd, f"{self.title} transformer", where, dtype)

    def _load_encoder(self, source: Source, spec: EncoderSpec, dtype):
        if isinstance(source, Path):
            return from_pretrained(self.encoder_class(spec.kind), source.parent, source.name, dtype)
        if spec.kind == "t5xxl":
            return load_t5(source, dtype)
        return self.load_clip_file(source, spec.kind, dtype)

    def _load_vae(self, source: Source, dtype):
        from diffusers import AutoencoderKL

        if isinstance(source, Path):
            return from_pretrained(AutoencoderKL, source.parent, source.name, dtype, what="VAE")
        return load_vae(source, self, dtype)

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

    # sampling ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def sample_conditioning(self, comps: Components, prompt: str, negative_prompt: str, cfg: float
                            ) -> dict[str, "torch.Tensor"]:
        """Pipeline keyword arguments carrying the prompt embeddings, encoded exactly as in training (see
        :meth:`ModelFamily.sample_conditioning`)."""

    def sample(self, comps: Components, prompts: Sequence[str], *, seed: int, steps: int, cfg: float,
               width: int, height: int, negative_prompt: str = "", guidance: float | None = None,
               conditioning: "Sequence[Mapping[str, torch.Tensor]] | None" = None) -> list["Image.Image"]:
        """Render one image per prompt with a fixed CPU seed; the VAE decode happens here, in the VAE's dtype
        (:meth:`~trainer.families.base.ModelFamily.decode_latents`).
        ``conditioning``: the prompts encoded already (see :meth:`ModelFamily.sample`)."""
        import torch

        if width % 16 or height % 16:
            raise ConfigError(f"sample size {width}x{height}: {self.title} needs width and height that are multiples "
                              "of 16 (sample.width / sample.height or the dataset resolution)")
        pipe = self.pipeline(comps)
        pipe.set_progress_bar_config(disable=True)
        images = []
        with torch.no_grad():
            scale = guidance if guidance is not None and self.guidance_distilled else cfg
            for i, prompt in enumerate(prompts):
                kwargs = (conditioning[i] if conditioning is not None
                          else self.sample_conditioning(comps, prompt, negative_prompt, cfg))
                generator = torch.Generator("cpu").manual_seed(seed)
                latents = pipe(**kwargs, guidance_scale=scale, num_inference_steps=steps, width=width, height=height,
                               generator=generator, output_type="latent").images
                images.extend(self.decode_latents(comps, self.pipeline_latents(latents, height, width)))
        return images

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


__all__ = ["FlowFamily", "EncoderSpec", "LoadPlan", "make_flow_scheduler", "components_by_name"]
