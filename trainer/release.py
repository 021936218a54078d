"""Hand a run's memory back the moment it ends: after a normal finish, an error or a Cancel.

A long-lived host (ComfyUI) keeps running after ``train()`` returns, and the next nodes of the same queue item
(the checkpoint sweep, KSampler) need the memory. Three things would otherwise keep the models alive until Python's
cycle collector happens to run:

- accelerate's mixed-precision wrapper stores ``forward`` (and ``_original_forward``) on the module instance as a
  method bound to the module itself: a reference cycle;
- the trainer is in cycles of its own (the text cache's encode closure and the flow-shift function refer back to it);
- an exception's traceback keeps every frame's locals (the components, batches, activations) alive for as long as
  the caller keeps the exception.

:func:`release_run` breaks the first two and drops every reference the trainer holds; :func:`forget_frames` clears
the locals of the finished frames of an exception. Both then leave the collection to :func:`collect`.
"""
from __future__ import annotations

import gc
import traceback
from typing import Any

WRAPPED_FORWARD = ("forward", "_original_forward")  # what accelerate's prepare() puts on the instance


def unwrap_forward(module: Any) -> None:
    """Remove instance-level forward wrappers (the class's own ``forward`` is what remains)."""
    for candidate in (module, getattr(module, "module", None)):  # DDP keeps the model in .module
        state = getattr(candidate, "__dict__", None)
        if state is not None:
            for name in WRAPPED_FORWARD:
                state.pop(name, None)


def release_run(trainer: Any) -> None:
    """Drop everything ``trainer`` loaded (models, optimizer, caches, accelerator state) and collect it."""
    state = vars(trainer)
    prefetch = state.get("prefetch")
    if prefetch is not None:
        prefetch.close()
    block_swap = state.get("block_swap")
    if block_swap is not None:
        block_swap.remove()  # its hooks refer to the trainer's mover; the caller may keep the model
    for comps in (state.get("comps"), state.get("train_comps")):
        if comps is not None:
            for module in (comps.denoiser, comps.vae, *comps.text_encoders):
                unwrap_forward(module)
    net = state.get("net")
    if net is not None:
        for module in net.modules.values():
            unwrap_forward(module)
    acc = state.get("acc")
    keep = {"cfg", "run_name", "run_dir", "work_dir", "state_dir"}  # plain values only
    for name in [n for n in state if n not in keep]:
        del state[name]
    if acc is not None:
        acc.free_memory()  # accelerate's own lists of prepared models and optimizers
    collect()


def forget_frames(exc: BaseException | None) -> None:
    """Clear the locals of the finished frames of ``exc``'s traceback (and of the exceptions it chains), so keeping
    the exception does not keep the models. The traceback still prints (file, line and code stay)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)  # frames still running are skipped
        exc = exc.__cause__ or exc.__context__


def collect() -> None:
    """Run the cycle collector and give cached accelerator memory back to the driver."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
