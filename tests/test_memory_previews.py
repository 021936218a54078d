"""Issue 16: the memory estimate counts the VAE a run keeps for its previews (trainer.sample_prompts: with the latent
cache on and the encoders released, a run with ``sample.prompts`` keeps the VAE in host memory and brings it to the
device for each preview) — where the run keeps it, and only then. The MODEL path (nodes/comfy_memory.py, the Step
Plan with comfy_model) counts ComfyUI's VAE by the same helper, :func:`trainer.memory.preview_terms`."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from test_comfy_family import module  # noqa: F401 - a fixture
from test_comfy_memory import deep_family, estimator, memory, options  # noqa: F401 - memory is a fixture
from trainer.config import NetworkConfig
from trainer.full_size import build_meta, param_counts
from trainer.memory import GIB, MemoryOptions, PreviewTerms, estimate, estimate_case, preview_terms

CACHED = dict(precision="bf16", resolution=512, cache_latents=True, cache_text_embeddings=True)


@pytest.mark.parametrize("family, vae_bytes", [("sd15", 2), ("sdxl", 4)])  # SDXL's VAE runs in fp32 (no_half_vae)
def test_on_the_cpu_the_vae_kept_for_previews_is_in_the_training_peak(family, vae_bytes):
    vae_gib = param_counts(family)["vae"] * vae_bytes / GIB
    assert 0.15 < vae_gib < 0.32  # the issue's +0.16–0.3 GiB
    without = estimate(MemoryOptions(family, **CACHED), "cpu")
    with_previews = estimate(MemoryOptions(family, previews=True, **CACHED), "cpu")
    assert without.parts["vae"] == 0  # released after caching: nothing needs it
    assert with_previews.parts["vae"] == pytest.approx(vae_gib)
    assert with_previews.training_gib == pytest.approx(without.training_gib + vae_gib)
    # without the latent cache the VAE encodes every step: resident either way, previews add no second copy
    uncached = dict(CACHED, cache_latents=False)
    assert estimate(MemoryOptions(family, previews=True, **uncached), "cpu").parts["vae"] == \
        estimate(MemoryOptions(family, **uncached), "cpu").parts["vae"] == pytest.approx(vae_gib)


def test_kept_in_ram_counts_the_vae_once_with_or_without_previews():
    kept = dict(CACHED, release_encoders=False)
    a = estimate(MemoryOptions("sdxl", **kept), "cpu")
    b = estimate(MemoryOptions("sdxl", previews=True, **kept), "cpu")
    assert a.parts == b.parts


def test_on_cuda_the_vae_is_off_the_device_during_steps_and_on_it_while_a_preview_decodes():
    without = estimate(MemoryOptions("sdxl", **CACHED))
    with_previews = estimate(MemoryOptions("sdxl", previews=True, **CACHED))
    assert with_previews.parts == without.parts and with_previews.parts["vae"] == 0  # host memory between previews
    assert without.previewing_gib == 0
    vae = param_counts("sdxl")["vae"] * 4
    decode = 3 * 128 * 512 ** 2 * 4
    held = sum(v for k, v in without.parts.items() if k != "activations")
    assert with_previews.previewing_gib == pytest.approx(held + (vae + decode) / GIB)
    assert with_previews.total_gib == max(with_previews.training_gib, with_previews.caching_gib,
                                          with_previews.previewing_gib)


def test_the_previews_peak_is_named_when_it_is_the_largest():
    """SD1.5 LoRA at 1024 px with checkpointing and both caches: the steps' activations (0.58 GiB) are smaller than
    the VAE (0.16) plus its decode at full resolution (0.75), so a preview is the run's peak and says so."""
    est = estimate(MemoryOptions("sd15", precision="bf16", resolution=1024, cache_latents=True,
                                 cache_text_embeddings=True, previews=True))
    assert est.previewing_gib > max(est.training_gib, est.caching_gib) and est.total_gib == est.previewing_gib
    assert f"previews peak at {est.previewing_gib:.1f} GiB" in est.format()
    plain = estimate(MemoryOptions("sd15", precision="bf16", resolution=1024, cache_latents=True,
                                   cache_text_embeddings=True))
    assert "previews" not in plain.format()


def test_a_run_config_with_preview_prompts_is_estimated_with_previews(tmp_path):
    from trainer.config import TrainConfig

    def config(prompts):
        return TrainConfig.from_dict({"model": {"family": "sdxl", "path": "unused"},
                                      "datasets": [{"path": "unused", "resolution": 512}],
                                      "sample": {"prompts": prompts}})

    assert MemoryOptions.from_config(config(["a photo"])).previews is True
    assert MemoryOptions.from_config(config([])).previews is False


