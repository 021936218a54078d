"""Block swap (kohya ``blocks_to_swap``, OneTrainer layer offload): the frozen weights of the denoiser's last N
blocks live in CPU memory (pinned, on CUDA) and each block is copied to the training device just before it runs,
then dropped again — in the forward pass and again in the backward pass, where the block's weights are needed to
carry the gradient through it.

While block *i* runs, the next swapped block in running order (*i+1* forward, *i-1* backward) is already being
copied on a side CUDA stream; an event makes the compute stream wait for that copy only when the block is reached.
So at most two swapped blocks are on the device at a time.

Hooks:
- forward pre-hook: the block's weights in (waiting for its prefetch), the next one's prefetch started; while
  gradients are recorded, the block's tensor inputs pass through an identity function whose backward runs once the
  block's whole backward is done — the block's weights go out again there;
- forward post-hook: the weights go out (their saved uses refer to the parameter, which is brought back in before
  the backward needs them); the outputs pass through an identity function whose backward runs before the block's
  own backward — the weights come in there and the previous block's prefetch starts.
A block recomputed by gradient checkpointing runs its forward inside its backward: it is in then and stays in.

Only frozen weights move: trainable ones (the LoRA adapter) stay on the device, where the optimizer steps them.
On the CPU (tests) the mover's copies are no-ops, but every hook and state change still runs.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import ConfigError


class StreamMover:
    """Copies tensors host → device on a side stream (CUDA), or hands the host tensor back (CPU: no copy)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """The weight's home in CPU memory (pinned on CUDA, so the copies in can run asynchronously)."""
        host = tensor.detach().to("cpu")
        return host.pin_memory() if self.cuda else host

    def start(self, hosts: Sequence[torch.Tensor]) -> Any:
        """Begin copying ``hosts`` to the device; returns what :meth:`finish` needs."""
        if not self.cuda:
            return list(hosts)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            copies = [h.to(self.device, non_blocking=True) for h in hosts]
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def finish(self, started: Any) -> list[torch.Tensor]:
        """The device copies, safe to use on the compute stream."""
        if not self.cuda:
            return started
        copies, event = started
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for copy in copies:
            copy.record_stream(current)  # the allocator must not reuse it while compute kernels still read it
        return copies


class _BlockBoundary(torch.autograd.Function):
    """Identity on tensors; its backward calls ``on_backward(index)``. Around a block's inputs it runs when the block's
    whole backward is done; around its outputs, just before the block's backward starts."""

    @staticmethod
    def forward(ctx, on_backward, index, *tensors):
        ctx.on_backward, ctx.index = on_backward, index
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.on_backward(ctx.index)
        return (None, None, *grads)


def _through(on_backward, index, tree):
    """``tree`` with every tensor that needs a gradient passed through a :class:`_BlockBoundary` calling
    ``on_backward(index)``."""
    leaves, spec = tree_flatten(tree)
    picked = [i for i, leaf in enumerate(leaves) if torch.is_tensor(leaf) and leaf.requires_grad]
    if not picked:
        return tree, False
    passed = _BlockBoundary.apply(on_backward, index, *[leaves[i] for i in picked])
    for i, tensor in zip(picked, passed):
        leaves[i] = tensor
    return tree_unflatten(leaves, spec), True


