"""Training nodes: model source, network / optimizer / advanced options, and the train node itself.

Every option node returns one section of :class:`trainer.config.TrainConfig`; the train node composes them, so
input names equal config field names and the same settings work headless (``python -m trainer train``).
"""
from __future__ import annotations

from pathlib import Path

from ..trainer import (ATTENTION, FAMILIES, LOSS_WEIGHTING, MIXED_PRECISION, NETWORK_TYPES, OPTIMIZERS, PREDICTION_TYPES,
                       SAVE_PRECISION, SCHEDULERS, TARGET_PRESETS, TIMESTEP_SAMPLING, CrucibleError, ModelConfig,
                       NetworkConfig, OptimConfig, SampleConfig, SaveConfig, TrainConfig, TrainingConfig, all_families,
                       run_paths, safe_name)
from . import _comfy
from ._sockets import DATASET, MODEL, NETWORK, OPTIM, RUN, TRAINING, RunRecord
from .lists import lines, numbers
from .options import Choice, Flag, Float, Int, OptionNode, Seed, Text
from .widgets import BOOL, FLOAT, INT, SEED, STRING, combo

CHECKPOINTING_WHEN_OFF = ("family default", "off")
CACHES_WHEN_OFF = ("family default", "off")
RELEASE_ENCODERS = ("free after caching", "keep in RAM")  # training.release_encoders True / False


def frees_encoders(choice: str) -> bool:
    return choice != "keep in RAM"

NONE = "(none)"
FP8_BASE_TIP = ("kohya --fp8_base: store the frozen base model's linear weights (and T5's) in fp8, about half the "
                "memory of bf16; the LoRA trains on top. Not for full fine-tunes or DoRA.")


class CrucibleModel:
    """The base model to train, from ComfyUI's models/checkpoints or a diffusers folder."""

    CATEGORY = "Crucible/train"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": combo(list(FAMILIES), "sd15", "Model family (kohya: train_network.py vs sdxl_train_network.py …)."),
            "ckpt_name": combo([NONE] + _comfy.list_models("checkpoints"), NONE, "A single-file checkpoint from models/checkpoints (kohya pretrained_model_name_or_path)."),
            "path": STRING("", "Or: a diffusers model folder (absolute path). Overrides ckpt_name when set."),
            "prediction_type": combo(["auto", *PREDICTION_TYPES], "auto", "auto = the family default; v_prediction for SD2-v style models (kohya v_parameterization)."),
            "zero_terminal_snr": BOOL(False, "kohya zero_terminal_snr: rescale betas so the last step is pure noise (v-prediction models)."),
            "clip_skip": INT(1, 1, 12, "kohya clip_skip: 2 = penultimate CLIP layer (anime models)."),
            "attention": combo(list(ATTENTION), "sdpa", "kohya --sdpa / --xformers: sdpa is torch's fused attention (default); xformers needs the xformers package (CUDA)."),
            "fp8_base": BOOL(False, FP8_BASE_TIP),
        }}

    def build(self, family, ckpt_name, path, prediction_type, zero_terminal_snr, clip_skip, attention="sdpa",
              fp8_base=False):
        if path.strip():
            source = _comfy.resolve_model_path(path)
        elif ckpt_name != NONE:
            source = _comfy.model_path("checkpoints", ckpt_name)
        else:
            raise CrucibleError("Crucible Model: choose a ckpt_name or give a diffusers folder in 'path'")
        # A single file has no tokenizer inside: one saved next to it wins, else ComfyUI's own CLIP tokenizer.
        tokenizer = _comfy.comfy_tokenizer_dir() if source.is_file() and not _has_own_tokenizer(source) else None
        cfg = ModelConfig(family=family, path=str(source), prediction_type="" if prediction_type == "auto" else prediction_type,
                          zero_terminal_snr=zero_terminal_snr, clip_skip=clip_skip, attention=attention,
                          tokenizer_path=str(tokenizer) if tokenizer else "", fp8_base=fp8_base)
        return (cfg,)


