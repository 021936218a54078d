"""Stable Diffusion 1.x: UNet + CLIP-L + 8× VAE, epsilon (or v) prediction on the scaled-linear DDPM schedule.

:class:`StableDiffusionFamily` also holds what SDXL shares (loading from a diffusers folder or a ComfyUI single
file, the VAE, the DDPM schedule, CLIP chunking, sampling through diffusers); :mod:`trainer.families.sdxl`
subclasses it.

Text conditioning follows kohya / A1111 / ComfyUI:

* ``clip_skip`` 1 is CLIP's last layer; 2 the penultimate one, passed through ``final_layer_norm`` as A1111 does.
* Captions longer than 75 tokens use 75-token windows (:mod:`trainer.families.clip_text`), as ComfyUI does.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .. import full_size
from ..errors import ConfigError, ModelLoadError
from ..lora_keys import kohya
from ..lora_targets import CLIP, UNET_ATTN, UNET_CONV, UNET_LINEAR, UNET_MLP, grow
from . import single_file as sf
from .base import Components, Conditioning, EncoderSpec, ModelFamily, PartDtypes
from .clip_text import WINDOW, check_clip_skip, chunked_token_ids, encode_windows, use_tokenizer_eos, windows_needed
from .kohya_blocks import SD15_BLOCKS
from .token_weights import apply_token_weights, token_weights
from .tokenizers import find_clip_tokenizer
from .weights import from_pretrained, load_denoiser, place, param_dtype, unwrap

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from ..config import ModelConfig

SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "clip_sample": False, "steps_offset": 1}
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def make_noise_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False,
                         base: Mapping[str, Any] | None = None):
    """The training ``DDPMScheduler``: SD's scaled-linear 0.00085–0.012 schedule over 1000 steps (or the beta
    schedule of ``base``, a model's own scheduler config), with the given prediction type."""
    from diffusers import DDPMScheduler

    config = dict(SCHEDULER_DEFAULTS)
    config.update({k: base[k] for k in _SCHEDULE_KEYS if base and base.get(k) is not None})
    return DDPMScheduler(**config, prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr)


def sampling_scheduler(noise_scheduler):
    """Euler sampling on the training schedule (``trailing`` spacing for zero-terminal-SNR models)."""
    from diffusers import EulerDiscreteScheduler

    ztsnr = bool(noise_scheduler.config.get("rescale_betas_zero_snr"))
    return EulerDiscreteScheduler.from_config(noise_scheduler.config, steps_offset=1,
                                              timestep_spacing="trailing" if ztsnr else "leading")


def _full_size_unet():
    import diffusers

    return diffusers.UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                          attention_head_dim=8, layers_per_block=2)


