"""Dataset nodes: load a folder, caption options, caption preview, step plan."""
from __future__ import annotations

from ..trainer import (CROP_ASPECTS, CROP_STYLES, MISSING_CAPTION, CaptionConfig, DatasetConfig, NetworkConfig,
                       OptimConfig, TrainConfig, TrainingConfig, validate)
from . import _comfy
from ._sockets import CAPTIONS, DATASET, MODEL, NETWORK, OPTIM, TRAINING
from .lists import lines, split_list
from .options import Choice, Flag, Float, Int, OptionNode, Text
from .widgets import BOOL, FLOAT, INT, SEED, STRING, combo, text_result


class CrucibleCaptionOptions(OptionNode):
    """How captions are rewritten each epoch (kohya / SimpleTuner / SeaArt vocabulary)."""

    CONFIG = CaptionConfig
    CATEGORY = "Crucible/dataset"
    RETURN_TYPES = (CAPTIONS,)
    RETURN_NAMES = ("captions",)
    DESCRIPTION = "Caption rules: trigger word, tag removal, keep-N shuffle, dropout."
    WIDGETS = {
        "trigger_word": Text("Prepended to every caption and never shuffled or dropped (kohya class token / SeaArt trigger word). Several: comma-separated."),
        "keep_tokens": Int(0, 64, "kohya keep_tokens: the first N tags stay in place when shuffling and are never dropped."),
        "shuffle_caption": Flag("kohya shuffle_caption: shuffle the tags after the kept ones, differently each epoch."),
        "separator": Text("kohya caption_separator: what separates tags."),
        "split_on_period": Flag("A period ending a sentence also separates tags — only when shuffle_caption, keep_tokens or caption_tag_dropout_rate needs tags. With no caption option on, captions reach the model exactly as written (kohya, SimpleTuner)."),
        "keep_tokens_separator": Text("kohya keep_tokens_separator (e.g. |||): tags before it are kept fixed instead of counting keep_tokens."),
        "caption_dropout_rate": Float(0.0, 1.0, 0.01, "kohya caption_dropout_rate: chance that a whole caption becomes empty (SD3 recipe: 0.25)."),
        "caption_tag_dropout_rate": Float(0.0, 1.0, 0.01, "kohya caption_tag_dropout_rate: chance to drop each non-kept tag."),
        "remove_tags": Text("Tags removed from every caption (one per line or comma-separated) — the SeaArt flow of deleting traits you want bound to the trigger word.", multiline=True, parse=split_list),
        "remove_tags_regex": Text("Tags that fully match this regular expression are removed."),
        "replace_tags": Text("old=new per line: tag replacement.", multiline=True, parse=lines),
        "weighted_captions": Flag("kohya weighted_captions: parse (tag:1.2) into token weights; when off the weight syntax is stripped."),
        "max_token_length": Choice(["75", "150", "225"], "kohya max_token_length: longer captions are split into 75-token CLIP chunks.", parse=int),
        "caption_dropout_every_n_epochs": Int(0, 10000, "kohya caption_dropout_every_n_epochs: every Nth epoch trains with all captions dropped (0 = off)."),
    }

    def build(self, **values):
        (captions,) = super().build(**values)
        validate(TrainConfig(datasets=(DatasetConfig(captions=captions),)))
        return (captions,)


