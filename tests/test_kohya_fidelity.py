"""Issue 15: the same knob means what kohya sd-scripts / SimpleTuner users know, and nothing is a silent no-op."""
from __future__ import annotations

import pytest
import torch

from trainer.config import TrainConfig
from trainer.plan import plan_from_counts


def _sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


# --- warmup: one value, computed once --------------------------------------------------------------------------------

def test_warmup_shown_in_the_plan_is_the_warmup_applied():
    from trainer.optim import build_scheduler

    cfg = TrainConfig.from_dict({"training": {"epochs": 1}, "optim": {"lr_warmup_ratio": 0.055,
                                                                     "lr_scheduler": "constant_with_warmup"}})
    plan = plan_from_counts({(64, 64): 100}, cfg)
    assert plan.warmup_steps == 5  # ⌊0.055 × 100⌋, as kohya's int(ratio × total)
    lrs = _lrs(build_scheduler(_sgd(), cfg.optim, plan), 8)
    assert lrs[plan.warmup_steps] == pytest.approx(1.0) and lrs[plan.warmup_steps - 1] < 1.0


def test_constant_with_warmup_is_not_shown_but_ignored():
    from trainer.optim import build_scheduler

    cfg = TrainConfig.from_dict({"training": {"epochs": 1}, "optim": {"lr_warmup_steps": 4, "lr_scheduler": "constant"}})
    plan = plan_from_counts({(64, 64): 20}, cfg)
    lrs = _lrs(build_scheduler(_sgd(), cfg.optim, plan), 6)
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.5) and lrs[4] == pytest.approx(1.0)
    assert "constant_with_warmup" in plan.format()
    no_warmup = TrainConfig.from_dict({"optim": {"lr_scheduler": "constant"}})
    assert "constant_with_warmup" not in plan_from_counts({(64, 64): 20}, no_warmup).format()


# --- regularization images: kohya prior_loss_weight --------------------------------------------------------------------

def _reg_run(tiny_sd15, tmp_path, weight, name):
    from PIL import Image

    from trainer.loop import train

    for folder, colour in (("data/1_thing", (200, 40, 40)), ("reg/1_person", (40, 40, 200))):
        path = tmp_path / folder
        if not path.exists():
            path.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (64, 64), (colour[0], 60 * i, colour[2])).save(path / f"{i}.png")
                (path / f"{i}.txt").write_text(folder.split("_")[-1])
    cfg = TrainConfig.from_dict({
        "model": {"family": "sd15", "path": str(tiny_sd15)},
        "datasets": [{"path": str(tmp_path / "data"), "resolution": 64},
                     {"path": str(tmp_path / "reg"), "resolution": 64, "is_reg": True}],
        "network": {"network_dim": 4, "network_alpha": 4},
        "optim": {"learning_rate": 1e-2, "lr_scheduler": "constant"},
        "training": {"batch_size": 1, "epochs": 1, "seed": 5, "prior_loss_weight": weight},
        "save": {"output_dir": str(tmp_path / name), "run_name": "r", "save_every_n_epochs": 0, "save_last": False,
                 "save_state": False},
    })
    return cfg, train(cfg)


@pytest.mark.slow
def test_prior_loss_weight_scales_the_loss_of_regularization_samples(tiny_sd15, tmp_path):
    from trainer.dataset import DataSource

    cfg, full = _reg_run(tiny_sd15, tmp_path, 1.0, "full")
    _, half = _reg_run(tiny_sd15, tmp_path, 0.5, "half")
    _, off = _reg_run(tiny_sd15, tmp_path, 0.0, "off")
    source = DataSource(cfg.datasets, seed=cfg.training.seed)
    is_reg = [source.items[batch[0].item].is_reg for batch in source.epoch_batches(1, 1)]
    assert len(is_reg) == len(full.losses) == 4 and sum(is_reg) == 2
    assert all(loss > 0 for loss in full.losses)
    assert [loss == 0.0 for loss in off.losses] == is_reg  # masked-out regularization steps contribute nothing
    first = is_reg.index(True)  # up to the first regularization step both runs are identical
    assert half.losses[:first] == full.losses[:first]
    assert half.losses[first] == pytest.approx(0.5 * full.losses[first], rel=1e-5)
    with pytest.raises(Exception, match="prior_loss_weight"):
        TrainConfig.from_dict({"training": {"prior_loss_weight": -1}})


