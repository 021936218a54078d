"""Issue #16: fp8 base weights (``model.fp8_base``), ComfyUI's fp8 / scaled-fp8 files, tensor-by-tensor loading and
T5's ``wo`` kept in fp32 under fp16 — on tiny models, on the CPU."""
from __future__ import annotations

import copy
import json
import math
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.config import TrainConfig
from trainer.errors import ConfigError, ModelLoadError
from trainer.families import get_family
from trainer.quantized import (FP8, Fp8Linear, KeepFp32Linear, apply_fp8_base, cast_frozen, fp8_bytes, fp8_loading,
                               quantize, quantize_linears)
from tiny_flow import build_tiny_flow_model

FLUX = get_family("flux")
FP8_REL = 0.07  # e4m3 keeps 3 mantissa bits: half a step is 1/16 of a value


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_flow_model(tmp_path_factory.mktemp("fp8flux"), "flux", seed=0)


# --- the layer ---------------------------------------------------------------------------------------------------

def test_fp8_linear_output_and_gradient_are_within_fp8_error():
    torch.manual_seed(0)
    linear = nn.Linear(96, 48).to(torch.bfloat16)
    layer = Fp8Linear.from_linear(linear)
    assert layer.weight.dtype == FP8 and layer.bias.dtype == torch.bfloat16 and layer.compute_dtype == torch.bfloat16
    x = torch.randn(8, 96, dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = layer(x), linear(x_ref)
    assert _rel(out, ref) < FP8_REL
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and _rel(x.grad, x_ref.grad) < 2 * FP8_REL


def test_backward_keeps_the_fp8_weight_not_an_upcast_copy():
    """The autograd graph saves the 1-byte weight; the upcast weight lives only inside forward and backward."""
    layer = Fp8Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16))
    saved = []
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        layer(x).sum().backward()
    weights = [d for d, shape in saved if shape == (32, 64)]
    assert weights == [FP8], saved


def test_casts_and_moves_keep_the_fp8_storage_and_change_the_compute_dtype():
    layer = Fp8Linear.from_linear(nn.Linear(16, 8))
    stored = layer.weight.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == FP8 and torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8))
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.weight_scale.dtype == torch.float32
    layer.to("cpu").half()
    assert layer.weight.dtype == FP8 and layer.compute_dtype == torch.float16


def test_fp8_values_are_kept_exactly_and_others_get_an_absmax_scale():
    exact = torch.randn(8, 8).to(FP8).to(torch.bfloat16)  # what a plain fp8 file holds, upcast
    q, scale = quantize(exact)
    assert float(scale) == 1.0 and torch.equal(q.to(torch.bfloat16), exact)
    small = torch.randn(8, 8) * 1e-3  # plain fp8 would flush most of these to subnormals
    q, scale = quantize(small)
    assert q.float().abs().max() == 448 and _rel(q.float() * scale, small) < FP8_REL
    wide = (torch.randn(8, 8) * 1e4).to(torch.float8_e5m2)  # e5m2 files: past e4m3fn's range
    q, scale = quantize(wide)
    assert torch.isfinite(q.float()).all() and _rel(q.float() * scale, wide.float()) < FP8_REL


def test_quantized_flux_is_within_fp8_error_and_half_the_bytes(tiny):
    comps = FLUX.load(tiny.file_config(), dtype=torch.bfloat16)
    reference = copy.deepcopy(comps.denoiser)
    bf16_linear_bytes = sum(m.weight.numel() * 2 for m in reference.modules() if isinstance(m, nn.Linear))
    count = apply_fp8_base([comps.denoiser, *comps.text_encoders], torch.bfloat16)
    linears = [m for m in comps.denoiser.modules() if isinstance(m, nn.Linear)]
    assert count and all(isinstance(m, Fp8Linear) for m in linears)
    fp8, _ = fp8_bytes(comps.denoiser)
    assert fp8 == bf16_linear_bytes // 2  # every Linear weight stored in one byte instead of two
    others = [p.dtype for m in comps.denoiser.modules() for n, p in m.named_parameters(recurse=False)
              if not (isinstance(m, Fp8Linear) and n == "weight")]
    assert others and set(others) == {torch.bfloat16}  # biases, norms, embeddings stay in the compute dtype
    t5 = comps.text_encoders[1]
    assert isinstance(t5.encoder.block[0].layer[0].SelfAttention.q, Fp8Linear)
    assert type(t5.encoder.block[0].layer[1].DenseReluDense.wo) is nn.Linear  # T5 casts activations to wo's dtype
    assert not any(isinstance(m, Fp8Linear) for m in comps.text_encoders[0].modules())  # CLIP stays as it is
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = FLUX.encode_text(comps, ["a red circle"])
        quantized = FLUX.predict(comps, latents, torch.tensor([500.0]), cond)
        full = FLUX.predict(copy.copy(comps).__class__(**{**comps.__dict__, "denoiser": reference}), latents,
                            torch.tensor([500.0]), cond)
    assert _rel(quantized, full) < 2 * FP8_REL
    assert comps.denoiser.dtype == torch.bfloat16  # what pipelines cast to, not the first weight's fp8
    images = FLUX.sample(comps, ["a red circle"], seed=1, steps=2, cfg=1.0, width=64, height=64)
    assert images[0].size == (64, 64) and len(set(images[0].tobytes())) > 1  # previews render on the fp8 base


