"""The ``setup+reduced-step`` method of ``bench_memory.py`` (issue 16), for families whose full-size step is too slow
(or too large) for the CPU: SD3 and Flux.

Two fresh processes per case:

1. **set-up, full size**: the full-size model with random weights (every component, in the dtype a loader would
   read it in), through the trainer's real set-up and cache filling (``trainer.loop.train`` up to its first step):
   weights, adapters, fp8 conversion, optimizer, resident encoders, caches. ``setup_peak_gib`` is its peak RSS;
   the RSS when the first step would begin is ``ready_gib``.
2. **one step, reduced**: the same config on a *same-width* model with fewer blocks (each component's layer counts
   cut to ``REDUCED_LAYERS``; hidden sizes, heads and sequence lengths unchanged), one real optimizer step. What the
   step adds to that process's RSS (its peak during the step minus its RSS just before) is ``step_gib``.

The row's ``peak_gib`` is ``max(setup_peak_gib, ready_gib + step_gib)``, its ``method`` ``setup+reduced-step``.
Known omission, said in the row: the gradients and optimizer state of the blocks the reduced model lacks (a LoRA's
are small; a full fine-tune's are ~0 only with a fused backward pass and Adafactor).

The tokenizers, scheduler and family extras come from a tiny model of the family (``tests/tiny_flow.py``), the
modules are swapped for the full-size (or reduced) random ones: the text the tokenizers produce is the same length
(the family pads to its token counts), only the vocabulary differs, which costs nothing.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REDUCED_LAYERS = 2  # blocks per stack in the reduced model (each "num_*layers" config value, at most this)
LAYER_KEYS = ("num_layers", "num_single_layers", "num_hidden_layers", "num_decoder_layers")


class _FirstStep(Exception):
    """Raised where the first optimizer step would begin (set-up process)."""


def rss_gib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 2**20


def reduced_module(family: str, component: str, cls=None, reduced: bool = True):
    """The full-size component on the meta device, each layer count cut to ``REDUCED_LAYERS`` (same width) where
    ``reduced``, as ``cls`` where given (the class the family loads, e.g. SD3's CLIP-L with its projection)."""
    import torch

    from trainer.full_size import build_meta

    full = build_meta(family, component)
    raw = getattr(full, "config", {})
    config = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)  # transformers | diffusers
    cut = {k: min(v, REDUCED_LAYERS) for k, v in config.items()
           if reduced and k in LAYER_KEYS and isinstance(v, int)}
    cls = cls or type(full)
    if not cut and cls is type(full):
        return full  # nothing to change (the VAE; every full-size component)
    with torch.device("meta"):
        if hasattr(raw, "to_dict"):  # transformers: a config object
            return cls(type(raw)(**{**config, **cut}))
        return cls.from_config({**config, **cut})


def materialise(module, dtype, gen):
    """Random weights (normal, std 0.02) allocated once in ``dtype``; float buffers (positional tables) random too:
    their values do not change the memory."""
    import torch

    module = module.to(dtype=dtype).to_empty(device="cpu")
    with torch.no_grad():
        for t in module.parameters():
            t.normal_(0.0, 0.02, generator=gen)
        for name, buf in module.named_buffers():
            if name.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
            elif buf.is_floating_point():
                buf.normal_(0.0, 0.02, generator=gen)
    return module.eval()