def _has_own_tokenizer(checkpoint: Path) -> bool:
    """``<name>_tokenizer/`` or ``tokenizer/`` beside a single-file checkpoint (trainer.families.tokenizers order)."""
    from ..trainer import is_tokenizer_dir

    return any(is_tokenizer_dir(checkpoint.parent / sub) for sub in (f"{checkpoint.stem}_tokenizer", "tokenizer"))


class CrucibleSplitModel:
    """SD3/SD3.5 or Flux as ComfyUI keeps them: transformer, text encoders and VAE in separate files."""

    CATEGORY = "Crucible/train"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "build"
    DESCRIPTION = "Pick the same files as your Load Diffusion Model / CLIP loader / Load VAE nodes."

    @classmethod
    def INPUT_TYPES(cls):
        encoders = [NONE] + _comfy.list_models("text_encoders")
        return {"required": {
            "family": combo([f.name for f in all_families() if f.split_file_loading], "flux", "sd3 (SD3 / SD3.5) or flux (Flux.1 dev / schnell)."),
            "unet_name": combo([NONE] + _comfy.list_models("diffusion_models"), NONE, "The transformer file from models/diffusion_models (the one Load Diffusion Model uses)."),
            "clip_name1": combo(encoders, NONE, "Text encoder from models/text_encoders: CLIP-L (both families)."),
            "clip_name2": combo(encoders, NONE, "Text encoder: CLIP-G (SD3) or T5-XXL (Flux)."),
            "clip_name3": combo(encoders, NONE, "Text encoder: T5-XXL (SD3; optional — SD3 can train without T5)."),
            "vae_name": combo([NONE] + _comfy.list_models("vae"), NONE, "The VAE from models/vae (ae.safetensors for Flux)."),
            "path": STRING("", "Or: a diffusers folder (absolute path) with everything in it. Overrides the files."),
            "fp8_base": BOOL(False, FP8_BASE_TIP),
        }}

    def build(self, family, unet_name, clip_name1, clip_name2, clip_name3, vae_name, path, fp8_base=False):
        if path.strip():
            return (ModelConfig(family=family, path=str(_comfy.resolve_model_path(path)), fp8_base=fp8_base),)
        if unet_name == NONE:
            raise CrucibleError("Crucible Split Model: choose unet_name (the transformer) or give a diffusers folder in 'path'")
        encoders = tuple(str(_comfy.model_path("text_encoders", n)) for n in (clip_name1, clip_name2, clip_name3)
                         if n != NONE)
        vae = str(_comfy.model_path("vae", vae_name)) if vae_name != NONE else ""
        return (ModelConfig(family=family, path=str(_comfy.model_path("diffusion_models", unet_name)),
                            text_encoder_paths=encoders, vae_path=vae, fp8_base=fp8_base),)


def _ranks(name: str):
    return lambda text: numbers(text, f"Crucible Network Options: '{name}' (ranks)", whole=True)


def _values(name: str):
    return lambda text: numbers(text, f"Crucible Network Options: '{name}'")


