"""The real-text-encoder cases of the 0.8.0 stage (model_path_text_encoders.py), checked without ComfyUI: each tiny
config keeps the geometry the family's code requires, and the small dataset has captions of different lengths."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_path_text_encoders import CASES, DATA, TEXT_WIDTH, small_dataset  # noqa: E402


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_case_keeps_its_familys_geometry_at_tiny_size(name):
    case = CASES[name]
    unet, encoder = case.unet_config, case.encoder_config
    width = unet.get("dim", unet.get("hidden_size"))
    heads = unet.get("n_heads", unet.get("num_heads"))
    axes = unet.get("axes_dims", unet.get("axes_dim"))
    assert width % heads == 0 and width // heads == sum(axes)  # RoPE axes cover each head (asserted by NextDiT)
    assert unet.get("cap_feat_dim", unet.get("context_in_dim")) == TEXT_WIDTH  # the encoder's features fit
    assert encoder.get("hidden_size", encoder.get("d_model")) == TEXT_WIDTH
    assert width < 1024 and case.real  # tiny, and the report names the released sizes


def test_the_small_dataset_copies_images_with_captions_of_different_lengths(tmp_path):
    folder = small_dataset(tmp_path)
    captions = sorted(folder.rglob("*.txt"))
    assert [p.stem for p in captions] == sorted(DATA)
    assert all(p.with_suffix(".png").is_file() for p in captions)
    assert len({len(p.read_text().split()) for p in captions}) == len(captions)