def test_the_benchmark_rows_ran_without_previews_and_are_estimated_so(tmp_path):
    """The 15% test compares ``estimate_case`` with benchmarks/results/memory-cpu*.json: those runs had no preview
    prompts (bench_memory.case_config), so they kept no VAE for previews, and neither does their estimate."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_memory import case_config

    for case in [("sdxl", "lora", "low"), ("sd15", "lora", "default"), ("flux", "lora", "low")]:
        cfg = case_config(case, 512, tmp_path, tmp_path / "out", 1, cuda=False)
        opts = MemoryOptions.from_config(cfg)
        assert opts.previews is False and not cfg.sample.prompts
        assert estimate_case(case, 512, "cpu").previewing_gib == 0


# --- the MODEL path: ComfyUI's VAE ---------------------------------------------------------------------------------
class VaeStandIn(torch.nn.Module):
    """ComfyUI's AutoencoderKL layout, tiny: an encoder whose first convolution is 16 wide, a decoder whose last
    convolution reads 24 channels (its widest layer at full resolution)."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Conv2d(3, 16, 3)
        self.decoder = torch.nn.Module()
        self.decoder.conv_out = torch.nn.Conv2d(24, 3, 3)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_model_path_adds_what_the_helper_says(module, memory, device):  # noqa: F811
    """ComfyUI's VAE lives in host memory and VAE.decode loads it, freeing the MODEL and the CLIP (ComfyUI's) as far
    as it needs: on a GPU a preview holds the adapter with its gradients and optimizer state + the VAE + its decode;
    on the CPU (host memory is the device) everything stays and the VAE is counted already."""
    family, _ = deep_family(module)
    family.vae.first_stage_model = VaeStandIn()
    vae = sum(p.numel() for p in family.vae.first_stage_model.parameters()) * 4
    network, est = NetworkConfig(network_dim=4), estimator(memory, family, device)
    opts = options(memory, cache_latents=True, cache_text_embeddings=True)
    off, on = est.estimate(opts, network), est.estimate(replace(opts, previews=True), network)
    decode = 3 * 24 * 64 ** 2 * 4  # the decoder's width, one image at the run's resolution, fp32 as the VAE is stored
    host = device == "cpu"
    terms = preview_terms(replace(opts, previews=True), vae, 4, host, counted=host, decoder_width=24)
    assert on.preview == terms == PreviewTerms(in_steps=0, vae=0 if host else vae, decode=decode)
    assert off.preview is None and off.previewing_gib == 0
    assert on.parts == off.parts  # ComfyUI's VAE adds nothing to the steps: off a GPU then, in host memory anyway
    assert on.parts["vae"] * GIB == pytest.approx(vae if host else 0)
    held = sum(v for k, v in off.parts.items() if k != "activations") if host else off.parts["trainable parameters"]
    assert on.previewing_gib * GIB == pytest.approx(terms.peak(held * GIB))
    assert on.previewing_gib * GIB == pytest.approx(held * GIB + (0 if host else vae) + decode)
    assert on.total_gib == max(on.training_gib, on.caching_gib, on.previewing_gib)
    # without the latent cache the VAE is on the device during the steps: the preview brings no second copy
    uncached = est.estimate(replace(opts, previews=True, cache_latents=False), network)
    assert uncached.preview.vae == 0 and uncached.parts["vae"] * GIB == pytest.approx(vae)
    if not host:
        assert uncached.previewing_gib * GIB == pytest.approx((uncached.parts["trainable parameters"]
                                                               + uncached.parts["vae"]) * GIB + decode)


def test_both_paths_give_the_same_preview_terms_for_the_same_vae(module, memory):  # noqa: F811
    """SD1.5's full-size VAE (on the meta device: no memory) as the graph's VAE: the MODEL path reads its bytes as
    stored and its decoder's width (128) and gets the Crucible path's terms for sd15 without mixed precision."""
    family, _ = deep_family(module)
    family.vae.first_stage_model = build_meta("sd15", "vae")
    network = NetworkConfig(network_dim=4)
    cached = dict(precision="no", resolution=64, cache_latents=True, cache_text_embeddings=True, previews=True)
    for device in ("cuda", "cpu"):
        model_path = estimator(memory, family, device).estimate(options(memory, **cached), network)
        crucible = estimate(MemoryOptions("sd15", **cached), device)
        assert model_path.preview.decode == crucible.preview.decode == 3 * 128 * 64 ** 2 * 4
        assert model_path.parts["vae"] == pytest.approx(crucible.parts["vae"])  # on the CPU: held all run long
        if device == "cuda":
            assert model_path.preview == crucible.preview
            assert crucible.preview.vae == param_counts("sd15")["vae"] * 4


def test_on_a_gpu_a_preview_decode_that_does_not_fit_is_tiled_not_a_failed_run(module, memory):  # noqa: F811
    """ComfyUI's VAE.decode catches the out-of-memory error and decodes in tiles (comfy/sd.py): on a GPU the Step Plan
    says so instead of "will NOT fit" and asks for no switch; on the CPU there is no such retry and the decode counts."""
    family, _ = deep_family(module)  # its VAE stand-in has no decoder: 128 wide, 6 MiB to decode at 64 px in fp32
    network = NetworkConfig(network_dim=4)
    opts = options(memory, cache_latents=True, cache_text_embeddings=True, previews=True)
    est = estimator(memory, family).estimate(opts, network)
    steps = max(est.training_gib, est.caching_gib)
    assert est.previewing_gib > steps and est.total_gib == est.previewing_gib
    free = (steps + est.previewing_gib) / 2
    text = memory.report(estimator(memory, family), opts, network, ("cuda", free, 24.0, "NORMAL_VRAM"))
    assert "fits: ComfyUI's device cuda" in text and "ComfyUI's VAE decode retries in tiles" in text
    assert "will NOT fit" not in text and f"previews peak at {est.previewing_gib:.1f} GiB" in text
    assert memory.needed_gib(est, "cuda") == steps and memory.needed_gib(est, "cpu") == est.total_gib
    # only where ComfyUI's retry is known to catch the error: not on MPS (a RuntimeError there) nor an unchecked XPU
    for kind in ("mps", "xpu"):
        assert memory.needed_gib(est, kind) == est.total_gib
        text = memory.report(estimator(memory, family), opts, network, (kind, free, 24.0, "NORMAL_VRAM"))
        assert "will NOT fit" in text and "retries in tiles" not in text, kind
    on_cpu = estimator(memory, family, "cpu")
    cpu_est = on_cpu.estimate(opts, network)
    text = memory.report(on_cpu, opts, network, ("cpu", cpu_est.previewing_gib * 0.99, 24.0, "host RAM"))
    assert "will NOT fit" in text and "retries in tiles" not in text