class CrucibleNetworkOptions(OptionNode):
    CONFIG = NetworkConfig
    RETURN_TYPES = (NETWORK,)
    RETURN_NAMES = ("network",)
    WIDGETS = {
            "network_type": Choice(list(NETWORK_TYPES), "lora, dora (weight-decomposed), loha / lokr (LyCORIS) through peft, or full fine-tune."),
            "network_dim": Int(1, 1024, "kohya network_dim: LoRA rank."),
            "network_alpha": Float(0.0, 1024.0, 0.5, "kohya network_alpha: scale = alpha / dim."),
            "target_preset": Choice(list(TARGET_PRESETS), "Which layers get adapters: attention only, + MLP, every linear layer, + convolutions (LoCon)."),
            "train_unet": Flag("Train the UNet/transformer (kohya: off = network_train_text_encoder_only)."),
            "train_text_encoder": Flag("Also train the text encoder(s) (kohya: on unless network_train_unet_only)."),
            "down_lr_weight": Text("kohya down_lr_weight (SD1.5/SDXL): one LR multiplier per input block IN00-IN11 (SDXL: 9), shallow to deep, comma-separated, 0 freezes a block; or a preset: cosine, sine, linear, reverse_linear, zeros, optionally +number."),
            "mid_lr_weight": Float(0.0, 10.0, 0.05, "kohya mid_lr_weight (SDXL: all three middle parts)."),
            "up_lr_weight": Text("kohya up_lr_weight: one LR multiplier per output block OUT00-OUT11 (SDXL: 9), deep to shallow; or a preset as for down_lr_weight."),
            "block_dims": Text("kohya block_dims: one rank per block in kohya's layout — 25 values for SD1.5 (12 IN, MID, 12 OUT), 23 for SDXL (embedding, 9 IN, 3 MID, 9 OUT, output); 0 = no adapter in that block.", parse=_ranks("block_dims")),
            "block_alphas": Text("kohya block_alphas: one alpha per block (same count as block_dims); empty = network_alpha.", parse=_values("block_alphas")),
            "conv_block_dims": Text("kohya conv_block_dims: rank of the 3x3 convolutions per block (same count as block_dims); needs a preset with convolutions (all_linear_conv).", parse=_ranks("conv_block_dims")),
            "conv_block_alphas": Text("kohya conv_block_alphas: alpha of the 3x3 convolutions per block; empty = conv_alpha.", parse=_values("conv_block_alphas")),
            "conv_dim": Int(0, 1024, "kohya conv_dim (LoCon): rank of the 3x3 convolutions with the all_linear_conv preset; 0 = network_dim."),
            "conv_alpha": Float(0.0, 1024.0, 0.5, "kohya conv_alpha; 0 = network_alpha."),
    }


class CrucibleOptimizerOptions(OptionNode):
    CONFIG = OptimConfig
    RETURN_TYPES = (OPTIM,)
    RETURN_NAMES = ("optimizer",)
    WIDGETS = {
            "optimizer": Choice(list(OPTIMIZERS), "kohya optimizer_type (same names; dadaptation = kohya's DAdaptation, i.e. DAdaptAdamPreprint). prodigy and dadapt*: learning-rate free, see learning_rate. adafactor: kohya defaults (relative_step=True: it sets its own step size; for a fixed LR put scale_parameter=False, relative_step=False, warmup_init=False in optimizer_args). adamw8bit needs CUDA."),
            "learning_rate": Float(0.0, 10.0, 1e-6, "kohya learning_rate. Prodigy / DAdaptation*: left at the default 1e-4, 1.0 is used (their recommended value); any other value is kept."),
            "unet_lr": Float(0.0, 10.0, 1e-6, "kohya unet_lr: 0 = learning_rate."),
            "text_encoder_lr": Float(0.0, 10.0, 1e-6, "kohya text_encoder_lr: 0 = learning_rate."),
            "weight_decay": Float(0.0, 10.0, 0.001, "Weight decay."),
            "optimizer_args": Text("kohya optimizer_args: key=value per line, e.g. betas=(0.9,0.99) or relative_step=True (Adafactor).", multiline=True, parse=lines),
            "max_grad_norm": Float(0.0, 100.0, 0.1, "kohya max_grad_norm: gradient clipping (0 = off)."),
            "lr_scheduler": Choice(list(SCHEDULERS), "kohya lr_scheduler (diffusers get_scheduler)."),
            "lr_warmup_steps": Int(0, 10**7, "kohya lr_warmup_steps."),
            "lr_warmup_ratio": Float(0.0, 1.0, 0.01, "Warmup as a fraction of total steps; overrides lr_warmup_steps (SimpleTuner default 0.1)."),
            "lr_scheduler_num_cycles": Int(1, 100, "kohya lr_scheduler_num_cycles (cosine_with_restarts)."),
            "lr_scheduler_power": Float(0.0, 10.0, 0.1, "kohya lr_scheduler_power (polynomial)."),
    }


