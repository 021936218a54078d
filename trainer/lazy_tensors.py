"""Tensors read from a file only when their value is needed (issue #16: fp8 base weights quantized while loading).

A :class:`LazyTensor` is a meta tensor (shape and dtype, no data) that knows how to make its values. Key
conversions (LDM → diffusers, BFL → diffusers: renames, ``chunk`` / ``split`` / ``cat`` of fused projections,
slicing, transposes) run on lazy tensors as they are: each torch operation is worked out on the meta device for the
result's shape and dtype and recorded, so the result is a lazy tensor again. :func:`trainer.quantized.assign_weights`
then makes one tensor at a time (:func:`materialize`) and quantizes or casts it before the next is read — so loading
a model with ``model.fp8_base`` holds its fp8 weights plus one tensor, never the whole file in the compute dtype.

The values are made by the very operations the eager path runs, in the same order, so they are bit-identical to
reading everything first. An operation whose result is not a tensor and cannot be worked out on the meta device
(``.item()``, ``torch.equal``) runs on the real values. In-place operations are recorded on the tensor they modify.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

# safetensors header dtype names → torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LazyTensor(torch.Tensor):
    """A meta tensor standing for values that ``make()`` produces on request (each call makes them anew)."""

    _make: Callable[[], torch.Tensor]

    @staticmethod
    def __new__(cls, meta: torch.Tensor, make: Callable[[], torch.Tensor]):
        out = torch.Tensor._make_subclass(cls, meta)
        out._make = make
        return out

    def materialize(self) -> torch.Tensor:
        return self._make()

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            with torch._C.DisableTorchFunctionSubclass():
                meta_out = func(*tree_map(_as_meta, args), **tree_map(_as_meta, kwargs))
        except (NotImplementedError, RuntimeError):  # needs the values (item, equal, tolist …)
            return func(*tree_map(_real, args), **tree_map(_real, kwargs))
        leaves, spec = tree_flatten(meta_out)
        if not any(isinstance(leaf, torch.Tensor) for leaf in leaves):
            return meta_out  # shape, dtype, dim, numel …
        name = getattr(func, "__name__", "")
        inplace = name.endswith("_") and not name.endswith("__") or name == "__setitem__"
        if inplace and isinstance(args[0], LazyTensor):  # record the change on the tensor it modifies
            target, before = args[0], args[0]._make

            def make_modified():
                value = before()
                func(value, *tree_map(_real, args[1:]), **tree_map(_real, kwargs))
                return value

            target._make = make_modified
            return target if meta_out is not None and name != "__setitem__" else None

        def make_all():
            return tree_flatten(func(*tree_map(_real, args), **tree_map(_real, kwargs)))[0]

        out = [LazyTensor(leaf, _pick(make_all, i)) if isinstance(leaf, torch.Tensor) and leaf.is_meta else leaf
               for i, leaf in enumerate(leaves)]
        return tree_unflatten(out, spec)


def _pick(make_all: Callable[[], list], index: int) -> Callable[[], torch.Tensor]:
    return lambda: make_all()[index]


def _as_meta(value: Any) -> Any:
    if isinstance(value, LazyTensor):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, torch.Tensor) and not value.is_meta:
        return value.to("meta")
    return value


def _real(value: Any) -> Any:
    return value.materialize() if isinstance(value, LazyTensor) else value


def materialize(value: torch.Tensor) -> torch.Tensor:
    """The values of ``value`` (itself when it is not lazy), owning their memory: a slice of a larger tensor (a
    fused projection's ``q``) is copied, so keeping it does not keep the whole."""
    if not isinstance(value, LazyTensor):
        return value
    out = value.materialize()
    if out.untyped_storage().nbytes() > out.numel() * out.element_size() and out.numel():
        out = out.clone()
    return out


TRIM_EVERY = 256 * 1024 ** 2  # bytes made between two returns of freed heap memory to the system


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None


def release_freed_memory() -> None:
    """Hand the heap pages freed so far back to the system (glibc ``malloc_trim``). Reading a model tensor by tensor
    frees a read copy between every two kept fp8 tensors; glibc keeps such holes in its heap, and without this the
    process grows by ~60% of the fp8 size on a full-size SDXL UNet (``benchmarks/bench_fp8_load.py``)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def lazy(shape, dtype: torch.dtype, make: Callable[[], torch.Tensor]) -> LazyTensor:
    """A lazy tensor of ``shape`` and ``dtype`` whose values ``make()`` reads."""
    return LazyTensor(torch.empty(tuple(shape), dtype=dtype, device="meta"), make)


__all__ = ["LazyTensor", "lazy", "materialize", "release_freed_memory", "SAFETENSORS_DTYPES"]
