"""The demo's pieces: drawn pictures, the concept dataset, and the pre-trained base model's recipe (smoke-sized)."""
from __future__ import annotations

import random

import pytest

from trainer.config import ModelConfig
from trainer.demo import PROMPT, demo_config
from trainer.demo_base import BACKGROUNDS, CONCEPT, COLOURS, VAE_CHANNELS, build_demo_base, draw, \
    write_concept_dataset
from trainer.families import get_family
from trainer.validation import training_source


def test_drawn_shapes_have_the_colours_and_shapes_their_captions_name():
    rng = random.Random(0)
    circle = draw("circle", COLOURS["red"], BACKGROUNDS["black"], rng)
    assert circle.getpixel((32, 32)) == COLOURS["red"] and circle.getpixel((1, 1)) == BACKGROUNDS["black"]
    ring = draw("ring", CONCEPT["colour"], BACKGROUNDS["grey"], random.Random(0))
    assert ring.getpixel((32, 32)) == BACKGROUNDS["grey"]  # a ring is hollow
    assert CONCEPT["colour"] in {c for _, c in ring.getcolors(4096)}
    with pytest.raises(ValueError, match="unknown shape"):
        draw("star", COLOURS["red"], BACKGROUNDS["black"], rng)


def test_concept_dataset_is_a_kohya_folder_with_a_held_out_validation_pair(tmp_path):
    data = write_concept_dataset(tmp_path / "concept")
    images = sorted((data / "4_crucible").glob("*.png"))
    assert len(images) == 20
    assert all(p.with_suffix(".txt").read_text().startswith("crucible, ") for p in images)
    cfg = demo_config(tmp_path / "base", data, tmp_path / "out", epochs=2)
    source = training_source(cfg)
    assert len(source.validation_items) == 2 and source.samples_per_epoch == 18 * 4
    assert PROMPT.startswith(CONCEPT["word"])


@pytest.mark.slow
def test_demo_base_recipe_writes_a_loadable_model_with_its_own_vae(tmp_path):
    folder = build_demo_base(tmp_path / "base", vae_steps=2, unet_steps=2, pictures=24, report=lambda _: None)
    comps = get_family("sd15").load(ModelConfig(family="sd15", path=str(folder)))
    assert tuple(comps.vae.config.block_out_channels) == VAE_CHANNELS
    assert comps.vae.config.scaling_factor != 0.18215  # set from the trained latents' spread
    images = get_family("sd15").sample(comps, [PROMPT], seed=1, steps=2, cfg=2.0, width=64, height=64)
    assert images[0].size == (64, 64)


def test_the_shipped_base_model_draws_a_shape_on_a_background():
    """trainer/demo_base_model (the output of `python -m trainer demo-base`) renders a shape, not noise."""
    import numpy as np

    from trainer.demo import SHIPPED_BASE

    family = get_family("sd15")
    comps = family.load(ModelConfig(family="sd15", path=str(SHIPPED_BASE)))
    (image,) = family.sample(comps, ["red circle, black background"], seed=7, steps=20, cfg=4.0, width=64, height=64)
    pixels = np.asarray(image, dtype=np.float32)
    centre, corners = pixels[24:40, 24:40].mean((0, 1)), np.concatenate(
        [pixels[:8, :8], pixels[:8, -8:], pixels[-8:, :8], pixels[-8:, -8:]]).mean((0, 1))
    assert np.abs(centre - corners).max() > 60  # a filled shape in the middle, a different colour around it
    assert centre[0] > centre[2] + 60  # and the shape is red, as asked
