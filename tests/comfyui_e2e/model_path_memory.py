"""The Step Plan's MODEL-path memory estimate (``nodes/comfy_memory.py``) against reality, in ComfyUI's own process
(run in the ComfyUI venv by ``checks_model_path_memory.py``; ComfyUI started with ``--use-pytorch-cross-attention``,
so its attention on the CPU is PyTorch's SDPA, the fused kernel the estimate counts).

1. **Full size, same computation**: a full-size SDXL that ComfyUI builds on the ``meta`` device
   (``comfy.model_detection`` reads the UNet config from the full-size diffusers SDXL's tensor shapes, the same
   meta state dict ``trainer.full_size`` builds; bf16 weights, LoRA dim 16 attn_mlp, AdamW, 1024 px, batch 1, caches
   on): the MODEL-path estimate of the training peak is within 15% of the Crucible Model path's
   (``trainer.memory.estimate``) for the same case, with and without gradient checkpointing. They trace different
   module trees (ComfyUI's UNet and diffusers'), so only the activations may differ; the checkpoint units differ too
   (ComfyUI's UNet layers vs diffusers' resnets / transformer blocks) and this estimate also counts each unit's
   saved input. The same SDXL stored in fp8 with ComfyUI's manual cast to bf16 traces too, its weights at 1 byte.
2. **Tiny, measured** (the Step Plan's lines from the real objects and ComfyUI's ``get_free_memory``; ComfyUI's
   SDXL class on tiny weights, ComfyUI's VAE, a CLIP stand-in:
   ``model_path_training.case_objects``; fp32 on the CPU, 512 px, batch 4, LoRA dim 8):
   * the traced activations equal what autograd saves in a real training forward of the real objects (the family's
     ``predict``, the adapter attached as the run attaches it; every saved tensor counted once per storage,
     weights left out) within 2% (the fused-kernel rule adds a log-sum-exp row per query);
   * gradient checkpointing on the real UNet gives the same adapter gradients and saves less;
   * the peak RSS of a training step (forward, backward, AdamW step; after warm-up steps, so oneDNN's kernels exist;
     the script runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` = 64 KiB, so each tensor is its own mapping and the RSS
     follows the live tensors rather than the heap's high-water mark, which held ~250 MiB more) above the RSS before it is within 25% + 30 MiB of the
     estimate's activations + adapter gradients and AdamW state (what a step adds on top of what is resident). A tiny model
     is dominated by fixed costs, so only the parts a step adds are compared; 30 MiB covers the allocator's slack
     and autograd's own buffers, 25% the transient tensors a backward pass holds next to the saved ones.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import sys
import threading
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: the model fixtures
from comfy_python import report, setup_comfy  # noqa: E402

GIB = 2**30
FULL_SIZE_TOL = 0.15
SAVED_TOL = 0.02
RSS_TOL, RSS_SLACK = 0.25, 30 * 2**20
RESOLUTION, BATCH, RANK = 512, 4, 8
MMAP_THRESHOLD = 65536


def pack_module(name: str):
    from model_path_equivalence import PACK_ALIAS

    return importlib.import_module(f"{PACK_ALIAS}.{name}")


def full_size_estimator(memory, family_module, weight_dtype, manual_cast=None):
    """The estimator for a full-size SDXL that ComfyUI builds on ``meta`` in ``weight_dtype``."""
    import comfy.model_detection
    import torch

    from trainer.full_size import build_meta

    unet_config = comfy.model_detection.unet_config_from_diffusers_unet(build_meta("sdxl", "unet").state_dict())
    config = comfy.model_detection.model_config_from_unet_config(unet_config)
    config.set_inference_dtype(weight_dtype, manual_cast)
    with torch.device("meta"):
        base = config.get_model({})
    clip = types.SimpleNamespace(tokenize=lambda text: text)  # the conditioning below replaces the CLIP
    family = family_module.ComfyModelFamily(types.SimpleNamespace(model=base), clip,
                                            types.SimpleNamespace(first_stage_model=None))
    cond = {"encoder_hidden_states": torch.zeros(1, 77, 2048), "pooled_output": torch.zeros(1, 1280)}
    return family, memory.ModelPathEstimator(family, cond, "cuda")


def full_size_sdxl(memory, family_module) -> None:
    import torch

    from trainer.memory import MemoryOptions, estimate

    started = time.perf_counter()
    family, estimator = full_size_estimator(memory, family_module, torch.bfloat16)
    network = pack_module("trainer.config").NetworkConfig(network_dim=16)
    for checkpointing in (True, False):
        case = dict(network_type="lora", network_dim=16, target_preset="attn_mlp", precision="bf16",
                    optimizer="adamw", gradient_checkpointing=checkpointing, resolution=1024, batch_size=1,
                    cache_latents=True, cache_text_embeddings=True)
        ours = estimator.estimate(pack_module("trainer.memory").MemoryOptions(family=family.title, **case), network)
        theirs = estimate(MemoryOptions(family="sdxl", **case))
        ratio = ours.training_gib / theirs.training_gib
        parts = "; ".join(f"{k}: {ours.parts[k]:.2f} vs {theirs.parts.get(k, 0):.2f}" for k in ours.parts
                          if ours.parts[k] or theirs.parts.get(k))
        report("pass" if abs(ratio - 1) <= FULL_SIZE_TOL else "fail",
               f"MODEL-path estimate, full-size SDXL (ComfyUI on meta), checkpointing {'on' if checkpointing else 'off'}: "
               f"within {FULL_SIZE_TOL:.0%} of the Crucible Model path's",
               f"{ours.training_gib:.2f} vs {theirs.training_gib:.2f} GiB (×{ratio:.3f}); GiB, MODEL vs diffusers "
               f"path: {parts} ({time.perf_counter() - started:.0f}s)")
    bf16 = ours  # the last case: checkpointing off
    family, estimator = full_size_estimator(memory, family_module, torch.float8_e4m3fn, torch.bfloat16)
    case["gradient_checkpointing"] = True  # SDXL's default (without it each layer's bf16 cast copy is saved)
    fp8 = estimator.estimate(pack_module("trainer.memory").MemoryOptions(family=family.title, **case), network)
    ratio = fp8.parts["denoiser weights"] / bf16.parts["denoiser weights"]
    lines = memory.report(estimator, fp8.options, network, ("cuda", 3.0, 8.0, "NORMAL_VRAM"))
    fp8_off = estimator.estimate(fp8.options.__class__(**{**fp8.options.__dict__, "gradient_checkpointing": False}),
                                 network).parts["activations"]
    report("pass" if abs(ratio - 0.5) < 0.01 and "float8_e4m3fn, computed in bfloat16 (manual cast)" in lines
           and "ComfyUI would load the MODEL partially" in lines else "fail",
           "MODEL-path estimate, full-size SDXL in fp8 with ComfyUI's manual cast: weights at 1 byte, traced on meta",
           f"weights {fp8.parts['denoiser weights']:.2f} vs {bf16.parts['denoiser weights']:.2f} GiB in bf16; "
           f"activations {fp8.parts['activations']:.2f} GiB with checkpointing (each layer's cast copy is saved: "
           f"{fp8_off:.2f} GiB without it); on an 8 GiB card with "
           f"3 GiB free:\n{lines} ({time.perf_counter() - started:.0f}s)")


class RssPeak:
    """The process's peak resident set size while the block runs, sampled every millisecond (/proc/self/statm)."""

    def __init__(self):
        import os

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.start = self.read()

    def read(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.start = self.peak = self.read()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.read())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.read())