# --- optimizers: kohya names, adaptive learning rate, Adafactor defaults ------------------------------------------------

@pytest.mark.parametrize("name", ["Prodigy", "DAdaptation", "DAdaptAdam", "dadaptlion", "DAdaptSGD"])
def test_adaptive_optimizers_default_to_learning_rate_one(name):
    cfg = TrainConfig.from_dict({"optim": {"optimizer": name}})
    assert cfg.optim.learning_rate == 1.0
    assert TrainConfig.from_dict({"optim": {"optimizer": name, "learning_rate": 0.5}}).optim.learning_rate == 0.5
    assert TrainConfig.from_dict({"optim": {"optimizer": "AdamW"}}).optim.learning_rate == 1e-4


def test_optimizer_tooltip_says_adaptive_optimizers_use_one():
    import comfy_stubs

    spec = comfy_stubs.load_pack().NODE_CLASS_MAPPINGS["CrucibleOptimizerOptions"].INPUT_TYPES()["required"]
    assert "1.0" in spec["learning_rate"][1]["tooltip"] and "default" in spec["learning_rate"][1]["tooltip"]
    assert {"dadaptlion", "dadaptsgd", "dadaptadagrad", "sgdnesterov"} <= set(spec["optimizer"][0])


@pytest.mark.parametrize("name,cls", [("DAdaptation", "DAdaptAdamPreprint"), ("DAdaptAdamPreprint", "DAdaptAdamPreprint"),
                                      ("DAdaptAdam", "DAdaptAdam"), ("DAdaptLion", "DAdaptLion"),
                                      ("DAdaptSGD", "DAdaptSGD"), ("DAdaptAdaGrad", "DAdaptAdaGrad"),
                                      ("SGDNesterov", "SGD"), ("AdaFactor", "Adafactor")])
def test_optimizer_names_mean_what_kohya_means(name, cls):
    from trainer.optim import build_optimizer

    cfg = TrainConfig.from_dict({"optim": {"optimizer": name}}).optim
    w = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([{"params": [w], "lr": cfg.learning_rate}], cfg)
    assert type(opt).__name__ == cls
    if name == "DAdaptAdam":
        assert opt.defaults["decouple"] is False  # kohya passes no decouple: the package default
    if name == "SGDNesterov":
        assert opt.defaults["nesterov"] is True


def test_adafactor_uses_kohya_defaults():
    from trainer.optim import build_optimizer, build_scheduler

    w = torch.nn.Parameter(torch.zeros(3))
    cfg = TrainConfig.from_dict({"optim": {"optimizer": "adafactor", "learning_rate": 1e-3}}).optim
    opt = build_optimizer([{"params": [w], "lr": 1e-3}], cfg)
    assert opt.defaults["relative_step"] is True and opt.defaults["scale_parameter"] is True
    assert opt.defaults["warmup_init"] is False
    plan = plan_from_counts({(64, 64): 10}, TrainConfig(optim=cfg).replace(training={"epochs": 1}))
    assert build_scheduler(opt, cfg, plan).get_last_lr()[0] == pytest.approx(1e-3)  # kohya: lr is the initial_lr
    manual = TrainConfig.from_dict({"optim": {"optimizer": "adafactor", "optimizer_args": [
        "scale_parameter=False", "relative_step=False", "warmup_init=False"]}}).optim
    opt = build_optimizer([{"params": [w], "lr": 1e-4}], manual)
    assert opt.defaults["relative_step"] is False and opt.defaults["scale_parameter"] is False
    assert opt.param_groups[0]["lr"] == 1e-4
    warm = TrainConfig.from_dict({"optim": {"optimizer": "adafactor", "optimizer_args": [
        "relative_step=False", "warmup_init=True"]}}).optim
    assert build_optimizer([{"params": [w], "lr": 1e-4}], warm).defaults["relative_step"] is True  # as kohya


