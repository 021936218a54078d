"""Bytes autograd keeps for the backward pass, traced on the ``meta`` device (no memory, no download): the
"activations" part of the memory estimate (:mod:`trainer.memory`) for the built-in families' full-size denoisers
(:func:`activation_bytes`) and for architectures known only at run time (:func:`traced_activation_bytes`, the MODEL
path). Every saved tensor counts once per storage, the weights left out, attention as a fused kernel."""
from __future__ import annotations

import contextlib
import functools


@functools.lru_cache(maxsize=None)
def activation_bytes(family: str, resolution: int, checkpointing: bool, rank: int = 16,
                     preset: str = "attn_mlp") -> int:
    """Bytes autograd keeps for backward for one sample, in fp32 units (scale by 2/4 for half precision)."""
    import peft
    import torch
    import torch.nn.functional as F

    from .families import get_family
    from .full_size import ARCHITECTURES, build_meta
    from .lora_targets import lora_target_modules

    component = ARCHITECTURES[family][0][0]
    model = build_meta(family, component)
    with torch.device("meta"):
        model = peft.inject_adapter_in_model(peft.LoraConfig(
            r=rank, lora_alpha=rank, target_modules=lora_target_modules(family, component, preset)), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.train()
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    counter = _SavedBytes(weights)
    units: list[int] = []

    def run_unit(fn, *args, **kwargs):  # a checkpointed block: count what it would save, keep none of it outside
        for k in ("use_reentrant", "preserve_rng_state", "determinism_check", "debug", "context_fn"):
            kwargs.pop(k, None)
        inner = _SavedBytes(weights)
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, inner.unpack):
            out = fn(*args, **kwargs)
        units.append(inner.total)
        return out

    if checkpointing:
        if hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        model._gradient_checkpointing_func = run_unit
        for sub in model.modules():
            if hasattr(sub, "_gradient_checkpointing_func"):
                sub._gradient_checkpointing_func = run_unit
    with torch.device("meta"), _fused_attention(F), \
            torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        model(**get_family(family).full_size_forward_inputs(resolution))
    return counter.total + (max(units) if units else 0)


class _SavedBytes:
    """Counts saved tensors once per storage (by address), leaving out the weights (counted as weights). It holds each
    storage it counted: a freed one's address comes back for the next (always on ``meta``), which then passed for one
    already counted (a checkpointed block's input nothing else keeps: the count followed the allocation history)."""

    def __init__(self, weights: set | None = None):
        self.total, self.seen, self.weights = 0, {}, weights or set()

    def pack(self, t):
        key = (storage := t.untyped_storage())._cdata
        if key not in self.seen and key not in self.weights:  # a tensor saved by several ops is held once
            self.seen[key] = storage
            self.total += t.numel() * 4  # fp32 units; the caller scales to the compute dtype
        return t

    @staticmethod
    def unpack(t):
        return t


@contextlib.contextmanager
def _fused_attention(F):
    """SDPA as a fused kernel saves its inputs, output and a log-sum-exp row, not the attention matrix."""
    import torch

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):  # pragma: no cover - never run (meta trace only)
            raise NotImplementedError

    real = F.scaled_dot_product_attention

    def fused(*args, **kwargs):
        q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
        return Fused.apply(q, k, v)

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def traced_activation_bytes(model, forward, checkpoint_blocks=()) -> int:
    """Bytes autograd keeps for backward in one call of ``forward()`` (a forward pass of ``model``, already on the
    ``meta`` device with its adapter attached), in fp32 units like :func:`activation_bytes`: every saved tensor once
    per storage, the model's own parameters left out, attention counted as a fused kernel. Each module in
    ``checkpoint_blocks`` is a checkpointed unit (gradient checkpointing: it saves its input only outside, and its
    own saved tensors live during its recompute in backward), so the total is what is saved outside them (the
    blocks' inputs included) plus the largest unit. For architectures known only at run time (the MODEL path, ``nodes/comfy_memory.py``)."""
    import torch
    import torch.nn.functional as F

    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    counter, units = _SavedBytes(weights), []
    for block in checkpoint_blocks:
        def run(*args, _forward=block.forward, **kwargs):
            for tensor in [*args, *kwargs.values()]:  # torch.utils.checkpoint keeps the block's tensor inputs
                if torch.is_tensor(tensor) and tensor.is_floating_point():
                    counter.pack(tensor)
            inner = _SavedBytes(weights)
            with torch.autograd.graph.saved_tensors_hooks(inner.pack, inner.unpack):
                out = _forward(*args, **kwargs)
            units.append(inner.total)
            return out

        block.forward = run  # instance attribute: nn.Module.__call__ runs it
    try:
        with torch.device("meta"), _fused_attention(F), \
                torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            forward()
    finally:
        for block in checkpoint_blocks:
            vars(block).pop("forward", None)
    return counter.total + (max(units) if units else 0)
