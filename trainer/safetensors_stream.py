"""Write a ``.safetensors`` file one tensor at a time, never holding the whole state dict (issue #16).

``safetensors.torch.save_file`` / ``serialize_file`` need every tensor in memory at once. The format is simple
enough to stream: an 8-byte little-endian header length, a JSON header (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}}`` plus an optional ``__metadata__`` of strings, padded with spaces to a multiple
of 8 bytes), then each tensor's bytes (C order, little-endian) at its offsets. :func:`write_streamed` writes the
header from the tensors' shapes and dtypes, then asks for each tensor's values in turn and writes them, so only one
tensor exists at a time. The file is written to a temporary name and renamed (:func:`trainer.fileio.atomic_path`).
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .fileio import atomic_path
from .lazy_tensors import SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def header_bytes(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and JSON header for tensors ``{name: (shape, dtype)}``, stored in that order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"safetensors has no dtype for {dtype} (tensor {name!r})")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_streamed(path: str | Path, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                   make: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``path`` with the tensors ``specs`` names (``{name: (shape, dtype)}``, in that order); ``make(name)``
    returns each tensor's values when its turn comes (it must have the announced shape and dtype)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(header_bytes(specs, metadata))
        for name, (shape, dtype) in specs.items():
            value = make(name)
            if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
                raise ValueError(f"tensor {name!r}: announced {tuple(shape)} {dtype}, made "
                                 f"{tuple(value.shape)} {value.dtype}")
            if value.numel():
                out.write(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del value
    return Path(path)


__all__ = ["header_bytes", "write_streamed", "DTYPE_NAMES"]