class CrucibleTrainingOptions(OptionNode):
    CONFIG = TrainingConfig
    RETURN_TYPES = (TRAINING,)
    RETURN_NAMES = ("training",)
    WIDGETS = {
            "seed": Seed("kohya seed: same seed → same run (bit-exact on the CPU)."),
            "gradient_accumulation_steps": Int(1, 1024, "kohya gradient_accumulation_steps."),
            "mixed_precision": Choice(list(MIXED_PRECISION), "kohya mixed_precision. auto: bf16 on GPUs that support it and on the CPU, fp16 with a gradient scaler on older GPUs. fp16 needs CUDA."),
            "gradient_checkpointing": Flag("kohya gradient_checkpointing: less memory, slower. On: always. Off: see gradient_checkpointing_when_off.", default=False),  # the field's None = family default
            "drop_last": Flag("Drop each bucket's last partial batch."),
            "min_snr_gamma": Float(0.0, 20.0, 0.5, "kohya min_snr_gamma (5 is common; 0 = off)."),
            "noise_offset": Float(0.0, 1.0, 0.01, "kohya noise_offset (0.05–0.1 for darker/brighter images)."),
            "multires_noise_iterations": Int(0, 16, "kohya multires_noise_iterations (6–10 typical)."),
            "multires_noise_discount": Float(0.0, 1.0, 0.05, "kohya multires_noise_discount."),
            "timestep_sampling": Choice(list(TIMESTEP_SAMPLING), "Flow models (SD3/Flux): how σ is drawn (SimpleTuner flow_sampler)."),
            "flow_shift": Float(0.0, 20.0, 0.1, "Flow models: σ shift (SimpleTuner flow_schedule_shift; SD3 recipes use 3.0). 0 = auto: Flux dev shifts by resolution, others 1.0."),
            "loss_weighting": Choice(list(LOSS_WEIGHTING), "Flow models: loss weighting scheme (diffusers weighting_scheme)."),
            "ema": Flag("Keep an EMA of the trained weights and save it."),
            "ema_decay": Float(0.0, 1.0, 0.0001, "EMA decay."),
            "cache_latents": Flag("kohya cache_latents: encode each image once (not with flip/colour/random-crop augmentation). On: always. Off: see caches_when_off.", default=False),  # the field's None = family default
            "cache_latents_to_disk": Flag("kohya cache_latents_to_disk: keep the latents as safetensors in the run folder, reused by later runs."),
            "cache_text_embeddings": Flag("kohya cache_text_encoder_outputs, but shuffle and caption dropout keep working: K caption variants per image are encoded once. On: always. Off: see caches_when_off.", default=False),
            "caption_variants": Int(1, 64, "Text cache: shuffled caption variants per image (K)."),
            "validation_split": Float(0.0, 0.5, 0.01, "Fraction of the dataset held out (chosen by the seed, never trained on) to measure a validation loss at every save; the sweep marks the checkpoint with the lowest. Used only with 10+ training images and no validation dataset; 0 = off."),
            "prior_loss_weight": Float(0.0, 100.0, 0.05, "kohya prior_loss_weight: loss weight of regularization images (datasets with is_reg on); 1.0 = same as training images."),
            "guidance_scale": Float(0.0, 100.0, 0.1, "Flux dev: the guidance embedding value during training (kohya guidance_scale; 1.0 recommended for LoRAs). Other families: no effect (reported)."),
            "logit_mean": Float(-10.0, 10.0, 0.05, "Flow models, timestep_sampling logit_normal: mean (SD3 / kohya logit_mean)."),
            "logit_std": Float(0.0, 10.0, 0.05, "Flow models, timestep_sampling logit_normal: standard deviation (kohya logit_std)."),
            "mode_scale": Float(0.0, 10.0, 0.01, "Flow models, timestep_sampling mode: scale (kohya mode_scale)."),
            "masked_loss": Flag("kohya masked_loss: weight the loss by each image's mask (alpha_mask or mask_dir on the Dataset); masked-out areas are not learned."),
            "t5xxl_max_token_length": Int(0, 512, "SD3/Flux: T5 tokens per caption (kohya t5xxl_max_token_length: SD3 256, Flux dev 512). 0 = ComfyUI's padding (SD3 77, Flux 256), so training matches ComfyUI's text encoding."),
    }
    OPTIONAL_WIDGETS = {  # appended; gradient_checkpointing_when_off is not a config field: with the toggle above it
        # decides gradient_checkpointing
        "gradient_checkpointing_when_off": Choice(CHECKPOINTING_WHEN_OFF, "With gradient_checkpointing off: 'family default' checkpoints SDXL, SD3 and Flux (their 1024 px activations dominate memory) and SD1.5 above 512 px; 'off' never checkpoints.", default="family default"),
        "blocks_to_swap": Int(0, 64, "kohya blocks_to_swap (LoRA): keep this many denoiser blocks in CPU memory and stream each to the GPU just before it runs (forward and backward). Less GPU memory, slower; 0 = off. Flux: 16 ≈ 12 GB."),
        "fused_backward_pass": Flag("kohya fused_backward_pass: the optimizer (adamw or adafactor) steps each weight as soon as its gradient is ready, so a full fine-tune never holds all gradients at once. Needs gradient_accumulation_steps 1; max_grad_norm clips per tensor."),
        "full_bf16": Flag("kohya full_bf16 (full fine-tune, bf16): the trained weights are stored in bf16 and updated with stochastic rounding, so small updates are not lost. Halves the weights' memory."),
        "caches_when_off": Choice(CACHES_WHEN_OFF, "With cache_latents / cache_text_embeddings off: 'family default' caches both for SD3 and Flux (their frozen T5-XXL leaves memory once the captions are encoded; latents only without flip/colour/random-crop augmentation, text only while no text encoder trains), not for SD1.5/SDXL; 'off' never caches.", default="family default"),
        "release_encoders": Choice(RELEASE_ENCODERS, "Where the VAE and frozen text encoders go once the caches replace them (they leave the GPU either way). 'free after caching': out of RAM too (Flux's T5 alone is ~9 GiB); previews render from prompts encoded before, keeping only the VAE (~0.2 GiB); a full fine-tune's single-file export reads them back from the model files at each save. 'keep in RAM': they wait in host memory, costing their size in RAM; choose it when RAM is plentiful and the model files may change or move during the run, or sit on a slow disk while full fine-tunes export single files.", parse=frees_encoders, default="free after caching"),
    }

    def build(self, gradient_checkpointing=False, gradient_checkpointing_when_off="family default",
              cache_latents=False, cache_text_embeddings=False, caches_when_off="family default", **values):
        def toggle(on, when_off):  # on: always; off: the family default (None) or never
            return True if on else (None if when_off == "family default" else False)

        return super().build(gradient_checkpointing=toggle(gradient_checkpointing, gradient_checkpointing_when_off),
                             cache_latents=toggle(cache_latents, caches_when_off),
                             cache_text_embeddings=toggle(cache_text_embeddings, caches_when_off), **values)