class CrucibleDataset:
    """A folder of images with same-name caption files; kohya `10_name` folders set repeats."""

    CATEGORY = "Crucible/dataset"
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "report")
    FUNCTION = "load"
    OUTPUT_NODE = True
    DESCRIPTION = "Scan a dataset folder (inside ComfyUI/input or an allowed folder) and report what will train."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "path": STRING("crucible_demo", "Dataset folder. Relative paths are inside ComfyUI/input. Sub-folders named like 10_concept set 10 repeats (kohya)."),
            "resolution": INT(512, 64, 4096, "Training resolution (kohya resolution); images are resized and cropped to it.", step=8),
            "repeats": INT(0, 0, 10000, "0 = take repeats from kohya folder names (10_concept → 10); > 0 overrides them."),
            "caption_extension": STRING(".txt", "Caption file extension (kohya caption_extension)."),
            "missing_caption": combo(list(MISSING_CAPTION), "class_tokens", "Image without a caption file: use the folder's class tokens, an empty caption, or skip the image."),
            "crop_style": combo(list(CROP_STYLES), "center", "SimpleTuner crop_style: which part of the image survives the crop."),
            "crop_aspect": combo(list(CROP_ASPECTS), "square", "SimpleTuner crop_aspect: square crops, or preserve the aspect ratio with buckets."),
            "enable_bucket": BOOL(False, "kohya enable_bucket: aspect-ratio buckets instead of square crops."),
            "min_bucket_reso": INT(256, 64, 4096, "kohya min_bucket_reso.", step=64),
            "max_bucket_reso": INT(1024, 64, 8192, "kohya max_bucket_reso.", step=64),
            "bucket_no_upscale": BOOL(False, "kohya bucket_no_upscale: never upscale small images to fill a bucket."),
            "flip_aug": BOOL(False, "kohya flip_aug: random horizontal flips (not with latent caching)."),
            "color_aug": BOOL(False, "kohya color_aug: mild colour jitter (not with latent caching)."),
            "background_color": STRING("#ffffff", "Transparent images are composited on this colour."),
            "is_reg": BOOL(False, "kohya reg_data_dir: regularization images (prior preservation; loss weight: prior_loss_weight on Training Options)."),
            "bucket_reso_steps": INT(64, 8, 1024, "kohya bucket_reso_steps: bucket sides are multiples of this (64 default; 32 gives finer buckets).", step=8),
            "alpha_mask": BOOL(False, "kohya alpha_mask: each image's transparency is its loss mask (turn masked_loss on in Training Options)."),
            "mask_dir": STRING("", "kohya conditioning_data_dir for masked loss: a folder of same-name mask images (white = train, black = ignore); relative = inside the dataset folder."),
        }, "optional": {
            "captions": (CAPTIONS, {"tooltip": "Caption options (Crucible Caption Options). Defaults when unconnected."}),
            "merge_with": (DATASET, {"tooltip": "Another dataset to train together with this one (each keeps its own options)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, path, caption_extension=".txt", **_):
        from ..trainer import dataset_fingerprint

        try:
            folder = _comfy.resolve_dataset_path(path)
            config = DatasetConfig(path=str(folder), caption_extension=caption_extension)
        except Exception:  # noqa: BLE001 - the error is raised properly when the node runs
            return float("nan")
        return dataset_fingerprint([config])

    def load(self, path, captions=None, merge_with=None, **fields):
        from ..trainer import scan_dataset

        folder = _comfy.resolve_dataset_path(path)
        if fields.get("mask_dir", "").strip():  # confined like the dataset itself
            fields["mask_dir"] = str(_comfy.resolve_dataset_path(str(folder / fields["mask_dir"].strip())))
        config = DatasetConfig(path=str(folder), captions=captions or CaptionConfig(), **fields)
        validate(TrainConfig(datasets=(config,)))
        scan = scan_dataset(config, index=len(merge_with or ()))
        report = scan.report.format()
        return text_result(report, (tuple(merge_with or ()) + (config,), report))


class CrucibleCaptionPreview:
    """Exactly the captions training will use (same code path, same seed)."""

    CATEGORY = "Crucible/dataset"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("preview",)
    FUNCTION = "preview"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": (DATASET, {"tooltip": "The dataset to preview."}),
            "images": STRING("0-3", "Which images (0-based, e.g. 0-3 or 0,5,9) to show."),
            "epochs": INT(2, 1, 100, "Show the captions of epochs 1..N (shuffle and dropout change per epoch)."),
            "seed": SEED(42, "Training seed (training.seed): the preview matches the run with this seed."),
        }, "optional": {
            "training": (TRAINING, {"tooltip": "The Training Options of the run: with cache_text_embeddings on, training draws each caption from K cached variants, and the preview shows those."}),
        }}

    def preview(self, dataset, images, epochs, seed, training=None):
        from ..trainer import caption_preview

        text = caption_preview(dataset, images, epochs, seed, training).lines()
        return text_result(text, (text,))


class CrucibleStepPlan:
    """Images × repeats / batch × epochs: how many steps, which ones save and sample — before anything trains."""

    CATEGORY = "Crucible/dataset"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("plan",)
    FUNCTION = "plan"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        d = TrainingConfig()
        return {"required": {
            "dataset": (DATASET, {"tooltip": "The dataset to plan for."}),
            "batch_size": INT(d.batch_size, 1, 1024, "kohya train_batch_size."),
            "epochs": INT(d.epochs, 1, 100000, "kohya max_train_epochs."),
            "max_train_steps": INT(0, 0, 10**7, "kohya max_train_steps: > 0 overrides epochs."),
            "gradient_accumulation_steps": INT(1, 1, 1024, "kohya gradient_accumulation_steps."),
            "drop_last": BOOL(False, "Drop each bucket's last partial batch (off = keep it, ⌈n/batch⌉)."),
            "save_every_n_epochs": INT(1, 0, 10000, "kohya save_every_n_epochs."),
            "save_every_n_steps": INT(0, 0, 10**7, "kohya save_every_n_steps."),
            "sample_every_n_epochs": INT(0, 0, 10000, "kohya sample_every_n_epochs."),
            "sample_every_n_steps": INT(0, 0, 10**7, "kohya sample_every_n_steps."),
            "lr_warmup_ratio": FLOAT(0.0, 0.0, 1.0, 0.01, "Warmup as a fraction of total steps (SimpleTuner default 0.1)."),
            "seed": SEED(42, "training.seed: the plan (bucket order, dropped samples) for the run with this seed."),
        }, "optional": {
            "model": (MODEL, {"tooltip": "Connect the Crucible Model (and the options below) to see the estimated peak memory, the GPU's memory, and what to switch on when it will not fit."}),
            "network": (NETWORK, {"tooltip": "Crucible Network Options of the run (memory estimate)."}),
            "optimizer": (OPTIM, {"tooltip": "Crucible Optimizer Options of the run (memory estimate)."}),
            "training": (TRAINING, {"tooltip": "Crucible Training Options of the run (memory estimate; batch_size is this node's)."}),
            "comfy_model": ("MODEL", {"tooltip": "Training the graph's own MODEL (Crucible Train's comfy_model)? Connect the same MODEL, CLIP and VAE here to see the memory estimate read from the loaded model (its weights as stored, fp8 included) and ComfyUI's view of the device."}),
            "comfy_clip": ("CLIP", {"tooltip": "The CLIP of comfy_model (Crucible Train's comfy_clip): one empty caption is encoded to learn the conditioning's shape."}),
            "comfy_vae": ("VAE", {"tooltip": "The VAE of comfy_model (Crucible Train's comfy_vae)."}),
        }}

    def plan(self, dataset, model=None, network=None, optimizer=None, training=None, comfy_model=None,
             comfy_clip=None, comfy_vae=None, **f):
        from ..trainer import compute_plan, training_source

        cfg = plan_config(dataset, f)
        source = training_source(cfg)  # held-out validation images are not counted
        text = compute_plan(cfg, source).format()
        # previews render when the plan samples (the Train node's prompts are not seen here): both paths count them
        samples = bool(f["sample_every_n_epochs"] or f["sample_every_n_steps"])
        if model is not None:
            from dataclasses import replace

            from ..trainer import memory_report

            run = TrainConfig(model=model, datasets=tuple(dataset), network=network or NetworkConfig(),
                              optim=optimizer or OptimConfig(),
                              training=replace(training or TrainingConfig(), batch_size=f["batch_size"]))
            text += "\n" + memory_report(run, previews=samples)
        if comfy_model is not None or comfy_clip is not None or comfy_vae is not None:
            from .comfy_memory import model_path_memory_report

            text += "\n" + model_path_memory_report(comfy_model, comfy_clip, comfy_vae, model, dataset, network,
                                                     optimizer, training, f["batch_size"], previews=samples)
        return text_result(text, (text,))


def plan_config(dataset, f: dict) -> TrainConfig:
    cfg = TrainConfig(datasets=tuple(dataset))
    return cfg.replace(
        training=dict(batch_size=f["batch_size"], epochs=f["epochs"], max_train_steps=f["max_train_steps"],
                      gradient_accumulation_steps=f["gradient_accumulation_steps"], drop_last=f["drop_last"],
                      seed=f["seed"]),
        save=dict(save_every_n_epochs=f["save_every_n_epochs"], save_every_n_steps=f["save_every_n_steps"]),
        sample=dict(sample_every_n_epochs=f["sample_every_n_epochs"], sample_every_n_steps=f["sample_every_n_steps"]),
        optim=dict(lr_warmup_ratio=f["lr_warmup_ratio"]),
    )


NODES = {"CrucibleDataset": CrucibleDataset, "CrucibleCaptionOptions": CrucibleCaptionOptions,
         "CrucibleCaptionPreview": CrucibleCaptionPreview, "CrucibleStepPlan": CrucibleStepPlan}
NAMES = {"CrucibleDataset": "Crucible Dataset", "CrucibleCaptionOptions": "Crucible Caption Options",
         "CrucibleCaptionPreview": "Crucible Caption Preview", "CrucibleStepPlan": "Crucible Step Plan"}
