"""What an optimizer step does when its gradient is not finite.

Under fp16 mixed precision accelerate scales the loss by a large factor (a ``torch.amp.GradScaler``) so small
gradients survive half precision. At the start of training the scale is usually too large: some gradients overflow
to inf, the scaler skips that optimizer step (the weights stay as they were) and halves the scale. That is normal
(kohya, diffusers and accelerate all do it) and not divergence. Only a long run of consecutive overflows means the
run is broken (the scale would have shrunk by 2^N), and only then does training stop.

Without a scaler (bf16, fp32) a non-finite gradient is real divergence: the run stops before the weights change.

:func:`overflow_decision` is the whole rule, a pure function the loop calls once per optimizer step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_CONSECUTIVE_SKIPS = 20  # 2^20 ≈ 10^6: a scale of 65536 would be far below 1 by then


@dataclass(frozen=True)
class StepDecision:
    action: str  # "step" (apply), "skip" (scaler skipped it; weights unchanged), "stop" (raise)
    consecutive_skips: int  # the count to carry into the next step
    message: str = ""


def overflow_decision(grad_norm: float | None, scaler_active: bool, consecutive_skips: int, step: int,
                      limit: int = MAX_CONSECUTIVE_SKIPS) -> StepDecision:
    """The action for optimizer step ``step`` whose gradient norm is ``grad_norm`` (None: not measured)."""
    if grad_norm is None or math.isfinite(grad_norm):
        return StepDecision("step", 0)
    if not scaler_active:
        return StepDecision("stop", consecutive_skips, (
            f"gradient norm became {grad_norm} at step {step}; training stopped. The last good checkpoint is kept. "
            "Lower the learning rate"))
    skips = consecutive_skips + 1
    if skips >= limit:
        return StepDecision("stop", skips, (
            f"fp16 gradients overflowed at {skips} consecutive steps (up to step {step}); the gradient scaler skipped "
            "every one of them, so the run is not learning. Training stopped; the last good checkpoint is kept. "
            "Use mixed_precision 'bf16' (or 'auto' on a GPU that supports it) or 'no', or lower the learning rate"))
    return StepDecision("skip", skips, f"fp16 gradient overflow at step {step}: the gradient scaler skipped this "
                                       f"step and lowered its scale ({skips} in a row; normal early in training)")