def tiny_sdxl_measured(memory, family_module) -> None:
    import torch

    from model_path_training import case_objects

    started = time.perf_counter()
    attach_network = pack_module("trainer.network").attach_network
    config = pack_module("trainer.config")
    saved_bytes = pack_module("trainer.memory")._SavedBytes
    model, clip, vae = case_objects("sdxl")
    network = config.NetworkConfig(network_dim=RANK, network_alpha=RANK, target_preset="attn_mlp")
    opts = pack_module("trainer.memory").MemoryOptions(
        family="ComfyUI SDXL (tiny)", network_dim=RANK, precision="no", optimizer="adamw", resolution=RESOLUTION,
        batch_size=BATCH, cache_latents=True, cache_text_embeddings=True, gradient_checkpointing=False)
    family = family_module.ComfyModelFamily(model, clip, vae)
    cond1 = family.encode_text(types.SimpleNamespace(denoiser=torch.nn.Linear(1, 1)), [""])
    estimator = memory.ModelPathEstimator(family, cond1, "cpu")
    est = estimator.estimate(opts, network)
    est_checkpointed = estimator.estimate(opts.__class__(**{**opts.__dict__, "gradient_checkpointing": True}), network)
    demo = Path(sys.modules["trainer"].__file__).parent / "demo_data"
    text = memory.model_path_memory_report(model, clip, vae, None, (config.DatasetConfig(path=str(demo), resolution=RESOLUTION),),
                                           network, None, config.TrainingConfig(mixed_precision="no"), BATCH)
    wanted = ("estimated peak memory", f"at {RESOLUTION} px, batch {BATCH}", "ComfyUI's device cpu")
    report("pass" if all(w in text for w in wanted) and ("fits: " in text or "will NOT fit" in text) else "fail",
           "Step Plan's MODEL-path memory lines from ComfyUI's own objects and model management", text)
    comps = family.load(config.ModelConfig(family=family_module.HOSTED_NAME))
    net = attach_network(family, comps, network)
    params = net.parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    side = RESOLUTION // 8
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, side, side, generator=generator)
    cond = family.encode_text(comps, [f"caption {i}" for i in range(BATCH)])
    timesteps = torch.full((BATCH,), 500)
    weights = {p.untyped_storage()._cdata for p in comps.denoiser.parameters()}

    def step(counter=None, update=True):
        hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack) if counter else None
        with hooks or _nothing():
            out = family.predict(comps, x, timesteps, cond)
        out.float().pow(2).mean().backward()
        grads = None if update else [p.grad.clone() for p in params]
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grads

    try:
        counter = saved_bytes(weights)
        plain = step(counter, update=False)  # also warms up (oneDNN's kernels, the allocator)
        traced = est.parts["activations"] * GIB
        report("pass" if abs(traced / counter.total - 1) <= SAVED_TOL else "fail",
               f"MODEL-path estimate, tiny SDXL: traced activations equal a real training forward's saved tensors "
               f"within {SAVED_TOL:.0%}",
               f"traced {traced / 2**20:.1f} MiB, saved {counter.total / 2**20:.1f} MiB")
        comps.denoiser.enable_gradient_checkpointing()
        counter = saved_bytes(weights)
        checkpointed = step(counter, update=False)
        comps.denoiser.disable_gradient_checkpointing()
        same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(plain, checkpointed))
        report("pass" if same and counter.total < traced * 0.7 else "fail",
               "MODEL path, tiny SDXL: gradient checkpointing reaches ComfyUI's UNet layers (same gradients, less saved)",
               f"gradients {'equal' if same else 'DIFFER'}; saved outside the checkpointed units "
               f"{counter.total / 2**20:.1f} MiB vs {traced / 2**20:.1f} MiB without; the estimate with checkpointing "
               f"{est_checkpointed.parts['activations'] * 1024:.1f} MiB")
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system: RSS then follows the live bytes
        with RssPeak() as rss:
            step()
        adds = (est.parts["activations"] + est.parts["trainable parameters"] * 8 / 16) * GIB  # + gradients, Adam
        measured = rss.peak - rss.start
        ok = abs(measured - adds) <= RSS_TOL * adds + RSS_SLACK
        report("pass" if ok else "fail",
               f"MODEL-path estimate, tiny SDXL at {RESOLUTION} px, batch {BATCH}: a training step's peak RSS "
               f"within {RSS_TOL:.0%} + {RSS_SLACK >> 20} MiB of the estimate's activations + gradients",
               f"measured {measured / 2**20:.1f} MiB above the {rss.start / 2**20:.0f} MiB before the step; "
               f"estimate {adds / 2**20:.1f} MiB (whole estimate {est.format()}) ({time.perf_counter() - started:.0f}s)")
    finally:
        comps.denoiser.disable_gradient_checkpointing()
        family.restore()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    import os
    import traceback

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(MMAP_THRESHOLD):  # glibc: every large tensor its own mapping,
        # returned when freed, so the RSS follows the live tensors instead of the heap's high-water mark
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
    args = setup_comfy(comfy_flags=("--use-pytorch-cross-attention",))
    from model_path_equivalence import comfy_family_module

    family_module = comfy_family_module(args.pack_dir)
    memory = pack_module("nodes.comfy_memory")
    wanted = {n for n in args.only.split(",") if n} or {"full", "tiny"}
    for name, case in (("full", full_size_sdxl), ("tiny", tiny_sdxl_measured)):
        if name in wanted:
            try:
                case(memory, family_module)
            except Exception:  # noqa: BLE001 - report and go on
                report("fail", f"MODEL-path memory estimate: {name}", traceback.format_exc()[-3000:])
            gc.collect()


if __name__ == "__main__":
    main()
