"""Noise shaping used by kohya users: offset noise and multi-resolution (pyramid) noise.

Both take an explicit generator so they are reproducible per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Add a per-sample, per-channel constant (Cross Labs' "offset noise"; kohya ``noise_offset``)."""
    if strength <= 0:
        return noise
    b, c = noise.shape[:2]
    shift = torch.randn(b, c, *([1] * (noise.ndim - 2)), generator=generator).to(noise)
    return noise + strength * shift


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """kohya ``multires_noise_iterations`` / ``multires_noise_discount``: add upsampled low-resolution noise.

    Each level halves (roughly) the resolution and is weighted ``discount ** level``; the sum is renormalised to unit
    standard deviation so the schedule's signal-to-noise ratios stay meaningful.
    """
    if iterations <= 0:
        return noise
    b, c, h, w = noise.shape
    out = noise.clone()
    for level in range(1, iterations + 1):
        r = 2 ** level
        lh, lw = max(1, h // r), max(1, w // r)
        low = torch.randn(b, c, lh, lw, generator=generator).to(noise)
        out = out + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount ** level
        if lh == 1 and lw == 1:
            break
    return out / out.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
