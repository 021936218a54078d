"""The code paths a CPU-only suite cannot reach, on a CUDA GPU (issue 16's "GPU checks"), with tiny models.

* block swap with its real CUDA side stream and pinned host memory: the same losses and LoRA weights as without it
  (tiny SDXL and Flux), the swapped weights home in pinned memory between steps, the adapters on the GPU;
* fp16 with accelerate's gradient scaler: an overflowing step is skipped (weights unchanged, scale halved) and
  training goes on; only a long run of consecutive overflows stops it;
* fp8 base weights: a LoRA trains on a float8 base held on the training device, near the bf16 run's losses;
* the SDXL VAE in fp32 under half precision (fp16 on CUDA), finite cached latents, a cache key naming its dtype;
* ``fused=True`` AdamW where every trained parameter is on CUDA;
* cache, then free: at step 1 no encoder is left on the device, and ``torch.cuda.max_memory_allocated`` of the
  steps is lower than a run that keeps its encoders.
* the Step Plan's memory line reads the GPU's free and total memory.

A test whose body also works on the CPU is parametrized over ``device``: its CPU variant runs everywhere (so the test
code itself is exercised in CI), its CUDA variant carries the ``cuda`` mark and is skipped without a GPU. Tests
that only mean something on CUDA (block swap's streams, fp16) carry the mark themselves. The marks sit on the
variants, not on the module, so that the CPU variants run here. On a GPU: ``pytest -m cuda tests/test_cuda.py``
(``benchmarks/gpu_checks.sh`` runs it). The trainer picks CUDA wherever it is available (``make_accelerator``), so
the CPU variant hides CUDA from it for its duration.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

import trainer.block_swap as block_swap
from trainer.callbacks import Callbacks
from trainer.config import TrainConfig
from trainer.errors import TrainingDivergedError
from trainer.numerics import MAX_CONSECUTIVE_SKIPS
from trainer.quantized import FP8, Fp8Linear

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
CUDA_MARKS = [pytest.mark.cuda, requires_cuda]
HALF = {"cpu": "bf16", "cuda": "fp16"}  # the half precision each device trains in (fp16 needs CUDA's scaler)

pytestmark = pytest.mark.slow  # each test trains or sets up a tiny model


@pytest.fixture(scope="module")
def run_config_defaults() -> dict:
    """Short runs without a validation split or epoch checkpoints (make_config's base for this module)."""
    return {"training": {"validation_split": 0.0}, "save": {"save_every_n_epochs": 0}}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
def device(request, monkeypatch) -> str:
    """The training device of a test that runs on both; on "cpu" CUDA is hidden from the trainer."""
    if request.param == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return request.param


@pytest.fixture
def exact_cuda(monkeypatch):
    """fp32 on CUDA as reproducible as it gets: no TF32 matmuls or convolutions, deterministic cuDNN algorithms."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def _spy_steps(monkeypatch, before=None, after=None):
    """Wrap ``Trainer._optimizer_step``: ``before(trainer, step)`` and ``after(trainer, step, loss)`` around it (a
    later call replaces an earlier one's wrapper: they never stack)."""
    import trainer.loop as loop

    real = getattr(loop.Trainer._optimizer_step, "unspied", loop.Trainer._optimizer_step)

    def step(self, group, step_no, epoch):
        if before is not None:
            before(self, step_no)
        loss = real(self, group, step_no, epoch)
        if after is not None:
            after(self, step_no, loss)
        return loss

    step.unspied = real
    monkeypatch.setattr(loop.Trainer, "_optimizer_step", step)


def _tensor_bytes(module, device: torch.device) -> int:
    """Bytes of ``module``'s parameters and buffers that are on ``device`` (0 for a released encoder)."""
    if not isinstance(module, torch.nn.Module):
        return 0
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
               if t.device.type == device.type)


# --- block swap: the CUDA stream mover ---------------------------------------------------------------------------

def _watch_block_swap(monkeypatch) -> dict:
    """Records every copy the real mover starts (device, pinned sources) and, before each step, where the swapped
    frozen weights and the swapped blocks' adapters are."""
    seen = {"starts": [], "between_steps": []}
    real_start = block_swap.StreamMover.start

    def start(self, hosts):
        seen["starts"].append((self.device.type, all(h.is_pinned() for h in hosts)))
        return real_start(self, hosts)

    def before(trainer, step):
        swap = trainer.block_swap
        if swap is None:
            return
        frozen = {(p.device.type, p.data.is_pinned()) for hosts in swap.hosts.values() for p, _ in hosts}
        trained = {p.device.type for b in swap.blocks[swap.first_swapped:] for p in b.parameters() if p.requires_grad}
        seen["between_steps"].append((frozen, trained))

    monkeypatch.setattr(block_swap.StreamMover, "start", start)
    _spy_steps(monkeypatch, before=before)
    return seen


def _check_swapped_on_cuda(seen: dict, steps: int, swapped: int) -> None:
    assert len(seen["starts"]) >= steps * swapped and set(seen["starts"]) == {("cuda", True)}
    # between steps every swapped weight is home in pinned host memory; the adapters train on the GPU
    assert seen["between_steps"] == [({("cpu", True)}, {"cuda"})] * steps


CUDA_SWAP_TOLERANCES = {"loss_rtol": 1e-4, "weight_rtol": 1e-3, "weight_atol": 1e-6}


@pytest.mark.cuda
@requires_cuda
def test_block_swap_on_cuda_trains_sdxl_as_without_it(tiny_sdxl, demo_dataset, tmp_path, monkeypatch, exact_cuda):
    from test_block_swap import SGD, _assert_same, sdxl_config
    from trainer.loop import train

    def config(out, swap):
        return sdxl_config(tiny_sdxl, demo_dataset, out, network={"train_text_encoder": False}, optim=SGD,
                           training={"max_train_steps": 3, "blocks_to_swap": swap, "gradient_checkpointing": True},
                           save={"save_every_n_steps": 3})

    plain = train(config(tmp_path / "plain", 0))
    seen = _watch_block_swap(monkeypatch)
    swapped = train(config(tmp_path / "swap", 3))
    _assert_same(plain, swapped, **CUDA_SWAP_TOLERANCES)
    _check_swapped_on_cuda(seen, steps=3, swapped=3)
    assert len(seen["starts"]) >= 3 * 2 * 3  # in for the forward and again for the backward (as on the CPU)


@pytest.mark.cuda
@requires_cuda
def test_block_swap_on_cuda_trains_flux_as_without_it(tiny_flux, demo_dataset, tmp_path, monkeypatch, exact_cuda):
    from test_block_swap import _assert_same, flux_swap_config
    from trainer.loop import train

    plain = train(flux_swap_config(tiny_flux, demo_dataset, tmp_path / "plain", 0))
    seen = _watch_block_swap(monkeypatch)
    swapped = train(flux_swap_config(tiny_flux, demo_dataset, tmp_path / "swap", 2))
    _assert_same(plain, swapped, **CUDA_SWAP_TOLERANCES)
    _check_swapped_on_cuda(seen, steps=3, swapped=2)


# --- fp16 and the gradient scaler -------------------------------------------------------------------------------

def _train_with_overflows(cfg, overflowing: set[int] | None, monkeypatch, seen: dict):
    """Train ``cfg``, making every gradient of the first trained tensor inf at the steps in ``overflowing`` (None:
    at every step): what an fp16 overflow does to the scaled gradients. The scaler starts at 2^10, far from any
    real overflow of the tiny model, so only the injected ones happen. ``seen`` (kept when training raises) gets the
    last step begun and, per step, whether any trained weight changed and the scaler's scale after it."""
    from trainer.loop import train

    seen.update(step=0, changed={}, scale={})

    def before(trainer, step):
        scaler = trainer.acc.scaler
        assert scaler is not None, "fp16 on CUDA runs with accelerate's gradient scaler"
        if "hook" not in seen:
            if scaler._scale is None:
                scaler._init_scale = 1024.0  # read when the scale is first made (the first backward)
            else:
                scaler._scale.fill_(1024.0)
            seen["hook"] = trainer.params[0].register_hook(
                lambda g: torch.full_like(g, float("inf")) if overflowing is None or seen["step"] in overflowing
                else g)
        seen["step"] = step
        seen["before"] = [p.detach().clone() for p in trainer.params]

    def after(trainer, step, loss):
        seen["changed"][step] = any(not torch.equal(b, p.detach()) for b, p in zip(seen["before"], trainer.params))
        seen["scale"][step] = trainer.acc.scaler.get_scale()

    _spy_steps(monkeypatch, before=before, after=after)
    return train(cfg)


@pytest.mark.cuda
@requires_cuda
def test_fp16_scaler_skips_overflowing_steps_and_training_goes_on(make_config, tiny_sd15, demo_dataset, tmp_path,
                                                                   monkeypatch, caplog):
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"mixed_precision": "fp16", "max_train_steps": 5})
    seen: dict = {}
    with caplog.at_level(logging.INFO, logger="crucible"):
        result = _train_with_overflows(cfg, {1, 2}, monkeypatch, seen)
    assert len(result.losses) == 5 and all(map(math.isfinite, result.losses))
    assert seen["changed"] == {1: False, 2: False, 3: True, 4: True, 5: True}  # skipped steps leave the weights
    scale = seen["scale"]
    assert scale[1] == 512.0 and scale[2] == 256.0  # halved at each overflow ...
    assert scale[5] == scale[3] == 256.0  # ... and kept while the steps are good (growth after 2000 of them)
    skipped = [r.getMessage() for r in caplog.records if "scaler skipped" in r.getMessage()]
    assert len(skipped) == 2 and "1 in a row" in skipped[0] and "2 in a row" in skipped[1]


