"""Random-weight model files in the layouts ComfyUI users keep, written tensor by tensor (issue #16).

``bench_memory.py --from-files`` (the default) measures what a user's run does: the trainer loads these files
through its real loaders (fp8 quantize-while-loading, encoders released after caching and read back lazily).

=======  =====================================================================================================
family   files (under ``<folder>/ComfyUI/models``; tokenizers where a ComfyUI install keeps its own)
=======  =====================================================================================================
sd15     ``checkpoints/<name>.safetensors``: one LDM single file (UNet, VAE, CLIP), fp16 like the published file
sdxl     the same (UNet, VAE, CLIP-L, OpenCLIP-G), fp16 as ``sd_xl_base_1.0.safetensors``
sd3      ``diffusion_models/`` SAI-named transformer (fp16, as ``sd3_medium.safetensors``), ``text_encoders/``
         ``clip_l``, ``clip_g`` (fp16) and ``t5xxl_fp8_e4m3fn``, ``vae/`` (fp32, LDM names)
flux     ``diffusion_models/`` BFL-named transformer in fp8 e4m3fn (as ``flux1-dev-fp8``), ``text_encoders/``
         ``clip_l`` (fp16) and ``t5xxl_fp8_e4m3fn``, ``vae/ae.safetensors`` (fp32)
=======  =====================================================================================================

In an fp8 file the 2-D ``.weight`` tensors (Linear layers, embeddings) are float8 e4m3fn and the rest (norms,
biases) bf16, as in ComfyUI's plain fp8 files. Values are N(0, 0.02) (``position_ids``: 0, 1, 2, …); they only
need the right shapes and dtypes. :func:`write_model_files` takes the modules to describe (full-size ones built on
the ``meta`` device by the benchmark, tiny ones in the tests): only their state dicts' names, shapes and dtypes are
read, and only one tensor's values exist at a time, so a 12 GB Flux file costs one tensor of RAM to write.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FP8 = "fp8_e4m3fn"
# family -> (denoiser file dtype, {text-encoder kind: file dtype}); None = float16, FP8 = as above
FILE_DTYPES = {"sd3": (None, {"clip_l": None, "clip_g": None, "t5xxl": FP8}),
               "flux": (FP8, {"clip_l": None, "t5xxl": FP8})}


def _file_dtype(name: str, meta, kind: str | None):
    """The dtype ``name`` is stored in: float16, fp8 (2-D weights of an fp8 file; bf16 for the rest), or its own
    (integer tensors)."""
    import torch

    if not meta.is_floating_point():
        return meta.dtype
    if kind == FP8:
        return torch.float8_e4m3fn if name.endswith(".weight") and meta.dim() == 2 else torch.bfloat16
    return kind or torch.float16


def write_random_file(path: Path, state: Mapping[str, Any], kind: str | None = None, seed: int = 0,
                      fp32: bool = False) -> Path:
    """``state``'s names and shapes as a ``.safetensors`` file of random values (see the module docstring),
    written tensor by tensor; ``kind``: ``None`` (float16) or :data:`FP8`; ``fp32``: every float tensor fp32."""
    import torch

    from trainer.safetensors_stream import write_streamed

    specs = {name: (tuple(t.shape), torch.float32 if fp32 and t.is_floating_point() else _file_dtype(name, t, kind))
             for name, t in state.items()}
    gen = torch.Generator().manual_seed(seed)

    def make(name: str):
        shape, dtype = specs[name]
        if not dtype.is_floating_point:
            base = torch.arange(shape[-1]).expand(shape) if name.endswith("position_ids") and shape else \
                torch.zeros(shape, dtype=torch.int64)
            return base.to(dtype)
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    return write_streamed(path, specs, make, metadata={"format": "pt"})


def write_model_files(family: str, folder: str | Path, modules: Mapping[str, Any], seed: int = 0) -> dict:
    """Write ``modules`` (``{component name: module}``, meta or real) as ``family``'s user files under ``folder``;
    returns the ``model`` config fields that load them (``path``, ``vae_path``, ``text_encoder_paths``,
    ``tokenizer_path``)."""
    from trainer.families import get_family
    from trainer.families.ldm_layout import vae_to_ldm
    from trainer.tiny import build_tiny_tokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_flow import build_tiny_t5_tokenizer, flux_to_original, sd3_to_original, text_encoder_file_state

    fam = get_family(family)
    root = Path(folder) / "ComfyUI"
    models = root / "models"
    if fam.denoiser_name == "unet":
        from types import SimpleNamespace

        from trainer.families.ldm_layout import diffusers_to_single_file

        names = tuple(n for n in modules if n.startswith("text_encoder"))
        comps = SimpleNamespace(denoiser=modules["unet"], vae=modules["vae"], text_encoder_names=names,
                                text_encoders=[modules[n] for n in names], noise_scheduler=None, extras={})
        path = write_random_file(models / "checkpoints" / f"random-{family}.safetensors",
                                 diffusers_to_single_file(comps, family), seed=seed)
        tokenizers = Path(folder) / "tokenizers"
        for sub, spec in zip(("tokenizer", "tokenizer_2"), fam.encoders):
            build_tiny_tokenizer(tokenizers / sub, pad_token="!" if spec.kind == "clip_g" else "<|endoftext|>")
        return {"path": str(path), "tokenizer_path": str(tokenizers)}
    denoiser_kind, encoder_kinds = FILE_DTYPES[family]
    to_original = sd3_to_original if family == "sd3" else flux_to_original
    path = write_random_file(models / "diffusion_models" / f"random-{family}.safetensors",
                             to_original(modules["transformer"].state_dict()), denoiser_kind, seed)
    encoders = []
    for spec in fam.encoders:
        kind = encoder_kinds[spec.kind]
        name = f"{spec.kind}{'_fp8_e4m3fn' if kind == FP8 else '_fp16'}.safetensors"
        encoders.append(str(write_random_file(models / "text_encoders" / name,
                                              text_encoder_file_state(modules[spec.component]), kind, seed)))
    vae = write_random_file(models / "vae" / f"random-{family}-vae.safetensors",
                            vae_to_ldm(modules["vae"].state_dict()), seed=seed, fp32=True)
    build_tiny_tokenizer(root / "comfy" / "sd1_tokenizer")
    build_tiny_t5_tokenizer(root / "comfy" / "text_encoders" / "t5_tokenizer")
    return {"path": str(path), "vae_path": str(vae), "text_encoder_paths": tuple(encoders)}


def write_full_size_files(family: str, folder: str | Path, seed: int = 0) -> dict:
    """The full-size ``family`` (``trainer.full_size``, on the meta device: no memory) as user files."""
    from trainer.full_size import ARCHITECTURES, build_meta

    modules = {name: build_meta(family, name) for name, _ in ARCHITECTURES[family]}
    return write_model_files(family, folder, modules, seed)


def files_size_gib(fields: Mapping[str, Any]) -> float:
    files = [fields["path"], fields.get("vae_path") or None, *fields.get("text_encoder_paths", ())]
    return sum(Path(f).stat().st_size for f in files if f) / 2**30