# --- metadata: ss_training_started_at is the start of this run ---------------------------------------------------------

@pytest.mark.slow
def test_training_started_at_is_the_start_of_each_run(tiny_sd15, demo_dataset, tmp_path):
    import time

    from safetensors import safe_open

    import trainer.checkpoints  # noqa: F401 - imported long before the run starts, as in a ComfyUI session
    from trainer.loop import train

    starts = []
    for name in ("a", "b"):
        cfg = TrainConfig.from_dict({
            "model": {"family": "sd15", "path": str(tiny_sd15)},
            "datasets": [{"path": str(demo_dataset), "resolution": 64, "repeats": 1}],
            "network": {"network_dim": 2, "network_alpha": 2},
            "training": {"batch_size": 4, "max_train_steps": 1},
            "save": {"output_dir": str(tmp_path / name), "run_name": name, "save_state": False},
        })
        before = time.time()
        result = train(cfg)
        with safe_open(str(result.checkpoints[-1].path), "pt") as f:
            started = float(f.metadata()["ss_training_started_at"])
        assert before <= started <= time.time()
        starts.append(started)
    assert starts[0] < starts[1]


# --- family-dependent settings: refused or reported, never silently ignored ----------------------------------------------

@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_weighted_captions_refused_on_flow_families_at_validation(family):
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"weighted_captions.*{family}"):
        TrainConfig.from_dict({"model": {"family": family}, "datasets": [{"captions": {"weighted_captions": True}}]})
    TrainConfig.from_dict({"model": {"family": "sdxl"}, "datasets": [{"captions": {"weighted_captions": True}}]})


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_family_contract_encode_text_takes_every_argument_the_loop_passes(family):
    import inspect

    from trainer.families import get_family

    fam = get_family(family)
    params = inspect.signature(fam.encode_text).parameters
    assert {"clip_skip", "max_token_length"} <= set(params)
    assert ("weights" in params) == ("weighted_captions" in fam.honoured_settings)


def test_settings_a_family_ignores_are_reported_in_the_plan():
    flux = TrainConfig.from_dict({"model": {"family": "flux", "clip_skip": 2},
                                  "datasets": [{"captions": {"max_token_length": 150}}],
                                  "training": {"min_snr_gamma": 5.0}})
    text = plan_from_counts({(64, 64): 4}, flux).format()
    for name in ("clip_skip", "max_token_length", "min_snr_gamma"):
        assert name in text, name
    assert plan_from_counts({(64, 64): 4}, flux).notes
    sd15 = TrainConfig.from_dict({"model": {"family": "sd15", "clip_skip": 2},
                                  "datasets": [{"captions": {"max_token_length": 150}}],
                                  "training": {"min_snr_gamma": 5.0}})
    assert plan_from_counts({(64, 64): 4}, sd15).notes == ()
    flow_only = TrainConfig.from_dict({"training": {"loss_weighting": "cosmap", "guidance_scale": 3.5}})
    notes = " ".join(plan_from_counts({(64, 64): 4}, flow_only).notes)
    assert "loss_weighting" in notes and "guidance_scale" in notes


# --- SDXL micro-conditioning: each image's original size and crop offsets -------------------------------------------------

