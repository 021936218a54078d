"""Reading ``.safetensors`` files tensor by tensor, including ComfyUI's fp8 and scaled-fp8 files (issue #16).

Formats read as ComfyUI 0.8.0 reads them (``comfy/utils.py`` ``convert_old_quants``, ``comfy/ops.py``
``MixedPrecisionOps``, ``comfy/quant_ops.py`` ``QUANT_ALGOS``):

=====================  ===========================================================================================
plain fp8              weights stored as ``float8_e4m3fn`` / ``float8_e5m2`` (``flux1-dev-fp8``,
                       ``t5xxl_fp8_e4m3fn``): the values are the weights.
scaled fp8 (old)       a ``scaled_fp8`` marker tensor (under the model's prefix) and, per quantized layer,
                       ``<layer>.scale_weight`` (fp32) and optionally ``<layer>.scale_input``: weight = fp8 × scale.
comfy_quant (new)      per layer ``<layer>.comfy_quant`` (JSON bytes, ``{"format": "float8_e4m3fn", …}``) or the
                       file metadata ``_quantization_metadata`` (``{"layers": {layer: {...}}}``), with
                       ``<layer>.weight_scale`` (and ``input_scale``): weight = fp8 × weight_scale.
=====================  ===========================================================================================

``input_scale`` / ``scale_input`` only matter to fp8 matrix multiplication at inference and are dropped. Formats
Crucible cannot train from (ComfyUI's ``nvfp4``, bitsandbytes NF4/int8, integer weights) are refused with a
:class:`~trainer.errors.ModelLoadError` naming the file.

:func:`read_tensors` casts every tensor to the target dtype as soon as it is read, so a file is never held whole in
its own dtype next to the converted copy. While :func:`trainer.quantized.fp8_loading` is active, it reads nothing
up front: each value is a lazy tensor read when the model is assigned (and quantized there), and plain fp8 tensors
are kept as they are (the fp8 base stores them without another rounding).
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import ModelLoadError
from .quantized import FP8_DTYPES, loading_fp8

FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # old scaled-fp8 / comfy_quant
DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # inference-only or metadata
MARKER = "scaled_fp8"
BNB_MARKERS = (".quant_state.", ".absmax", ".quant_map", ".SCB", ".weight_format")
ADVICE = ("use the fp16, bf16 or fp8 (float8_e4m3fn, optionally scaled) version of this model, as ComfyUI ships them "
          "in models/diffusion_models and models/text_encoders")


def is_aux_key(key: str) -> bool:
    """Keys that describe quantization rather than hold a model tensor."""
    return key == MARKER or key.endswith("." + MARKER) or key.endswith(SCALE_SUFFIXES + DROPPED_SUFFIXES) \
        or key.endswith(".weight_scale_2")


def layer_formats(keys: Iterable[str], metadata: Mapping[str, str] | None, read: Any, where: Any) -> dict[str, str]:
    """``{layer: quant format}`` of a file from its ``comfy_quant`` tensors or ``_quantization_metadata``; layers
    with a ``scale_weight`` (old scaled fp8) are ``float8_e4m3fn``, as ComfyUI assumes."""
    keys = list(keys)
    formats: dict[str, str] = {}
    if metadata and "_quantization_metadata" in metadata:
        try:
            layers = json.loads(metadata["_quantization_metadata"])["layers"]
            formats.update({k: str(v.get("format")) for k, v in layers.items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"'{where}' has unreadable _quantization_metadata ({exc}); the file is damaged or "
                                 f"written by an unknown tool: {ADVICE}") from exc
    for key in keys:
        if key.endswith(".comfy_quant"):
            try:
                conf = json.loads(bytes(read(key).tolist()).decode("utf-8"))
            except (ValueError, TypeError) as exc:
                raise ModelLoadError(f"'{where}': the quantization entry '{key}' is unreadable ({exc}); {ADVICE}") \
                    from exc
            formats[key[: -len(".comfy_quant")]] = str(conf.get("format"))
        elif key.endswith(".scale_weight"):
            formats.setdefault(key[: -len(".scale_weight")], "float8_e4m3fn")
    return formats


def check_supported(keys: Iterable[str], formats: Mapping[str, str], where: Any) -> None:
    """Refuse quantization formats Crucible cannot dequantize, naming the file and what to do."""
    bad = {layer: fmt for layer, fmt in formats.items() if fmt not in FP8_FORMATS}
    if bad:
        layer, fmt = next(iter(bad.items()))
        raise ModelLoadError(f"'{where}' stores {len(bad)} layer(s) in the quantization format '{fmt}' (e.g. "
                             f"'{layer}'), which Crucible cannot train from; {ADVICE}")
    marker = next((k for k in keys if any(m in k for m in BNB_MARKERS)), None)
    if marker is not None:
        raise ModelLoadError(f"'{where}' is a bitsandbytes-quantized file (e.g. '{marker}'), which Crucible cannot "
                             f"train from; {ADVICE}")


def dequantize_tensor(key: str, tensor: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype | None,
                      keep_fp8: bool, where: Any) -> torch.Tensor:
    """One file tensor in the dtype the model gets: ``fp8 × scale`` for scaled layers, plain fp8 kept (``keep_fp8``)
    or upcast, everything else cast to ``dtype`` (``None``: floats keep their dtype)."""
    if scale is not None:
        if tensor.dtype not in FP8_DTYPES:
            raise ModelLoadError(f"'{where}': '{key}' has a scale but is stored as {tensor.dtype}, not fp8; the "
                                 f"file's quantization is unknown: {ADVICE}")
        scale = scale.float()
        if scale.numel() != 1 and scale.dim() == 1 and scale.numel() == tensor.shape[0]:
            scale = scale.reshape(-1, *([1] * (tensor.dim() - 1)))  # one scale per output row
        try:
            value = tensor.float() * scale
        except RuntimeError as exc:
            raise ModelLoadError(f"'{where}': the scale of '{key}' (shape {tuple(scale.shape)}) does not fit the "
                                 f"weight {tuple(tensor.shape)}; {ADVICE}") from exc
        return value.to(dtype or torch.float32)
    if tensor.dtype in FP8_DTYPES:
        return tensor if keep_fp8 else tensor.to(dtype or torch.float32)
    if not (tensor.is_floating_point() or tensor.numel() == 0) and key.endswith(".weight"):
        raise ModelLoadError(f"'{where}': the weight '{key}' is stored as {tensor.dtype}, a quantized format Crucible "
                             f"cannot train from; {ADVICE}")
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


def read_tensors(handle, where: Any, prefix: str = "", exclude: tuple[str, ...] = (),
                 dtype: torch.dtype | None = None, reopen: str | Path | None = None,
                 shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an open ``safe_open`` ``handle`` whose names start with ``prefix`` (removed) and not with an
    ``exclude`` prefix, read one at a time and each converted at once (:func:`dequantize_tensor`); ComfyUI's
    quantization entries are consumed, not returned.

    While :func:`trainer.quantized.fp8_loading` is active and ``reopen`` names the file, nothing is read yet: each
    value is a :class:`~trainer.lazy_tensors.LazyTensor` that reads (and converts) its tensor from ``reopen`` when
    the model is assigned, so the fp8 base is quantized tensor by tensor. Bad files are refused here all the same.

    ``shapes_only``: nothing is read at all; each value is a meta tensor of the shape and dtype the read would give
    (a sharded run's ranks > 0 build the denoiser from those: :func:`trainer.families.weights.denoiser_shapes_only`)."""
    keys = list(handle.keys())
    formats = layer_formats(keys, handle.metadata(), handle.get_tensor, where)
    check_supported(keys, formats, where)
    present = set(keys)
    keep_fp8 = loading_fp8()
    reader = ChunkedReader(handle, None if shapes_only else reopen)
    out: dict[str, torch.Tensor] = {}
    try:
        for key in keys:
            if not key.startswith(prefix) or (exclude and key.startswith(exclude)) or is_aux_key(key):
                continue
            scale_key = None
            if key.endswith(".weight"):
                layer = key[: -len(".weight")]
                scale_key = next((layer + s for s in SCALE_SUFFIXES if layer + s in present), None)
            if shapes_only:
                out[key[len(prefix):]] = _meta_value(handle, key, scale_key, dtype, keep_fp8, where)
                continue
            if keep_fp8 and reopen is not None:
                out[key[len(prefix):]] = _lazy_tensor(handle, reopen, key, scale_key, dtype, where)
                continue
            scale = reader.get(scale_key) if scale_key is not None else None
            raw = reader.get(key)
            value = dequantize_tensor(key, raw, scale, dtype, keep_fp8, where)
            out[key[len(prefix):]] = reader.own_copy(value) if value is raw else value
            del raw, value  # no file tensor outlives its turn (one at a time: tests/test_fp8.py)
    finally:
        reader.close()
    return out