class StableDiffusionFamily(ModelFamily):
    """SD1.5 (and the shared machinery of SDXL)."""

    honoured_settings = frozenset({"weighted_captions", "clip_skip", "max_token_length", "block_weights"})
    block_layout = SD15_BLOCKS

    name = "sd15"
    title = "SD1.5"
    swap_block_attributes = ("down_blocks", "mid_block", "up_blocks")  # training.blocks_to_swap, in running order
    # at its native 512 px a LoRA fits in 4 GiB without checkpointing (faster); above it, activations dominate
    gradient_checkpointing_above_px = 512
    default_prediction = "epsilon"
    vae_scale_factor = 8
    latent_channels = 4
    denoiser_name = "unet"
    encoders = (EncoderSpec("text_encoder", "clip_l"),)
    # lora_te_ is kohya's SD1.5 name (A1111/Forge read it); ComfyUI maps it to CLIP-L exactly like lora_te1_.
    key_styles = {"unet": kohya("lora_unet"), "text_encoder": kohya("lora_te", clip=True)}
    lora_targets = {"unet": grow(UNET_ATTN, UNET_MLP, UNET_LINEAR, UNET_CONV), "text_encoder": CLIP}
    base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1"
    modelspec_implementation = "diffusers"
    pipeline_class_name = "StableDiffusionPipeline"
    pipeline_class_pattern = r"^StableDiffusion(?!3)(?!.*XL)"  # every SD1.x pipeline class, not SD3's or SDXL's
    pipeline_index_extras = {"safety_checker": [None, None], "feature_extractor": [None, None],
                             "requires_safety_checker": False}  # model_index.json entries of a pipeline folder
    vae_factors = {"scaling_factor": 0.18215, "sample_size": 512}  # what tensor shapes cannot tell
    unet_sample_size = 64
    # single-file layout: component -> key prefix of that text encoder (UNet and VAE prefixes are shared)
    single_file_prefixes = {"text_encoder": "cond_stage_model.transformer."}
    text_time_conditioning = False  # SDXL's added size/crop conditioning (``addition_embed_type="text_time"``)
    full_size_components = (("unet", _full_size_unet), ("text_encoder", full_size.clip_l), ("vae", full_size.vae(4)))
    full_size_text_tokens = 77
    full_size_context_width = 768  # cross-attention width of the full-size UNet

    def matches_single_file(self, keys) -> bool:
        """An LDM UNet without SDXL's or SD2's text-encoder layout."""
        keys = list(keys)
        return any(k.startswith(sf.UNET_PREFIX + "input_blocks.") for k in keys) and not any(
            k.startswith(("conditioner.embedders.", "cond_stage_model.model.")) for k in keys)

    def full_size_forward_inputs(self, resolution: int) -> dict[str, Any]:
        import torch

        h = w = resolution // self.vae_scale_factor
        return {"sample": torch.randn(1, self.latent_channels, h, w), "timestep": torch.tensor([500.0]),
                "encoder_hidden_states": torch.randn(1, self.full_size_text_tokens, self.full_size_context_width)}

    # --- loading ------------------------------------------------------------------------------------------------
    def load(self, cfg: "ModelConfig", device: "torch.device | str" = "cpu",
             dtype: "torch.dtype | PartDtypes | None" = None) -> Components:
        """Load from a diffusers folder or a ComfyUI ``.safetensors`` checkpoint; never touches the network."""
        dtype = PartDtypes.of(dtype)
        if not cfg.path:
            raise ModelLoadError("model.path is empty: choose a diffusers model folder or a .safetensors checkpoint")
        if cfg.prediction_type not in ("", "epsilon", "v_prediction"):
            raise ConfigError(f"model.prediction_type '{cfg.prediction_type}' does not apply to {self.name}; "
                              "use epsilon or v_prediction")
        path = Path(cfg.path).expanduser()
        if path.is_dir():
            self._check_folder(path)
        else:
            sf.check_family(sf.checkpoint_keys(path), self, path)
        tokenizers = [find_clip_tokenizer(cfg, spec.kind) for spec in self.encoders]  # cheap: fail before loading
        if path.is_dir():
            modules, schedule = self._load_folder(path, dtype), self._folder_schedule(path)
        else:
            loaded = sf.load_single_file(path, self, dtype)
            modules = {k: v for k, v in loaded.items() if k not in ("v_pred", "ztsnr")}
            schedule = {"prediction_type": "v_prediction" if loaded["v_pred"] else None,
                        "rescale_betas_zero_snr": loaded["ztsnr"]}
        if cfg.vae_path:
            modules["vae"] = self._load_vae_override(cfg.vae_path, dtype.vae)
        prediction = cfg.prediction_type or schedule.get("prediction_type") or self.default_prediction
        scheduler = make_noise_scheduler(prediction, cfg.zero_terminal_snr or
                                         bool(schedule.get("rescale_betas_zero_snr")), schedule)
        names = tuple(spec.component for spec in self.encoders)
        encoders = [modules[name] for name in names]
        for name, encoder, tokenizer in zip(names, encoders, tokenizers):
            if len(tokenizer) > int(encoder.config.vocab_size):
                raise ModelLoadError(f"the tokenizer found for '{path}' has {len(tokenizer)} tokens but its {name} "
                                     f"knows only {encoder.config.vocab_size}; set model.tokenizer_path to the "
                                     "tokenizer that belongs to this model")
            use_tokenizer_eos(encoder, tokenizer)
        comps = Components(denoiser=modules["unet"], vae=modules["vae"], text_encoders=encoders,
                           tokenizers=tokenizers, noise_scheduler=scheduler, denoiser_name=self.denoiser_name,
                           text_encoder_names=names, source=str(path),
                           extras={"family": self.name, "clip_skip": cfg.clip_skip,
                                   "format": "diffusers" if path.is_dir() else "single_file"})
        for module in (comps.denoiser, comps.vae, *comps.text_encoders):
            place(module, device)
        return comps

    def load_denoiser(self, cfg: "ModelConfig", comps: Components, device: "torch.device | str" = "cpu",
                      dtype: "torch.dtype | PartDtypes | None" = None) -> Any:
        """The UNet alone, from the folder or single file :meth:`load` read it from (see
        :meth:`ModelFamily.load_denoiser`); a single file's other tensors are not read."""
        from diffusers import UNet2DConditionModel

        dtype = PartDtypes.of(dtype).denoiser
        path = Path(cfg.path).expanduser()
        if path.is_dir():
            unet = load_denoiser(UNet2DConditionModel, path, "unet", dtype)
        else:
            # SDXL's pooled width splits the UNet's added conditioning as load did (a released encoder keeps its config)
            pooled = [int(m.config.projection_dim) for s, m in zip(self.encoders, comps.text_encoders)
                      if s.kind == "clip_g"]
            unet = sf.load_single_file_unet(path, self, dtype, pooled_dim=pooled[0] if pooled else None)
        place(unet, device)
        return unet

    def load_encoders(self, cfg: "ModelConfig", comps: Components, dtype=None) -> dict[str, Any]:
        """The VAE and text encoders from the folder or single file (never its UNet) and ``model.vae_path``."""
        dtype = PartDtypes.of(dtype)
        path = Path(cfg.path).expanduser()
        if path.is_dir():
            modules = self._load_folder(path, dtype, unet=False)
        else:
            modules = sf.load_single_file(path, self, dtype, unet=False)
        if cfg.vae_path:
            modules["vae"] = self._load_vae_override(cfg.vae_path, dtype.vae)
        for name, tokenizer in zip(comps.text_encoder_names, comps.tokenizers):
            use_tokenizer_eos(modules[name], tokenizer)
        return {name: modules[name] for name in ("vae", *comps.text_encoder_names)}

    def _load_folder(self, folder: Path, dtype: PartDtypes, unet: bool = True) -> dict[str, Any]:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        classes = {"clip_l": CLIPTextModel, "clip_g": CLIPTextModelWithProjection}
        modules = {"vae": from_pretrained(AutoencoderKL, folder, "vae", dtype.vae)}
        if unet:
            modules["unet"] = load_denoiser(UNet2DConditionModel, folder, "unet", dtype.denoiser)
        for spec in self.encoders:
            modules[spec.component] = from_pretrained(classes[spec.kind], folder, spec.component, dtype.text_encoders)
        return modules

    def _check_folder(self, folder: Path) -> None:
        """Refuse folders that are not a diffusers pipeline of this family, naming what was found."""
        self.check_pipeline_index(folder)
        wanted = ["unet", "vae", *(spec.component for spec in self.encoders)]
        missing = [sub for sub in wanted if not (folder / sub).is_dir()]
        if missing:
            raise ModelLoadError(f"model.path '{folder}' is not a diffusers {self.name} pipeline folder (no "
                                 f"{', '.join(s + '/' for s in missing)}); give the folder that holds "
                                 "model_index.json, or a .safetensors checkpoint")

    @staticmethod
    def _folder_schedule(folder: Path) -> dict[str, Any]:
        import json

        config = folder / "scheduler" / "scheduler_config.json"
        return json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}

    def _load_vae_override(self, vae_path: str, dtype):
        from diffusers import AutoencoderKL

        path = Path(vae_path).expanduser()
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").is_file() else None
            return from_pretrained(AutoencoderKL, path, sub, dtype, what="model.vae_path")
        return sf.load_vae(sf.read_checkpoint(path, "model.vae_path"), self, path, dtype)

    # --- training -----------------------------------------------------------------------------------------------
    def encode_text(self, comps: Components, captions: Sequence[str], clip_skip: int = 1,
                    max_token_length: int = WINDOW, weights=None) -> Conditioning:
        """``{"encoder_hidden_states": [B, 77·windows, 768]}`` from CLIP-L layer ``-clip_skip`` (final-normed).

        ``weights`` (optional): each caption's ``(text, weight)`` pieces — kohya's weighted captions."""
        encoder = comps.text_encoders[0]
        check_clip_skip(encoder, clip_skip)
        ids = chunked_token_ids(comps.tokenizers[0], captions, max_token_length)
        hidden, _ = encode_windows(encoder, ids, -clip_skip, final_norm=True)
        if weights is not None:
            hidden = apply_token_weights(hidden, token_weights(comps.tokenizers[0], weights, max_token_length))
        return {"encoder_hidden_states": hidden}

    def encode_images(self, comps: Components, pixels: "torch.Tensor",
                      generator: "torch.Generator | None" = None) -> "torch.Tensor":
        """Latents ``(mean − shift) × scaling_factor`` (a sample drawn with ``generator`` when one is given)."""
        vae = unwrap(comps.vae)
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = dist.sample(generator) if generator is not None else dist.mean
        shift = vae.config.get("shift_factor") or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def predict(self, comps: Components, noisy_latents: "torch.Tensor", timesteps: "torch.Tensor",
                cond: Conditioning) -> "torch.Tensor":
        unet = comps.denoiser
        dtype = param_dtype(unet)
        hidden = cond["encoder_hidden_states"].to(noisy_latents.device, dtype)
        return unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=hidden,
                    added_cond_kwargs=self._added_cond(comps, noisy_latents, cond), return_dict=False)[0]

    def _added_cond(self, comps: Components, latents: "torch.Tensor", cond: Conditioning) -> dict | None:
        return None

    # --- sampling -----------------------------------------------------------------------------------------------
    def pipeline(self, comps: Components) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoders[0],
                                       tokenizer=comps.tokenizers[0], unet=comps.denoiser,
                                       scheduler=sampling_scheduler(comps.noise_scheduler), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def sample(self, comps: Components, prompts: Sequence[str], *, seed: int, steps: int, cfg: float,
               width: int, height: int, negative_prompt: str = "", guidance: float | None = None,
               conditioning: "Sequence[Mapping[str, torch.Tensor]] | None" = None) -> list["Image.Image"]:
        """Render one image per prompt. Prompts are encoded exactly as in training (clip skip, 75-token windows,
        so long prompts are not cut at 77 tokens) and handed to the diffusers pipeline as embeddings, or come
        encoded already (``conditioning``, see :meth:`ModelFamily.sample`)."""
        import torch

        pipe = self.pipeline(comps)
        pipe.set_progress_bar_config(disable=True)
        images = []
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                embeds = (conditioning[i] if conditioning is not None
                          else self.sample_conditioning(comps, prompt, negative_prompt, cfg))
                generator = torch.Generator("cpu").manual_seed(seed)
                latents = pipe(**embeds, num_inference_steps=steps, guidance_scale=cfg, width=width, height=height,
                               generator=generator, output_type="latent").images
                images.extend(self.decode_latents(comps, latents))  # in the VAE's dtype (SDXL: fp32)
        return images

    def sample_conditioning(self, comps: Components, prompt: str, negative_prompt: str, cfg: float
                            ) -> dict[str, "torch.Tensor"]:
        """The prompt's and negative prompt's embeddings, with the clip skip and as many 75-token windows as the
        longer of the two needs."""
        clip_skip = int(comps.extras.get("clip_skip", 1))
        length = WINDOW * windows_needed(comps.tokenizers[0], [prompt, negative_prompt])
        return self.prompt_embeds(comps, prompt, negative_prompt, clip_skip, length)

    def prompt_embeds(self, comps: Components, prompt: str, negative_prompt: str, clip_skip: int,
                      max_token_length: int) -> dict[str, "torch.Tensor"]:
        """Pipeline keyword arguments carrying the prompt (and negative prompt) embeddings."""
        pos = self.encode_text(comps, [prompt], clip_skip, max_token_length)["encoder_hidden_states"]
        neg = self.encode_text(comps, [negative_prompt], clip_skip, max_token_length)["encoder_hidden_states"]
        return {"prompt_embeds": pos, "negative_prompt_embeds": neg}

    # --- export -------------------------------------------------------------------------------------------------
    def single_file_state_dict(self, comps: Components) -> dict[str, "torch.Tensor"]:
        """The whole model as a ComfyUI single-file checkpoint (UNet, VAE, text encoders in the LDM layout).

        ComfyUI's *Load Checkpoint* reads it, and so does *Load Diffusion Model* (it picks the
        ``model.diffusion_model.`` keys).
        """
        return sf.diffusers_to_single_file(comps, self)


FAMILY = StableDiffusionFamily()
