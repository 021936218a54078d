"""Host-RAM peak of loading a full-size SDXL UNet (random bf16 weights, diffusers folder layout) three ways, each in
a fresh subprocess (issue #16):

* ``bf16``            — ``model.fp8_base`` off: the UNet in bf16 (diffusers ``from_pretrained``).
* ``fp8-after-load``  — what ``fp8_base`` did before: load in bf16, then quantize (the peak is the bf16 load).
* ``fp8-streamed``    — ``fp8_base`` now: built on the meta device, each tensor read and quantized in turn.

Each line: ``case=sdxl-unet-<mode> peak_rss_gib=<x> above_start_gib=<y> anon_above_start_gib=<a> weights_gib=<z>``
(``above_start``: peak RSS minus the RSS after imports; ``anon_above_start``: the same for anonymous memory alone,
sampled every 5 ms — a memory-mapped file's pages count in RSS but are page cache the kernel can drop; ``weights``:
bytes the loaded UNet holds). Needs ~6 GiB of free RAM and ~5 GiB of disk.

    python benchmarks/bench_fp8_load.py [--dir /tmp/crucible-fp8-bench]
"""
from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("bf16", "fp8-after-load", "fp8-streamed")
GIB = 1024 ** 3


def write_unet_folder(folder: Path) -> Path:
    """A full-size SDXL UNet as ``unet/config.json`` + ``diffusion_pytorch_model.safetensors`` (bf16, N(0, 0.02)),
    written tensor by tensor (never the whole model in memory)."""
    import torch

    from trainer.full_size import build_meta

    unet_dir = folder / "unet"
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    if weights.is_file():
        return folder
    unet_dir.mkdir(parents=True, exist_ok=True)
    meta = build_meta("sdxl", "unet")
    (unet_dir / "config.json").write_text(meta.to_json_string(), encoding="utf-8")
    state = meta.state_dict()
    header, offset = {}, 0
    for key, t in state.items():
        size = t.numel() * 2
        header[key] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(0)
    tmp = weights.with_suffix(".part")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for key, t in state.items():
            value = (torch.randn(t.shape, generator=generator) * 0.02).to(torch.bfloat16)
            out.write(value.view(torch.uint8).numpy().tobytes())
    tmp.rename(weights)
    return folder


class AnonPeak:
    """Samples ``RssAnon`` (/proc/self/status: anonymous memory, not the page cache of a memory-mapped file) every
    5 ms in a thread; ``peak`` is the largest sample."""

    def __init__(self):
        import threading

        self.peak, self.stop = self.read(), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    @staticmethod
    def read() -> int:
        with open("/proc/self/status", encoding="ascii") as status:
            line = next((x for x in status if x.startswith("RssAnon:")), "RssAnon: 0 kB")
        return int(line.split()[1]) * 1024

    def run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.read())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.read())


def measure(mode: str, folder: Path) -> dict:
    """Run in a fresh process: load the UNet ``mode``'s way; peak RSS (ru_maxrss) and peak anonymous RSS."""
    import torch
    from diffusers import UNet2DConditionModel

    from trainer.families.weights import from_pretrained
    from trainer.quantized import apply_fp8_base, fp8_bytes, fp8_loading

    start, anon_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, AnonPeak.read()
    with AnonPeak() as anon:
        with fp8_loading(mode == "fp8-streamed"):
            unet = from_pretrained(UNet2DConditionModel, folder, "unet", torch.bfloat16)
        if mode == "fp8-after-load":
            apply_fp8_base([unet], torch.bfloat16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fp8, other = fp8_bytes(unet)
    return {"peak": peak, "start": start, "anon": anon.peak - anon_start, "weights": fp8 + other, "fp8": fp8}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/crucible-fp8-bench", help="where the 5 GiB UNet folder is written")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args(argv)
    folder = Path(args.dir)
    if args.mode:
        print(json.dumps(measure(args.mode, folder)))
        return 0
    write_unet_folder(folder)
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--dir", str(folder), "--mode", mode], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"case=sdxl-unet-{mode} peak_rss_gib={r['peak'] / GIB:.2f} "
              f"above_start_gib={(r['peak'] - r['start']) / GIB:.2f} anon_above_start_gib={r['anon'] / GIB:.2f} "
              f"weights_gib={r['weights'] / GIB:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
