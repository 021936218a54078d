"""Optimizer steps one parameter at a time: the fused backward pass and bf16 weights with stochastic rounding.

**Fused backward pass** (kohya ``fused_backward_pass``): each trained tensor is stepped by the optimizer the moment
its gradient is complete (``Tensor.register_post_accumulate_grad_hook``), and its gradient is freed at once. A full
fine-tune then never holds a whole model's worth of gradients. There is no global gradient norm (the gradients are
never all alive together): clipping is per tensor, as kohya does, and a non-finite gradient stops the run before
that tensor changes.

**bf16 weights** (``training.full_bf16``): each tensor is stepped in float32 (the optimizer's state is float32 too)
and written back to its bf16 storage with stochastic rounding (:mod:`trainer.stochastic_rounding`), so updates far
below bf16's resolution are not lost.

One tensor is stepped by calling the run's own optimizer with every parameter group narrowed to that tensor, so the
learning rate schedule, the groups' settings and the saved/resumed optimizer state are exactly those of the normal
step.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterable

import torch

from .errors import TrainingDivergedError
from .stochastic_rounding import copy_stochastically_

FUSED_OPTIMIZERS = ("adamw", "adafactor")  # stateful per tensor; kohya fuses Adafactor (and AdamW in later versions)


_GROUP_OF: "weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, int]]" = weakref.WeakKeyDictionary()


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    """The index of ``param``'s group (a map built once per optimizer: stepping N tensors stays O(N))."""
    index = _GROUP_OF.get(optimizer)
    if index is None or id(param) not in index:
        index = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        _GROUP_OF[optimizer] = index
    return index[id(param)]


@contextlib.contextmanager
def only_this_parameter(optimizer: torch.optim.Optimizer, param: torch.Tensor):
    """Every group of ``optimizer`` narrowed to ``param`` (its own group) or to nothing, for one ``step()``."""
    own = _group_of(optimizer, param)
    saved = [group["params"] for group in optimizer.param_groups]
    try:
        for i, group in enumerate(optimizer.param_groups):
            group["params"] = [param] if i == own else []
        yield
    finally:
        for group, params in zip(optimizer.param_groups, saved):
            group["params"] = params


def step_parameter(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                   generator: torch.Generator | None = None) -> None:
    """Apply the optimizer to ``param`` alone, then free its gradient. A bf16 ``param`` is stepped in float32 and
    rounded back stochastically."""
    if param.grad is None:
        return
    stored = param.data
    if stored.dtype == torch.bfloat16:
        param.data = stored.float()  # the optimizer sees (and keeps state in) float32
        param.grad = param.grad.float()
    try:
        with only_this_parameter(optimizer, param):
            optimizer.step()
    finally:
        if param.data is not stored:
            copy_stochastically_(stored, param.data, generator)
            param.data = stored
        param.grad = None


def keep_float32_state_on_load(optimizer: torch.optim.Optimizer) -> None:
    """torch's ``load_state_dict`` casts a resumed state to its parameter's dtype, which would round the float32
    state of bf16-stored weights to bf16 and make a resumed run differ: the bf16 parameters are shown to it as
    float32 for the duration of the load (exactly: bf16 → float32 → bf16 is lossless)."""
    stored: dict[torch.Tensor, torch.Tensor] = {}

    def before(opt, _state_dict):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.dtype == torch.bfloat16:
                    stored[p] = p.data
                    p.data = p.data.float()

    def after(_opt):
        for p, data in stored.items():
            p.data = data
        stored.clear()

    optimizer.register_load_state_dict_pre_hook(before)
    optimizer.register_load_state_dict_post_hook(after)


def clip_one_(param: torch.Tensor, max_norm: float, step: int) -> None:
    """Per-tensor clipping for the fused pass; a non-finite gradient stops the run before this tensor changes."""
    norm = torch.linalg.vector_norm(param.grad.detach().float())
    if not torch.isfinite(norm):
        raise TrainingDivergedError(f"gradient norm became {float(norm)} at step {step} (fused backward pass); "
                                    "training stopped. The last good checkpoint is kept. Lower the learning rate")
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        param.grad.detach().mul_(scale.to(param.grad.dtype))


class FusedBackward:
    """Steps each trained tensor from a post-accumulate-grad hook during ``loss.backward()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], max_grad_norm: float,
                 generator_for_step=None):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.step = 0
        self.generator_for_step = generator_for_step or (lambda step, device: None)
        self.generator = None
        self.stepped = 0
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params if p.requires_grad]

    def begin(self, step: int) -> None:
        """Called before the step's backward pass."""
        self.step, self.stepped, self.generator = step, 0, None

    def _hook(self, param: torch.Tensor) -> None:
        clip_one_(param, self.max_grad_norm, self.step)
        if self.generator is None and param.dtype == torch.bfloat16:
            self.generator = self.generator_for_step(self.step, param.device)
        step_parameter(self.optimizer, param, self.generator)
        self.stepped += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
