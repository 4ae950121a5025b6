"""Learning rate per optimizer step: linear warm-up, then cosine from lr down to lr * final_ratio.

A pure function of the step, so resuming needs only the step count.
"""

from __future__ import annotations

import math


def lr_at(step: int, total: int, lr: float, warmup: int, final_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
