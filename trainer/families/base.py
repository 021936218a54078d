"""The model-family contract.

A family (SD1.5, SDXL, SD3, Flux) is one module implementing :class:`ModelFamily`. The training loop, the sampler and
the exporter only talk to this interface, so none of them ever branches on the family. A new family is one file
plus its tests.

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

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from ..config import ModelConfig

Conditioning = dict  # str -> torch.Tensor


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
    """One model family. Instances are stateless; state lives in :class:`Components`."""

    name: str = ""
    default_prediction: str = "epsilon"  # epsilon | v_prediction | flow
    vae_scale_factor: int = 8
    latent_channels: int = 4
    # The family-dependent settings (trainer.families.settings.FAMILY_SETTINGS) this family applies; a setting not
    # listed is refused at validation or reported in the plan, never silently ignored.
    honoured_settings: frozenset[str] = frozenset()
    gradient_checkpointing_default: bool = False  # training.gradient_checkpointing "auto" (trainer.defaults)
    vae_fp32: bool = False  # the VAE overflows in fp16/bf16 and always runs in float32 (kohya no_half_vae)

    def __init_subclass__(cls, **kwargs):
        """Every family's ``load`` first checks each path it will read against the read policy in force
        (:func:`check_model_paths`), whoever calls it: confinement holds where files are opened."""
        super().__init_subclass__(**kwargs)
        load = cls.__dict__.get("load")
        if load is not None and not getattr(load, "_checks_paths", False):
            def checked_load(self, cfg, *args, __load=load, **kw):
                check_model_paths(cfg)
                return __load(self, cfg, *args, **kw)

            checked_load.__doc__, checked_load.__name__, checked_load._checks_paths = load.__doc__, "load", True
            cls.load = checked_load

    # --- loading ------------------------------------------------------------------------------------------------
    @abstractmethod
    def load(self, cfg: "ModelConfig", device: "torch.device | str" = "cpu",
             dtype: "torch.dtype | None" = None) -> Components:
        """Load every component from ``cfg.path`` (diffusers folder or single file) without network access."""

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

    @abstractmethod
    def lora_target_modules(self, component: str, preset: str) -> list[str]:
        """Module-name suffixes (peft ``target_modules``) for a component and target preset."""

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
        if self.block_layout is None or component != "unet":
            return None
        return self.block_layout.index(module_name)

    # --- sampling ------------------------------------------------------------------------------------------------
    @abstractmethod
    def pipeline(self, comps: Components) -> Any:
        """A diffusers pipeline built from the (possibly LoRA-patched) components."""

    def sample(self, comps: Components, prompts: Sequence[str], *, seed: int, steps: int, cfg: float,
               width: int, height: int, negative_prompt: str = "", guidance: float | None = None) -> list["Image.Image"]:
        """Render one image per prompt with a fixed seed (``torch.Generator`` on the CPU, so it is portable).
        ``guidance``: a guidance-distilled model's embedded guidance (Flux); None = use ``cfg`` for it. Families
        with classifier-free guidance ignore it."""
        import torch

        pipe = self.pipeline(comps)
        pipe.set_progress_bar_config(disable=True)
        images = []
        for prompt in prompts:
            generator = torch.Generator("cpu").manual_seed(seed)
            kwargs = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=cfg, width=width,
                          height=height, generator=generator, output_type="pil")
            if negative_prompt and cfg > 1:
                kwargs["negative_prompt"] = negative_prompt
            images.extend(pipe(**kwargs).images)
        return images

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
