"""Stable Diffusion 1.x: UNet + CLIP-L + 8× VAE, epsilon (or v) prediction on the scaled-linear DDPM schedule.

:class:`StableDiffusionFamily` also holds what SDXL shares (loading from a diffusers folder or a ComfyUI single
file, the VAE, the DDPM schedule, CLIP chunking, sampling through diffusers); :mod:`trainer.families.sdxl`
subclasses it.

Text conditioning follows kohya / A1111 / ComfyUI:

* ``clip_skip`` 1 is CLIP's last layer; 2 the penultimate one, passed through ``final_layer_norm`` as A1111 does.
* Captions longer than 75 tokens are split into 75-token windows, each wrapped in BOS … EOS and padded to 77, encoded
  separately and concatenated (``max_token_length`` 75 / 150 / 225 → 77 / 154 / 231 positions), which is what
  ComfyUI does at inference. The number of windows is fixed by ``max_token_length`` so batches and caches have one
  shape.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import ConfigError, ModelLoadError
from . import single_file as sf
from .base import Components, Conditioning, ModelFamily
from .kohya_blocks import SD15_BLOCKS
from .token_weights import apply_token_weights, token_weights
from .tokenizers import find_clip_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from ..config import ModelConfig

WINDOW = 75  # tokens per CLIP window, without BOS/EOS
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


def chunked_token_ids(tokenizer, captions: Sequence[str], max_token_length: int = WINDOW) -> "torch.Tensor":
    """Token ids ``[B, windows, 77]``: each caption cut to ``max_token_length`` tokens, split into 75-token windows,
    each wrapped in BOS/EOS and padded with the tokenizer's pad token."""
    import torch

    if max_token_length < WINDOW or max_token_length % WINDOW:
        raise ConfigError(f"max_token_length is {max_token_length}; use 75, 150 or 225 (a multiple of 75)")
    windows = max_token_length // WINDOW
    body = tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=max_token_length,
                     verbose=False).input_ids
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for ids in body:
        chunks = []
        for w in range(windows):
            part = list(ids[w * WINDOW:(w + 1) * WINDOW])
            chunks.append([bos, *part, eos] + [pad] * (WINDOW - len(part)))
        rows.append(chunks)
    return torch.tensor(rows, dtype=torch.long)


def windows_needed(tokenizer, texts: Sequence[str]) -> int:
    """How many 75-token windows the longest of ``texts`` needs (at least one)."""
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False).input_ids]
    return max(1, math.ceil(max(lengths, default=0) / WINDOW))


def param_dtype(module) -> "torch.dtype":
    """The dtype of a module's first parameter (diffusers' ``.dtype`` walks every parameter: slow per step)."""
    return next(unwrap(module).parameters()).dtype


def unwrap(module):
    """The module inside a DDP / accelerate wrapper (config, dtype and submodules live there)."""
    return getattr(module, "module", module)


def encode_windows(encoder, ids: "torch.Tensor", layer: int, final_norm: bool) -> "tuple[torch.Tensor, Any]":
    """Run a CLIP text encoder over ``[B, windows, 77]`` ids; return the ``layer`` hidden states joined to
    ``[B, windows*77, D]`` (optionally through ``final_layer_norm``) and the raw model output."""
    inner = unwrap(encoder)
    b, n, length = ids.shape
    out = encoder(ids.reshape(b * n, length).to(inner.device), output_hidden_states=True)
    hidden = out.hidden_states[layer]
    if final_norm:
        norm = getattr(inner, "text_model", inner).final_layer_norm
        hidden = norm(hidden.to(norm.weight.dtype))  # CPU layer_norm refuses fp32 input with bf16 weights
    return hidden.reshape(b, n * length, hidden.shape[-1]), out


def use_tokenizer_eos(encoder, tokenizer) -> None:
    """CLIP pools at the first EOS token; make the encoder look for the tokenizer's EOS id (a config derived from a
    single file can only guess it, and old diffusers configs say 2)."""
    eos = tokenizer.eos_token_id
    encoder.config.eos_token_id = eos
    for module in encoder.modules():
        if isinstance(getattr(module, "eos_token_id", None), int):
            module.eos_token_id = eos


