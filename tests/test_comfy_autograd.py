"""nodes/comfy_autograd.py: ComfyUI's inference-style model code made differentiable for the MODEL path."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint


def _load():  # a leaf module (torch only): loaded from its file, without the pack's package around it
    path = Path(__file__).resolve().parents[1] / "nodes" / "comfy_autograd.py"
    spec = importlib.util.spec_from_file_location("crucible_comfy_autograd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_module = _load()
differentiable_rope, out_of_place_updates = _module.differentiable_rope, _module.out_of_place_updates


def _block(x, l1, l2):
    """Written like ComfyUI's Flux blocks: the residual stream is normed (saved), then updated in place."""
    n = torch.nn.functional.layer_norm(x, (x.shape[-1],))
    x += l1(n) * n
    m = torch.nn.functional.layer_norm(x, (x.shape[-1],))
    x += l2(m) * m
    x *= 0.5
    return x


def _reference(x, l1, l2):
    n = torch.nn.functional.layer_norm(x, (x.shape[-1],))
    x = x + l1(n) * n
    m = torch.nn.functional.layer_norm(x, (x.shape[-1],))
    x = x + l2(m) * m
    return x * 0.5


def _grads(run, seed=0):
    torch.manual_seed(seed)
    l1, l2 = torch.nn.Linear(8, 8).double(), torch.nn.Linear(8, 8).double()
    start = torch.randn(3, 8, dtype=torch.double, requires_grad=True)
    out = run(start * 1.0, l1, l2)  # a non-leaf stream, as inside a network
    out = run(out, l1, l2)  # two blocks: the second one's input gradient reaches the first one's weights
    out.pow(2).sum().backward()
    return [start.grad] + [p.grad for p in (*l1.parameters(), *l2.parameters())]


def test_in_place_residual_updates_fail_without_the_context():
    with pytest.raises(RuntimeError, match="inplace"):
        _grads(_block)


def test_in_place_residual_updates_give_the_out_of_place_gradients():
    reference = _grads(_reference)
    with out_of_place_updates():
        got = _grads(_block)
    for want, have in zip(reference, got):
        torch.testing.assert_close(have, want)


def test_checkpointed_blocks_recompute_out_of_place_and_match():
    """Recomputation runs in the backward pass, outside the forward's context, so the checkpointed function enters
    it again: the recomputed block computes exactly what the forward computed."""
    reference = _grads(_reference)

    def recomputed(x, l1, l2):
        def call(*args):
            with out_of_place_updates():
                return _block(*args)
        return checkpoint(call, x, l1, l2, use_reentrant=False)

    with out_of_place_updates():
        got = _grads(recomputed)
    for want, have in zip(reference, got):
        torch.testing.assert_close(have, want)


def test_untracked_tensors_explicit_add_and_other_code_keep_in_place_updates():
    before = torch.Tensor.__dict__.get("__iadd__")
    plain = torch.zeros(3)
    alias = plain
    tracked = torch.zeros(3, requires_grad=True) * 1.0
    with out_of_place_updates():
        plain += 1  # not in the autograd graph: ComfyUI's in-place update, as always
        with torch.no_grad():
            shared = tracked.detach()
            shared += 1  # no_grad: in place, through the shared storage (tracked is now 1)
        tracked_alias = tracked
        tracked += 1  # rebound to a new tensor
        tracked_alias.data.add_(0)  # explicit add_ is untouched (and still works)
    assert alias is plain and plain.tolist() == [1.0, 1.0, 1.0]
    assert tracked is not tracked_alias and tracked.tolist() == [2.0] * 3 and tracked_alias.tolist() == [1.0] * 3
    assert torch.Tensor.__dict__.get("__iadd__") is before  # the patch is gone after the block
    y = torch.zeros(2, requires_grad=True) * 1.0
    y_alias = y
    y += 1
    assert y is y_alias  # outside the context: in place again


# --- RoPE without a backward, as comfy-kitchen 0.2.40 ships it ----------------------------------------------------
def _rotate(x, freqs):  # comfy-kitchen's eager apply_rope1: pairs (2k, 2k+1) times the 2×2 matrix freqs[..., k, :, :]
    pairs = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    if freqs.shape[2] > x.shape[2]:
        freqs = freqs[:, :, : x.shape[2]]
    out = freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]
    return out.reshape(*x.shape).type_as(x)


@pytest.fixture(scope="module")
def rope_namespace():
    name = "crucible_test_rope"

    @torch.library.custom_op(f"{name}::apply_rope1", mutates_args=())
    def apply_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        return _rotate(x, freqs_cis)

    @torch.library.custom_op(f"{name}::apply_rope", mutates_args=())
    def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _rotate(xq, freqs_cis), _rotate(xk, freqs_cis)

    return name


def _freqs(tokens, pairs):
    angle = torch.rand(1, 1, tokens, pairs, dtype=torch.double) * 6.28
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(1, 1, tokens, pairs, 2, 2)


def test_rope_ops_without_a_backward_get_the_transposed_rotation(rope_namespace):
    ops = getattr(torch.ops, rope_namespace)
    x = torch.randn(1, 2, 5, 8, dtype=torch.double, requires_grad=True)
    k = torch.randn(1, 2, 5, 8, dtype=torch.double, requires_grad=True)
    freqs = _freqs(7, 4)  # longer than the sequence: the kernel trims it, and so must the backward
    with pytest.raises(RuntimeError):
        ops.apply_rope1(x, freqs).sum().backward()
    assert sorted(differentiable_rope(rope_namespace)) == [f"{rope_namespace}::apply_rope",
                                                           f"{rope_namespace}::apply_rope1"]
    assert differentiable_rope(rope_namespace) == []  # once per process
    weight = torch.randn(1, 2, 5, 8, dtype=torch.double)
    q_out, k_out = ops.apply_rope(x, k, freqs)
    (q_out * weight + k_out * weight * 2).sum().backward()
    xr, kr = x.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    (_rotate(xr, freqs) * weight + _rotate(kr, freqs) * weight * 2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(k.grad, kr.grad)
    assert torch.autograd.gradcheck(lambda t: ops.apply_rope1(t, freqs), (x.detach().clone().requires_grad_(True),))


def test_a_namespace_that_is_not_loaded_is_left_alone():
    assert differentiable_rope("crucible_no_such_namespace") == []