def _wide_dataset(root, style="center", flip=False):
    from PIL import Image

    folder = root / "1_wide"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (100, 60), (200, 30, 30)).save(folder / "wide.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(folder / "square.png")
    return {"path": str(root), "resolution": 64, "crop_style": style, "flip_aug": flip}


def test_image_geometry_is_original_size_and_crop_offset(tmp_path):
    from trainer.config import DatasetConfig
    from trainer.dataset import DataSource, Sample

    source = DataSource([DatasetConfig(**_wide_dataset(tmp_path))], seed=1)
    wide = next(i for i, item in enumerate(source.items) if item.path.name == "wide.png")
    square = 1 - wide
    # 100x60 covers 64x64 at scale 64/60: resized to 106.7x64, centre crop starts 21 px in (x), 0 (y)
    assert source.image_geometry([Sample(wide, 0), Sample(square, 0)], 1) == [(60, 100, 0, 21), (64, 64, 0, 0)]
    corner = DataSource([DatasetConfig(**_wide_dataset(tmp_path, "corner"))], seed=1)
    assert corner.image_geometry([Sample(wide, 0)], 1) == [(60, 100, 0, 0)]
    rand = DataSource([DatasetConfig(**_wide_dataset(tmp_path, "random"))], seed=1)
    lefts = {rand.image_geometry([Sample(wide, 0)], e)[0][3] for e in range(1, 12)}
    assert len(lefts) > 1 and all(0 <= x <= 43 for x in lefts)


def test_image_geometry_matches_the_pixels_of_a_random_crop(tmp_path):
    """The offset reported is where the crop really is: cut it from the resized image and compare pixels."""
    import numpy as np
    from PIL import Image

    from trainer.config import DatasetConfig
    from trainer.dataset import DataSource, Sample, load_pil

    folder = tmp_path / "1_grad"
    folder.mkdir(parents=True)
    ramp = np.tile(np.arange(128, dtype=np.uint8) * 2, (64, 1))
    Image.fromarray(np.stack([ramp] * 3, -1)).save(folder / "ramp.png")
    cfg = DatasetConfig(path=str(tmp_path), resolution=64, crop_style="random")
    source = DataSource([cfg], seed=3)
    for epoch in (1, 2, 3):
        _, _, top, left = source.image_geometry([Sample(0, 0)], epoch)[0]
        crop = np.asarray(load_pil(source.items[0], 64, 64, cfg, seed=3, epoch=epoch, repeat=0))[0, :, 0]
        assert top == 0 and abs(int(crop[0]) - 2 * left) <= 2


def test_sdxl_time_ids_come_from_the_image_geometry(monkeypatch):
    from trainer.families import get_family

    fam = get_family("sdxl")

    class Comps:  # only what _added_cond reads
        denoiser = torch.nn.Linear(1, 1)
        vae = None

    monkeypatch.setattr(type(fam), "vae_scale_factor_of", staticmethod(lambda comps: 8))
    cond = {"text_embeds": torch.zeros(2, 4), "image_geometry": torch.tensor([[60, 100, 0, 21], [64, 64, 0, 0]])}
    out = fam._added_cond(Comps(), torch.zeros(2, 4, 8, 8), cond)
    assert out["time_ids"].tolist() == [[60, 100, 0, 21, 64, 64], [64, 64, 0, 0, 64, 64]]


@pytest.mark.slow
def test_sdxl_training_conditions_on_each_images_size_and_crop(tmp_path, monkeypatch):
    from trainer.families import get_family
    from trainer.loop import train
    from trainer.tiny import build_tiny_pipeline

    fam = get_family("sdxl")
    seen = []
    real = type(fam)._added_cond

    def spy(self, comps, latents, cond):
        out = real(self, comps, latents, cond)
        seen.extend(tuple(int(v) for v in row) for row in out["time_ids"].tolist())
        return out

    monkeypatch.setattr(type(fam), "_added_cond", spy)
    model = build_tiny_pipeline(tmp_path / "xl", family="sdxl", seed=1)
    cfg = TrainConfig.from_dict({
        "model": {"family": "sdxl", "path": str(model)}, "datasets": [_wide_dataset(tmp_path / "data")],
        "network": {"network_dim": 2, "network_alpha": 2},
        "training": {"batch_size": 1, "epochs": 1},
        "save": {"output_dir": str(tmp_path / "out"), "run_name": "xl", "save_every_n_epochs": 0,
                 "save_last": False, "save_state": False},
    })
    train(cfg)
    assert sorted(set(seen)) == [(60, 100, 0, 21, 64, 64), (64, 64, 0, 0, 64, 64)]


# --- block-wise LR / dims in kohya's layout ---------------------------------------------------------------------------

@pytest.mark.parametrize("family,name,index", [
    ("sd15", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 1),
    ("sd15", "down_blocks.0.resnets.1.conv1", 2),
    ("sd15", "down_blocks.0.downsamplers.0.conv", 3),
    ("sd15", "down_blocks.3.resnets.1.conv2", 11),
    ("sd15", "mid_block.attentions.0.proj_in", 12),
    ("sd15", "up_blocks.0.resnets.2.conv1", 15),
    ("sd15", "up_blocks.0.upsamplers.0.conv", 15),
    ("sd15", "up_blocks.3.attentions.2.proj_out", 24),
    ("sdxl", "add_embedding.linear_1", 0),
    ("sdxl", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 5),
    ("sdxl", "mid_block.resnets.1.conv1", 12),
    ("sdxl", "up_blocks.0.attentions.1.proj_out", 14),
    ("sdxl", "conv_out", 22),
])
def test_kohya_block_index_of_diffusers_module_names(family, name, index):
    from trainer.families import get_family

    assert get_family(family).block_index("unet", name) == index


def test_kohya_lr_weight_presets_and_counts():
    from trainer.errors import ConfigError
    from trainer.families.kohya_blocks import SD15_BLOCKS, SDXL_BLOCKS, parse_weights

    cosine = parse_weights("cosine", 12, "down", "sd15")
    assert cosine[0] == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.0) and len(cosine) == 12
    assert parse_weights("sine+0.5", 9, "up", "sdxl")[-1] == pytest.approx(1.5)
    assert parse_weights("zeros+0.25", 12, "d", "sd15") == [0.25] * 12
    assert parse_weights("linear", 12, "d", "sd15")[6] == pytest.approx(6 / 11)
    assert parse_weights("reverse_linear", 12, "d", "sd15")[0] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="needs 12"):
        parse_weights("1,1,1", 12, "network.down_lr_weight", "sd15")
    with pytest.raises(ConfigError, match="needs 25"):
        SD15_BLOCKS.per_block((4,) * 24, "block_dims")
    assert SDXL_BLOCKS.total == 23 and SD15_BLOCKS.total == 25
    with pytest.raises(ConfigError, match="down_lr_weight.*needs 9"):
        TrainConfig.from_dict({"model": {"family": "sdxl"}, "network": {"down_lr_weight": "1,1,1,1,1,1,1,1,1,1,1,1"}})
    with pytest.raises(ConfigError, match="block_dims.*needs 25"):
        TrainConfig.from_dict({"network": {"block_dims": [4] * 9}})
    TrainConfig.from_dict({"network": {"block_dims": [4] * 25, "down_lr_weight": [0] * 6 + [1] * 6,
                                       "up_lr_weight": "cosine+0.1"}})  # TOML lists still work


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_block_fields_refused_on_transformer_families(family):
    from trainer.errors import ConfigError

    for fields in ({"down_lr_weight": "cosine"}, {"block_dims": [4] * 25}, {"conv_block_alphas": [1.0] * 25}):
        with pytest.raises(ConfigError, match=f"does nothing on {family}"):
            TrainConfig.from_dict({"model": {"family": family}, "network": fields})


