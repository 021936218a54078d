"""The memory benchmark's model files (issue 16): the streaming safetensors writer, and random-weight files in the
ComfyUI layouts that the trainer's real loader reads (tiny models here; full size in benchmarks/bench_memory.py)."""
from __future__ import annotations

import gc
import json
import struct
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.safetensors_stream import header_bytes, write_streamed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_memory  # noqa: E402
import model_files  # noqa: E402


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "b.fp8": torch.randn(4, 4, generator=gen).to(torch.float8_e4m3fn),
        "c.half": torch.randn(7, generator=gen).to(torch.float16),
        "d.f32": torch.randn(2, 3, 4, generator=gen),
        "position_ids": torch.arange(77).unsqueeze(0),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "v_pred": torch.tensor([]),  # ComfyUI's empty marker tensors
    }


def test_streamed_file_round_trips_through_safe_open(tmp_path):
    tensors = _tensors()
    path = write_streamed(tmp_path / "x.safetensors", {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
                          lambda name: tensors[name].clone(), metadata={"format": "pt", "note": "streamed"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "streamed"}
        assert set(handle.keys()) == set(tensors)
        for name, value in tensors.items():
            got = handle.get_tensor(name)
            assert got.dtype == value.dtype and got.shape == value.shape
            assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                               value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value), name
    loaded = load_file(str(path))  # safetensors' own reader checks the offsets cover the data exactly
    assert torch.equal(loaded["a.weight"], tensors["a.weight"])
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0 and len(raw) == 8 + length + sum(v.numel() * v.element_size() for v in tensors.values())
    assert json.loads(raw[8:8 + length])["d.f32"]["data_offsets"][1] - \
        json.loads(raw[8:8 + length])["d.f32"]["data_offsets"][0] == 24 * 4


def test_streamed_writer_holds_one_tensor_at_a_time(tmp_path):
    """Each tensor is made when its turn comes and let go before the next is asked for: writing a 12 GB fp8 Flux
    transformer costs one tensor of RAM."""
    alive: list = []
    specs = {f"t{i}": ((256, 256), torch.float32) for i in range(6)}

    def make(name):
        gc.collect()
        assert all(ref() is None for ref in alive), f"{name}: an earlier tensor is still held"
        value = torch.full((256, 256), float(name[1:]))
        alive.append(weakref.ref(value))
        return value

    path = write_streamed(tmp_path / "y.safetensors", specs, make)
    assert len(alive) == 6
    assert torch.equal(load_file(str(path))["t4"], torch.full((256, 256), 4.0))


def test_a_tensor_unlike_its_announcement_is_refused_and_nothing_is_left(tmp_path):
    path = tmp_path / "z.safetensors"
    with pytest.raises(ValueError, match="'b'.*announced \\(2,\\) torch.float32"):
        write_streamed(path, {"a": ((2,), torch.float32), "b": ((2,), torch.float32)},
                       lambda name: torch.zeros(3) if name == "b" else torch.zeros(2))
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no dtype"):
        header_bytes({"c": ((2,), torch.complex64)})


def _tiny_modules(family: str) -> dict:
    if family in ("sd15", "sdxl"):
        from trainer.tiny import build_tiny_components

        comps = build_tiny_components(family)
        return {"unet": comps.denoiser, "vae": comps.vae, **dict(zip(comps.text_encoder_names, comps.text_encoders))}
    from tiny_flow import build_tiny_flow_modules

    return build_tiny_flow_modules(family, 0, 72)  # the tiny T5 tokenizer's 67 tokens, rounded up to 8


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_model_files_load_through_the_real_loader_as_a_users_files(tmp_path, family):
    from trainer.config import ModelConfig
    from trainer.families import get_family
    from trainer.quantized import fp8_loading

    modules = _tiny_modules(family)
    fields = model_files.write_model_files(family, tmp_path, modules)
    files = [fields["path"], *fields.get("text_encoder_paths", ())]
    assert all("/ComfyUI/models/" in f for f in files)
    fp8 = family == "flux"  # flux1-dev-fp8 and t5xxl_fp8_e4m3fn, as ComfyUI users have them
    if family in ("sd3", "flux"):
        with safe_open(fields["text_encoder_paths"][-1], framework="pt") as t5:
            assert t5.get_slice("encoder.block.0.layer.0.SelfAttention.q.weight").get_dtype() == "F8_E4M3"
            assert t5.get_slice("encoder.final_layer_norm.weight").get_dtype() == "BF16"
    with safe_open(fields["path"], framework="pt") as denoiser:
        dtypes = {denoiser.get_slice(k).get_dtype() for k in denoiser.keys()}
    assert dtypes == ({"F8_E4M3", "BF16"} if fp8 else {"F16"})
    with fp8_loading(fp8):
        comps = get_family(family).load(ModelConfig(family=family, fp8_base=fp8, **fields), dtype=torch.bfloat16)
    denoiser = next(iter(modules.values()))
    loaded = [k for k in comps.denoiser.state_dict() if not k.endswith(".weight_scale")]  # fp8: one per weight
    assert sorted(loaded) == sorted(denoiser.state_dict())
    assert all(comps.denoiser.state_dict()[k].shape == v.shape for k, v in denoiser.state_dict().items())
    if fp8:
        assert any(p.dtype == torch.float8_e4m3fn for p in comps.denoiser.parameters())
    assert [type(t).__name__ for t in comps.text_encoders] == \
        [type(modules[n]).__name__ for n in comps.text_encoder_names]


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_from_files_case_loads_them_and_releases_the_encoders_after_caching(tmp_path, family, caplog):
    """The benchmark's default method on a tiny model: the case's run loads the files (fp8 for Flux) and, its caches
    filled, drops the encoders from RAM (they can be read again from the files), which the in-memory method
    cannot do (its modules have no files)."""
    import logging

    fields = model_files.write_model_files(family, tmp_path / "files", _tiny_modules(family))
    with caplog.at_level(logging.INFO, logger="crucible"):
        row = bench_memory.child((family, "lora", "low"), 64, 1, fields)
    assert row["weights"] == "files" and row["method"] == "full-step" and len(row["losses"]) == 1
    assert row["step_peak_gib"] > 0 and row["caching_peak_gib"] > 0 and row["setup_anon_peak_gib"] > 0
    assert row["train_peak_gib"] == max(row["caching_peak_gib"], row["step_peak_gib"])
    released = [r.getMessage() for r in caplog.records if "released" in r.getMessage()]
    assert released and "text_encoder" in released[0] and "vae" in released[0]
    cfg = bench_memory.with_files(bench_memory.case_config((family, "lora", "low"), 64, tmp_path / "d", tmp_path / "o",
                                                           1, False), fields)
    assert cfg.model.path == fields["path"] and cfg.model.fp8_base == (family == "flux")


def test_model_files_are_written_once_per_family_and_deleted_after_its_last_case(tmp_path, monkeypatch):
    written = []

    def fake_write(family, folder):
        folder.mkdir(parents=True)
        (folder / "m.safetensors").write_bytes(b"x")
        written.append(family)
        return {"path": str(folder / "m.safetensors")}

    monkeypatch.setattr(model_files, "write_full_size_files", fake_write)
    files = bench_memory.ModelFiles(tmp_path)
    order = ["sd15", "sd15", "sdxl"]
    for i, family in enumerate(order):
        assert files.of(family, order[i + 1:])["path"].startswith(str(tmp_path / family))
        files.done(family, order[i + 1:])
        assert (tmp_path / family).exists() == (family in order[i + 1:])
    assert written == ["sd15", "sdxl"]
    assert bench_memory.ModelFiles(tmp_path, in_memory=True).of("sd15", []) is None


def test_an_own_temporary_folder_is_removed_with_the_last_family(monkeypatch):
    def fake_write(family, folder):
        folder.mkdir(parents=True)
        (folder / "m").write_bytes(b"x")
        return {"path": str(folder / "m")}

    monkeypatch.setattr(model_files, "write_full_size_files", fake_write)
    files = bench_memory.ModelFiles(None)
    folder = Path(files.of("sd15", [])["path"]).parents[1]
    assert folder.is_dir()
    files.done("sd15", [])
    assert not folder.exists() and files.tmp is None