class CrucibleTrain:
    """Train a LoRA (or full fine-tune) and save checkpoints where ComfyUI's loaders find them."""

    CATEGORY = "Crucible/train"
    RETURN_TYPES = (RUN, "IMAGE", "STRING", "INT")
    RETURN_NAMES = ("run", "loss_curve", "checkpoint_names", "checkpoint_steps")
    OUTPUT_IS_LIST = (False, False, True, True)
    FUNCTION = "train"
    OUTPUT_NODE = True
    DESCRIPTION = ("Trains with live progress, loss curve and sample previews. Cancel saves a checkpoint and the "
                   "training state; queue again with resume on to continue exactly.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": (DATASET, {"tooltip": "Crucible Dataset (chain several to merge)."}),
            "run_name": STRING("my-lora", "Run name: LoRAs go to models/loras/<run_name>/, full fine-tunes to models/diffusion_models/<run_name>/ (kohya output_name)."),
            "epochs": INT(10, 1, 100000, "kohya max_train_epochs."),
            "max_train_steps": INT(0, 0, 10**7, "kohya max_train_steps: > 0 overrides epochs."),
            "batch_size": INT(1, 1, 1024, "kohya train_batch_size."),
            "save_every_n_epochs": INT(1, 0, 10000, "kohya save_every_n_epochs."),
            "save_every_n_steps": INT(0, 0, 10**7, "kohya save_every_n_steps."),
            "checkpoint_limit": INT(0, 0, 10000, "kohya save_last_n_epochs: keep at most N checkpoints (the last is always kept); 0 = all."),
            "save_precision": combo(list(SAVE_PRECISION), "fp16", "kohya save_precision."),
            "sample_prompts": STRING("", "Preview prompts, one per line (SeaArt 'model effect preview'). Rendered at the sample steps; with no sample_every_n_* set, once per epoch.", multiline=True),
            "sample_every_n_epochs": INT(0, 0, 10000, "kohya sample_every_n_epochs (0 = off)."),
            "sample_every_n_steps": INT(0, 0, 10**7, "kohya sample_every_n_steps (0 = off)."),
            "resume": BOOL(False, "Continue this run from its saved state (after Cancel or a stop). The loss sequence equals an uninterrupted run."),
        }, "optional": {
            "network": (NETWORK, {"tooltip": "Crucible Network Options (default: LoRA dim 16, alpha 16, attention+MLP)."}),
            "optimizer": (OPTIM, {"tooltip": "Crucible Optimizer Options (default: AdamW 1e-4, cosine)."}),
            "training": (TRAINING, {"tooltip": "Crucible Training Options (seed, precision, noise, min-SNR …)."}),
            "resume_force": ("BOOLEAN", {"default": False, "tooltip": "Resume even if the dataset or config changed since the state was saved."}),
            "also_save_checkpoint": ("BOOLEAN", {"default": False, "tooltip": "Full fine-tune only: also save the whole model (UNet, VAE, text encoders) as a single-file checkpoint in models/checkpoints/<run_name>/ for Load Checkpoint."}),
            "validation_dataset": (DATASET, {"tooltip": "Optional held-out images (a Crucible Dataset, never trained on): the validation loss at every save is measured on them. Without it, Training Options' validation_split holds out a fraction of the dataset (10+ images)."}),
            "sample_steps": INT(20, 1, 1000, "Preview sampling steps (kohya --s, SeaArt sample steps)."),
            "sample_cfg": FLOAT(7.0, 0.0, 100.0, 0.1, "Preview CFG scale (kohya --l). SD3 uses it; Flux uses sample_guidance instead."),
            "sample_seed": SEED(1234, "Preview seed (kohya --d): the same seed at every checkpoint, so previews compare."),
            "sample_negative_prompt": STRING("", "Preview negative prompt (kohya --n); Flux has none.", multiline=True),
            "sample_width": INT(0, 0, 8192, "Preview width (kohya --w); 0 = the dataset resolution.", step=8),
            "sample_height": INT(0, 0, 8192, "Preview height (kohya --h); 0 = the dataset resolution.", step=8),
            "sample_guidance": FLOAT(3.5, 0.0, 100.0, 0.1, "Flux previews: embedded guidance (ComfyUI FluxGuidance, kohya --g; 3.5 for dev)."),
            "save_last": BOOL(True, "kohya: always save the final step's checkpoint, whatever the save cadence."),
            "model": (MODEL, {"tooltip": "Crucible Model: the base model to train (or connect comfy_model/clip/vae)."}),
            "comfy_model": ("MODEL", {"tooltip": "Train the graph's own MODEL (Load Checkpoint / Load Diffusion Model, fp8 included) instead of a Crucible Model; needs comfy_clip and comfy_vae too. LoRA-type adapters only."}),
            "comfy_clip": ("CLIP", {"tooltip": "The CLIP that encodes the captions for comfy_model (from the same loader)."}),
            "comfy_vae": ("VAE", {"tooltip": "The VAE that encodes the images for comfy_model (from the same loader)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, run_name="", **_):
        """Unchanged inputs reuse ComfyUI's cached result, unless a run under this name was cancelled or failed
        since: its files on disk are then no longer what the cached result describes."""
        return str(_UNFINISHED.get(_run_key(run_name), 0))

    def train(self, dataset, run_name, sample_prompts, resume, network=None, optimizer=None, training=None,
              resume_force=False, also_save_checkpoint=False, validation_dataset=None, unique_id=None, model=None,
              comfy_model=None, comfy_clip=None, comfy_vae=None, **f):
        from contextlib import nullcontext

        from ..trainer import hosted_family

        hosted = None
        if comfy_model is not None or comfy_clip is not None or comfy_vae is not None:
            from .comfy_family import hosted_model_config

            hosted, model, network = hosted_model_config(comfy_model, comfy_clip, comfy_vae, model, network)
        elif model is None:
            raise CrucibleError("Crucible Train: connect a Crucible Model to 'model', or your loader's MODEL, CLIP "
                                "and VAE to comfy_model, comfy_clip and comfy_vae")
        try:
            with hosted_family(hosted) if hosted else nullcontext():
                return self._train(model, dataset, run_name, sample_prompts, resume, network, optimizer, training,
                                   resume_force, also_save_checkpoint, validation_dataset, unique_id, f)
        finally:
            if hosted is not None:
                hosted.restore()  # the user's MODEL leaves the run as it came in

    def _train(self, model, dataset, run_name, sample_prompts, resume, network, optimizer, training, resume_force,
               also_save_checkpoint, validation_dataset, unique_id, f):
        from ..trainer import train

        cfg = build_train_config(model, dataset, run_name, sample_prompts, network, optimizer, training, f,
                                 also_save_checkpoint, validation_dataset)
        state_dir = run_paths(cfg.save, "run_name").state_dir
        check_plan(cfg)  # refuse an impossible plan before ComfyUI's models are unloaded
        _comfy.free_memory()
        progress = _comfy.ComfyProgress(total=1, preview_every=10)
        key = _run_key(run_name)
        try:  # train() releases every model it loaded before it returns or raises
            result = train(cfg, progress, resume_from=state_dir if resume else None, force_resume=resume_force)
        except BaseException:
            _UNFINISHED[key] = _UNFINISHED.get(key, 0) + 1
            raise
        finally:
            _comfy.hand_back_memory()
        summary = run_summary(result, cancelled=progress.cancelled)
        if progress.cancelled:
            _UNFINISHED[key] = _UNFINISHED.get(key, 0) + 1
            print(f"[Crucible] {summary}", flush=True)
            _comfy.show_report(unique_id, summary)  # the UI text of a raising node is otherwise never delivered
            progress.raise_interrupt()  # checkpoint and state are saved; ComfyUI marks the prompt interrupted
        run, names = run_output(cfg, result)
        curve = _comfy.pil_to_image([_loss_curve(result)])
        return {"ui": {"text": [summary]}, "result": (run, curve, names, [c.step for c in result.checkpoints])}


_UNFINISHED: dict[str, int] = {}  # run folder -> how many runs under it were cancelled or failed in this process


def _run_key(run_name) -> str:
    try:
        return safe_name(str(run_name), "run_name")
    except CrucibleError:
        return str(run_name)


def _loss_curve(result):
    from ..trainer import loss_curve

    return loss_curve(result.losses, val=[(c.step, c.val_loss) for c in result.checkpoints])


def run_summary(result, cancelled: bool = False) -> str:
    """The node's report: what the run left on disk, after a Cancel how to go on, and the settings this model
    ignores (the plan's notes, trainer.families.settings)."""
    notes = getattr(getattr(result, "plan", None), "notes", ()) or ()
    return _run_state(result, cancelled) + "".join(f"\nnote: {note}" for note in notes)


def _run_state(result, cancelled: bool) -> str:
    last = result.checkpoints[-1] if result.checkpoints else None
    if cancelled and last is not None:
        state = f" (training state in {result.state_dir})" if result.state_dir else ""
        if result.cancelled:
            return f"cancelled at step {last.step}; saved {last.path}{state}; queue again with resume on to continue"
        return (f"cancelled after the last step {last.step}: the run is complete; saved {last.path}{state}; "
                "queue again with resume on to pass it to the next nodes")
    if not result.losses:
        return "no steps"
    from ..trainer import recommendation

    return (f"{len(result.checkpoints)} checkpoints in {result.run_dir}; last loss {result.losses[-1]:.4f}\n"
            + recommendation([{"path": str(c.path), "step": c.step, "val_loss": c.val_loss} for c in result.checkpoints]))


def run_output(cfg: TrainConfig, result) -> tuple[dict, list[str]]:
    """The CRUCIBLE_RUN socket value and the checkpoint names as ComfyUI's loaders list them."""
    kind_root = _comfy.model_folder("diffusion_models" if cfg.network.network_type == "full" else "loras")
    names = [c.path.relative_to(kind_root).as_posix() for c in result.record.checkpoints]
    return RunRecord.of(result.record, names), names


def check_plan(cfg: TrainConfig) -> None:
    """Scan the data and compute the step plan: every 'this cannot train' error surfaces before any work."""
    from ..trainer import compute_plan, training_source

    compute_plan(cfg, training_source(cfg))


def build_train_config(model, dataset, run_name, sample_prompts, network, optimizer, training, f,
                       also_save_checkpoint: bool = False, validation_dataset=None) -> TrainConfig:
    full = network is not None and network.network_type == "full"
    kind = "diffusion_models" if full else "loras"
    single = str(_comfy.model_folder("checkpoints")) if full and also_save_checkpoint else ""
    save = SaveConfig(output_dir=str(_comfy.model_folder(kind)), run_name=run_name, single_file_dir=single,
                      work_dir=str(_comfy.output_dir() / "crucible"),
                      save_every_n_epochs=f["save_every_n_epochs"], save_every_n_steps=f["save_every_n_steps"],
                      checkpoint_limit=f["checkpoint_limit"], save_precision=f["save_precision"],
                      save_last=f.get("save_last", True))
    d = SampleConfig()
    sample = SampleConfig(prompts=lines(sample_prompts), sample_every_n_epochs=f["sample_every_n_epochs"],
                          sample_every_n_steps=f["sample_every_n_steps"], steps=f.get("sample_steps", d.steps),
                          cfg=f.get("sample_cfg", d.cfg), seed=f.get("sample_seed", d.seed),
                          negative_prompt=f.get("sample_negative_prompt", d.negative_prompt),
                          width=f.get("sample_width", d.width), height=f.get("sample_height", d.height),
                          guidance=f.get("sample_guidance", d.guidance))
    tr = training or TrainingConfig()
    from dataclasses import replace

    tr = replace(tr, epochs=f["epochs"], max_train_steps=f["max_train_steps"], batch_size=f["batch_size"])
    cfg = TrainConfig(model=model, datasets=tuple(dataset), network=network or NetworkConfig(),
                      optim=optimizer or OptimConfig(), training=tr, save=save, sample=sample,
                      validation_datasets=tuple(validation_dataset or ()))
    return TrainConfig.from_dict(cfg.to_dict())  # full validation, same path as the CLI


NODES = {"CrucibleModel": CrucibleModel, "CrucibleSplitModel": CrucibleSplitModel, "CrucibleNetworkOptions": CrucibleNetworkOptions,
         "CrucibleOptimizerOptions": CrucibleOptimizerOptions, "CrucibleTrainingOptions": CrucibleTrainingOptions,
         "CrucibleTrain": CrucibleTrain}
NAMES = {"CrucibleModel": "Crucible Model", "CrucibleSplitModel": "Crucible Split Model (SD3/Flux)", "CrucibleNetworkOptions": "Crucible Network Options",
         "CrucibleOptimizerOptions": "Crucible Optimizer Options", "CrucibleTrainingOptions": "Crucible Training Options",
         "CrucibleTrain": "Crucible Train"}
