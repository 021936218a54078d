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

The CLIP is a ``ModelPatcher`` too (``clip.patcher``, weights of ``clip.cond_stage_model`` by key path
``clip_l.transformer.…``), and ``clip.encode_from_tokens`` loads it itself before it encodes: each trained CLIP tower
is one more root of the same swap. Around every ComfyUI call its adapter is out like the MODEL's; for the training
encode, :meth:`AdapterSwap.adapter_in_forwards` puts it back for the tower's own forward only (after ComfyUI's load,
with gradients), so ComfyUI loads, unloads, partly unloads and re-patches (upstream CLIP LoRAs) the tree it built.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch


class AdapterSwap:
    """Moves the top-level peft tuner layers of each root (the diffusion model, each trained CLIP tower) out of the
    module tree and back in, root by root."""

    def __init__(self, *roots: torch.nn.Module):
        self.roots = list(roots)
        self.encoders: list[torch.nn.Module] = []  # the roots that are trained CLIP towers
        self.taken: dict[int, list[tuple[torch.nn.Module, str, torch.nn.Module]]] = {}  # id(root) → (parent, child, layer)

    def add_encoder(self, root: torch.nn.Module) -> None:
        """A trained text encoder of the CLIP (``clip.cond_stage_model.clip_l`` …): one more root."""
        self.roots.append(root)
        self.encoders.append(root)

    def is_out(self, root: torch.nn.Module) -> bool:
        return bool(self.taken.get(id(root)))

    @property
    def out(self) -> bool:
        return any(self.taken.values())

    def take_out(self, roots: Sequence[torch.nn.Module] | None = None) -> int:
        """Put each peft layer's base layer back where the layer is (returns how many are out); idempotent."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for root in self.roots if roots is None else roots:
            taken = self.taken.setdefault(id(root), [])
            for name, module in list(root.named_modules()):
                if name and isinstance(module, BaseTunerLayer):
                    parent_name, _, child = name.rpartition(".")
                    parent = root.get_submodule(parent_name) if parent_name else root
                    if getattr(parent, child) is module:  # not a tuner layer nested in one already taken out
                        setattr(parent, child, module.get_base_layer())
                        taken.append((parent, child, module))
        return sum(len(t) for t in self.taken.values())

    def put_back(self, roots: Sequence[torch.nn.Module] | None = None) -> None:
        for root in self.roots if roots is None else roots:
            for parent, child, layer in reversed(self.taken.pop(id(root), [])):
                setattr(parent, child, layer)

    def forget(self) -> None:
        """The run is over: the adapter stays out of the MODEL and the CLIP."""
        self.taken.clear()

    @contextmanager
    def comfy_owns_model(self):
        """ComfyUI may load, unload or re-patch the MODEL and the CLIP in here: each tree is the one it built. Nested
        uses put the adapter back only where they took it out."""
        taken_here = [root for root in self.roots if not self.is_out(root)]
        self.take_out(taken_here)
        try:
            yield
        finally:
            self.put_back(taken_here)

    @contextmanager
    def comfy_encodes(self, prepare: Callable[[torch.nn.Module], None] | None = None):
        """Around ``clip.encode_from_tokens``: ComfyUI owns every tree (it loads the CLIP itself, which may unload the
        MODEL), and each trained encoder runs its forward with its adapter (``prepare`` first, see below)."""
        with self.comfy_owns_model(), self.adapter_in_forwards(self.encoders, prepare):
            yield

    @contextmanager
    def adapter_in_forwards(self, roots: Sequence[torch.nn.Module] | None = None,
                            prepare: Callable[[torch.nn.Module], None] | None = None):
        """Inside :meth:`comfy_owns_model`, ComfyUI's sampler / encode still runs the adapter: each forward of a root
        (by default every root) puts its adapter back for that call, ``prepare(root)`` first (what ComfyUI's load
        left there is used as it is now), and takes it out again after."""
        def before(module, args):
            if self.is_out(module):
                if prepare is not None:
                    prepare(module)
                self.put_back([module])
                module._crucible_swapped_in = True

        def after(module, args, output):
            if vars(module).pop("_crucible_swapped_in", False):
                self.take_out([module])

        hooked = self.roots if roots is None else list(roots)
        handles = [hook for root in hooked
                   for hook in (root.register_forward_pre_hook(before), root.register_forward_hook(after))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for root in hooked:  # a forward that raised: out again, as around any ComfyUI call
                if vars(root).pop("_crucible_swapped_in", False):
                    self.take_out([root])

