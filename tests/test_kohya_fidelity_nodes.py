"""Issue 15 through the nodes (ComfyUI stubbed as in test_nodes): widgets and reports kohya users expect."""
from __future__ import annotations

import pytest
from PIL import Image

from trainer.config import TrainConfig
from trainer.errors import ConfigError

from test_nodes import (comfy, dataset, defaults, nodes, pack, run, small_input,  # noqa: F401 - shared fixtures
                        train_inputs)


def _images(folder, n=2, caption_ext=".txt", caption="a red square"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (200, 30 * i, 30)).save(folder / f"{i}.png")
        (folder / f"{i}{caption_ext}").write_text(caption, encoding="utf-8")


def test_dataset_is_changed_follows_the_chosen_caption_extension(nodes, comfy):
    _images(comfy.input_dir / "capext" / "3_thing", caption_ext=".caption")
    is_changed = nodes["CrucibleDataset"].IS_CHANGED
    before = is_changed(path="capext", caption_extension=".caption")
    (comfy.input_dir / "capext" / "3_thing" / "0.caption").write_text("a blue square, edited", encoding="utf-8")
    assert is_changed(path="capext", caption_extension=".caption") != before


def test_dataset_report_warns_about_images_kohya_would_ignore(nodes, comfy):
    _images(comfy.input_dir / "mixed" / "2_good")
    _images(comfy.input_dir / "mixed" / "plain", n=1)
    _images(comfy.input_dir / "mixed", n=1)
    (_, report), ui = run(nodes, "CrucibleDataset", path="mixed", resolution=64)
    assert "kohya" in report and "plain" in report and "(root)" in report
    assert "N_name" in report
    (_, report), _ = run(nodes, "CrucibleDataset", path="mixed", resolution=64, repeats=3)
    assert "kohya would ignore" not in report  # explicit repeats: every folder is meant to train
    (_, report), _ = run(nodes, "CrucibleDataset", path="mixed/2_good", resolution=64)
    assert "kohya would ignore" in report  # a flat folder: kohya reads none of it


def test_network_options_take_kohya_block_settings(nodes):
    (net,), _ = run(nodes, "CrucibleNetworkOptions", down_lr_weight="cosine+0.1", up_lr_weight="0,0,0,0,0,0,1,1,1,1,1,1",
                    block_dims=",".join(["8"] * 25), block_alphas=",".join(["4"] * 25), conv_dim=4, conv_alpha=2.0,
                    target_preset="all_linear_conv", conv_block_dims=",".join(["2"] * 25))
    assert net.down_lr_weight == "cosine+0.1" and len(net.block_dims) == 25 and net.conv_dim == 4
    assert net.conv_block_dims == (2,) * 25 and net.block_alphas == (4.0,) * 25
    with pytest.raises(ConfigError, match="needs 23"):  # SDXL's layout has 23 blocks
        TrainConfig.from_dict({"model": {"family": "sdxl"}, "network": {"block_dims": list(net.block_dims)}})


def test_cli_only_settings_have_node_inputs(nodes):
    spec = {name: {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}
            for name, cls in nodes.items()}
    train = spec["CrucibleTrain"]
    for name in ("sample_steps", "sample_cfg", "sample_seed", "sample_negative_prompt", "sample_width",
                 "sample_height", "sample_guidance", "save_last"):
        assert name in nodes["CrucibleTrain"].INPUT_TYPES()["optional"], name
    assert "bucket_reso_steps" in spec["CrucibleDataset"]
    assert "caption_dropout_every_n_epochs" in spec["CrucibleCaptionOptions"]
    assert {"conv_dim", "conv_alpha"} <= set(spec["CrucibleNetworkOptions"])
    assert {"guidance_scale", "logit_mean", "logit_std", "mode_scale", "prior_loss_weight"} <= \
        set(spec["CrucibleTrainingOptions"])
    assert train["sample_prompts"][1]["tooltip"].count("epoch")


def test_train_node_preview_settings_reach_the_config(nodes, comfy):
    import sys

    import comfy_stubs

    module = sys.modules[f"{comfy_stubs.PACK_NAME}.nodes.train_nodes"]
    from trainer.config import DatasetConfig, ModelConfig

    f = {"epochs": 2, "max_train_steps": 0, "batch_size": 1, "save_every_n_epochs": 1, "save_every_n_steps": 0,
         "checkpoint_limit": 0, "save_precision": "fp16", "sample_every_n_epochs": 0, "sample_every_n_steps": 0,
         "sample_steps": 12, "sample_cfg": 4.5, "sample_seed": 7, "sample_negative_prompt": "blurry",
         "sample_width": 512, "sample_height": 768, "sample_guidance": 3.0, "save_last": False}
    cfg = module.build_train_config(ModelConfig(), (DatasetConfig(path=str(comfy.input_dir)),), "r", "a cat",
                                    None, None, None, f)
    s = cfg.sample
    assert (s.steps, s.cfg, s.seed, s.negative_prompt, s.width, s.height, s.guidance) == \
        (12, 4.5, 7, "blurry", 512, 768, 3.0)
    assert cfg.save.save_last is False