def check_clip_skip(encoder, clip_skip: int, extra: int = 0) -> None:
    layers = int(unwrap(encoder).config.num_hidden_layers)
    if not 1 <= clip_skip <= layers - extra:
        raise ConfigError(f"model.clip_skip is {clip_skip}; this text encoder has {layers} layers, so use 1 to "
                          f"{layers - extra}")


class StableDiffusionFamily(ModelFamily):
    """SD1.5 (and the shared machinery of SDXL)."""

    honoured_settings = frozenset({"weighted_captions", "clip_skip", "max_token_length", "block_weights"})
    block_layout = SD15_BLOCKS

    name = "sd15"
    swap_block_attributes = ("down_blocks", "mid_block", "up_blocks")  # training.blocks_to_swap, in running order
    default_prediction = "epsilon"
    vae_scale_factor = 8
    latent_channels = 4
    encoders: tuple[tuple[str, str], ...] = (("text_encoder", "clip_l"),)  # (component name, tokenizer kind)

    # --- loading ------------------------------------------------------------------------------------------------
    def load(self, cfg: "ModelConfig", device: "torch.device | str" = "cpu",
             dtype: "torch.dtype | None" = None) -> Components:
        """Load from a diffusers folder or a ComfyUI ``.safetensors`` checkpoint; never touches the network."""
        if not cfg.path:
            raise ModelLoadError("model.path is empty: choose a diffusers model folder or a .safetensors checkpoint")
        if cfg.prediction_type not in ("", "epsilon", "v_prediction"):
            raise ConfigError(f"model.prediction_type '{cfg.prediction_type}' does not apply to {self.name}; "
                              "use epsilon or v_prediction")
        path = Path(cfg.path).expanduser()
        if path.is_dir():
            self._check_folder(path)
        else:
            sf.check_family(sf.checkpoint_keys(path), self.name, path)
        tokenizers = [find_clip_tokenizer(cfg, kind) for _, kind in self.encoders]  # cheap: fail before loading
        if path.is_dir():
            modules, schedule = self._load_folder(path, dtype), self._folder_schedule(path)
        else:
            loaded = sf.load_single_file(path, self.name, dtype)
            modules = {k: v for k, v in loaded.items() if k not in ("v_pred", "ztsnr")}
            schedule = {"prediction_type": "v_prediction" if loaded["v_pred"] else None,
                        "rescale_betas_zero_snr": loaded["ztsnr"]}
        if cfg.vae_path:
            modules["vae"] = self._load_vae_override(cfg.vae_path, dtype)
        prediction = cfg.prediction_type or schedule.get("prediction_type") or self.default_prediction
        scheduler = make_noise_scheduler(prediction, cfg.zero_terminal_snr or
                                         bool(schedule.get("rescale_betas_zero_snr")), schedule)
        names = tuple(name for name, _ in self.encoders)
        encoders = [modules[name] for name in names]
        for name, encoder, tokenizer in zip(names, encoders, tokenizers):
            if len(tokenizer) > int(encoder.config.vocab_size):
                raise ModelLoadError(f"the tokenizer found for '{path}' has {len(tokenizer)} tokens but its {name} "
                                     f"knows only {encoder.config.vocab_size}; set model.tokenizer_path to the "
                                     "tokenizer that belongs to this model")
            use_tokenizer_eos(encoder, tokenizer)
        comps = Components(denoiser=modules["unet"], vae=modules["vae"], text_encoders=encoders,
                           tokenizers=tokenizers, noise_scheduler=scheduler, denoiser_name="unet",
                           text_encoder_names=names, source=str(path),
                           extras={"family": self.name, "clip_skip": cfg.clip_skip,
                                   "format": "diffusers" if path.is_dir() else "single_file"})
        for module in (comps.denoiser, comps.vae, *comps.text_encoders):
            module.to(device)
        return comps

    def _load_folder(self, folder: Path, dtype) -> dict[str, Any]:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
        modules = {"unet": _from_pretrained(UNet2DConditionModel, folder, "unet", dtype),
                   "vae": _from_pretrained(AutoencoderKL, folder, "vae", dtype)}
        for name, _ in self.encoders:
            modules[name] = _from_pretrained(classes[name], folder, name, dtype)
        return modules

    def _check_folder(self, folder: Path) -> None:
        """Refuse folders that are not a diffusers pipeline of this family, naming what was found."""
        import json

        index = folder / "model_index.json"
        if index.is_file():
            cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
            is_xl = "XL" in cls
            if is_xl != (self.name == "sdxl"):
                raise ModelLoadError(f"model.path '{folder}' holds a {cls}; set model.family to "
                                     f"'{'sdxl' if is_xl else 'sd15'}'")
        wanted = ["unet", "vae", *(name for name, _ in self.encoders)]
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
            return _from_pretrained(AutoencoderKL, path, sub, dtype, what="model.vae_path")
        return sf.load_vae(sf.read_checkpoint(path, "model.vae_path"), self.name, path, dtype)

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

    def lora_target_modules(self, component: str, preset: str) -> list[str]:
        from ..lora_targets import lora_target_modules

        return lora_target_modules(self.name, component, preset)

    # --- sampling -----------------------------------------------------------------------------------------------
    def pipeline(self, comps: Components) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoders[0],
                                       tokenizer=comps.tokenizers[0], unet=comps.denoiser,
                                       scheduler=sampling_scheduler(comps.noise_scheduler), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def sample(self, comps: Components, prompts: Sequence[str], *, seed: int, steps: int, cfg: float,
               width: int, height: int, negative_prompt: str = "", guidance: float | None = None) -> list["Image.Image"]:
        """Render one image per prompt. Prompts are encoded exactly as in training (clip skip, 75-token windows,
        so long prompts are not cut at 77 tokens) and handed to the diffusers pipeline as embeddings."""
        import torch

        pipe = self.pipeline(comps)
        pipe.set_progress_bar_config(disable=True)
        clip_skip = int(comps.extras.get("clip_skip", 1))
        images = []
        with torch.no_grad():
            for prompt in prompts:
                length = WINDOW * windows_needed(comps.tokenizers[0], [prompt, negative_prompt])
                embeds = self.prompt_embeds(comps, prompt, negative_prompt, clip_skip, length)
                generator = torch.Generator("cpu").manual_seed(seed)
                images.extend(pipe(**embeds, num_inference_steps=steps, guidance_scale=cfg, width=width,
                                   height=height, generator=generator, output_type="pil").images)
        return images

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
        return sf.diffusers_to_single_file(comps, self.name)


