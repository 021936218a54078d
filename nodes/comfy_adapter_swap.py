"""Keep the trained adapter out of ComfyUI's view whenever ComfyUI's model management may run.

The MODEL path trains peft layers placed in ``model.model.diffusion_model`` (each replaces a Linear / Conv and holds
it as ``base_layer``). ComfyUI's ``ModelPatcher`` addresses weights by key path (``diffusion_model.x.y.weight``) and
walks ``named_modules()``: when it unloads or partially unloads the MODEL to make room (on an 8-12 GB GPU whenever
the VAE, a CLIP or a preview loads), ``set_attr_param`` on a peft layer fails (``KeyError: attribute 'weight'
already exists``: there ``weight`` is a property), and a (re)load would patch the wrong names (``….base_layer``)
and drop upstream LoRA patches on the trained layers.

The fix chosen here is the smallest one that keeps ComfyUI's view exactly the tree it built: :class:`AdapterSwap`
takes the peft layers out (their original modules back in place, as after the run) around every ComfyUI call the
family makes (CLIP / VAE encodes, the preview's load, ComfyUI's own ``load_models_gpu`` before each training
forward) and puts them back afterwards. The peft layers are kept as objects, so their trained values, the
optimizer's parameters and the exporter's view are untouched; the original module is the same object in both
states, so whatever ComfyUI wrote into it (a reloaded, re-patched weight, a ``LowVramPatch``) is what the next
forward sees. Making ComfyUI's key paths resolve through peft layers would need per-adapter-type ``__setattr__``
and ``named_modules`` overrides; a bypass (forward-hook) adapter would replace the peft network the exporter reads.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class AdapterSwap:
    """Moves the top-level peft tuner layers of ``root`` out of the module tree and back in."""

    def __init__(self, root: torch.nn.Module):
        self.root = root
        self.taken: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []  # (parent, child name, peft layer)

    @property
    def out(self) -> bool:
        return bool(self.taken)

    def take_out(self) -> int:
        """Put each peft layer's base layer back where the layer is (returns how many); idempotent."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(self.root.named_modules()):
            if name and isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = self.root.get_submodule(parent_name) if parent_name else self.root
                if getattr(parent, child) is module:  # not a tuner layer nested in one already taken out
                    setattr(parent, child, module.get_base_layer())
                    self.taken.append((parent, child, module))
        return len(self.taken)

    def put_back(self) -> None:
        for parent, child, layer in reversed(self.taken):
            setattr(parent, child, layer)
        self.taken.clear()

    def forget(self) -> None:
        """The run is over: the adapter stays out of the MODEL."""
        self.taken.clear()

    @contextmanager
    def comfy_owns_model(self):
        """ComfyUI may load, unload or re-patch the MODEL in here: the tree is the one it built. Nested uses put the
        adapter back only where it was taken out."""
        was_in = not self.out
        if was_in:
            self.take_out()
        try:
            yield
        finally:
            if was_in:
                self.put_back()

    @contextmanager
    def adapter_in_forwards(self):
        """Inside :meth:`comfy_owns_model`, ComfyUI's sampler still runs the adapter: each forward of ``root`` puts it
        back for that call (no gradients are kept across sampling steps) and takes it out again after."""
        def before(module, args):
            if self.out:
                self.put_back()
                module._crucible_swapped_in = True

        def after(module, args, output):
            if vars(module).pop("_crucible_swapped_in", False):
                self.take_out()

        handles = (self.root.register_forward_pre_hook(before), self.root.register_forward_hook(after))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
