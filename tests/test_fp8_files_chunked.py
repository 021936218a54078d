"""Loading a file into another dtype never holds the whole file's mapped pages beside the converted copy.

safetensors (0.6+) maps the file and every page a handle has read stays resident until that handle closes; the fp16
SDXL single file read as bf16 through one handle peaked at 13.3 GiB RSS (7.1 of it the copy). The reader now takes a
fresh handle every ``READ_CHUNK_BYTES`` (``trainer.fp8_files.ChunkedReader``). Measured here through the process's
``RssFile`` at each conversion (Linux only)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import trainer.fp8_files as fp8_files
from trainer.safetensors_stream import write_streamed

MIB = 1 << 20
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def rss_file_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_a_file_read_into_another_dtype_holds_at_most_a_chunk_of_its_pages(tmp_path, monkeypatch):
    path = tmp_path / "fp16.safetensors"
    count, shape = 24, (1024, 1024)  # 24 tensors of 2 MiB: a 48 MiB fp16 file
    write_streamed(path, {f"layer{i}.weight": (shape, torch.float16) for i in range(count)},
                   lambda key: torch.full(shape, 0.5, dtype=torch.float16), metadata={"format": "pt"})
    monkeypatch.setattr(fp8_files, "READ_CHUNK_BYTES", 8 * MIB)
    start, grown = rss_file_bytes(), []
    convert = fp8_files.dequantize_tensor

    def measuring(key, tensor, *args, **kwargs):
        value = convert(key, tensor, *args, **kwargs)  # the file's pages of this tensor are read now
        grown.append(rss_file_bytes() - start)
        return value

    monkeypatch.setattr(fp8_files, "dequantize_tensor", measuring)
    out = fp8_files.read_file(path, torch.bfloat16)
    assert len(out) == count and all(v.dtype == torch.bfloat16 and float(v[0, 0]) == 0.5 for v in out.values())
    # one handle for the whole file: ~48 MiB of file pages at the end; chunked: at most a chunk plus one tensor
    assert max(grown) <= 8 * MIB + 2 * MIB + 4 * MIB, [round(g / MIB, 1) for g in grown]


def test_tensors_kept_in_the_files_dtype_stay_valid_after_their_handle_closes(tmp_path, monkeypatch):
    path = tmp_path / "same.safetensors"
    write_streamed(path, {f"t{i}": ((256, 256), torch.float16) for i in range(8)},
                   lambda key: torch.full((256, 256), float(key[1:]), dtype=torch.float16), metadata={"format": "pt"})
    monkeypatch.setattr(fp8_files, "READ_CHUNK_BYTES", 200_000)  # a fresh handle for nearly every tensor
    out = fp8_files.read_file(path)
    assert [float(out[f"t{i}"].float().mean()) for i in range(8)] == [float(i) for i in range(8)]


def test_a_small_tensor_kept_in_the_files_dtype_does_not_pin_its_chunk(tmp_path, monkeypatch):
    """ComfyUI's ``t5xxl_fp8_e4m3fn``: fp8 Linear weights (converted) beside bf16 layer norms (kept as they are). A
    kept tensor left in the mapping held every page its handle had read: SD3's T5-XXL kept 4.6 GiB of the fp8 file
    resident beside its bf16 copy until the encoder was released (measured 2026-12-07). Kept tensors are copied out,
    so the mapping goes with its handle."""
    path = tmp_path / "t5_like.safetensors"
    count, shape = 24, (2048, 1024)  # 24 blocks of a 2 MiB fp8 weight and a small bf16 norm: ~48 MiB
    layout = {}
    for i in range(count):
        layout[f"block{i}.weight"] = (shape, torch.float8_e4m3fn)
        layout[f"block{i}.norm.weight"] = ((1024,), torch.bfloat16)

    def value(key):
        dtype = layout[key][1]
        return torch.full(layout[key][0], 0.5).to(dtype)

    write_streamed(path, layout, value, metadata={"format": "pt"})
    monkeypatch.setattr(fp8_files, "READ_CHUNK_BYTES", 8 * MIB)
    start = rss_file_bytes()
    out = fp8_files.read_file(path, torch.bfloat16)
    held = rss_file_bytes() - start
    assert all(v.dtype == torch.bfloat16 and float(v.flatten()[0]) == 0.5 for v in out.values())
    assert held <= 8 * MIB + 4 * MIB, round(held / MIB, 1)  # was the whole ~48 MiB file
