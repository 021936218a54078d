"""Small helpers the family tests share (tests/test_family_contract.py and tests/test_family_<name>.py)."""
from __future__ import annotations

import torch


def pixels(batch: int = 2, seed: int = 0, size: int = 64) -> torch.Tensor:
    """Seeded random images ``[B, 3, size, size]`` in [-1, 1], as the loop feeds the VAE."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules hold exactly the same tensors under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