@pytest.mark.slow
def test_kohya_down_lr_weight_freezes_only_the_shallow_blocks(tiny_sd15):
    """12 values, the first four 0: IN01–IN03 (the tiny UNet's down_blocks.0) freeze, IN04 and the rest train."""
    from trainer.families import get_family
    from trainer.network import attach_network, param_groups

    fam = get_family("sd15")
    cfg = TrainConfig.from_dict({"model": {"family": "sd15", "path": str(tiny_sd15)},
                                 "network": {"network_dim": 4, "target_preset": "all_linear_conv",
                                             "down_lr_weight": "0,0,0,0,1,1,1,1,1,1,1,1",
                                             "block_dims": [4] * 5 + [2] * 20}})
    comps = fam.load(cfg.model)
    net = attach_network(fam, comps, cfg.network)
    groups = param_groups(fam, net, cfg.optim)
    trained = {n for _, n, p in net.named_trainable()}
    assert not any(n.startswith("down_blocks.0.") for n in trained)  # IN01–IN03 (its downsampler is IN03)
    assert any(n.startswith("down_blocks.1.resnets.0.") for n in trained)  # IN04
    assert any(n.startswith("mid_block.") for n in trained)
    assert any(n.startswith("up_blocks.") for n in trained) and groups
    unet = comps.denoiser
    ranks = {name.rsplit(".lora_A", 1)[0]: m.weight.shape[0] for name, m in unet.named_modules()
             if name.endswith("lora_A.default")}
    assert ranks["down_blocks.0.attentions.0.proj_in"] == 4  # IN01: block_dims[1]
    assert ranks["up_blocks.1.attentions.0.proj_in"] == 2  # OUT03: block_dims[16]


