"""The learning-rate schedule every run trains with: linear warm-up, then cosine decay to a tenth of the peak.

One owner for the math: training's LambdaLR and the loss projection (estimates) both read `lr_factor`. The areas under
the schedule are those of Tissue et al. 2024, "Scaling Law with Learning Rate Annealing" (arXiv 2408.11029), which
model the loss as L0 + A * S1**-alpha - C * S2: S1 the forward area (the sum of the learning rates so far), S2 the
annealing area (the sum of a momentum of the learning-rate drops). Both are in units of the peak rate: the sum of
factors, so that under a constant rate the forward area is the step count. Pure math and numpy: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

FLOOR_FRACTION = 0.1
"""The cosine ends at this share of the peak rate, not at zero."""
ANNEALING_MOMENTUM = 0.999
"""The decay factor lambda of the annealing momentum, as public fits of the paper's law set it; over a run of a few
hundred steps it keeps almost every drop."""
REPORTED_LR_TOLERANCE = 1e-3
"""Reported rates that differ from the schedule's by more than this share of the peak are another schedule."""


def effective_warmup_steps(warmup_steps: int, total_steps: int) -> int:
    """A warm-up longer than the run is cut so that the last step still reaches the peak."""
    return min(warmup_steps, max(total_steps - 1, 0))


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The multiplier of the peak rate after `step` optimizer steps (LambdaLR's argument): update `step` + 1 uses it."""
    warmup = effective_warmup_steps(warmup_steps, total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return FLOOR_FRACTION + (1.0 - FLOOR_FRACTION) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The function torch.optim.lr_scheduler.LambdaLR takes for a run of `total_steps`."""

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps, total_steps)

    return factor


@dataclass(frozen=True)
class LrSchedule:
    """The schedule of one run, with the areas under it."""

    warmup_steps: int
    total_steps: int

    @classmethod
    def for_config(cls, config, total_steps: int) -> LrSchedule:
        """From a config.RunConfig and the run's optimizer steps."""
        return cls(warmup_steps=config.warmup_steps, total_steps=total_steps)

    def with_total_steps(self, total_steps: int) -> LrSchedule:
        """The same warm-up, stretched over a run of another length (the cosine scales with the run)."""
        return LrSchedule(warmup_steps=self.warmup_steps, total_steps=total_steps)

    def factors(self, steps) -> np.ndarray:
        """lr_factor at each step, vectorised; steps past the end stay at the floor."""
        steps = np.asarray(steps, dtype=float)
        warmup = effective_warmup_steps(self.warmup_steps, self.total_steps)
        progress = np.clip((steps - warmup) / max(1, self.total_steps - warmup), 0.0, 1.0)
        cosine = FLOOR_FRACTION + (1.0 - FLOOR_FRACTION) * 0.5 * (1.0 + np.cos(np.pi * progress))
        return np.where(steps < warmup, (steps + 1) / (warmup + 1), cosine)

    def forward_area(self, steps) -> np.ndarray:
        """S1 after each of `steps` optimizer steps: the sum of the factors the updates used, factor(0) to
        factor(step - 1), in peak-rate steps."""
        steps = np.asarray(steps, dtype=int)
        if steps.size == 0:
            return np.zeros(0)
        cumulative = np.concatenate([[0.0], np.cumsum(self.factors(np.arange(max(0, int(steps.max())))))])
        return cumulative[np.clip(steps, 0, None)]

    def annealing_area(self, steps, momentum: float = ANNEALING_MOMENTUM) -> np.ndarray:
        """S2 after each of `steps` optimizer steps: m_i = momentum * m_(i-1) + (eta_(i-1) - eta_i) over the updates
        i, S2 = the sum of the m_i, in peak-rate steps.

        Only drops after the peak count: the warm-up's rises are not annealing (and, carried by a momentum of 0.999,
        they would outweigh the whole decay of a run shorter than a few thousand steps).
        """
        steps = np.asarray(steps, dtype=int)
        if steps.size == 0:
            return np.zeros(0)
        last = max(0, int(steps.max()))
        # update i (1-based) used factor(i - 1)
        rates = self.factors(np.arange(last))
        peak_update = effective_warmup_steps(self.warmup_steps, self.total_steps) + 1
        area = np.zeros(last + 1)
        drop_momentum = 0.0
        for update in range(1, last + 1):
            drop = rates[update - 2] - rates[update - 1] if update > peak_update else 0.0
            drop_momentum = momentum * drop_momentum + drop
            area[update] = area[update - 1] + drop_momentum
        return area[np.clip(steps, 0, None)]


def schedule_from_reported_lrs(steps: Sequence[int], lrs: Sequence[float], total_steps: int,
                               tolerance: float = REPORTED_LR_TOLERANCE) -> LrSchedule | None:
    """The schedule whose factors, times one peak rate, are the rates a run reported (protocol.StepMetrics.lr: after
    `step` updates, the rate of the next one); None when no warm-up length fits, e.g. a run on another schedule.

    The step events carry the rates but not the warm-up length; the peak of the reported rates brackets it.
    """
    step_array = np.asarray(steps, dtype=float)
    rate_array = np.asarray(lrs, dtype=float)
    if len(step_array) == 0 or len(step_array) != len(rate_array) or total_steps <= 0 or rate_array.max() <= 0:
        return None
    peak_index = int(np.argmax(rate_array))
    first = 0 if peak_index == 0 else int(step_array[peak_index - 1])
    last = int(step_array[min(peak_index + 1, len(step_array) - 1)])
    for warmup in range(first, last + 1):
        schedule = LrSchedule(warmup_steps=warmup, total_steps=total_steps)
        factors = schedule.factors(step_array)
        peak_lr = float(np.median(rate_array / factors))
        if np.max(np.abs(rate_array - peak_lr * factors)) <= tolerance * peak_lr:
            return schedule
    return None