READ_CHUNK_BYTES = 256 << 20  # a fresh handle after this many bytes read (:class:`ChunkedReader`)


class ChunkedReader:
    """Reads a file's tensors through a fresh ``safe_open`` handle every :data:`READ_CHUNK_BYTES`.

    safetensors (0.6+) maps the file and hands out tensors backed by the mapping; every page a handle has read stays
    in the process's resident memory until that handle closes, even once the tensor read from it was converted and
    dropped. One handle kept open for a whole file therefore holds the file beside its converted copy: loading the
    fp16 SDXL single file as bf16 peaked at 13.3 GiB RSS, 6.1 GiB of it file pages (measured, 2026-12-07). A tensor
    kept in the file's dtype is copied out of the mapping (:meth:`own_copy`): left in it, it held every page its
    handle had read (SD3's T5-XXL, fp8 weights beside bf16 layer norms, kept 4.6 GiB of ``t5xxl_fp8_e4m3fn``
    resident beside its bf16 copy, measured 2026-12-07). Without ``path`` (nothing to reopen) ``handle`` reads all."""

    def __init__(self, handle, path: str | Path | None):
        self.handle, self.path = handle, path
        self.own = None
        self.bytes_read = 0
        self._open = ExitStack()

    def get(self, key: str) -> torch.Tensor:
        if self.path is None:
            return self.handle.get_tensor(key)
        if self.own is None or self.bytes_read >= READ_CHUNK_BYTES:
            from safetensors import safe_open

            self.close()
            self.own = self._open.enter_context(safe_open(str(self.path), framework="pt"))
        value = self.own.get_tensor(key)
        self.bytes_read += value.numel() * value.element_size()
        return value

    def own_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (read by :meth:`get`) in memory of its own, so the handle's mapping goes when the handle does."""
        return tensor.clone() if self.path is not None else tensor

    def close(self) -> None:
        self._open.close()
        self.own, self.bytes_read = None, 0