# --- preview samples ---------------------------------------------------------------------------------------------------

def test_prompts_without_a_cadence_preview_once_per_epoch():
    with_prompts = TrainConfig.from_dict({"training": {"epochs": 3}, "sample": {"prompts": ["a cat"]}})
    plan = plan_from_counts({(64, 64): 4}, with_prompts)
    assert [e for _, e in plan.sample_points] == [1, 2, 3]
    assert "samples at steps" in plan.format()
    assert plan_from_counts({(64, 64): 4}, TrainConfig.from_dict({"training": {"epochs": 3}})).sample_points == ()
    stepped = TrainConfig.from_dict({"training": {"epochs": 3}, "sample": {"prompts": ["a"], "sample_every_n_steps": 2}})
    assert [s for s, _ in plan_from_counts({(64, 64): 4}, stepped).sample_points] == [2, 4, 6, 8, 10, 12]


def test_flux_previews_use_the_flux_guidance_not_the_cfg(monkeypatch):
    from trainer.families import get_family

    fam = get_family("flux")
    seen = {}

    class Stop(Exception):
        pass

    class Pipe:
        def set_progress_bar_config(self, **_):
            pass

        def __call__(self, guidance_scale, **_):
            seen["guidance"] = guidance_scale
            raise Stop

    monkeypatch.setattr(type(fam), "pipeline", lambda self, comps: Pipe())
    monkeypatch.setattr(type(fam), "sample_conditioning", lambda self, comps, prompt, negative_prompt, cfg: {})
    with pytest.raises(Stop):
        fam.sample(None, ["a"], seed=1, steps=2, cfg=7.0, width=64, height=64, guidance=3.5)
    assert seen["guidance"] == 3.5
    with pytest.raises(Stop):
        fam.sample(None, ["a"], seed=1, steps=2, cfg=4.0, width=64, height=64)  # the sweep's cfg stays the guidance
    assert seen["guidance"] == 4.0
    with pytest.raises(Stop):  # pre-encoded prompts (trainer.sample_prompts) too
        fam.sample(None, ["a"], seed=1, steps=2, cfg=7.0, width=64, height=64, guidance=2.5, conditioning=[{}])
    assert seen["guidance"] == 2.5


@pytest.mark.slow
def test_preview_settings_reach_the_sampler(tiny_sd15, demo_dataset, tmp_path, monkeypatch):
    from trainer.families.sd15 import StableDiffusionFamily
    from trainer.loop import train

    calls = []
    monkeypatch.setattr(StableDiffusionFamily, "sample",
                        lambda self, comps, prompts, **kw: calls.append(kw) or [__import__("PIL.Image").Image.new(
                            "RGB", (kw["width"], kw["height"]))] * len(prompts))
    cfg = TrainConfig.from_dict({
        "model": {"family": "sd15", "path": str(tiny_sd15)},
        "datasets": [{"path": str(demo_dataset), "resolution": 64, "repeats": 1}],
        "network": {"network_dim": 2, "network_alpha": 2},
        "training": {"batch_size": 6, "epochs": 2},
        "sample": {"prompts": ["a red circle"], "steps": 3, "cfg": 2.5, "seed": 9, "negative_prompt": "blurry",
                   "width": 96, "height": 64, "guidance": 2.0},
        "save": {"output_dir": str(tmp_path), "run_name": "p", "save_every_n_epochs": 0, "save_state": False},
    })
    result = train(cfg)
    assert len(calls) == 2 and len(result.samples) == 2  # no cadence given: one preview per epoch
    assert calls[0] == {"seed": 9, "steps": 3, "cfg": 2.5, "width": 96, "height": 64, "negative_prompt": "blurry",
                        "guidance": 2.0}