# --- training through the loop -------------------------------------------------------------------------------------

def _config(tiny, data, out, steps: int, **network) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"family": "flux", "path": str(tiny.transformer_file), "fp8_base": True,
                  "text_encoder_paths": [str(p) for p in tiny.text_encoder_files], "vae_path": str(tiny.vae_file)},
        "datasets": [{"path": str(data), "resolution": 64, "repeats": 1}],
        "network": {"network_dim": 4, "network_alpha": 4, "target_preset": "attn_mlp", **network},
        "optim": {"learning_rate": 1e-2, "lr_scheduler": "constant"},
        "training": {"batch_size": 4, "max_train_steps": steps, "seed": 3, "mixed_precision": "bf16",
                     "timestep_sampling": "logit_normal", "guidance_scale": 3.5, "gradient_checkpointing": True},
        "save": {"output_dir": str(out / "models"), "work_dir": str(out / "runs"), "run_name": "t",
                 "save_every_n_epochs": 0, "save_every_n_steps": steps, "save_precision": "bf16"},
    })


@pytest.fixture(scope="module")
def fp8_run(tiny, demo_dataset, tmp_path_factory):
    from trainer.loop import Trainer, train
    from trainer.callbacks import Callbacks

    out = tmp_path_factory.mktemp("fp8run")
    cfg = _config(tiny, demo_dataset, out, steps=24)
    seen = {}
    original = Trainer._setup_denoiser

    def spy(self):
        original(self)
        seen["denoiser"] = self.comps.denoiser

    Trainer._setup_denoiser = spy
    try:
        result = train(cfg, Callbacks())
    finally:
        Trainer._setup_denoiser = original
    return cfg, result, seen["denoiser"]


def test_lora_trains_on_the_fp8_base_and_the_loss_falls(fp8_run):
    _, result, denoiser = fp8_run
    base = [m.base_layer for m in denoiser.modules() if hasattr(m, "base_layer")]
    assert base and all(isinstance(b, Fp8Linear) and b.weight.dtype == FP8 for b in base)
    losses = result.losses
    assert len(losses) == 24 and all(map(math.isfinite, losses))
    assert sum(losses[-6:]) / 6 < 0.9 * sum(losses[:6]) / 6, losses


def test_the_exported_lora_is_a_normal_lora(fp8_run, tiny, comfyui_reference):
    cfg, result, _ = fp8_run
    tensors = load_file(str(result.checkpoints[-1].path))
    assert tensors and not any(t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in tensors.values())
    assert {t.dtype for k, t in tensors.items() if ".lora_" in k} == {torch.bfloat16}  # save_precision
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert prefixes <= set(comfyui_reference.keymap("flux")["unet"])
    assert not any("scale" in k or "comfy_quant" in k for k in tensors)


def test_resume_on_the_fp8_base_repeats_the_uninterrupted_run(tiny, demo_dataset, tmp_path):
    from run_helpers import StopAt

    from trainer.loop import train

    whole = train(_config(tiny, demo_dataset, tmp_path / "whole", steps=4)).losses
    cfg = _config(tiny, demo_dataset, tmp_path / "parts", steps=4)
    first = train(cfg, StopAt(2))
    assert first.cancelled
    assert train(cfg, resume_from=first.state_dir).losses == whole


def test_fp8_base_refuses_full_finetunes_and_dora(tiny, demo_dataset, tmp_path):
    with pytest.raises(ConfigError, match="fp8_base.*full fine-tune"):
        _config(tiny, demo_dataset, tmp_path, steps=2, network_type="full")
    with pytest.raises(ConfigError, match="fp8_base.*DoRA"):
        _config(tiny, demo_dataset, tmp_path, steps=2, network_type="dora")
    for kind in ("loha", "lokr"):  # peft's LyCORIS adapters read only the base layer's output
        _config(tiny, demo_dataset, tmp_path, steps=2, network_type=kind)


