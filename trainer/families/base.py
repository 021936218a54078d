"""The model-family contract.

A family (SD1.5, SDXL, SD3, Flux) is one module implementing :class:`ModelFamily`. The training loop, the sampler and
the exporter only talk to this interface, so none of them ever branches on the family: what they need to know about a
family (LoRA key styles and targets, export metadata names, single-file layout and detection, VAE factors, pipeline
class, full-size architecture) is a class attribute here, and the registry (:mod:`trainer.families`) is the only
list of families (``tests/test_family_facts.py`` enforces both). A new family is one file plus one subclass of the
shared contract test (``tests/test_family_contract.py``).

Conventions
-----------
* Images enter as float tensors ``[B, 3, H, W]`` in ``[-1, 1]``.
* ``encode_images`` returns latents already scaled (and shifted) the way the denoiser expects them.
* ``encode_text`` returns a :class:`Conditioning` – a dict of tensors the family's ``predict`` understands
  (e.g. ``encoder_hidden_states``; SDXL adds ``text_embeds``/``time_ids``; Flux adds pooled CLIP and ids). The loop
  adds ``image_geometry`` ``[B, 4]`` (original h, w, crop top, left of each image); families that condition on it
  (SDXL) use it, the others ignore it.
* ``predict`` returns the raw model output (epsilon, v or flow velocity, as the objective expects) in latent shape.
* Components are named the way diffusers names them in a pipeline folder: ``unet`` or ``transformer``,
  ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``, ``vae``.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from ..config import ModelConfig

Conditioning = dict  # str -> torch.Tensor


@dataclass(frozen=True)
class EncoderSpec:
    """One text encoder of a family: its pipeline component name, kind, and whether the family can do without it."""

    component: str  # text_encoder | text_encoder_2 | text_encoder_3
    kind: str  # clip_l | clip_g | t5xxl
    required: bool = True

    @property
    def tokenizer_subfolder(self) -> str:
        return self.component.replace("text_encoder", "tokenizer")


@dataclass(frozen=True)
class PartDtypes:
    """The dtype each part of a model is read into (``None``: float32 for quantized or converted weights, as stored
    otherwise). A run reads every part straight into the dtype it trains or computes in, so no part is ever built
    in a wider dtype first: SD3's T5-XXL read as float32 and cast after would hold 17.7 GiB instead of 8.9.
    :meth:`ModelFamily.load` takes one of these or a single dtype for every part (:meth:`of`)."""

    denoiser: "torch.dtype | None" = None
    text_encoders: "torch.dtype | None" = None
    vae: "torch.dtype | None" = None

    @classmethod
    def of(cls, dtype: "torch.dtype | PartDtypes | None") -> "PartDtypes":
        return dtype if isinstance(dtype, PartDtypes) else cls(dtype, dtype, dtype)


@dataclass
class Components:
    """Loaded model parts. ``denoiser_name`` is ``"unet"`` or ``"transformer"``."""

    denoiser: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any  # training scheduler (DDPMScheduler / FlowMatchEulerDiscreteScheduler)
    denoiser_name: str = "unet"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    source: str = ""  # where it was loaded from (for metadata)
    extras: dict[str, Any] = field(default_factory=dict)

    def modules(self) -> dict[str, Any]:
        """Trainable modules by component name (denoiser and text encoders)."""
        named = {self.denoiser_name: self.denoiser}
        named.update(zip(self.text_encoder_names, self.text_encoders))
        return named

    def to(self, device=None, dtype=None) -> "Components":
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in [self.denoiser, self.vae, *self.text_encoders]:
            if module is not None and kwargs:
                module.to(**kwargs)
        return self


class ModelFamily(ABC):
    """One model family. Instances are stateless; state lives in :class:`Components`.

    The class attributes are the family's facts (as ComfyUI's ``supported_models.py`` describes families as data):
    every module outside ``trainer/families/`` reads them instead of keeping tables keyed by family name.
    """

    name: str = ""
    title: str = ""  # the family's name in messages ("SDXL")
    denoiser_name: str = "unet"  # the denoiser's diffusers component name: unet | transformer
    encoders: tuple[EncoderSpec, ...] = ()  # text encoders, in pipeline order
    # LoRA export: component -> key style (a trainer.lora_keys.KeyStyle; not imported here, as lora_keys reads the
    # family: no cycle) and component -> preset -> peft target_modules
    key_styles: Mapping[str, Any] = {}
    lora_targets: Mapping[str, Mapping[str, tuple[str, ...]]] = {}
    # metadata written into exports (kohya ss_base_model_version, modelspec architecture / implementation)
    base_model_version: str = ""
    modelspec_architecture: str = ""
    modelspec_implementation: str = "diffusers"
    pipeline_class_name: str = ""  # the diffusers pipeline class (model_index.json _class_name)
    pipeline_class_pattern: str = "$^"  # regex (re.search) for the model_index.json classes of this family
    vae_factors: Mapping[str, Any] = {}  # AutoencoderKL config values shapes cannot tell (scaling/shift, size)
    split_file_loading: bool = False  # loads from ComfyUI's split files (diffusion model + text encoders + VAE)
    # full-size architecture (trainer.full_size): (component, builder) with the denoiser first and the VAE last
    full_size_components: tuple[tuple[str, Callable[[], Any]], ...] = ()
    full_size_text_tokens: int = 77  # the full-size denoiser's text sequence length (memory estimate)
    default_prediction: str = "epsilon"  # epsilon | v_prediction | flow
    vae_scale_factor: int = 8
    latent_channels: int = 4
    # The family-dependent settings (trainer.families.settings.FAMILY_SETTINGS) this family applies; a setting not
    # listed is refused at validation or reported in the plan, never silently ignored.
    honoured_settings: frozenset[str] = frozenset()
    # training.gradient_checkpointing "auto" (trainer.defaults) checkpoints when the run's largest training
    # resolution is above this many pixels; 0 = always
    gradient_checkpointing_above_px: int = 0
    # training.cache_latents / cache_text_embeddings "auto" (trainer.defaults): encode once before step 1 and free the
    # encoders (where the datasets allow it): for families whose large text encoder (T5-XXL) is frozen in a LoRA
    caches_by_default: bool = False
    vae_fp32: bool = False  # the VAE overflows in fp16/bf16 and always runs in float32 (kohya no_half_vae)
    # what was applied to the loaded base before training (the MODEL path: LoRAs, ModelSampling* patches upstream of
    # Crucible Train); recorded in run.json's base_patches and the LoRA's crucible_base_patches; empty = nothing
    base_patches: Mapping[str, Any] = {}

    def __init_subclass__(cls, **kwargs):
        """Every family's ``load`` first checks each path it will read against the read policy in force
        (:func:`check_model_paths`), whoever calls it: confinement holds where files are opened."""
        super().__init_subclass__(**kwargs)
        for name in ("load", "load_denoiser"):
            load = cls.__dict__.get(name)
            if load is not None and not getattr(load, "_checks_paths", False):
                def checked_load(self, cfg, *args, __load=load, **kw):
                    check_model_paths(cfg)
                    return __load(self, cfg, *args, **kw)

                checked_load.__doc__, checked_load.__name__, checked_load._checks_paths = load.__doc__, name, True
                setattr(cls, name, checked_load)

    # --- loading ------------------------------------------------------------------------------------------------
    @abstractmethod
    def load(self, cfg: "ModelConfig", device: "torch.device | str" = "cpu",
             dtype: "torch.dtype | PartDtypes | None" = None) -> Components:
        """Load every component from ``cfg.path`` (diffusers folder or single file) without network access, each
        read straight into its dtype (one for all, or :class:`PartDtypes`)."""

    def load_denoiser(self, cfg: "ModelConfig", comps: Components, device: "torch.device | str" = "cpu",
                      dtype: "torch.dtype | PartDtypes | None" = None) -> Any:
        """The denoiser alone, read from the file or folder :meth:`load` read the rest from and built as it builds
        it, in ``dtype`` (its ``denoiser`` field) on ``device``; nothing else is read. A run loads the model with
        the denoiser as shapes only (:func:`~trainer.families.weights.denoiser_shapes_only`: every check and
        config value that needs the denoiser still runs, nothing is read), fills its caches, releases the encoders,
        and only then reads the denoiser with this (SimpleTuner's order), so host memory never holds T5-XXL and a
        12B transformer at once. ``comps``: what :meth:`load` returned."""
        raise NotImplementedError(f"{self.title or self.name} cannot read its denoiser apart from the rest")

    @property
    def reads_denoiser_apart(self) -> bool:
        """Whether this family reads its denoiser apart from the rest (a :meth:`load_denoiser` of its own); a family
        hosting a ComfyUI MODEL is handed its model whole."""
        return type(self).load_denoiser is not ModelFamily.load_denoiser

    @property
    def reloads_encoders(self) -> bool:
        """Whether this family can read its encoders again (a :meth:`load_encoders` of its own)."""
        return type(self).load_encoders is not ModelFamily.load_encoders

    def load_encoders(self, cfg: "ModelConfig", comps: Components, dtype: "torch.dtype | PartDtypes | None" = None
                      ) -> "dict[str, Any] | None":
        """The VAE and text encoders alone, read again from the files :meth:`load` read them from and built as it
        built them, on the CPU: ``{"vae": …, <text encoder component>: …}`` for those in ``comps`` (whose tokenizers
        they use). The run reloads them with this after releasing them from memory (:mod:`trainer.encoder_residency`).
        ``None``: this family cannot, so a run keeps its encoders (a ComfyUI MODEL's CLIP and VAE are ComfyUI's)."""
        return None

    # --- training ------------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_text(self, comps: Components, captions: Sequence[str], clip_skip: int = 1,
                    max_token_length: int = 75, weights=None) -> Conditioning:
        """Tokenize and encode a batch of captions (every tensor batch-first). ``max_token_length`` 150/225 splits
        long captions into 75-token CLIP windows. ``weights``: per caption, its ``(text, weight)`` pieces (kohya
        weighted captions) — scale those tokens' embeddings; ``None`` = unweighted."""

    @abstractmethod
    def encode_images(self, comps: Components, pixels: "torch.Tensor") -> "torch.Tensor":
        """VAE-encode ``[B,3,H,W]`` pixels in [-1,1] into scaled latents (sampled with the VAE's mean here)."""

    @abstractmethod
    def predict(self, comps: Components, noisy_latents: "torch.Tensor", timesteps: "torch.Tensor",
                cond: Conditioning) -> "torch.Tensor":
        """Run the denoiser. ``timesteps`` are the scheduler's timesteps (0..999 or sigma×1000 for flow)."""

    def configure_training(self, comps: Components, training: Any) -> None:
        """Hook called once before training (e.g. Flux stores its guidance value). Default: nothing."""

    def flow_shift(self, comps: Components, latents: "torch.Tensor") -> float | None:
        """Flow families: the family's own σ shift for latents of this size (Flux dev's resolution-dependent
        shift), used when ``training.flow_shift`` is 0 ("auto"). ``None`` = no opinion (shift 1.0)."""
        return None

    # kohya's block layout (trainer.families.kohya_blocks) for block-wise LR/dims; None = not supported.
    block_layout: Any = None
    # The denoiser's attributes holding its blocks, in running order (training.blocks_to_swap; trainer.block_swap).
    swap_block_attributes: tuple[str, ...] = ()

    def swappable_blocks(self, denoiser: Any) -> list[Any]:
        """The denoiser's blocks in the order they run (block swap moves the last N of them)."""
        blocks: list[Any] = []
        for name in self.swap_block_attributes:
            part = getattr(denoiser, name, None)
            if part is not None:
                blocks.extend(part if isinstance(part, (list, tuple)) or type(part).__name__ == "ModuleList"
                              else [part])
        return blocks

    def block_index(self, component: str, module_name: str) -> int | None:
        """The kohya block index of a denoiser module (into ``block_dims``), for block-wise LR/dims."""
        if self.block_layout is None or component != self.denoiser_name:
            return None
        return self.block_layout.index(module_name)

    def lora_target_modules(self, component: str, preset: str) -> list[str]:
        """Module-name suffixes (peft ``target_modules``) for a component and target preset."""
        from ..lora_targets import lora_target_modules

        return lora_target_modules(self, component, preset)

    # --- facts as predicates ------------------------------------------------------------------------------------
    def check_pipeline_index(self, folder) -> None:
        """Refuse a diffusers folder whose ``model_index.json`` names another family's pipeline, naming it."""
        import json

        from ..errors import ModelLoadError
        from . import family_of_pipeline

        index = folder / "model_index.json"
        if index.is_file():
            cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
            other = family_of_pipeline(cls)
            if other and other != self.name:
                raise ModelLoadError(f"model.path '{folder}' holds a {cls}; set model.family to '{other}'")

    def owns_pipeline_class(self, class_name: str) -> bool:
        """Whether a diffusers pipeline class is one of this family's (exclusive across families)."""
        return re.search(self.pipeline_class_pattern, class_name) is not None

    def matches_single_file(self, keys: Iterable[str]) -> bool:
        """Whether a single file's tensor names are this family's layout (exclusive across families)."""
        return False

    def scale_shift_swapped(self, module_name: str, weight_shape: tuple[int, ...]) -> bool:
        """Whether ComfyUI stores this module's weight with its two output halves swapped (``swap_scale_shift``);
        see :func:`trainer.lora_keys.is_scale_shift_swapped`."""
        return False

    def full_size_forward_inputs(self, resolution: int) -> dict[str, Any]:
        """Keyword arguments of one full-size denoiser forward pass at ``resolution`` px (batch 1, random values,
        ``full_size_text_tokens`` text tokens), for the memory estimate's traced forward."""
        raise NotImplementedError(f"{self.name} has no full-size forward inputs")

    # --- sampling ------------------------------------------------------------------------------------------------
    @abstractmethod
    def pipeline(self, comps: Components) -> Any:
        """A diffusers pipeline built from the (possibly LoRA-patched) components."""

    def sample_conditioning(self, comps: Components, prompt: str, negative_prompt: str, cfg: float
                            ) -> "dict[str, torch.Tensor] | None":
        """One preview prompt's embeddings, as the keyword arguments the family's pipeline takes them
        (``prompt_embeds`` …, and the negative prompt's where ``cfg`` uses one), encoded exactly as :meth:`sample`
        encodes the prompt. A run encodes its preview prompts once, before the text encoders leave memory
        (:mod:`trainer.sample_prompts`), and hands them back to :meth:`sample` as ``conditioning`` (kohya
        ``--cache_text_encoder_outputs`` with ``--sample_prompts``). ``None``: this family encodes prompts only while
        it renders, so the run brings its text encoders back for every preview."""
        return None

    def sample(self, comps: Components, prompts: Sequence[str], *, seed: int, steps: int, cfg: float,
               width: int, height: int, negative_prompt: str = "", guidance: float | None = None,
               conditioning: "Sequence[Mapping[str, torch.Tensor]] | None" = None) -> list["Image.Image"]:
        """Render one image per prompt with a fixed seed (``torch.Generator`` on the CPU, so it is portable).
        ``guidance``: a guidance-distilled model's embedded guidance (Flux); None = use ``cfg`` for it. Families
        with classifier-free guidance ignore it. ``conditioning``: per prompt, what :meth:`sample_conditioning`
        returned for it (on the device); the text encoders are then not used, and may be released ones."""
        import torch

        pipe = self.pipeline(comps)
        pipe.set_progress_bar_config(disable=True)
        images = []
        for i, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(seed)
            kwargs = dict(num_inference_steps=steps, guidance_scale=cfg, width=width,
                          height=height, generator=generator, output_type="latent")
            if conditioning is not None:
                kwargs.update(conditioning[i])
            else:
                kwargs["prompt"] = prompt
                if negative_prompt and cfg > 1:
                    kwargs["negative_prompt"] = negative_prompt
            images.extend(self.decode_latents(comps, self.pipeline_latents(pipe(**kwargs).images, height, width)))
        return images

    def pipeline_latents(self, latents: "torch.Tensor", height: int, width: int) -> "torch.Tensor":
        """The pipeline's ``output_type="latent"`` result as the VAE's ``[B, C, h, w]`` latents."""
        return latents

    def decode_latents(self, comps: Components, latents: "torch.Tensor") -> list["Image.Image"]:
        """PIL images from scaled latents (the inverse of :meth:`encode_images`), decoded in the VAE's own dtype,
        outside any autocast: a run's previews render under it, and SDXL's fp32 VAE would otherwise decode in fp16
        and overflow (what kohya's ``no_half_vae`` avoids)."""
        import torch
        from diffusers.image_processor import VaeImageProcessor

        from .weights import unwrap

        vae = unwrap(comps.vae)
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        with torch.autocast(vae.device.type, enabled=False):
            decoded = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor).postprocess(decoded.float(), output_type="pil")

    def latent_cache_identity(self, cfg: "ModelConfig", comps: Components) -> str:
        """What the latent cache's key records about the VAE in use (with its dtype, added by the loop): the model
        files' paths, sizes and modification times, so latents of another model are never reused."""
        from ..cache import model_identity

        return model_identity(cfg.path, cfg.vae_path)

    # --- export ----------------------------------------------------------------------------------------------
    def full_export_state_dict(self, comps: Components) -> dict[str, "torch.Tensor"]:
        """A full fine-tune's checkpoint: the denoiser's diffusers-named state dict, which ComfyUI's Load Diffusion
        Model detects from its shapes (SD1.5/SDXL UNets, SD3/Flux transformers)."""
        return {k: v for k, v in comps.denoiser.state_dict().items()}


def check_model_paths(cfg: "ModelConfig") -> None:
    """Refuse a model config whose model, VAE, text-encoder or tokenizer path lies outside the folders the read
    policy in force allows for models (:class:`trainer.fileio.ReadPolicy`; unrestricted in headless use)."""
    from ..fileio import check_read

    named = [("model.path", cfg.path), ("model.vae_path", cfg.vae_path), ("model.tokenizer_path", cfg.tokenizer_path)]
    named += [(f"model.text_encoder_paths[{i}]", p) for i, p in enumerate(cfg.text_encoder_paths)]
    for what, path in named:
        if path:
            check_read(path, "models", what)