# --- python -m trainer preview: a readable table, --json for scripts ---------------------------------------------------

def test_cli_preview_prints_a_table_and_json(demo_dataset, tmp_path, capsys):
    import json

    from trainer.cli import main

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"datasets": [{"path": str(demo_dataset), "captions": {"trigger_word": "ohwx"}}]}))
    assert main(["preview", str(config), "--images", "2", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "CaptionPreviewRow" not in out
    assert lines[0].split()[:3] == ["file", "epoch", "caption"]
    assert len([line for line in lines[2:] if line.strip()]) == 4
    assert all("ohwx" in line for line in lines[2:6])
    assert main(["preview", str(config), "--images", "2", "--epochs", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and {"file", "epoch", "caption", "raw", "dropped"} <= set(rows[0])
    assert rows[0]["caption"].startswith("ohwx")


# --- masked loss ---------------------------------------------------------------------------------------------------------

def _half_masked_image(folder, name="half.png", size=(100, 60)):
    """RGBA: left half opaque red, right half transparent blue; returns the split column."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.zeros((h, w, 4), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0, 255)
    arr[:, w // 2:] = (0, 0, 255, 0)
    Image.fromarray(arr, "RGBA").save(folder / name)
    (folder / name).with_suffix(".txt").write_text("a red thing")
    return w // 2


@pytest.mark.parametrize("style,flip", [("center", False), ("random", False), ("center", True)])
def test_alpha_masks_follow_the_crop_and_flip_of_their_image(tmp_path, style, flip):
    import numpy as np

    from trainer.config import DatasetConfig
    from trainer.dataset import DataSource, load_pil
    from trainer.masks import load_mask

    _half_masked_image(tmp_path / "1_thing")
    cfg = DatasetConfig(path=str(tmp_path), resolution=64, crop_style=style, flip_aug=flip, alpha_mask=True,
                        background_color="#0000ff")
    source = DataSource([cfg], seed=4)
    item = source.items[0]
    for epoch in range(1, 6):
        mask = load_mask(item, 64, 64, cfg, seed=4, epoch=epoch, repeat=0)
        red = np.asarray(load_pil(item, 64, 64, cfg, seed=4, epoch=epoch, repeat=0))[..., 0] / 255.0
        assert mask.shape == (64, 64) and mask.min() < 0.05 and mask.max() > 0.95
        assert np.abs(mask - red).mean() < 0.02  # opaque exactly where the (red) pixels are


def test_mask_dir_masks_are_found_and_not_trained_on(tmp_path):
    import numpy as np
    from PIL import Image

    from trainer.config import DatasetConfig
    from trainer.dataset import DataSource
    from trainer.masks import load_mask

    _half_masked_image(tmp_path / "1_thing", "pic.png", size=(64, 64))
    (tmp_path / "masks" / "1_thing").mkdir(parents=True)
    Image.fromarray(np.tile(np.array([0, 255], dtype=np.uint8).repeat(32), (64, 1)), "L").save(
        tmp_path / "masks" / "1_thing" / "pic.png")
    cfg = DatasetConfig(path=str(tmp_path), resolution=64, mask_dir="masks")
    source = DataSource([cfg], seed=1)
    assert [i.path.name for i in source.items] == ["pic.png"]  # the mask folder is not a concept folder
    mask = load_mask(source.items[0], 64, 64, cfg, seed=1, epoch=1, repeat=0)
    assert mask[:, :30].max() == 0.0 and mask[:, 34:].min() == 1.0


def test_masked_out_pixels_get_no_gradient():
    from trainer.masks import apply_mask

    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    masks = torch.ones(2, 1, 64, 64)
    masks[0, :, :, :32] = 0  # left half of image 0
    error = torch.nn.functional.mse_loss(pred, target, reduction="none")
    apply_mask(error, masks).mean().backward()
    assert pred.grad[0, :, :, :4].abs().max() == 0 and pred.grad[0, :, :, 4:].abs().min() > 0
    assert pred.grad[1].abs().min() > 0


def test_masked_loss_without_masks_is_refused_and_unused_masks_are_reported():
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="masked_loss"):
        TrainConfig.from_dict({"datasets": [{"path": "x"}], "training": {"masked_loss": True}})
    unused = TrainConfig.from_dict({"datasets": [{"path": "x", "alpha_mask": True}]})
    assert any("masked_loss is off" in n for n in plan_from_counts({(64, 64): 2}, unused).notes)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True])
def test_fully_masked_images_train_nothing(tiny_sd15, tmp_path, cache):
    import numpy as np
    from PIL import Image

    from trainer.loop import train

    data = tmp_path / "data"
    for i in range(2):
        _half_masked_image(data / "1_thing", f"{i}.png", size=(64, 64))
    (data / "black").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((64, 64), dtype=np.uint8), "L").save(data / "black" / f"{i}.png")
    cfg = TrainConfig.from_dict({
        "model": {"family": "sd15", "path": str(tiny_sd15)},
        "datasets": [{"path": str(data), "resolution": 64, "mask_dir": "black"}],
        "network": {"network_dim": 2, "network_alpha": 2},
        "training": {"batch_size": 1, "epochs": 1, "masked_loss": True, "cache_latents": cache},
        "save": {"output_dir": str(tmp_path / "out"), "run_name": "m", "save_every_n_epochs": 0,
                 "save_last": False, "save_state": False},
    })
    assert train(cfg).losses == [0.0, 0.0]


# --- T5 token length (kohya t5xxl_max_token_length) ---------------------------------------------------------------------

@pytest.mark.parametrize("family,default", [("sd3", 77), ("flux", 256)])
def test_t5_token_length_is_a_training_option(family, default):
    from trainer.config import TrainingConfig
    from trainer.families import get_family
    from trainer.families.base import Components

    fam = get_family(family)
    comps = Components(None, None, [], [], None, extras={"t5_length": fam.t5_length, "guidance": 1.0})
    fam.configure_training(comps, TrainingConfig())
    assert comps.extras["t5_length"] == default  # 0 = ComfyUI's padding length
    fam.configure_training(comps, TrainingConfig(t5xxl_max_token_length=512))
    assert comps.extras["t5_length"] == 512
    sd15 = TrainConfig.from_dict({"training": {"t5xxl_max_token_length": 256}})
    assert any("t5xxl_max_token_length" in n for n in plan_from_counts({(64, 64): 2}, sd15).notes)


def test_bad_masks_are_named(tmp_path):
    from trainer.config import DatasetConfig
    from trainer.dataset import DataSource
    from trainer.errors import DatasetError
    from trainer.masks import load_mask

    _half_masked_image(tmp_path / "1_thing", "pic.png", size=(64, 64))
    cfg = DatasetConfig(path=str(tmp_path), resolution=64, mask_dir="nowhere")
    item = DataSource([cfg], seed=1).items[0]
    with pytest.raises(DatasetError, match="mask_dir"):
        load_mask(item, 64, 64, cfg, seed=1, epoch=1, repeat=0)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "pic.png").write_bytes(b"not a png")
    cfg = DatasetConfig(path=str(tmp_path), resolution=64, mask_dir="masks")
    with pytest.raises(DatasetError, match="pic.png"):
        load_mask(item, 64, 64, cfg, seed=1, epoch=1, repeat=0)


def test_adafactor_relative_step_says_the_schedule_does_not_apply():
    notes = plan_from_counts({(64, 64): 4}, TrainConfig.from_dict({"optim": {"optimizer": "adafactor"}})).notes
    assert any("relative_step" in n and "cosine" in n for n in notes)
    fixed = TrainConfig.from_dict({"optim": {"optimizer": "adafactor",
                                             "optimizer_args": ["relative_step=False", "scale_parameter=False"]}})
    assert plan_from_counts({(64, 64): 4}, fixed).notes == ()