# --- ComfyUI's fp8 files -------------------------------------------------------------------------------------------

def _linear_weights(state: dict) -> list[str]:
    return [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and "embed" not in k
            and "shared" not in k and "relative_attention_bias" not in k]


def _scaled(state: dict, style: str) -> tuple[dict, dict]:
    """``state`` as ComfyUI's scaled-fp8 files hold it: ``old`` (``scaled_fp8`` + ``.scale_weight``),
    ``comfy_quant`` (per-layer JSON + ``.weight_scale``) or ``metadata`` (``_quantization_metadata``)."""
    out, layers = dict(state), {}
    for key in _linear_weights(state):
        layer = key[: -len(".weight")]
        q, scale = quantize(state[key].float())
        out[key] = q
        if style == "old":
            out[f"{layer}.scale_weight"] = scale
            out[f"{layer}.scale_input"] = torch.ones(())
        else:
            out[f"{layer}.weight_scale"] = scale
            layers[layer] = {"format": "float8_e4m3fn"}
            if style == "comfy_quant":
                out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(layers[layer]).encode()), dtype=torch.uint8)
    if style == "old":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    metadata = {"_quantization_metadata": json.dumps({"layers": layers})} if style == "metadata" else {}
    return out, metadata


@pytest.mark.parametrize("style", ["plain", "old", "comfy_quant", "metadata"])
def test_comfyui_fp8_t5_files_load_within_fp8_error(tiny, tmp_path, style):
    from trainer.families.t5_text import load_t5
    from trainer.families.weights import Part, TensorFile

    t5_file = next(p for p in tiny.text_encoder_files if "t5" in p.name)
    original = load_file(str(t5_file))
    if style == "plain":  # t5xxl_fp8_e4m3fn: every Linear weight cast to fp8, nothing else
        state, metadata = {k: v.to(FP8) if k in _linear_weights(original) else v for k, v in original.items()}, {}
    else:
        state, metadata = _scaled(original, style)
    path = tmp_path / f"t5_{style}.safetensors"
    save_file(state, str(path), metadata=metadata or None)
    model = load_t5(Part(TensorFile(path, "t5")))
    loaded = model.state_dict()
    for key in _linear_weights(original):
        assert loaded[key].dtype == torch.float32
        assert _rel(loaded[key], original[key]) < FP8_REL, key
        if style == "plain":
            assert torch.equal(loaded[key], original[key].to(FP8).float())
        else:
            scale = state[key.replace(".weight", ".scale_weight" if style == "old" else ".weight_scale")]
            assert torch.equal(loaded[key], state[key].float() * scale)
    assert torch.equal(loaded["shared.weight"], original["shared.weight"])


@pytest.mark.parametrize("style", ["plain", "old", "comfy_quant", "metadata"])
def test_comfyui_fp8_flux_files_train_on_the_fp8_base(tiny, tmp_path, style):
    """``flux1-dev-fp8``-style transformer files (original BFL naming): dequantized into the compute dtype, or kept
    in fp8 with fp8_base (plain fp8 values stay bit-exact: scale 1, no second rounding)."""
    original = load_file(str(tiny.transformer_file))
    metadata = None
    if style == "plain":
        state = {k: v.to(FP8) if k in _linear_weights(original) else v for k, v in original.items()}
    else:
        state, metadata = _scaled(original, style)
    path = tmp_path / f"flux_{style}.safetensors"
    save_file(state, str(path), metadata=metadata or None)
    reference = FLUX.load(tiny.file_config()).denoiser.state_dict()
    plain = FLUX.load(tiny.file_config(path=str(path)))
    for key, value in plain.denoiser.state_dict().items():
        assert value.dtype == torch.float32 and _rel(value, reference[key]) < FP8_REL, key
    with fp8_loading():
        kept = FLUX.load(tiny.file_config(path=str(path)), dtype=torch.bfloat16)
    layers = {n: m for n, m in kept.denoiser.named_modules() if isinstance(m, Fp8Linear)}
    assert layers and not any(type(m) is nn.Linear for m in kept.denoiser.modules())
    for name, layer in layers.items():
        assert _rel(layer.dequantized_weight(), reference[f"{name}.weight"]) < FP8_REL, name
        if style == "plain":
            assert layer.scale == 1.0 and torch.equal(layer.weight.float(), reference[f"{name}.weight"].to(FP8).float())


