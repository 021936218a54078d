"""Stochastic rounding from float32 to bfloat16, for weights that are stored in bf16 (``training.full_bf16``).

bf16 keeps float32's exponent and the top 7 mantissa bits, so near 1.0 its spacing is 2⁻⁷ ≈ 0.0078. An optimizer
update smaller than half of that vanishes under round-to-nearest: a full fine-tune in bf16 with a learning rate of
1e-5 would not train at all. Rounding up with probability equal to the remainder's share of the spacing makes the
stored value right *in expectation*: E[round(x)] = x, so many tiny updates add up as they would in float32.

The float32 bit pattern is the bf16 one plus 16 low bits; adding a uniform random 16-bit integer to those low bits
and truncating rounds up exactly with that probability (Revisiting BFloat16 Training, Zamirai et al. 2020).
"""
from __future__ import annotations

import torch

LOW_BITS = 16
KEEP_MASK = -(1 << LOW_BITS)  # 0xFFFF0000 as a signed int32: clears the bits bf16 does not keep


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (float32) rounded to bfloat16 up or down at random, unbiased: ``E[result] == x``. Non-finite values
    and values already representable in bf16 are returned unchanged."""
    if x.dtype != torch.float32:
        x = x.float()
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << LOW_BITS, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = ((bits + noise) & KEEP_MASK).view(torch.float32)
    rounded = torch.where(torch.isfinite(x), rounded, x)  # inf/nan keep their bits (nan's payload may sit low)
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero


def copy_stochastically_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write the float32 ``value`` into the bf16 ``target`` with stochastic rounding (plain copy for other dtypes)."""
    if target.dtype == torch.bfloat16:
        target.copy_(stochastic_round_to_bf16(value, generator))
    else:
        target.copy_(value)
