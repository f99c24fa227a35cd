"""Estimates from the live numbers of a run: the time left from the running step rate, and the final loss from a curve
fitted to the losses so far, with a band and a recommended number of epochs. numpy only, so the UI can call it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ETA_WINDOW_STEPS = 200
"""The rate is measured over at most this many recent steps: recent enough to follow a change, long enough to smooth
the one-off pauses (evaluation, checkpoints) into the rate they really cost."""
MIN_FIT_POINTS = 6
POWER_EXPONENTS = np.geomspace(0.02, 4.0, 240)
EXP_RATES = np.geomspace(1e-4, 1.0, 240)
BAND_DELTA_CHI2 = 4.0
"""Curves whose squared error is within this many noise variances of the best fit stay in the band (about 2 sigma)."""
FINE_GRID_POINTS = 81
BAND_SIGMAS = 2.0
FLAT_IMPROVEMENT = 0.01
"""An epoch that lowers the projected loss by less than 1 % is not worth its time."""
MAX_RECOMMENDED_EPOCHS = 20
SMOOTHED_TAIL_FRACTION = 0.1


def epoch_seconds(tokens_per_epoch: int, tokens_per_s: float) -> float:
    """Time of one epoch at a measured rate: a tier's row in the table, from a probe of real steps."""
    return tokens_per_epoch / tokens_per_s if tokens_per_s > 0 else math.inf


@dataclass(frozen=True)
class Eta:
    remaining_s: float
    seconds_per_step: float
    steps_left: int
    measured_steps: int
    """How many step intervals the rate comes from."""


def estimate_eta(steps: Sequence[int], elapsed_s: Sequence[float], total_steps: int,
                 window_steps: int = ETA_WINDOW_STEPS) -> Eta | None:
    """Time left until `total_steps`, from the wall time between the recent step events.

    The first step event is only a starting mark: its elapsed time holds model loading, the dataset build and the
    first step's one-time allocations, none of which recur. None until two step events exist.
    """
    if len(steps) < 2 or len(steps) != len(elapsed_s):
        return None
    last = len(steps) - 1
    first = max(0, last - window_steps)
    step_span = steps[last] - steps[first]
    if step_span <= 0:
        return None
    seconds_per_step = (elapsed_s[last] - elapsed_s[first]) / step_span
    steps_left = max(0, total_steps - steps[last])
    return Eta(remaining_s=steps_left * seconds_per_step, seconds_per_step=seconds_per_step, steps_left=steps_left,
               measured_steps=step_span)


@dataclass(frozen=True)
class LossFit:
    """A fitted curve loss(step) = offset + scale * shape(step); shape is step**-exponent or exp(-exponent * step)."""

    kind: str
    """"power" or "exponential"."""
    offset: float
    scale: float
    exponent: float
    fitted_points: int
    residual_std: float

    def loss_at(self, steps) -> np.ndarray:
        return self.offset + self.scale * _shape(self.kind, self.exponent, np.asarray(steps, dtype=float))


@dataclass(frozen=True)
class LossProjection:
    fit: LossFit
    total_steps: int
    final_loss: float
    """The fitted curve's value at total_steps."""
    final_loss_low: float
    final_loss_high: float
    curve_steps: tuple[int, ...]
    """Steps from the last measured one to total_steps, for drawing the projection and its band."""
    curve_loss: tuple[float, ...]
    curve_low: tuple[float, ...]
    curve_high: tuple[float, ...]
    recommended_epochs: int | None
    """Where one more epoch lowers the projected loss by less than 1 %; None without steps_per_epoch."""


def _shape(kind: str, exponent: float, steps: np.ndarray) -> np.ndarray:
    if kind == "power":
        return np.power(steps, -exponent)
    return np.exp(-exponent * steps)


def _exponent_grids(steps: np.ndarray) -> tuple[tuple[str, np.ndarray], ...]:
    # Decay rates scale with the run's length: a rate per step that suits 100 steps is too fast for 10,000.
    return (("power", POWER_EXPONENTS), ("exponential", EXP_RATES / max(1.0, steps.max() / 100.0)))


def _candidates(steps: np.ndarray, losses: np.ndarray, grids=None):
    """Every grid curve with its least-squares offset and scale: (kind, exponent, offset, scale, squared error,
    the unscaled covariance of offset and scale).

    Only falling curves with a non-negative floor are kept; a cross-entropy cannot fall below zero.
    """
    design_ones = np.ones_like(steps)
    for kind, grid in grids or _exponent_grids(steps):
        for exponent in grid:
            basis = _shape(kind, float(exponent), steps)
            if np.ptp(basis) < 1e-12:
                continue
            design = np.stack([design_ones, basis], axis=1)
            (offset, scale), *_ = np.linalg.lstsq(design, losses, rcond=None)
            if scale <= 0 or offset < 0:
                continue
            error = float(np.sum((design @ np.array([offset, scale]) - losses) ** 2))
            yield kind, float(exponent), float(offset), float(scale), error, np.linalg.pinv(design.T @ design)