def test_a_scaled_fp8_sd15_checkpoint_loads_within_fp8_error(tiny_sd15, tmp_path):
    """A ComfyUI full checkpoint with the scaled-fp8 UNet under ``model.diffusion_model.`` (marker and scales there)."""
    from trainer.config import ModelConfig
    from trainer.tiny import single_file_path

    family = get_family("sd15")
    original = load_file(str(single_file_path(tiny_sd15)))
    unet = {k: v for k, v in original.items() if k.startswith("model.diffusion_model.")}
    scaled, _ = _scaled(unet, "old")
    scaled["model.diffusion_model.scaled_fp8"] = scaled.pop("scaled_fp8")
    path = tmp_path / "sd15_fp8_scaled.safetensors"
    save_file({**original, **scaled}, str(path))
    reference = family.load(ModelConfig(family="sd15", path=str(single_file_path(tiny_sd15)))).denoiser.state_dict()
    cfg = ModelConfig(family="sd15", path=str(path), tokenizer_path=str(tiny_sd15 / "tokenizer"))
    loaded = family.load(cfg, dtype=torch.bfloat16).denoiser.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(_rel(loaded[k], reference[k]) < FP8_REL for k in reference if reference[k].abs().max() > 0)


@pytest.mark.parametrize("bad, message", [
    ({"x.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}, "quantization format 'nvfp4'"),
    ({"x.weight.quant_state.bitsandbytes__nf4": torch.zeros(4, dtype=torch.uint8)}, "bitsandbytes"),
    ({"x.weight": torch.zeros(4, 4, dtype=torch.int8)}, "stored as torch.int8"),
])
def test_unknown_quantization_formats_are_refused_naming_the_file(tmp_path, bad, message):
    from trainer.families.weights import TensorFile

    path = tmp_path / "odd.safetensors"
    save_file({"x.weight": torch.zeros(4, 4, dtype=FP8), **bad}, str(path))
    with pytest.raises(ModelLoadError, match=message) as info:
        TensorFile(path, "model.path").read()
    assert str(path) in str(info.value) and "fp16, bf16 or fp8" in str(info.value)


# --- tensor-by-tensor loading --------------------------------------------------------------------------------------

class _CountingOpen:
    """``safetensors.safe_open`` that counts the bytes of tensors it handed out and that are still alive."""

    live = peak = largest = 0

    def __init__(self, real):
        self.real = real

    def __call__(self, *args, **kwargs):
        counter, handle = self, self.real(*args, **kwargs)

        class Handle:
            def __enter__(self):
                self.inner = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self.inner, name)

            def get_tensor(self, key):
                tensor = self.inner.get_tensor(key)
                size = tensor.numel() * tensor.element_size()
                counter.live += size
                counter.peak = max(counter.peak, counter.live)
                counter.largest = max(counter.largest, size)
                weakref.finalize(tensor, counter.release, size)
                return tensor

        return Handle()

    def release(self, size):
        self.live -= size


@pytest.mark.parametrize("which", ["flux transformer", "sd15 single file"])
def test_files_load_tensor_by_tensor_into_the_target_dtype(tiny, tiny_sd15, monkeypatch, which):
    """An fp32 file loaded in bf16: at no moment is more than one fp32 tensor of it alive (the old loader held the
    whole file in fp32 while it built the bf16 model), and the loaded weights equal the file's, cast."""
    import safetensors

    from trainer.tiny import single_file_path

    from trainer.config import ModelConfig

    if which == "flux transformer":
        path, family, cfg = tiny.transformer_file, FLUX, tiny.file_config()
    else:
        path, family = single_file_path(tiny_sd15), get_family("sd15")
        cfg = ModelConfig(family="sd15", path=str(path))
    reference = family.load(cfg).denoiser.state_dict()
    counter = _CountingOpen(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", counter)
    model = family.load(cfg, dtype=torch.bfloat16).denoiser
    file_bytes = sum(v.numel() * v.element_size() for v in load_file(str(path)).values())
    assert counter.largest and counter.peak <= counter.largest < file_bytes / 4
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, reference[key].to(torch.bfloat16)), key


# --- T5 wo stays fp32 under fp16 -----------------------------------------------------------------------------------

def _t5_part(tiny):
    from trainer.families.weights import Part, TensorFile

    return Part(TensorFile(next(p for p in tiny.text_encoder_files if "t5" in p.name), "t5"))


def test_t5_wo_loads_in_fp32_under_fp16_and_stays_there(tiny):
    from trainer.families.t5_text import load_t5

    model = load_t5(_t5_part(tiny), torch.float16)
    ff = model.encoder.block[0].layer[1].DenseReluDense
    assert isinstance(ff.wo, KeepFp32Linear) and ff.wo.weight.dtype == torch.float32
    assert ff.wi_0.weight.dtype == torch.float16 and model.shared.weight.dtype == torch.float16
    model.to(torch.float16)  # what the loop does to frozen encoders under fp16
    assert ff.wo.weight.dtype == torch.float32
    bf16 = load_t5(_t5_part(tiny), torch.bfloat16)  # transformers keeps wo in fp32 only for fp16
    assert bf16.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16


def test_t5_under_fp16_does_not_overflow_where_an_fp16_wo_does(tiny):
    """T5-XXL's feed-forward output exceeds fp16's range (65504); in an fp32 ``wo`` it does not (transformers#20287).
    transformers clamps fp16 infinities to 64504, so an fp16 ``wo`` gives finite but wrong hidden states."""
    from trainer.families.t5_text import load_t5

    base = load_t5(_t5_part(tiny))
    with torch.no_grad():
        for block in base.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(3e5)  # activations well past 65504
    ids = torch.arange(1, 9).unsqueeze(0)
    naive = copy.deepcopy(base).to(torch.float16)
    pinned = cast_frozen(copy.deepcopy(base), torch.float16)

    def states(model):
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True).hidden_states[1]  # after block 0, before the norm

    reference, overflowed, kept = states(base), states(naive), states(pinned)
    assert reference.abs().max() > 65504  # the setup does overflow fp16
    assert not torch.isfinite(overflowed).all() or _rel(overflowed, reference) > 0.1
    assert torch.isfinite(kept).all() and _rel(kept, reference) < 0.01
    with torch.autocast("cpu", dtype=torch.float16):  # the loop's fp16 autocast: wo opts out of it
        assert _rel(states(pinned), reference) < 0.01