@pytest.mark.cuda
@requires_cuda
def test_fp16_stops_only_after_many_consecutive_overflows(make_config, tiny_sd15, demo_dataset, tmp_path,
                                                          monkeypatch):
    steps = MAX_CONSECUTIVE_SKIPS + 5
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"mixed_precision": "fp16", "max_train_steps": steps})
    seen: dict = {}
    with pytest.raises(TrainingDivergedError, match=f"{MAX_CONSECUTIVE_SKIPS} consecutive steps"):
        _train_with_overflows(cfg, None, monkeypatch, seen)
    assert seen["step"] == MAX_CONSECUTIVE_SKIPS  # not one step earlier, and not later
    assert len(seen["changed"]) == MAX_CONSECUTIVE_SKIPS - 1 and not any(seen["changed"].values())
    assert seen["scale"][MAX_CONSECUTIVE_SKIPS - 1] == 1024.0 / 2 ** (MAX_CONSECUTIVE_SKIPS - 1)


# --- fp8 base weights ---------------------------------------------------------------------------------------------

def test_fp8_base_lora_trains_near_the_bf16_run_with_fp8_weights_on_the_device(device, tiny_flux, demo_dataset,
                                                                                tmp_path, monkeypatch):
    from test_fp8 import _config as flux_fp8_config
    from trainer.loop import Trainer, train

    steps = 3
    fp8_cfg = flux_fp8_config(tiny_flux, demo_dataset, tmp_path / "fp8", steps=steps)
    data = flux_fp8_config(tiny_flux, demo_dataset, tmp_path / "bf16", steps=steps).to_dict()
    data["model"]["fp8_base"] = False
    bf16_cfg = TrainConfig.from_dict(data)
    seen = {}
    real_setup = Trainer._setup_denoiser

    def setup(self):
        real_setup(self)
        seen["denoiser"] = self.comps.denoiser

    monkeypatch.setattr(Trainer, "_setup_denoiser", setup)
    bf16 = train(bf16_cfg).losses
    wrapped = [m for m in seen["denoiser"].modules() if hasattr(m, "base_layer")]
    assert wrapped and not any(isinstance(m.base_layer, Fp8Linear) for m in wrapped)  # the comparison run is bf16
    fp8 = train(fp8_cfg).losses
    wrapped = [m for m in seen["denoiser"].modules() if hasattr(m, "base_layer")]
    bases = [m.base_layer for m in wrapped]
    assert bases and all(isinstance(b, Fp8Linear) for b in bases)
    assert {(b.weight.dtype, b.weight.device.type) for b in bases} == {(FP8, device)}  # stored fp8 on the device
    adapters = [p for m in wrapped for p in m.lora_A.parameters()]
    assert adapters and {(p.dtype, p.device.type) for p in adapters} == {(torch.float32, device)}
    assert len(fp8) == len(bf16) == steps and all(map(math.isfinite, fp8)) and fp8 != bf16  # it computed in fp8
    for a, b in zip(fp8, bf16):  # the same noise and timesteps; only the base's fp8 rounding differs
        assert abs(a - b) <= 0.02 * abs(b), (fp8, bf16)


