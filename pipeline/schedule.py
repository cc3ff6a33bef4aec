"""The learning-rate schedule of pretraining, SFT and the RM: linear warmup, then cosine decay to a floor.

Warmup counts from step + 1, so the first optimizer step already learns. transformers' schedules start at 0:
SFT's first step, and the whole of a one-step run, changed no weight.
"""

from __future__ import annotations

import math
from functools import partial

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + 0.5 * (1 + math.cos(math.pi * progress)) * (1 - min_ratio)


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                            min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """warmup_cosine as a torch scheduler (its state dict is that of transformers' LambdaLR schedules)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, warmup_steps=warmup_steps,
                                                                total_steps=total_steps, min_ratio=min_ratio))
