"""Issue 16, FSDP2 rank-0 loading from single files (what ComfyUI users have): a sharded run's ranks > 0 build the
denoiser of a ``.safetensors`` checkpoint or diffusion-model file on the meta device from the file's header, reading
none of its tensors, while its text encoders and VAE load as on rank 0 (trainer.sharding.rank0_loading,
trainer.families.weights.denoiser_shapes_only). Half-precision and fp8 / scaled-fp8 files included. Two processes
really sharding a single file: tests/test_multi_gpu_recipe.py."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_fp8 import _linear_weights, _scaled
from trainer.families import get_family
from trainer.sharding import rank0_loading

FP8 = torch.float8_e4m3fn


def _off_rank0():
    return SimpleNamespace(is_main_process=False, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
        cpu_ram_efficient_loading=False)))


def _variant(source: Path, folder: Path, kind: str, only: str = "") -> Path:
    """``source`` rewritten as ComfyUI ships it: ``fp16`` / ``bf16`` (every float tensor), ``fp8`` (Linear weights
    cast to float8_e4m3fn: ``flux1-dev-fp8``) or ``scaled_fp8`` (old-style ``scale_weight`` scales); ``only``: change
    the tensors under this prefix alone (a checkpoint's UNet)."""
    state = load_file(str(source))
    mine = {k: v for k, v in state.items() if k.startswith(only)}
    if kind in ("fp16", "bf16"):
        dtype = torch.float16 if kind == "fp16" else torch.bfloat16
        changed = {k: v.to(dtype) if v.is_floating_point() else v for k, v in mine.items()}
    elif kind == "fp8":
        changed = {k: v.to(FP8) if k in _linear_weights(mine) else v for k, v in mine.items()}
    else:
        changed, _ = _scaled(mine, "old")
        changed[f"{only}scaled_fp8"] = changed.pop("scaled_fp8")
    path = folder / f"{source.stem}-{kind}.safetensors"
    save_file({**state, **changed}, str(path))
    return path


def _configs(name: str, kind: str, request, tmp_path):
    """(file config, the denoiser's file, its key prefix in that file) of the tiny ``name`` model as a ``kind`` file."""
    from trainer.config import ModelConfig
    from trainer.tiny import single_file_path

    tiny = request.getfixturevalue(f"tiny_{name}")
    if get_family(name).split_file_loading:  # a diffusion-model file beside text-encoder and VAE files
        path = _variant(tiny.transformer_file, tmp_path, kind)
        return tiny.file_config(path=str(path)), path, ""
    path = _variant(single_file_path(tiny), tmp_path, kind, only="model.diffusion_model.")
    return ModelConfig(family=name, path=str(path), tokenizer_path=str(tiny)), path, \
        "model.diffusion_model."


@pytest.mark.parametrize("name, kind", [("sd15", "fp16"), ("sdxl", "bf16"), ("sd15", "scaled_fp8"),
                                        ("flux", "fp8"), ("sd3", "scaled_fp8"), ("flux", "bf16")])
def test_off_rank0_a_single_files_denoiser_is_built_from_its_header_and_nothing_of_it_is_read(
        name, kind, request, tmp_path, monkeypatch):
    """Off rank 0 the denoiser has the rank-0 load's keys, shapes and dtypes with every parameter on the meta device,
    and not one of its tensors was read from the file (every real read is recorded); the text encoders and VAE are
    rank 0's, equal tensor for tensor."""
    import trainer.fp8_files as fp8_files

    cfg, path, prefix = _configs(name, kind, request, tmp_path)
    family = get_family(name)
    reference = family.load(cfg)
    read: list[str] = []
    dequantize = fp8_files.dequantize_tensor

    def spy(key, tensor, scale, dtype, keep_fp8, where):
        if not tensor.is_meta and Path(str(where)) == path:
            read.append(key)
        return dequantize(key, tensor, scale, dtype, keep_fp8, where)

    monkeypatch.setattr(fp8_files, "dequantize_tensor", spy)
    with rank0_loading(_off_rank0()):
        comps = family.load(cfg)
    monkeypatch.undo()
    if prefix:  # a checkpoint: its text encoders and VAE were read, nothing of its UNet
        assert read and not [k for k in read if k.startswith(prefix)]
    else:  # a diffusion-model file holds the denoiser alone
        assert not read
    denoiser = comps.denoiser
    assert all(p.is_meta for p in denoiser.parameters())
    assert {k: (v.shape, v.dtype) for k, v in denoiser.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in reference.denoiser.state_dict().items()}
    for module, expected in [(comps.vae, reference.vae), *zip(comps.text_encoders, reference.text_encoders)]:
        state, want = module.state_dict(), expected.state_dict()
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    assert comps.noise_scheduler.config == reference.noise_scheduler.config  # v-pred / ztsnr markers seen as on rank 0


def test_on_rank0_a_single_file_loads_whole_as_without_sharding(tiny_sd15, tmp_path):
    from trainer.config import ModelConfig
    from trainer.tiny import single_file_path

    cfg = ModelConfig(family="sd15", path=str(single_file_path(tiny_sd15)))
    family = get_family("sd15")
    reference = family.load(cfg).denoiser.state_dict()
    main = SimpleNamespace(is_main_process=True, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
        cpu_ram_efficient_loading=False)))
    with rank0_loading(main):
        state = family.load(cfg).denoiser.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)


def test_a_damaged_single_file_is_refused_off_rank0_as_on_rank0(tiny_sd15, tmp_path):
    """The header is checked as a real read checks it: a checkpoint missing a UNet tensor is refused by name on
    every rank (not left for a hang in the broadcast)."""
    from trainer.config import ModelConfig
    from trainer.errors import ModelLoadError
    from trainer.tiny import single_file_path

    state = load_file(str(single_file_path(tiny_sd15)))
    dropped = next(k for k in state if k.startswith("model.diffusion_model.output_blocks."))
    del state[dropped]
    path = tmp_path / "damaged.safetensors"
    save_file(state, str(path))
    cfg = ModelConfig(family="sd15", path=str(path), tokenizer_path=str(tiny_sd15 / "tokenizer"))
    with pytest.raises(ModelLoadError, match="damaged.safetensors"):
        get_family("sd15").load(cfg)
    with rank0_loading(_off_rank0()), pytest.raises(ModelLoadError, match="damaged.safetensors"):
        get_family("sd15").load(cfg)