# --- the SDXL VAE in fp32 -----------------------------------------------------------------------------------------

def test_sdxl_vae_runs_in_fp32_under_half_precision(device, make_config, tiny_sdxl, demo_dataset, tmp_path):
    from trainer.loop import Trainer
    from trainer.release import release_run

    precision = HALF[device]
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    cfg = make_config(tiny_sdxl, demo_dataset, tmp_path, model={"family": "sdxl"},
                      network={"train_text_encoder": False},
                      training={"mixed_precision": precision, "cache_latents": True, "max_train_steps": 1})
    trainer = Trainer(cfg, Callbacks())
    try:
        trainer._setup_encoders(None)
        vae = trainer.comps.vae
        assert {(p.dtype, p.device.type) for p in vae.parameters()} == {(torch.float32, device)}
        assert trainer.latent_cache.model_id.endswith("|vae=torch.float32")  # never reused by a half-precision VAE
        trainer._pre_encode()
        latents = list(trainer.latent_cache.memory.values())
        assert len(latents) == len(trainer.source.items)
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() and t.abs().max() > 0 for t in latents)
        trainer._setup_denoiser()
        assert {p.dtype for p in trainer.comps.denoiser.parameters() if not p.requires_grad} == {half}
        loss = trainer._optimizer_step(trainer._epoch_groups(1)[0], 1, 1)
        assert math.isfinite(loss)
    finally:
        release_run(trainer)