def _meta_value(handle, key: str, scale_key: str | None, dtype, keep_fp8: bool, where) -> torch.Tensor:
    """:func:`dequantize_tensor` of ``key`` worked out on the meta device from the file's header (nothing read)."""
    from .lazy_tensors import SAFETENSORS_DTYPES

    def meta(name: str) -> torch.Tensor:
        view = handle.get_slice(name)
        return torch.empty(view.get_shape(), dtype=SAFETENSORS_DTYPES[view.get_dtype()], device="meta")

    return dequantize_tensor(key, meta(key), meta(scale_key) if scale_key is not None else None, dtype, keep_fp8,
                             where)


def _lazy_tensor(handle, path: str | Path, key: str, scale_key: str | None, dtype, where):
    """:func:`dequantize_tensor` of ``key``, deferred: checked now on the meta device, read from ``path`` later."""
    from safetensors import safe_open

    from .lazy_tensors import lazy

    shape = _meta_value(handle, key, scale_key, dtype, True, where)

    def make() -> torch.Tensor:
        with safe_open(str(path), framework="pt") as again:
            scale_now = again.get_tensor(scale_key) if scale_key is not None else None
            return dequantize_tensor(key, again.get_tensor(key), scale_now, dtype, True, where)

    return lazy(shape.shape, shape.dtype, make)


def read_file(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every model tensor of a ``.safetensors`` file, read tensor by tensor into ``dtype`` (:func:`read_tensors`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return read_tensors(handle, path, dtype=dtype, reopen=path)


__all__ = ["read_tensors", "read_file", "dequantize_tensor", "layer_formats", "check_supported", "is_aux_key",
           "FP8_FORMATS"]
