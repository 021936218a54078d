"""fp8 base weights quantized while loading (issue #16): a model loaded with ``model.fp8_base`` never holds its
file in the compute dtype; each tensor is read, converted and quantized before the next, with the same numbers as
quantizing after a full load."""
from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trainer.config import ModelConfig
from trainer.families import get_family
from trainer.lazy_tensors import LazyTensor, lazy, materialize
from trainer.quantized import FP8, Fp8Linear, apply_fp8_base, fp8_loading

from tiny_flow import build_tiny_flow_model


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return build_tiny_flow_model(tmp_path_factory.mktemp("fp8stream"), "flux", seed=0)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return build_tiny_flow_model(tmp_path_factory.mktemp("fp8stream3"), "sd3", seed=0)


@pytest.fixture(scope="module")
def deep_flux(tiny_flux, tmp_path_factory):
    """The tiny Flux with a 12-block fp32 transformer (so that its weights, not one tensor, dominate), as an
    original-layout file and as a diffusers folder whose transformer is saved in shards with an index."""
    import shutil

    from diffusers import FluxTransformer2DModel

    from tiny_flow import flux_to_original
    from trainer.fileio import save_safetensors

    config = FluxTransformer2DModel.load_config(str(tiny_flux.folder / "transformer"))
    torch.manual_seed(1)
    transformer = FluxTransformer2DModel.from_config({**config, "num_layers": 4, "num_single_layers": 8})
    base = tmp_path_factory.mktemp("deepflux")
    file = save_safetensors(base / "deep-flux.safetensors", flux_to_original(transformer.state_dict()))
    folder = base / "flux"
    shutil.copytree(tiny_flux.folder, folder)
    shutil.rmtree(folder / "transformer")
    transformer.save_pretrained(str(folder / "transformer"), max_shard_size="300KB", safe_serialization=True)
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 2
    return tiny_flux.file_config(path=str(file)), ModelConfig(family="flux", path=str(folder))


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every CPU tensor storage alive that torch operations (and ``safe_open``'s
    ``get_tensor``) made while active; ``peak`` is the most at any moment. Each storage counts once (views share)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def track(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta or tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if not size or key in self.seen:
            return
        self.seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self.seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            self.track(leaf)
        return out


def _count_file_reads(monkeypatch, counter: LiveBytes) -> None:
    import safetensors

    real = safetensors.safe_open

    class Handle:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.__dict__["handle"], name)

        def get_tensor(self, key):
            tensor = self.handle.get_tensor(key)
            counter.track(tensor)
            return tensor

    monkeypatch.setattr(safetensors, "safe_open", Handle)


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _single_file_case(family: str, folder):
    from trainer.tiny import single_file_path

    return get_family(family), ModelConfig(family=family, path=str(single_file_path(folder)))


CASES = {  # name: (fixture, how to get (family, ModelConfig) from it)
    "flux transformer file": ("tiny_flux", lambda tiny: (get_family("flux"), tiny.file_config())),
    "flux diffusers folder": ("tiny_flux", lambda tiny: (get_family("flux"), tiny.folder_config())),
    "sd3 transformer file": ("tiny_sd3", lambda tiny: (get_family("sd3"), tiny.file_config())),
    "sd15 single file": ("tiny_sd15", lambda folder: _single_file_case("sd15", folder)),
    "sdxl single file": ("tiny_sdxl", lambda folder: _single_file_case("sdxl", folder)),
    "sdxl diffusers folder": ("tiny_sdxl", lambda folder: (get_family("sdxl"),
                                                           ModelConfig(family="sdxl", path=str(folder)))),
}


def _watch(monkeypatch, counter: LiveBytes, owner, name: str, seen: list) -> None:
    """Wrap ``owner.name`` so that ``seen`` gets (live tensor bytes it added at its peak, its result)."""
    real = getattr(owner, name)

    def watched(*args, **kwargs):
        start = counter.peak = counter.live
        out = real(*args, **kwargs)
        seen.append((counter.peak - start, out))
        return out

    monkeypatch.setattr(owner, name, watched)