def components(family: str, dtype, reduced: bool, scratch: Path, seed: int = 0):
    """The family's :class:`Components` from a tiny model (tokenizers, scheduler, extras) with its modules replaced
    by full-size (or reduced, same-width) random ones in ``dtype`` (the VAE in fp32 where the family keeps it)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_flow import build_tiny_flow_model

    from trainer.config import ModelConfig
    from trainer.families import get_family
    from trainer.full_size import ARCHITECTURES

    fam = get_family(family)
    tiny = build_tiny_flow_model(scratch / "tiny", family, seed)
    comps = fam.load(ModelConfig(family=family, path=str(tiny.folder)))
    gen = torch.Generator().manual_seed(seed)
    loaded = dict(zip(comps.text_encoder_names, comps.text_encoders))
    built = {}
    for name, _ in ARCHITECTURES[family]:
        cls = type(loaded[name]) if loaded.get(name) is not None else None
        meta = reduced_module(family, name, cls, reduced)
        target = torch.float32 if name == "vae" and fam.vae_fp32 else dtype
        built[name] = materialise(meta, target, gen)
    names = list(comps.text_encoder_names)
    comps.denoiser = built[ARCHITECTURES[family][0][0]]
    comps.vae = built["vae"]
    comps.text_encoders = [built[n] for n in names]
    comps.source = f"random-{'reduced' if reduced else 'full'}-{family}"
    if hasattr(fam, "model_extras"):  # facts read from the denoiser at load (e.g. SD3's joint_attention_dim)
        comps.extras.update(fam.model_extras(comps.denoiser))
    return comps


def run_phase(case, cfg_for, res: int, steps: int, phase: str, from_files: bool = False) -> dict:
    """One process of the method (``setup`` or ``step``); returns its numbers. ``from_files``: the config names the
    model files to load (``bench_memory.py``'s default method), nothing is built in memory."""
    import torch

    import trainer.loop as loop
    from bench_memory import reset_rss_peak  # beside this file (bench_memory imports this module only lazily)
    from trainer.defaults import resolve_mixed_precision

    family, kind = case[0], case[1]
    with tempfile.TemporaryDirectory(prefix="crucible-bench-reduced-") as tmp:
        tmp = Path(tmp)
        cfg = cfg_for(tmp, steps)
        precision = resolve_mixed_precision(cfg.training.mixed_precision)
        lowp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # frozen parts load in the compute dtype; a full fine-tune's denoiser too with full_bf16
        dtype = lowp if lowp is not None and (kind == "lora" or cfg.training.full_bf16) else torch.float32
        comps = None if from_files else components(family, dtype, reduced=phase == "step", scratch=tmp)
        original = loop.Trainer._loop
        marks = {}

        def measured_loop(self, start_step):
            if phase == "setup":  # a full step reads every weight: count them all, file-mapped ones included
                marks["touched_gib"] = round(touch_resident(self.comps) / 2**30, 3)
            marks["ready"] = rss_gib("VmRSS")  # set-up and caches done, the first step about to begin
            marks["setup_peak"] = rss_gib("VmHWM")
            if phase == "setup":
                raise _FirstStep
            marks["reset"] = reset_rss_peak()
            return original(self, start_step)

        loop.Trainer._loop = measured_loop
        from bench_fp8_load import AnonPeak

        try:
            with AnonPeak() as anon:  # a file's memory-mapped pages count in the RSS while it is read
                loop.train(cfg, components=comps)
        except _FirstStep:
            pass
        finally:
            loop.Trainer._loop = original
        out = {"ready_gib": round(marks["ready"], 3), "setup_peak_gib": round(marks["setup_peak"], 3),
               "precision": precision}
        if phase == "setup":
            out["setup_anon_peak_gib"] = round(anon.peak / 2**30, 3)
            out["touched_gib"] = marks["touched_gib"]
        if phase == "step":
            peak = rss_gib("VmHWM")  # the step's peak (since the reset; the whole process's where it failed)
            out["step_gib"] = round(max(0.0, peak - marks["ready"]), 3)
            out["step_peak_exact"] = marks["reset"]
        return out


def touch_resident(comps) -> int:
    """Read one byte per page of every tensor of the run's modules (returns their bytes). safetensors hands out
    tensors that map the file (an fp8 file read as fp8 is never copied), whose pages join the RSS only when read: the
    reduced method never runs the full-size model, so without this its set-up would not count such weights at all,
    while a real step on the CPU reads every one (on a GPU they are copied to the device)."""
    import torch

    seen, total = set(), 0
    modules = [m for m in vars(comps).values() if isinstance(m, torch.nn.Module)]
    modules += [m for value in vars(comps).values() if isinstance(value, (list, tuple))
                for m in value if isinstance(m, torch.nn.Module)]
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.device.type != "cpu" or tensor.data_ptr() in seen or tensor.numel() == 0:
                continue
            seen.add(tensor.data_ptr())
            raw = tensor.detach().reshape(-1).view(torch.uint8)
            raw[::4096].sum()  # one byte per page
            total += raw.numel()
    return total


def combine(case_name: str, res: int, setup: dict, step: dict, base_gib: float) -> dict:
    """The row of ``setup+reduced-step``: the full-size set-up plus the reduced model's step."""
    train = setup["ready_gib"] + step["step_gib"]
    peak = max(setup["setup_peak_gib"], train)
    return {"case": case_name, "res": res, "peak_gib": round(peak, 3), "base_gib": round(base_gib, 3),
            "setup_peak_gib": setup["setup_peak_gib"], "train_peak_gib": round(train, 3),
            "ready_gib": setup["ready_gib"], "step_gib": step["step_gib"], "device": "cpu",
            **({"setup_anon_peak_gib": setup["setup_anon_peak_gib"]} if "setup_anon_peak_gib" in setup else {}),
            **({"touched_gib": setup["touched_gib"]} if "touched_gib" in setup else {}),
            "method": "setup+reduced-step", "precision": setup["precision"], "steps": 1,
            "reduced_layers": REDUCED_LAYERS,
            "left_out": "gradients and optimizer state of the blocks the reduced model lacks"}


def cpu_threads() -> None:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