class BlockSwap:
    """Keeps the frozen weights of ``blocks[-count:]`` off the device between uses (see the module docstring)."""

    def __init__(self, blocks: Sequence[torch.nn.Module], count: int, device, mover: StreamMover | None = None):
        if count > len(blocks):
            raise ConfigError(f"training.blocks_to_swap is {count}, but this denoiser has {len(blocks)} blocks to "
                              f"swap: choose at most {len(blocks)}")
        self.blocks = list(blocks)
        self.mover = mover or StreamMover(device)
        self.first_swapped = len(self.blocks) - count
        self.hosts: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        self.resident: set[int] = set()
        self.pending: dict[int, Any] = {}
        self.in_backward: set[int] = set()
        self.handles = []
        for index, block in enumerate(self.blocks):
            if index >= self.first_swapped:
                self.hosts[index] = [(p, self.mover.host_copy(p.data)) for p in block.parameters()
                                     if not p.requires_grad]
                for p in block.parameters():
                    if p.requires_grad:  # the adapter: trained on the device
                        p.data = p.data.to(self.mover.device)
                self._send_out(index)
            self.handles.append(block.register_forward_pre_hook(self._pre_forward(index), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post_forward(index)))

    # --- moving --------------------------------------------------------------------------------------------------
    def _prefetch(self, index: int) -> None:
        if index in self.hosts and index not in self.resident and index not in self.pending:
            self.pending[index] = self.mover.start([host for _, host in self.hosts[index]])

    def _bring_in(self, index: int) -> None:
        if index not in self.hosts or index in self.resident:
            return
        self._prefetch(index)
        copies = self.mover.finish(self.pending.pop(index))
        for (param, _), copy in zip(self.hosts[index], copies):
            param.data = copy
        self.resident.add(index)

    def _send_out(self, index: int) -> None:
        if index not in self.hosts:
            return
        for param, host in self.hosts[index]:
            param.data = host  # the device copy is freed with its last reference
        self.resident.discard(index)

    def _next_swapped(self, index: int, step: int) -> int | None:
        following = index + step
        return following if following in self.hosts else None

    # --- hooks ---------------------------------------------------------------------------------------------------
    def _pre_forward(self, index: int):
        def hook(_module, args, kwargs):
            if index in self.in_backward:  # recomputed by gradient checkpointing: it is in; nothing to start
                return None
            for earlier in [i for i in self.resident if i < index]:
                self._send_out(earlier)
            self._bring_in(index)
            following = self._next_swapped(index, +1)
            if following is not None:
                self._prefetch(following)
            if not torch.is_grad_enabled() or index not in self.hosts:
                return None
            (args, kwargs), wrapped = _through(self._backward_done, index, (args, kwargs))
            return (args, kwargs) if wrapped else None
        return hook

    def _post_forward(self, index: int):
        def hook(_module, _args, output):
            if index not in self.hosts or index in self.in_backward:
                return None  # a checkpointed block recomputed inside its backward stays in
            if torch.is_grad_enabled():
                output, _ = _through(self._backward_starts, index, output)
            self._send_out(index)
            return output
        return hook

    def _backward_starts(self, index: int) -> None:
        for later in [i for i in self.resident if i > index]:  # their backward is over (a block whose inputs
            self._send_out(later)                              # needed no gradient never says so itself)
            self.in_backward.discard(later)
        self.in_backward.add(index)
        self._bring_in(index)
        previous = self._next_swapped(index, -1)
        if previous is not None:
            self._prefetch(previous)

    def _backward_done(self, index: int) -> None:
        self.in_backward.discard(index)
        self._send_out(index)

    # --- step boundaries -----------------------------------------------------------------------------------------
    def settle(self) -> None:
        """After a step's backward: every swapped block out (a block whose inputs needed no gradient has no
        'backward done' signal), nothing half-fetched."""
        for index in list(self.pending):
            self._bring_in(index)
        for index in list(self.resident):
            self._send_out(index)
        self.in_backward.clear()

    def remove(self) -> None:
        """Detach the hooks (the swapped weights stay in CPU memory)."""
        self.settle()
        for handle in self.handles:
            handle.remove()
        self.handles = []


def attach_block_swap(family, denoiser: torch.nn.Module, count: int, device) -> BlockSwap | None:
    """Block swap for ``count`` > 0 of the family's denoiser blocks, or None."""
    if count <= 0:
        return None
    blocks = family.swappable_blocks(denoiser)
    if not blocks:
        raise ConfigError(f"training.blocks_to_swap: {family.name} does not list its denoiser blocks; set it to 0")
    return BlockSwap(blocks, count, device)


def place_resident(module: torch.nn.Module, device, skip: Sequence[torch.nn.Module]) -> None:
    """Move ``module`` to ``device`` except the blocks in ``skip`` (they stay where they are, in CPU memory)."""
    skipped = {id(m) for block in skip for m in block.modules()}
    for sub in module.modules():
        if id(sub) in skipped:
            continue
        for name, param in sub.named_parameters(recurse=False):
            param.data = param.data.to(device)
        for name, buffer in sub.named_buffers(recurse=False):
            sub._buffers[name] = buffer.to(device)
