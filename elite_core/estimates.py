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
MIN_COMPONENT_WEIGHT = 1e-6
"""Curves less likely than this, relative to the best, are left out of the average: they would change it by less."""


def epoch_seconds(tokens_per_epoch: int, tokens_per_s: float) -> float:
    """Time of one epoch at a measured rate: a tier's row in the table, from a probe of real steps."""
    return tokens_per_epoch / tokens_per_s if tokens_per_s > 0 else math.inf


BYTES_PER_TOKEN_GUESS = 3.5
"""Source code through a BPE tokenizer of a code model; the first guess before the dataset is built."""


@dataclass(frozen=True)
class EpochTokens:
    """The training stream one epoch reads: counted from the built dataset, or estimated from the repository's size."""

    train_tokens: int
    estimated: bool
    source_bytes: int = 0
    """Text bytes the estimate came from (0 when counted)."""
    bytes_per_token: float = 0.0
    """The ratio the estimate assumed (0 when counted)."""

    def tokens_per_epoch(self, window_tokens: int) -> int:
        """Tokens the model processes in one epoch at this window: every window in full, the last one padded."""
        if self.train_tokens <= 0 or window_tokens <= 0:
            return 0
        return math.ceil(self.train_tokens / window_tokens) * window_tokens


def epoch_tokens_from_summary(summary) -> EpochTokens:
    """Counted: the built dataset's train stream (a dataset.DatasetSummary)."""
    return EpochTokens(train_tokens=int(summary.train_tokens), estimated=False)


def bytes_per_token_guess(model: str) -> float:
    """The demo's byte-level tokenizer makes one token of every byte; a code model's BPE about 3.5 bytes."""
    from elite_core.config import DEMO_MODEL

    return 1.0 if model == DEMO_MODEL else BYTES_PER_TOKEN_GUESS


def epoch_tokens_from_repo(repo, model: str, eval_fraction: float = 0.0) -> EpochTokens:
    """Estimated before the dataset exists, from a walk of names and sizes only (no file is read).

    Files without a known language (images, archives, licences) are left out: the build drops most of them.
    """
    from elite_core.repo_scan import language_of, scan_repository

    bytes_per_token = bytes_per_token_guess(model)

    scan = scan_repository(repo)
    texts = [c for c in scan.candidates if language_of(c.relative_path) != "Other"]
    source_bytes = sum(c.size_bytes for c in texts)
    # One end-of-text token separates files in the stream.
    tokens = (source_bytes / bytes_per_token + len(texts)) * (1.0 - eval_fraction)
    return EpochTokens(train_tokens=int(round(tokens)), estimated=True, source_bytes=source_bytes,
                       bytes_per_token=bytes_per_token)


@dataclass(frozen=True)
class RateCalibration:
    """One measured training rate beside what the planner estimated for the same configuration."""

    tier: int
    measured_tokens_per_s: float
    estimated_tokens_per_s: float

    @property
    def ratio(self) -> float:
        """Measured over estimated; scales the estimates of the tiers that were not probed."""
        if self.measured_tokens_per_s <= 0 or self.estimated_tokens_per_s <= 0:
            return 1.0
        return self.measured_tokens_per_s / self.estimated_tokens_per_s


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
class CurveComponent:
    weight: float
    kind: str
    offset: float
    scale: float
    exponent: float


@dataclass(frozen=True)
class LossFit:
    """The loss curve fitted to the steps so far: the likelihood-weighted average of the curves
    loss(step) = offset + scale * shape(step), shape step**-exponent or exp(-exponent * step), over a grid of exponents.

    kind, offset, scale and exponent describe the most likely curve; `loss_at` is the average, which is what the
    projection uses. Early in a run many curves fit the noisy losses about equally well, and the one that fits best
    by a hair is often far off: on 16 recorded demo runs, from their first 20 % of steps, the best curve alone missed
    the final loss by 22 % on average (up to 77 %), the average by 9 % (bench/results/projection-cpu.txt).
    """

    kind: str
    """"power" or "exponential"."""
    offset: float
    scale: float
    exponent: float
    fitted_points: int
    residual_std: float
    components: tuple[CurveComponent, ...] = ()
    """The curves averaged, weights summing to 1; empty means the single curve above."""

    def loss_at(self, steps) -> np.ndarray:
        steps = np.asarray(steps, dtype=float)
        if not self.components:
            return self.offset + self.scale * _shape(self.kind, self.exponent, steps)
        return sum(c.weight * (c.offset + c.scale * _shape(c.kind, c.exponent, steps)) for c in self.components)


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
    """The fit (least squares over a grid of exponents, curves averaged by likelihood) and every candidate curve
    (for the band).

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
    coarse = list(_candidates(steps_array, loss_array))
    if not coarse:
        return None
    candidates = list(coarse)
    # A finer grid between the best coarse exponent's neighbours: extrapolation is sensitive to the exponent.
    kind, exponent = min(candidates, key=lambda c: c[4])[:2]
    grid = dict(_exponent_grids(steps_array))[kind]
    position = int(np.argmin(np.abs(grid - exponent)))
    fine = np.linspace(grid[max(0, position - 1)], grid[min(len(grid) - 1, position + 1)], FINE_GRID_POINTS)
    candidates += list(_candidates(steps_array, loss_array, ((kind, fine),)))
    best = min(candidates, key=lambda c: c[4])
    kind, exponent, offset, scale, error, _ = best
    noise_variance = error / max(1, len(steps_array) - 3)
    averaged = coarse if any(c is best for c in coarse) else coarse + [best]
    fit = LossFit(kind=kind, offset=offset, scale=scale, exponent=exponent, fitted_points=len(steps_array),
                  residual_std=math.sqrt(noise_variance),
                  components=_averaged_components(averaged, error, noise_variance))
    return fit, candidates


def _averaged_components(candidates: list, best_error: float, noise_variance: float) -> tuple[CurveComponent, ...]:
    """Each curve weighted by its likelihood under Gaussian noise of the best fit's variance.

    Over the coarse grid only, whose exponents are evenly spaced in log: a log-uniform prior on the exponent (the fine
    grid would crowd weight around the best). Curves below MIN_COMPONENT_WEIGHT of the best are dropped.
    """
    errors = np.array([c[4] for c in candidates])
    # Noise-free data (exact curves) have a zero best error: then only the best curve counts.
    scaled = (errors - best_error) / (2.0 * max(noise_variance, 1e-300))
    weights = np.exp(-scaled)
    keep = weights >= MIN_COMPONENT_WEIGHT
    total = float(weights[keep].sum())
    return tuple(CurveComponent(weight=float(w) / total, kind=c[0], offset=c[2], scale=c[3], exponent=c[1])
                 for c, w, kept in zip(candidates, weights, keep) if kept)


def project_loss(steps: Sequence[int], losses: Sequence[float], total_steps: int, lrs: Sequence[float] | None = None,
                 steps_per_epoch: int | None = None, curve_points: int = 40) -> LossProjection | None:
    """The projected loss at total_steps (the averaged fit) with a band of the curves that fit the data about as well
    as the best.

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
    projected = fit.loss_at(curve_steps)
    low = np.maximum(np.minimum(np.min(lows, axis=0), projected), 0.0)
    high = np.maximum(np.max(highs, axis=0), projected)
    return LossProjection(
        fit=fit, total_steps=end, final_loss=float(projected[-1]),
        final_loss_low=float(low[-1]), final_loss_high=float(high[-1]),
        curve_steps=tuple(int(s) for s in curve_steps), curve_loss=tuple(float(v) for v in projected),
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
