"""The MODEL's weights as a training run needs them: trainable through autograd, quantized layers wrapped by peft.

* :func:`usable_by_autograd`: ComfyUI runs nodes under ``torch.inference_mode()``, so a model loaded there holds
  inference tensors, which autograd may not save for the backward pass; they become normal copies.
* :class:`QuantizedLinearViews`: ComfyUI 0.8.0 loads a *scaled fp8* file (``scaled_fp8`` marker + ``.scale_weight``
  per layer, or the current ``.comfy_quant`` + ``.weight_scale`` layout) with its mixed-precision ops
  (``comfy.ops.mixed_precision_ops``). Every Linear of such a model is then ComfyUI's ``MixedPrecisionOps.Linear``,
  a plain ``torch.nn.Module`` (not a ``torch.nn.Linear``) whose weight is a ``QuantizedTensor`` (fp8 data + scale)
  that its own forward dequantizes (``weight · scale``). peft wraps only ``torch.nn.Linear`` / Conv layers, and the
  family's module filters ask the same, so such a MODEL had no trainable module at all. For the run, each such
  layer gets, in place, a class derived from its own class and from ``torch.nn.Linear`` (the same object and state;
  its own ``forward`` / ``state_dict`` / loading come first in the MRO), so peft wraps it as a Linear and the
  adapter's forward calls ComfyUI's own forward, dequantize included.
  Where ComfyUI computes in fp8 (a GPU with fp8 matmuls), that forward quantizes its *input* to fp8 and
  multiplies fp8 × fp8: that step has no gradient, so every LoRA before such a layer would lose the part of its
  gradient that flows through the frozen weight. For the run each layer takes ComfyUI's full-precision path
  (``_full_precision_mm``: dequantize, then a normal matmul, as ComfyUI's own forward does whenever weight
  patches apply); :meth:`QuantizedLinearViews.undo` gives each layer its class and setting back.
"""
from __future__ import annotations

import torch

_VIEWS: dict[type, type] = {}  # ComfyUI's layer class → its torch.nn.Linear view class (one per class)


def usable_by_autograd(module: torch.nn.Module) -> int:
    """Replace the module's inference tensors by normal copies (same values; returns how many). A frozen weight
    between a LoRA and the loss is saved for the backward pass. One tensor at a time is copied."""
    copied = 0
    for sub in module.modules():
        for table, make in ((sub._parameters, lambda t: torch.nn.Parameter(t, requires_grad=False)),
                            (sub._buffers, lambda t: t)):
            for name, tensor in list(table.items()):
                if tensor is not None and tensor.is_inference():
                    table[name] = make(tensor.detach().clone())
                    copied += 1
    return copied


def is_cast_linear(module: torch.nn.Module) -> bool:
    """A ComfyUI cast-op layer (``comfy.ops.CastWeightBiasOp``) that is a Linear by its features but not a
    ``torch.nn.Linear`` subclass (0.8.0's mixed-precision Linear of quantized models)."""
    return (not isinstance(module, torch.nn.Linear) and hasattr(type(module), "comfy_cast_weights")
            and isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int)
            and getattr(module, "weight", None) is not None and len(module.weight.shape) == 2)


def linear_view_class(cls: type) -> type:
    """``cls`` with ``torch.nn.Linear`` after it in the MRO (cached, so every layer of a class shares one)."""
    if cls not in _VIEWS:
        _VIEWS[cls] = type(cls.__name__, (cls, torch.nn.Linear),
                           {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_crucible_view_of": cls})
    return _VIEWS[cls]


class QuantizedLinearViews:
    """Every :func:`is_cast_linear` layer under ``root`` as a ``torch.nn.Linear`` on ComfyUI's full-precision path
    until :meth:`undo` (see the module docstring)."""

    def __init__(self, root: torch.nn.Module):
        self.changed: list[tuple[torch.nn.Module, type, dict]] = []  # (layer, its class, its own attributes before)
        for module in root.modules():
            if is_cast_linear(module):
                before = {k: vars(module)[k] for k in ("_full_precision_mm",) if k in vars(module)}
                self.changed.append((module, type(module), before))
                module.__class__ = linear_view_class(type(module))
                module._full_precision_mm = True

    def __len__(self) -> int:
        return len(self.changed)

    def undo(self) -> None:
        """Each layer's class and full-precision setting as before (idempotent)."""
        for module, cls, before in self.changed:
            module.__class__ = cls
            vars(module).pop("_full_precision_mm", None)
            vars(module).update(before)
        self.changed.clear()