def test_fp8_base_on_t5_under_fp16_keeps_wo_fp32_and_quantizes_the_rest(tiny):
    from trainer.families.t5_text import load_t5

    with fp8_loading():
        model = load_t5(_t5_part(tiny), torch.float16)
    ff = model.encoder.block[0].layer[1].DenseReluDense
    assert isinstance(ff.wi_0, Fp8Linear) and ff.wi_0.compute_dtype == torch.float16
    assert isinstance(ff.wo, KeepFp32Linear) and ff.wo.weight.dtype == torch.float32
    assert quantize_linears(model) == 0  # nothing left to quantize (wo is kept in fp32 on purpose)


@pytest.mark.slow
def test_two_processes_train_on_the_fp8_base(tiny_sd15, demo_dataset, tmp_path):
    """DDP cannot broadcast fp8 tensors (gloo: "Invalid scalar type"); the frozen fp8 weights are left out of its
    sync (the same file on every rank), so a 2-process run trains and the ranks agree."""
    import re

    from test_multiprocess import assert_ranks_agree, launch_two_processes

    cfg = {"model": {"family": "sd15", "path": str(tiny_sd15), "fp8_base": True},
           "datasets": [{"path": str(demo_dataset), "resolution": 64, "repeats": 1}],
           "network": {"network_dim": 4, "network_alpha": 4},
           "training": {"batch_size": 2, "epochs": 1, "seed": 1, "max_train_steps": 2},
           "save": {"output_dir": str(tmp_path / "out"), "run_name": "mp8", "save_every_n_epochs": 0,
                    "save_state": False}}
    assert_ranks_agree(launch_two_processes(tmp_path, cfg))


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
def test_a_shapes_only_weight_is_quantized_to_its_shape(dtype):
    """A run builds the denoiser as shapes only until the caches are filled (trainer.run_setup), under fp8 loading:
    a meta weight, bf16 or read from an fp8 file, becomes a meta fp8 weight with a usable scale, nothing computed."""
    from trainer.quantized import quantize

    q, scale = quantize(torch.empty(48, 96, dtype=dtype, device="meta"))
    assert q.is_meta and q.dtype == FP8 and q.shape == (48, 96) and float(scale) == 1.0
    layer = Fp8Linear.from_linear(nn.Linear(96, 48, device="meta", dtype=torch.bfloat16))
    assert layer.weight.is_meta and layer.weight.dtype == FP8