def fit_loss_curve(steps: Sequence[int], losses: Sequence[float], lrs: Sequence[float] | None = None) -> tuple[LossFit, list] | None:
    """The best curve by least squares over a grid of exponents, and every candidate (for the band).

    With learning rates given, the warm-up steps (before the peak rate) are left out: the loss there follows the
    ramp, not the decay the curve models.
    """
    steps_array = np.asarray(steps, dtype=float)
    loss_array = np.asarray(losses, dtype=float)
    keep = np.isfinite(loss_array) & (steps_array > 0)
    if lrs is not None and len(lrs) == len(steps):
        lr_array = np.asarray(lrs, dtype=float)
        peak = int(np.argmax(lr_array))
        keep &= np.arange(len(steps_array)) >= peak
    steps_array, loss_array = steps_array[keep], loss_array[keep]
    if len(steps_array) < MIN_FIT_POINTS:
        return None
    candidates = list(_candidates(steps_array, loss_array))
    if not candidates:
        return None
    # A finer grid between the best coarse exponent's neighbours: extrapolation is sensitive to the exponent.
    kind, exponent = min(candidates, key=lambda c: c[4])[:2]
    grid = dict(_exponent_grids(steps_array))[kind]
    position = int(np.argmin(np.abs(grid - exponent)))
    fine = np.linspace(grid[max(0, position - 1)], grid[min(len(grid) - 1, position + 1)], FINE_GRID_POINTS)
    candidates += list(_candidates(steps_array, loss_array, ((kind, fine),)))
    kind, exponent, offset, scale, error, _ = min(candidates, key=lambda c: c[4])
    residual_std = math.sqrt(error / max(1, len(steps_array) - 3))
    fit = LossFit(kind=kind, offset=offset, scale=scale, exponent=exponent, fitted_points=len(steps_array),
                  residual_std=residual_std)
    return fit, candidates


def project_loss(steps: Sequence[int], losses: Sequence[float], total_steps: int, lrs: Sequence[float] | None = None,
                 steps_per_epoch: int | None = None, curve_points: int = 40) -> LossProjection | None:
    """The projected loss at total_steps with a band of the curves that fit the data about as well as the best.

    None until enough steps (after warm-up) exist for a fit.
    """
    fitted = fit_loss_curve(steps, losses, lrs)
    if fitted is None:
        return None
    fit, candidates = fitted
    best_error = min(c[4] for c in candidates)
    noise_variance = best_error / max(1, fit.fitted_points - 3)
    accepted = [c for c in candidates if c[4] <= best_error + BAND_DELTA_CHI2 * noise_variance]
    last_step = int(max(steps))
    end = max(total_steps, last_step)
    curve_steps = np.unique(np.linspace(last_step, end, curve_points).round().astype(int))
    lows, highs = [], []
    for kind, exponent, offset, scale, _, covariance in accepted:
        basis = _shape(kind, exponent, curve_steps.astype(float))
        curve = offset + scale * basis
        # Two standard errors of the fitted mean at each step, from the offset and scale uncertainty of this curve
        rows = np.stack([np.ones_like(basis), basis], axis=1)
        spread = BAND_SIGMAS * np.sqrt(noise_variance * np.einsum("ij,jk,ik->i", rows, covariance, rows))
        lows.append(curve - spread)
        highs.append(curve + spread)
    best_curve = fit.loss_at(curve_steps)
    low = np.maximum(np.minimum(np.min(lows, axis=0), best_curve), 0.0)
    high = np.maximum(np.max(highs, axis=0), best_curve)
    return LossProjection(
        fit=fit, total_steps=end, final_loss=float(best_curve[-1]),
        final_loss_low=float(low[-1]), final_loss_high=float(high[-1]),
        curve_steps=tuple(int(s) for s in curve_steps), curve_loss=tuple(float(v) for v in best_curve),
        curve_low=tuple(float(v) for v in low), curve_high=tuple(float(v) for v in high),
        recommended_epochs=recommend_epochs(fit, steps_per_epoch) if steps_per_epoch else None,
    )


def recommend_epochs(fit: LossFit, steps_per_epoch: int, flat_improvement: float = FLAT_IMPROVEMENT,
                     max_epochs: int = MAX_RECOMMENDED_EPOCHS) -> int:
    """The first epoch count after which one more epoch lowers the projected loss by less than `flat_improvement`."""
    for epochs in range(1, max_epochs):
        now = float(fit.loss_at([epochs * steps_per_epoch])[0])
        following = float(fit.loss_at([(epochs + 1) * steps_per_epoch])[0])
        if now <= 0 or (now - following) / now < flat_improvement:
            return epochs
    return max_epochs


def smoothed_final_loss(losses: Sequence[float], tail_fraction: float = SMOOTHED_TAIL_FRACTION) -> float:
    """The mean loss over the last tenth of a run: what a projection of the curve (not of one noisy step) is judged by."""
    values = np.asarray(losses, dtype=float)
    tail = max(1, int(round(len(values) * tail_fraction)))
    return float(values[-tail:].mean())