def test_sdxl_previews_decode_with_the_fp32_vae(device, make_config, tiny_sdxl, demo_dataset, tmp_path, monkeypatch):
    """Previews render under the run's autocast; the VAE decodes outside it, in its own dtype (found writing this
    test: SDXL's fp32 VAE decoded in bf16 on the CPU, fp16 on CUDA, where kohya's no_half_vae exists to avoid it)."""
    from trainer.loop import Trainer, train

    cfg = make_config(tiny_sdxl, demo_dataset, tmp_path, model={"family": "sdxl"},
                      network={"train_text_encoder": False},
                      training={"mixed_precision": HALF[device], "max_train_steps": 1},
                      sample={"prompts": ["a red circle"], "steps": 2, "cfg": 1.0, "sample_every_n_steps": 1})
    decoded = []
    real_setup = Trainer._setup_denoiser

    def setup(self):
        real_setup(self)
        self.comps.vae.decoder.conv_out.register_forward_hook(lambda _m, _i, out: decoded.append(out.dtype))

    monkeypatch.setattr(Trainer, "_setup_denoiser", setup)
    result = train(cfg)
    assert result.samples and decoded  # a preview was rendered through the VAE's decoder
    assert set(decoded) == {torch.float32}


# --- AdamW chosen for memory ----------------------------------------------------------------------------------------

