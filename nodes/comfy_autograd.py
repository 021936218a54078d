"""Make ComfyUI's inference-only model code differentiable for the MODEL path (``nodes/comfy_family.py``).

ComfyUI writes its diffusion models for sampling, and two habits of that code break ``loss.backward()``:

* **In-place residual updates** (``img += attn_out`` in Flux/Chroma blocks, ``x += …`` in single blocks): the
  stream was saved by the norm before it, so autograd refuses the backward pass ("modified by an inplace
  operation"). Under :func:`out_of_place_updates` an augmented assignment (``+=``, ``-=``, ``*=``) on a tensor in
  the autograd graph computes a new tensor instead, and Python rebinds the name to it (``x += y`` is
  ``x = x.__iadd__(y)``), so every value is the same and nothing saved is overwritten. Explicit ``x.add_(y)``
  calls are untouched. Gradient checkpointing must run its recomputation inside the same context (a block
  recomputed with in-place adds would overwrite the tensors it saves, silently giving wrong input gradients).
* **Custom ops with no backward**: comfy-kitchen's RoPE kernels (``comfy_kitchen::apply_rope`` /
  ``apply_rope1``, used by Flux, Chroma, Lumina 2, …) have no autograd formula. RoPE multiplies each pair of
  channels by the 2×2 rotation matrix ``F`` held in ``freqs_cis[..., 2, 2]`` (out = F·x), so the gradient is
  ``Fᵀ·grad``: the same kernel with the matrix transposed. :func:`differentiable_rope` registers that formula once
  per process, and only for an op whose backward fails without it.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_AUGMENTED = {"__iadd__": torch.add, "__isub__": torch.sub, "__imul__": torch.mul}
_state = threading.local()
_lock = threading.Lock()
_originals: dict[str, object] = {}
_active = 0  # contexts open in any thread (the patch is installed while > 0)


def _out_of_place(name: str):
    fallback = getattr(torch._C.TensorBase, name)
    op = _AUGMENTED[name]

    def augmented(self, other):
        if getattr(_state, "depth", 0) and torch.is_grad_enabled() and (
                self.requires_grad or (torch.is_tensor(other) and other.requires_grad)):
            return op(self, other)
        return fallback(self, other)

    augmented.__name__ = name
    return augmented


@contextmanager
def out_of_place_updates():
    """Within this block (this thread), ``t += u`` / ``-=`` / ``*=`` on tensors that autograd tracks make a new
    tensor instead of writing into ``t``; other threads and untracked tensors keep ComfyUI's in-place update."""
    global _active
    with _lock:
        if _active == 0:
            for name in _AUGMENTED:
                _originals[name] = torch.Tensor.__dict__.get(name)
                setattr(torch.Tensor, name, _out_of_place(name))
        _active += 1
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        with _lock:
            _active -= 1
            if _active == 0:
                for name, original in _originals.items():
                    if original is None:
                        delattr(torch.Tensor, name)
                    else:
                        setattr(torch.Tensor, name, original)
                _originals.clear()


_ROPE_OPS = {"apply_rope1": 1, "apply_rope": 2}  # op name → how many rotated tensors it takes (x | xq, xk)
_registered: set[str] = set()


def _rope_backward(count: int, namespace: str):
    def setup_context(ctx, inputs, output):
        ctx.transposed = inputs[count].transpose(-1, -2).contiguous()  # Fᵀ (freqs_cis[..., i, j] → [..., j, i])

    def backward(ctx, *grads):
        rotate = getattr(getattr(torch.ops, namespace), "apply_rope1")
        return (*(None if g is None else rotate(g, ctx.transposed) for g in grads), None)

    return setup_context, backward


def _has_backward(op, count: int) -> bool:
    xs = [torch.zeros(1, 1, 1, 2, requires_grad=True) for _ in range(count)]
    freqs = torch.eye(2).expand(1, 1, 1, 1, 2, 2).contiguous()
    out = op(*xs, freqs)
    total = sum(o.sum() for o in (out if isinstance(out, (tuple, list)) else [out]))
    try:
        torch.autograd.grad(total, xs)
        return True
    except RuntimeError:
        return False


def differentiable_rope(namespace: str = "comfy_kitchen") -> list[str]:
    """Give the namespace's RoPE ops a backward where they have none (see the module doc); returns the ops it
    registered. A namespace that is not loaded, or ops that already differentiate, are left alone."""
    done = []
    ops = getattr(torch.ops, namespace)
    for name, count in _ROPE_OPS.items():
        qualname = f"{namespace}::{name}"
        if qualname in _registered:
            continue
        try:
            op = getattr(ops, name)
        except (AttributeError, RuntimeError):
            continue  # this comfy-kitchen has no such op
        with torch.inference_mode(False), torch.enable_grad():
            if _has_backward(op, count):
                _registered.add(qualname)
                continue
        setup_context, backward = _rope_backward(count, namespace)
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        _registered.add(qualname)
        done.append(qualname)
    return done
