"""fp8 base weights and pinned-precision layers (issue #16).

``model.fp8_base`` (kohya ``--fp8_base``) stores the frozen denoiser's ``nn.Linear`` weights, and T5's for SD3 and
Flux, as ``torch.float8_e4m3fn`` with one fp32 scale per weight (``absmax / 448``, the layout of ComfyUI's scaled-fp8
files). Each forward — and each backward — upcasts one layer's weight to the compute dtype, uses it, and drops it:
the autograd graph keeps the 1-byte weight, never an upcast copy. Biases, norms, embeddings and convolutions stay in
the compute dtype. peft wraps an :class:`Fp8Linear` like any ``nn.Linear`` (it is one), so LoRA / LoHa / LoKr train on
top in fp32; peft reads :attr:`Fp8Linear.compute_dtype` to place the adapter.

Weights that are already fp8 values (ComfyUI's plain ``*_fp8_e4m3fn`` files, read as they are) are kept with scale 1:
re-quantizing them loses nothing.

:class:`KeepFp32Linear` is transformers' ``_keep_in_fp32_modules`` made to last: T5's ``wo`` layers overflow in fp16,
so under fp16 they keep fp32 weights through later ``.to(torch.float16)`` calls and run with autocast off.

Both layer kinds keep their storage dtype through ``Module.to`` / ``.half()`` (they follow device moves; an
:class:`Fp8Linear` takes a new floating dtype as its compute dtype), so code that casts whole models stays correct.

Loading (:func:`assign_weights`, called by the file and folder loaders) builds each model on the meta device and
assigns tensors one at a time, quantizing the denoiser's and T5's Linear weights as it goes while :func:`fp8_loading`
is active. Under :func:`fp8_loading` the readers hand out :class:`~trainer.lazy_tensors.LazyTensor` values and key
conversions run on them unread, so each tensor is read (from a bf16/fp32 file, or a scaled-fp8 file dequantized),
converted and quantized before the next: loading peaks at the fp8 model plus about one tensor, and the stored fp8
bytes and scales equal those of quantizing after a full load. A plain fp8 file stays fp8 throughout. Quantizing
happens on the host before the model moves to the GPU.

Limits: T5's ``wo`` is never fp8 (transformers casts the activations to ``wo.weight.dtype``); DoRA is refused (it
rebuilds the full weight every step); under DDP the fp8 tensors are left out of the broadcast
(:func:`mark_quantized`).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# The modules fp8_base stores in fp8: the denoisers and T5 (CLIP and the VAE are small and stay as they are).
FP8_MODULE_CLASSES = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "T5EncoderModel")

_LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("crucible_fp8_loading", default=False)


# --- tensors -------------------------------------------------------------------------------------------------------

def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 tensor, fp32 scale)`` with ``fp8 × scale ≈ weight``: scale 1 when ``weight`` holds fp8 values already
    (lossless), else ``absmax / 448`` so the largest value uses fp8's full range."""
    if weight.is_meta:  # shapes only (trainer.families.weights.denoiser_shapes_only): no values to quantize
        return torch.empty_like(weight, dtype=FP8), torch.ones((), dtype=torch.float32)
    if weight.dtype == FP8:
        return weight, torch.ones((), dtype=torch.float32, device=weight.device)
    if weight.dtype in FP8_DTYPES:  # e5m2 reaches 57344, past e4m3fn's 448: rescale like any other weight
        weight = weight.float()
    as_fp8 = weight.to(FP8)
    if torch.equal(as_fp8.to(weight.dtype), weight):
        return as_fp8, torch.ones((), dtype=torch.float32, device=weight.device)
    del as_fp8
    amax = weight.detach().abs().amax().float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (weight.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(weight: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``weight × scale`` in ``dtype``. ``scale`` is a Python number, so the product is taken at the kernel's float
    precision without an fp32 copy of the weight and without a device sync."""
    out = weight.to(dtype)
    return out if scale == 1 else out.mul_(scale)


class _Fp8Matmul(torch.autograd.Function):
    """``x @ (w8 × scale)ᵀ + b`` that saves the fp8 weight for backward and upcasts it again there."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype):
        w = dequantize(weight, scale, dtype)
        ctx.save_for_backward(weight)
        ctx.scale, ctx.dtype, ctx.x_dtype, ctx.has_bias = scale, dtype, x.dtype, bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = dequantize(weight, ctx.scale, ctx.dtype)
            grad_x = grad.to(w.dtype).matmul(w).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None


# --- layers --------------------------------------------------------------------------------------------------------

class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored as fp8 with an fp32 scale (buffer ``weight_scale``, as in
    ComfyUI's files; :attr:`scale` is the same number as a Python float) and computed in :attr:`compute_dtype`."""

    compute_dtype: torch.dtype
    scale: float

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None,
                    weight: torch.Tensor | None = None) -> "Fp8Linear":
        """A quantized copy of ``linear`` (``weight``, when given, replaces its weight: a tensor being loaded)."""
        source = linear.weight if weight is None else weight
        dtype = compute_dtype or (source.dtype if source.dtype not in FP8_DTYPES else torch.bfloat16)
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, scale = quantize(source.detach())
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.register_buffer("weight_scale", scale)
        layer.scale = float(scale)
        layer.compute_dtype = dtype
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        layer.train(linear.training)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight, self.scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Matmul.apply(x, self.weight, self.scale, self.bias, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        """Device moves move the fp8 weight and fp32 scale; a floating cast becomes the new compute dtype."""
        target = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight.device))
        if target.is_floating_point() and target.dtype not in FP8_DTYPES:
            self.compute_dtype = target.dtype
        weight, scale = self._parameters.pop("weight"), self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight if weight.device == target.device else \
                nn.Parameter(weight.data.to(target.device), requires_grad=False)
            self._buffers["weight_scale"] = scale.to(target.device)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=e4m3fn, compute_dtype={self.compute_dtype}"


class KeepFp32Linear(nn.Linear):
    """An ``nn.Linear`` that keeps fp32 weights through ``.to(fp16)`` and runs with autocast off (T5 ``wo``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        def keep_fp32(t):  # follow device moves, never round an fp32 tensor through another dtype
            if t.dtype != torch.float32:
                return fn(t)
            if t.is_meta:  # nothing to round
                out = fn(t)
                return out.float() if out.is_floating_point() else out
            probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            return t.to(probe.device) if probe.is_floating_point() else fn(t)

        return super()._apply(keep_fp32, recurse)


# --- whole modules -------------------------------------------------------------------------------------------------

def keep_fp32_names(module: nn.Module) -> tuple[str, ...]:
    """transformers' ``_keep_in_fp32_modules`` (+ ``_strict``) of a model: ``("wo",)`` for T5."""
    names = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    names |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(sorted(names))


def _is_kept_fp32(name: str, keep: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(k in parts for k in keep)


def is_fp8_target(module: nn.Module) -> bool:
    """Whether ``fp8_base`` stores this model's Linear weights in fp8 (denoisers and T5)."""
    return type(module).__name__ in FP8_MODULE_CLASSES


def _linears(module: nn.Module) -> Iterator[tuple[nn.Module, str, str, nn.Linear]]:
    """``(parent, attribute, full name, layer)`` for every plain ``nn.Linear`` (not peft's wrappers, not ours)."""
    for parent_name, parent in list(module.named_modules()):
        for attr, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                yield parent, attr, f"{parent_name}.{attr}" if parent_name else attr, child


def _first_compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the first floating parameter that is not fp8: what the model computes in."""
    found = None
    for p in model.parameters():
        if p.is_floating_point():
            if p.dtype not in FP8_DTYPES:
                return p.dtype
            found = found or p.dtype
    return found or torch.float32


def _fp8_tensor_names(model: nn.Module) -> list[str]:
    """Names of the fp8 weights and their scales (for DDP, which cannot broadcast fp8 and need not: they are frozen
    and loaded from the same file on every rank)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            names += [f"{name}.weight" if name else "weight", f"{name}.weight_scale" if name else "weight_scale"]
    return names


def mark_quantized(model: nn.Module) -> None:
    """Give a model holding :class:`Fp8Linear` layers a same-named subclass that

    * reports the compute dtype as ``.dtype`` (diffusers / transformers models; pipelines and families cast their
      inputs to it) instead of fp8 when its first parameter is an fp8 weight (Flux's ``x_embedder``), and
    * tells DistributedDataParallel to leave the fp8 tensors alone (``_ddp_params_and_buffers_to_ignore``, read when
      DDP wraps the model, after the adapter is injected)."""
    cls = type(model)
    if getattr(cls, "_crucible_fp8", False):
        return
    attrs: dict = {"_crucible_fp8": True, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                   "_ddp_params_and_buffers_to_ignore": property(_fp8_tensor_names)}
    if isinstance(getattr(cls, "dtype", None), property):
        attrs["dtype"] = property(_first_compute_dtype)
    model.__class__ = type(cls.__name__, (cls,), attrs)


def quantize_linears(module: nn.Module, compute_dtype: torch.dtype | None = None) -> int:
    """Replace every plain ``nn.Linear`` of ``module`` by an :class:`Fp8Linear`, one layer at a time (the original
    weight is freed as soon as its layer is replaced), skipping ``_keep_in_fp32_modules``. Returns the count."""
    keep = keep_fp32_names(module)
    count = 0
    for parent, attr, name, layer in _linears(module):
        if _is_kept_fp32(name, keep):
            continue
        setattr(parent, attr, Fp8Linear.from_linear(layer, compute_dtype))
        count += 1
    if count:
        mark_quantized(module)
    return count


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)``, except that under fp16 the ``_keep_in_fp32_modules`` Linears (T5's ``wo``) become
    :class:`KeepFp32Linear` in fp32, as transformers loads them."""
    if dtype == torch.float16:
        pin_fp32_modules(module)
    return module.to(dtype=dtype)


def pin_fp32_modules(module: nn.Module) -> int:
    """Make ``module``'s ``_keep_in_fp32_modules`` Linears :class:`KeepFp32Linear` with fp32 weights (count)."""
    keep = keep_fp32_names(module)
    count = 0
    if not keep:
        return 0
    for parent, attr, name, layer in _linears(module):
        if _is_kept_fp32(name, keep):
            layer.__class__ = KeepFp32Linear  # same parameters, pinned precision
            layer.float()
            count += 1
    return count


def apply_fp8_base(modules, compute_dtype: torch.dtype) -> int:
    """Quantize the fp8 targets among ``modules`` (:func:`is_fp8_target`) that are not quantized yet. Returns the
    number of layers quantized now."""
    return sum(quantize_linears(m, compute_dtype) for m in modules if m is not None and is_fp8_target(m))


def fp8_bytes(module: nn.Module) -> tuple[int, int]:
    """``(bytes in fp8 tensors, bytes in all other parameters and buffers)`` of ``module``."""
    fp8 = other = 0
    for t in [*module.parameters(), *module.buffers()]:
        n = t.numel() * t.element_size()
        if t.dtype in FP8_DTYPES:
            fp8 += n
        else:
            other += n
    return fp8, other


# --- loading -------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def fp8_loading(enabled: bool = True):
    """While active, :func:`assign_weights` stores the fp8 targets' Linear weights as fp8 and readers keep fp8
    tensors of the file as they are."""
    token = _LOADING.set(bool(enabled))
    try:
        yield
    finally:
        _LOADING.reset(token)


def loading_fp8() -> bool:
    return _LOADING.get()


def assign_weights(module: nn.Module, weights: dict[str, torch.Tensor], keys, dtype: torch.dtype) -> nn.Module:
    """Assign ``weights`` (one per key of ``keys``, all present and the right shapes) into ``module``, built on the
    meta device, one tensor at a time: each is cast to ``dtype`` (fp32 for ``_keep_in_fp32_modules`` under fp16) —
    or, while :func:`fp8_loading` is active and ``module`` is an fp8 target, its Linear weights quantized — and
    dropped from ``weights`` as it goes, so no second copy of the model is ever alive."""
    keep = keep_fp32_names(module) if dtype == torch.float16 else ()
    fp8 = loading_fp8() and is_fp8_target(module)
    skip_fp8 = keep_fp32_names(module)
    linears = {name: (parent, attr, layer) for parent, attr, name, layer in _linears(module)}
    made = _Made(weights)
    for key in list(keys):
        tensor = made(weights.pop(key))
        owner, _, leaf = key.rpartition(".")
        if fp8 and leaf == "weight" and owner in linears and not _is_kept_fp32(owner, skip_fp8):
            parent, attr, layer = linears[owner]
            setattr(parent, attr, Fp8Linear.from_linear(getattr(parent, attr), dtype, weight=tensor))
            continue
        target = torch.float32 if keep and _is_kept_fp32(owner, keep) else dtype
        if tensor.is_floating_point() and tensor.dtype != target:  # integer buffers keep their dtype
            tensor = tensor.to(target)
        _assign(module, key, tensor)
    if keep:
        pin_fp32_modules(module)
    if fp8:
        mark_quantized(module)
    return module


class _Made:
    """Values of lazily read tensors (:mod:`trainer.lazy_tensors`), made once even when one tensor is under two
    keys (T5's tied embedding) and kept only until the last of its keys is assigned."""

    def __init__(self, weights: dict):
        from .lazy_tensors import LazyTensor

        self.uses: dict[int, int] = {}
        for value in weights.values():
            if isinstance(value, LazyTensor):
                self.uses[id(value)] = self.uses.get(id(value), 0) + 1
        self.kept: dict[int, torch.Tensor] = {}
        self.made_bytes = 0

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        from .lazy_tensors import TRIM_EVERY, materialize, release_freed_memory

        ident = id(value)
        if ident not in self.uses:
            return value
        if ident in self.kept:
            made = self.kept.pop(ident)
        else:
            made = materialize(value)
            self.made_bytes += made.numel() * made.element_size()
            if self.made_bytes >= TRIM_EVERY:  # the previous tensors' read copies are freed by now
                self.made_bytes = 0
                release_freed_memory()
        self.uses[ident] -= 1
        if self.uses[ident]:
            self.kept[ident] = made
        return made


def _assign(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:  # pragma: no cover - keys come from module.state_dict()
        raise KeyError(key)


__all__ = ["FP8", "Fp8Linear", "KeepFp32Linear", "quantize", "dequantize", "quantize_linears", "apply_fp8_base",
           "cast_frozen", "pin_fp32_modules", "keep_fp32_names", "is_fp8_target", "fp8_bytes",
           "fp8_loading", "loading_fp8", "assign_weights"]