@pytest.mark.parametrize("case", ["flux transformer file", "flux diffusers folder"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_base_loads_within_its_fp8_size_plus_one_tensor(deep_flux, monkeypatch, case, dtype):
    """Loading with fp8_base from an fp32 file or sharded folder: while the transformer loads, the live tensor bytes never grow past what the loaded modules hold (fp8 weights + the rest in ``dtype``)
    plus about one fp32 tensor. The old loader read the whole file in ``dtype`` first (bf16: half the fp32 file;
    fp32: all of it) and only then quantized. (The tiny SD1.5 is mostly convolutions, too few Linear bytes to tell
    the two loaders apart by size: its streamed load is checked for exact numbers below.)"""
    from trainer.families import flow_common

    counter, seen = LiveBytes(), []
    _count_file_reads(monkeypatch, counter)
    family, cfg = get_family("flux"), deep_flux[0 if case.endswith("file") else 1]
    _watch(monkeypatch, counter, flow_common.FlowFamily, "_load_transformer", seen)
    with counter, fp8_loading(True):
        comps = family.load(cfg, dtype=dtype)
    assert apply_fp8_base([comps.denoiser, *comps.text_encoders], dtype) == 0  # all quantized while loading
    (grew, out), = seen
    modules = [m for m in (out.values() if isinstance(out, dict) else [out]) if isinstance(m, torch.nn.Module)]
    loaded = sum(_bytes(m) for m in modules)
    largest = max(t.numel() * 4 for m in modules for t in m.state_dict().values())
    assert any(isinstance(m, Fp8Linear) for m in comps.denoiser.modules())
    assert grew <= loaded + 3 * largest + 64 * 1024, (grew, loaded, largest)


def _fp8_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_quantizing_while_loading_stores_the_same_fp8_bytes_and_scales(request, case):
    """The streamed load equals a full load quantized afterwards: every fp8 weight bit for bit, every scale, and
    every other tensor (denoiser, text encoders with T5, VAE)."""
    fixture, make = CASES[case]
    family, cfg = make(request.getfixturevalue(fixture))
    after = family.load(cfg, dtype=torch.bfloat16)
    apply_fp8_base([after.denoiser, *after.text_encoders], torch.bfloat16)
    with fp8_loading(True):
        streamed = family.load(cfg, dtype=torch.bfloat16)
    for name, module in {**after.modules(), "vae": after.vae}.items():
        want, got = _fp8_state(module), _fp8_state({**streamed.modules(), "vae": streamed.vae}[name])
        assert want.keys() == got.keys(), name
        for key, value in want.items():
            assert got[key].dtype == value.dtype, (name, key)
            if value.dtype == FP8:
                assert torch.equal(got[key].view(torch.uint8), value.view(torch.uint8)), (name, key)
            else:
                assert torch.equal(got[key], value), (name, key)
    assert any(v.dtype == FP8 for v in _fp8_state(streamed.denoiser).values())


# --- the lazy tensors themselves -------------------------------------------------------------------------------------

def _reads(values: dict[str, torch.Tensor], log: list[str]) -> dict[str, LazyTensor]:
    def make(key):
        def read():
            log.append(key)
            return values[key].clone()
        return read

    return {k: lazy(v.shape, v.dtype, make(k)) for k, v in values.items()}


def test_conversions_on_lazy_tensors_read_nothing_and_then_give_the_eager_values():
    """chunk / cat / split / slicing / transpose / in-place ops are recorded, nothing is read until materialized,
    and the values are those of the same operations on real tensors."""
    torch.manual_seed(0)
    values = {"qkv": torch.randn(12, 4), "mod": torch.randn(8), "conv": torch.randn(4, 4, 1, 1)}
    log: list[str] = []
    sd = _reads(values, log)

    def convert(sd):
        q, k, v = torch.chunk(sd["qkv"], 3, dim=0)
        shift, scale = sd["mod"].chunk(2, dim=0)
        first, rest = torch.split(sd["qkv"], (4, 8), dim=0)
        return {"q": torch.cat([q]), "k": k[:, :2].clone().detach(), "v": v.T.contiguous(),
                "mod": torch.cat([scale, shift], dim=0), "conv": sd["conv"][:, :, 0, 0], "rest": rest * 2,
                "eye": torch.eye(3), "shape": sd["qkv"].shape[0]}

    lazy_out, eager = convert(sd), convert(values)
    assert not log and isinstance(lazy_out["q"], LazyTensor) and lazy_out["shape"] == 12
    for key, value in eager.items():
        if isinstance(value, torch.Tensor):
            got = materialize(lazy_out[key])
            assert got.shape == value.shape and got.dtype == value.dtype and torch.equal(got, value), key
    assert set(log) == {"qkv", "mod", "conv"}
    part = materialize(lazy_out["k"])  # a slice is copied: it does not keep the fused tensor alive
    assert part.untyped_storage().nbytes() == part.numel() * part.element_size()
    log.clear()
    scaled = sd["mod"].mul_(3)
    assert scaled is sd["mod"] and not log
    assert torch.equal(materialize(sd["mod"]), values["mod"] * 3)
    assert float(sd["mod"].abs().max()) == float((values["mod"] * 3).abs().max())  # values run for real when needed


def test_a_scaled_fp8_file_is_read_lazily_and_equals_the_eager_read(tmp_path):
    from trainer.families.weights import TensorFile

    weight = torch.randn(8, 4)
    scale = weight.abs().amax() / 448
    path = tmp_path / "scaled.safetensors"
    save_file({"a.weight": (weight / scale).to(FP8), "a.scale_weight": scale.reshape(()), "a.bias": torch.randn(8),
               "scaled_fp8": torch.zeros(0, dtype=FP8)}, str(path))
    eager = TensorFile(path, "model.path").read(dtype=torch.bfloat16)
    with fp8_loading(True):
        streamed = TensorFile(path, "model.path").read(dtype=torch.bfloat16)
    assert set(streamed) == set(eager) == {"a.weight", "a.bias"}
    for key in eager:
        assert isinstance(streamed[key], LazyTensor)
        assert torch.equal(materialize(streamed[key]), eager[key]), key