def _from_pretrained(cls, folder: Path, sub: str | None, dtype, what: str = "model.path"):
    """``cls.from_pretrained`` offline, safetensors only, with a :class:`ModelLoadError` naming the folder.

    Folders that only hold ``fp16`` variant weights (``*.fp16.safetensors``) load too.
    """
    import torch

    where = folder / sub if sub else folder
    dtype = dtype or torch.float32
    variant = _fp16_variant(where)
    try:
        if cls.__module__.startswith("transformers"):
            model, info = cls.from_pretrained(str(where), local_files_only=True, use_safetensors=True,
                                              variant=variant, output_loading_info=True, **_transformers_dtype(dtype),
                                              **_sdpa(cls))
            if info.get("missing_keys"):
                raise ModelLoadError(f"{what}: '{where}' lacks {len(info['missing_keys'])} weights (e.g. "
                                     f"'{sorted(info['missing_keys'])[0]}'); the folder is incomplete or damaged")
        else:
            model = cls.from_pretrained(str(folder), subfolder=sub, local_files_only=True, use_safetensors=True,
                                        variant=variant, torch_dtype=dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise ModelLoadError(f"{what}: cannot load '{where}' ({first_line}). It needs config.json and .safetensors "
                             "weights; pickle .bin weights are refused, convert them to .safetensors") from exc
    return model.eval()


def _fp16_variant(folder: Path) -> str | None:
    """``"fp16"`` when ``folder`` has only fp16-variant safetensors weights, else ``None``."""
    if not folder.is_dir():
        return None
    files = [p.name for p in folder.iterdir() if p.name.endswith(".safetensors")]
    plain = [n for n in files if not n.endswith(".fp16.safetensors")]
    return "fp16" if files and not plain else None


def _transformers_dtype(dtype) -> dict[str, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _sdpa(cls) -> dict[str, Any]:
    """PyTorch SDPA attention where the class has it. transformers 4.x loads a folder whose config.json carries
    ``_attn_implementation_autoset`` (written by its own save_pretrained) with eager attention: slower, more memory,
    and not bit-equal to the same encoder built from a single file."""
    return {"attn_implementation": "sdpa"} if getattr(cls, "_supports_sdpa", False) else {}


FAMILY = StableDiffusionFamily()