def test_fused_adamw_is_chosen_when_every_parameter_is_on_cuda(device, make_config, tiny_sd15, demo_dataset,
                                                               tmp_path):
    from trainer.loop import Trainer
    from trainer.release import release_run

    cfg = make_config(tiny_sd15, demo_dataset, tmp_path, training={"mixed_precision": "bf16", "max_train_steps": 1})
    assert cfg.optim.optimizer == "adamw" and not cfg.optim.optimizer_args
    trainer = Trainer(cfg, Callbacks())
    try:
        trainer._setup(None)
        inner = trainer.optimizer.optimizer  # accelerate's wrapper holds torch's AdamW
        params = [p for group in inner.param_groups for p in group["params"]]
        assert params and {p.device.type for p in params} == {device}
        assert bool(inner.defaults.get("fused")) is (device == "cuda")
        before = [p.detach().clone() for p in params]
        loss = trainer._optimizer_step(trainer._epoch_groups(1)[0], 1, 1)
        assert math.isfinite(loss) and any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    finally:
        release_run(trainer)


# --- cache, then free ---------------------------------------------------------------------------------------------

def _step_memory(cfg, monkeypatch) -> dict:
    """At step 1: the bytes of encoder tensors on the training device, and on CUDA ``memory_allocated``; after the
    run, on CUDA, the peak allocated since step 1 began (the steps' peak)."""
    import gc

    from trainer.loop import train

    seen = {}

    def before(trainer, step):
        if step != 1:
            return
        where = trainer.acc.device
        seen["encoder_bytes"] = sum(_tensor_bytes(m, where) for m in (trainer.comps.vae, *trainer.comps.text_encoders))
        if where.type == "cuda":
            seen["allocated"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _spy_steps(monkeypatch, before=before)
    train(cfg)
    if torch.cuda.is_available():
        seen["peak"] = torch.cuda.max_memory_allocated()
    return seen


def test_with_caches_no_encoder_is_on_the_device_during_the_steps(device, make_config, tiny_sd15, demo_dataset,
                                                                  tmp_path, monkeypatch):
    def config(out, cached: bool):
        return make_config(tiny_sd15, demo_dataset, out, training={
            "mixed_precision": "no", "cache_latents": cached, "cache_text_embeddings": cached, "max_train_steps": 2})

    # the run that keeps its encoders first: anything a run leaves behind could only make the cached run look worse
    kept = _step_memory(config(tmp_path / "kept", False), monkeypatch)
    cached = _step_memory(config(tmp_path / "cached", True), monkeypatch)
    assert kept["encoder_bytes"] > 1_000_000  # the tiny VAE (~4 MB) and CLIP text encoder are on the device ...
    assert cached["encoder_bytes"] == 0  # ... and with the caches filled they have left it
    if device == "cuda":  # the allocator agrees: the encoders' bytes are no longer allocated on the GPU
        assert kept["allocated"] - cached["allocated"] >= kept["encoder_bytes"] // 2, (kept, cached)
        assert cached["peak"] < kept["peak"], (kept, cached)


# --- the Step Plan's memory line --------------------------------------------------------------------------------------

def test_the_memory_report_reads_the_devices_memory(device):
    import re

    from trainer.memory import memory_report

    cfg = TrainConfig.from_dict({"model": {"family": "sd15"}, "datasets": [{"path": "x", "resolution": 512}]})
    report = memory_report(cfg)
    if device == "cpu":
        assert "device memory: unknown here (no CUDA device)" in report
        return
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    found = re.search(r"fits: ([\d.]+) GiB free of ([\d.]+) GiB", report)  # an SD1.5 LoRA at 512 px: ~3 GiB
    assert found, report
    free, reported_total = float(found.group(1)), float(found.group(2))
    assert abs(reported_total - total) < 0.5 and 0 < free <= reported_total