# --- tagging: images + tagger strings → a captioned dataset -------------------------------------------------------------

def stub_tagger(images) -> list[str]:
    """What a WD14-style tagger node outputs: one tag string per image."""
    return [f"1girl, solo, {'red' if float(img[..., 0].mean()) > 0.5 else 'blue'}_hair, smile" for img in images]


def test_write_captions_node_makes_a_dataset_that_trains(nodes, comfy):
    import torch

    from trainer.errors import CrucibleError

    images = torch.stack([torch.full((32, 48, 3), v) for v in (0.9, 0.1)])
    captions = stub_tagger(images)
    node = nodes["CrucibleWriteCaptions"]()
    args = dict(images=[images], captions=captions, path=["tagged/10_ohwx"], name_prefix=["img"],
                trigger_word=["ohwx"], remove_tags=["solo"], overwrite=[False])
    out = node.write(**args)
    folder = comfy.input_dir / "tagged" / "10_ohwx"
    assert sorted(p.name for p in folder.iterdir()) == ["img_0000.png", "img_0000.txt", "img_0001.png", "img_0001.txt"]
    assert (folder / "img_0000.txt").read_text(encoding="utf-8") == "ohwx, 1girl, red_hair, smile"
    assert (folder / "img_0001.txt").read_text(encoding="utf-8") == "ohwx, 1girl, blue_hair, smile"
    assert out["result"][0] == "tagged/10_ohwx" and "2 image(s)" in out["result"][1]

    (folder / "img_0000.txt").write_text("hand-edited caption", encoding="utf-8")
    again = node.write(**args)
    assert "2 skipped" in again["result"][1]
    assert (folder / "img_0000.txt").read_text(encoding="utf-8") == "hand-edited caption"  # never overwritten
    node.write(**{**args, "overwrite": [True]})
    assert (folder / "img_0000.txt").read_text(encoding="utf-8") == "ohwx, 1girl, red_hair, smile"
    assert not [p for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]  # no temp files left

    (_, report), _ = run(nodes, "CrucibleDataset", path="tagged", resolution=64)
    assert "2 images x 10 repeats" in report

    with pytest.raises(CrucibleError):
        node.write(**{**args, "path": ["/etc/crucible-tagged"]})
    with pytest.raises(CrucibleError, match="2 image"):
        node.write(**{**args, "captions": captions[:1], "overwrite": [True]})


def test_coming_from_kohya_page_names_every_node_input(nodes):
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "coming_from_kohya.md").read_text(encoding="utf-8")
    missing = [f"{node_id}.{name}" for node_id, cls in nodes.items()
               for section in ("required", "optional") for name in cls.INPUT_TYPES().get(section, {})
               if f"`{name}`" not in page and node_id not in ("CrucibleCheckpointSweep", "CrucibleImageGrid")]
    assert not missing, f"docs/coming_from_kohya.md does not map: {missing}"


def test_dataset_node_mask_dir_is_confined(nodes, comfy):
    from trainer.errors import CrucibleError

    _images(comfy.input_dir / "masked" / "1_thing")
    (datasets, _), _ = run(nodes, "CrucibleDataset", path="masked", resolution=64, alpha_mask=True, mask_dir="masks")
    assert datasets[-1].alpha_mask and datasets[-1].mask_dir == str((comfy.input_dir / "masked" / "masks").resolve())
    with pytest.raises(CrucibleError):
        run(nodes, "CrucibleDataset", path="masked", resolution=64, mask_dir="../../../etc")


@pytest.mark.slow
def test_train_node_report_names_settings_the_model_ignores(nodes, comfy, tiny_sd15, small_input):
    (training,), _ = run(nodes, "CrucibleTrainingOptions", seed=3, loss_weighting="cosmap")
    comfy.reset_interrupt()
    outputs, ui = run(nodes, "CrucibleTrain", **train_inputs(nodes, tiny_sd15, "noted", epochs=1, training=training))
    report = ui["text"][0]
    assert "note:" in report and "loss_weighting" in report and "sd15" in report
