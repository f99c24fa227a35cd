"""Estimates from the live numbers of a run: the time left from the running step rate, and the final loss from curves
fitted to the losses so far, with a band and a recommended number of epochs. numpy only, so the UI can call it.

The projected final loss is the steady fall (`fit_steady_fall`): loss = scale * steps**-exponent, a straight line in
log-log, fitted to the steps after the warm-up. That is how the recorded fine-tunes of a pretrained model fell: on 15
fine-tunes of the pretrained demo model on an H200 at a user run's batch (about 32K tokens per update, six repositories
it never saw), projected from the first fifth, it missed by +2.3 % on average (mean |error| 12.0 %), where the
flattening fit missed by +17.6 % (17.6 %), too high on every run (bench/results/projection-gpu-finetunes.txt). The band
holds both readings of the first fifth: the steady fall's own two-sigma band, and every flattening curve that fits
about as well (`fit_loss_curve`: a power law with a floor, in the learning-rate area), which training from random
weights follows. It held the actual on 19 of 23 fine-tunes (the flattening band alone: 3) and on 22 of 24 runs from
random weights, where the steady fall itself projects 21 % low."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

from elite_core.schedule import LrSchedule, schedule_from_reported_lrs

ETA_WINDOW_S = 600.0
"""The rate is measured over the steps of the last ten minutes of wall time: recent enough to follow a change, long
enough to smooth the one-off pauses (evaluation, checkpoints) into the rate they really cost. A window counted in steps
was either seconds long on fast steps (200 of the demo's 30-ms steps span 6 s, and 5-s spans of one CPU demo run
measured 30.7 to 37.5 steps/s) or hours long on slow ones."""
ETA_MIN_WINDOW_STEPS = 20
"""...but never fewer step intervals than this when the history has them: one slow step is not a rate."""
MIN_FIT_POINTS = 6
FIT_MAX_POINTS = 500
"""Longer histories are thinned evenly to this many points: a curve of two coefficients gains nothing from more, and
the monitor refits it every two seconds."""
POWER_EXPONENTS = np.geomspace(0.02, 4.0, 240)
BAND_DELTA_CHI2 = 4.0
"""Curves whose squared error is within this many noise variances of the best fit stay in the band (about 2 sigma)."""
BAND_SIGMAS = 2.0
HUBER_THRESHOLD_SIGMAS = 1.345
"""Residuals past this many noise sigmas weigh linearly, not squared: Huber's usual constant (95 % efficient under
Gaussian noise)."""
MAD_TO_SIGMA = 1.4826
"""The median absolute deviation of Gaussian noise times this is its standard deviation."""
NOISE_FREE_SIGMA = 1e-9
"""Below this share of the loss the points lie on a curve: least squares, and the residual error is the noise."""
IRLS_MAX_ITERATIONS = 50
IRLS_TOLERANCE = 1e-4
FLAT_IMPROVEMENT = 0.01
"""An epoch that lowers the projected loss by less than 1 % is not worth its time."""
MAX_RECOMMENDED_EPOCHS = 20
SMOOTHED_TAIL_FRACTION = 0.1
OVERFIT_RISE = 0.01
"""A held-out loss this share above its lowest evaluation, at the last one: the steps after the lowest overfit."""
MIN_HELD_OUT_POINTS = 3
"""Evaluations after the warm-up that a held-out recommendation needs: they are few (every eval_every_steps) but carry
no window-to-window noise."""
REPEATED_EPOCHS_WORTH = 1.0
"""R* of Muennighoff et al. 2023 (Scaling Data-Constrained Language Models), in epochs: a second epoch is worth 63 % of
fresh windows, a third 23 % more, and all repeats together at most one fresh epoch. Fitted to 3 repositories' final
held-out losses after 1-4 epochs (the best fit: 1.0-1.5; pretraining's 15 would have every epoch pay); on 5 others
trained after (15 runs), it put the recommendation within one epoch of the truth on each
(bench/results/epochs-gpu.txt)."""
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
    window_tokens: int = 0
    """The probed window (0: unknown): the measured rate stands for the tier's row only at that window."""

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
                 window_s: float = ETA_WINDOW_S) -> Eta | None:
    """Time left until `total_steps`, from the wall time between the recent step events.

    The first step event is only a starting mark: its elapsed time holds model loading, the dataset build and the
    first step's one-time allocations, none of which recur. None until two step events exist.
    """
    if len(steps) < 2 or len(steps) != len(elapsed_s):
        return None
    last = len(steps) - 1
    in_window = bisect.bisect_left(elapsed_s, elapsed_s[last] - window_s)
    first = max(0, min(in_window, last - ETA_MIN_WINDOW_STEPS))
    step_span = steps[last] - steps[first]
    if step_span <= 0:
        return None
    seconds_per_step = (elapsed_s[last] - elapsed_s[first]) / step_span
    steps_left = max(0, total_steps - steps[last])
    return Eta(remaining_s=steps_left * seconds_per_step, seconds_per_step=seconds_per_step, steps_left=steps_left,
               measured_steps=step_span)


STEADY_FALL = "steady fall"


@dataclass(frozen=True)
class CurveComponent:
    weight: float
    offset: float
    scale: float
    exponent: float
    annealing: float = 0.0
    """C of the annealing term (0 unless fitted)."""


@dataclass(frozen=True)
class LossFit:
    """A loss curve fitted to the steps so far. The steady fall (kind STEADY_FALL, `fit_steady_fall`) is the single
    curve scale * steps**-exponent. The flattening fit (kind "power", `fit_loss_curve`) is the likelihood-weighted
    average of the curves
    loss = offset + scale * x**-exponent - annealing * S2 over a grid of exponents, where x is the forward area of the
    run's learning-rate schedule (schedule.LrSchedule.forward_area, the sum of the rates so far) when the schedule is
    known, else the step count (Tissue et al. 2024, "Scaling Law with Learning Rate Annealing").

    The annealing term (C * S2) is left at 0 unless asked for: from the first fifth of a cosine run S2 has reached
    under 1 % of its final value, so a C fitted there is extrapolated 100 to 170 times, and on the recorded demo runs
    it projected losses below zero (bench/results/projection-cpu.txt). What the forward area does know in advance is
    that a decaying rate moves the weights less per step, so the curve flattens as the rate falls.

    offset, scale and exponent describe the most likely curve; `loss_at` is the average, which is what the band
    uses: early in a run many curves fit the noisy losses about equally well, and the one that fits best by a hair is
    often far off.
    """

    kind: str
    """"power": a power law with a floor in the abscissa; STEADY_FALL: one without, in steps."""
    offset: float
    scale: float
    exponent: float
    fitted_points: int
    residual_std: float
    """The noise of one step's loss about the curve (a robust estimate: the median absolute residual, scaled); for
    the steady fall, of its logarithm: a share of the loss."""
    components: tuple[CurveComponent, ...] = ()
    """The curves averaged, weights summing to 1; empty means the single curve above."""
    schedule: LrSchedule | None = None
    """The run's learning-rate schedule, whose forward area is the abscissa; None: the step count is."""
    annealing: float = 0.0
    """C of the most likely curve."""

    @property
    def abscissa(self) -> str:
        return "learning-rate area" if self.schedule is not None else "steps"

    def loss_at(self, steps) -> np.ndarray:
        """The fitted loss after each of `steps` optimizer steps of this run."""
        return self._evaluate(np.asarray(steps, dtype=int), self.schedule)

    def final_loss(self, total_steps: int) -> float:
        """The fitted loss at the end of a run of `total_steps`, its schedule stretched to that length."""
        schedule = self.schedule.with_total_steps(total_steps) if self.schedule is not None else None
        return float(self._evaluate(np.asarray([total_steps]), schedule)[0])

    def _evaluate(self, steps: np.ndarray, schedule: LrSchedule | None) -> np.ndarray:
        curves = self.components or (CurveComponent(1.0, self.offset, self.scale, self.exponent, self.annealing),)
        x = _abscissa(steps, schedule)
        annealing_area = (schedule.annealing_area(steps) if schedule is not None and any(c.annealing for c in curves)
                          else np.zeros(len(x)))
        return sum(c.weight * (c.offset + c.scale * np.power(x, -c.exponent) - c.annealing * annealing_area)
                   for c in curves)


@dataclass(frozen=True)
class CandidateCurves:
    """Every curve of the exponent grid fitted to the same points, for the average and the band."""

    exponents: np.ndarray
    coefficients: np.ndarray
    """Per exponent: offset, scale and, with the annealing term, C."""
    objectives: np.ndarray
    """Per exponent: the sum of the Huber losses of the residuals (half the squared error where none is large)."""
    covariances: np.ndarray
    """Per exponent: the covariance of the coefficients."""
    valid: np.ndarray
    """Falling curves with a non-negative floor: a cross-entropy cannot fall below zero."""
    noise_variance: float

    @property
    def best_objective(self) -> float:
        return float(self.objectives[self.valid].min())

    def design(self, x: np.ndarray, annealing_area: np.ndarray) -> np.ndarray:
        """Rows (offset, scale, C) of the design at abscissa x, per exponent: shape (exponents, len(x), coefficients)."""
        columns = [np.ones((len(self.exponents), len(x))), np.power(x[None, :], -self.exponents[:, None])]
        if self.coefficients.shape[1] == 3:
            columns.append(np.broadcast_to(-annealing_area, columns[0].shape))
        return np.stack(columns, axis=2)


@dataclass(frozen=True)
class LossProjection:
    fit: LossFit
    """The steady fall: the projection."""
    flattening: LossFit | None
    """The flattening fit, whose curves widen the band; None when no falling curve with a floor fits."""
    total_steps: int
    final_loss: float
    """The steady fall's value at total_steps."""
    final_loss_low: float
    final_loss_high: float
    curve_steps: tuple[int, ...]
    """Steps from the last measured one to total_steps, for drawing the projection and its band."""
    curve_loss: tuple[float, ...]
    curve_low: tuple[float, ...]
    curve_high: tuple[float, ...]


def _after_warmup(steps: np.ndarray, lrs: np.ndarray | None) -> np.ndarray:
    """Which steps follow the warm-up: from the peak of the reported rates on (all of them without rates)."""
    keep = steps > 0
    if lrs is not None and len(lrs):
        keep &= np.arange(len(steps)) >= int(np.argmax(lrs))
    return keep


def _thinned(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Longer histories thinned evenly to FIT_MAX_POINTS."""
    if len(arrays[0]) <= FIT_MAX_POINTS:
        return arrays
    chosen = np.unique(np.linspace(0, len(arrays[0]) - 1, FIT_MAX_POINTS).round().astype(int))
    return tuple(array[chosen] for array in arrays)


@dataclass(frozen=True)
class SteadyFall:
    """loss = scale * steps**-exponent: log(loss) is a line in log(steps), whose two coefficients
    (log scale, -exponent) have this covariance."""

    fit: LossFit
    covariance: np.ndarray

    def band(self, steps: np.ndarray, sigmas: float = BAND_SIGMAS) -> tuple[np.ndarray, np.ndarray]:
        """The curve at `sigmas` standard errors of its fitted mean, below and above: a band in log(loss)."""
        rows = np.stack([np.ones(len(steps)), np.log(np.asarray(steps, dtype=float))], axis=1)
        centre = np.log(self.fit.scale) - self.fit.exponent * rows[:, 1]
        spread = sigmas * np.sqrt(np.maximum(np.einsum("np,pq,nq->n", rows, self.covariance, rows), 0.0))
        return np.exp(centre - spread), np.exp(centre + spread)


def steady_fall_points(steps: Sequence[int], losses: Sequence[float], lrs: Sequence[float] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The steps and losses the steady fall fits: after the warm-up, finite and positive, thinned to FIT_MAX_POINTS."""
    step_array = np.asarray(steps, dtype=float)  # float: the epoch advice fits effective steps
    loss_array = np.asarray(losses, dtype=float)
    lr_array = np.asarray(lrs, dtype=float) if lrs is not None and len(lrs) == len(steps) else None
    keep = _after_warmup(step_array, lr_array) & np.isfinite(loss_array) & (loss_array > 0)
    return _thinned(step_array[keep], loss_array[keep])


def fit_steady_fall(steps: Sequence[int], losses: Sequence[float], lrs: Sequence[float] | None = None,
                    min_points: int = MIN_FIT_POINTS,
                    exponent_prior: tuple[float, float] | None = None) -> SteadyFall | None:
    """The steady fall fitted to the steps after the warm-up (while the rate ramps up the loss follows the ramp, which
    the step count does not know): a line in log-log, with Huber's loss at the noise scale of its least-squares
    residuals (one window unlike the rest must not tilt the line). None with fewer than `min_points` such steps or
    when the line does not fall.

    Against the step count, not the learning-rate area: over a cosine schedule the area grows ever slower, so a curve
    in it flattens late, and the fine-tunes kept falling as the rate decayed (the annealing gain of Tissue et al.
    2024 made up for the slower area); the steady fall in steps matched them.

    `exponent_prior` (mean, standard deviation): a Gaussian prior on the exponent, weighed against the points at their
    noise scale (the most likely line under both: the slope is pulled towards the mean the more, the fewer and the
    noisier the points); None fits the points alone. Noise-free points are fitted alone: they need no prior."""
    step_array, loss_array = steady_fall_points(steps, losses, lrs)
    if len(step_array) < min_points or np.ptp(step_array) == 0:
        return None
    log_losses = np.log(loss_array)
    design = np.stack([np.ones(len(step_array)), np.log(step_array.astype(float))], axis=1)[None]
    coefficients, _, _ = _fit_grid(design, log_losses, math.inf)
    residuals = log_losses - design[0] @ coefficients[0]
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(residuals - np.median(residuals))))
    threshold = HUBER_THRESHOLD_SIGMAS * sigma if sigma > NOISE_FREE_SIGMA else math.inf
    prior = None
    if exponent_prior is not None and sigma > NOISE_FREE_SIGMA:
        mean, spread = exponent_prior
        # in the units of the squared residuals: the prior's precision times the noise variance
        prior = (np.array([0.0, -mean]), np.diag([0.0, (sigma / spread) ** 2]))
    coefficients, _, covariances = _fit_grid(design, log_losses, threshold, prior)
    log_scale, slope = (float(value) for value in coefficients[0])
    if slope >= 0:
        return None
    residual_std = sigma if sigma > NOISE_FREE_SIGMA else float(np.std(log_losses - design[0] @ coefficients[0]))
    fit = LossFit(kind=STEADY_FALL, offset=0.0, scale=math.exp(log_scale), exponent=-slope,
                  fitted_points=len(step_array), residual_std=residual_std)
    return SteadyFall(fit=fit, covariance=covariances[0])


def _abscissa(steps: np.ndarray, schedule: LrSchedule | None) -> np.ndarray:
    if schedule is None:
        return np.asarray(steps, dtype=float)
    return schedule.forward_area(steps)


def _fit_grid(design: np.ndarray, losses: np.ndarray, huber_threshold: float,
              prior: tuple[np.ndarray, np.ndarray] | None = None):
    """Least squares of every exponent's design at once, reweighted to Huber's loss (iteratively reweighted least
    squares); an infinite threshold is plain least squares. Returns coefficients, objectives and the coefficients'
    covariances (Huber's asymptotic one: mean psi**2 over mean psi' squared times the inverse of the normal matrix,
    which for least squares is the residual variance times that inverse).

    `prior` (mean, precision): a Gaussian prior on the coefficients, its precision in units of the residuals' squares
    (the prior's precision times the noise variance), added to the normal matrix: ridge regression towards the mean.
    The objectives leave it out."""
    count = design.shape[2]
    prior_mean, prior_precision = prior if prior is not None else (np.zeros(count), np.zeros((count, count)))
    weights = np.ones(design.shape[:2])
    for _ in range(IRLS_MAX_ITERATIONS):
        weighted = np.swapaxes(design, 1, 2) * weights[:, None, :]
        coefficients = np.linalg.solve(weighted @ design + prior_precision,
                                       ((weighted @ losses) + prior_precision @ prior_mean)[..., None])[..., 0]
        residuals = losses[None, :] - (design @ coefficients[..., None])[..., 0]
        if not math.isfinite(huber_threshold):
            break
        size = np.abs(residuals)
        new_weights = np.where(size <= huber_threshold, 1.0, huber_threshold / np.maximum(size, 1e-300))
        converged = np.max(np.abs(new_weights - weights)) < IRLS_TOLERANCE
        weights = new_weights
        if converged:
            break
    points = design.shape[1]
    psi = np.clip(residuals, -huber_threshold, huber_threshold)
    inside = np.abs(residuals) <= huber_threshold
    beyond = np.abs(residuals) - 0.5 * huber_threshold if math.isfinite(huber_threshold) else 0.0
    objectives = np.where(inside, 0.5 * residuals**2, huber_threshold * beyond)
    psi_variance = (psi**2).sum(axis=1) / max(1, points - count)
    psi_slope = np.maximum(inside.mean(axis=1), 1.0 / points)
    unweighted_inverse = np.linalg.inv(np.swapaxes(design, 1, 2) @ design + prior_precision)
    covariances = (psi_variance / psi_slope**2)[:, None, None] * unweighted_inverse
    return coefficients, objectives.sum(axis=1), covariances


def _candidates(x: np.ndarray, losses: np.ndarray, annealing_area: np.ndarray | None,
                huber_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every grid exponent's curve: (exponents, coefficients, objectives, covariances). With the annealing term,
    an exponent whose best C is negative (annealing would raise the loss) keeps its curve without the term."""
    exponents = POWER_EXPONENTS[np.ptp(np.power(x[None, :], -POWER_EXPONENTS[:, None]), axis=1) > 1e-12]
    ones = np.ones((len(exponents), len(x)))
    basis = np.power(x[None, :], -exponents[:, None])
    plain = _fit_grid(np.stack([ones, basis], axis=2), losses, huber_threshold)
    if annealing_area is None or np.ptp(annealing_area) <= 0:
        return exponents, *plain
    annealed = _fit_grid(np.stack([ones, basis, np.broadcast_to(-annealing_area, ones.shape)], axis=2), losses,
                         huber_threshold)
    use_annealed = annealed[0][:, 2] >= 0
    coefficients = np.where(use_annealed[:, None], annealed[0], np.pad(plain[0], ((0, 0), (0, 1))))
    objectives = np.where(use_annealed, annealed[1], plain[1])
    # Without the term, C is known exactly: its row and column of the covariance are 0.
    covariances = np.where(use_annealed[:, None, None], annealed[2], np.pad(plain[2], ((0, 0), (0, 1), (0, 1))))
    return exponents, coefficients, objectives, covariances


def _valid(coefficients: np.ndarray) -> np.ndarray:
    return (coefficients[:, 1] > 0) & (coefficients[:, 0] >= 0)


def fit_loss_curve(steps: Sequence[int], losses: Sequence[float], lrs: Sequence[float] | None = None, *,
                   total_steps: int | None = None, schedule: LrSchedule | None = None,
                   fit_annealing: bool = False) -> tuple[LossFit, CandidateCurves] | None:
    """The fit (Huber's loss over a grid of exponents, curves averaged by likelihood) and every candidate curve
    (for the band).

    The schedule is `schedule`, or the one the reported learning rates `lrs` follow over a run of `total_steps`
    (schedule.schedule_from_reported_lrs); with none, the curve is fitted against the step count.

    With the schedule the warm-up steps are fitted too: the forward area grows slowly while the rate ramps up, so the
    curve models them, and they pin its start. On the recorded demo runs leaving them out (5 of the 20 steps of a
    100-step run's first fifth) cost the most: mean |error| 6.9 % against 3.9 % with them (bench/results/
    projection-cpu.txt). Against the step count the warm-up (before the peak of the reported rates) is left out: the
    loss there follows the ramp, which the step count does not know.

    Huber's loss rather than squares: one window unlike the rest (a data file, a generated table) can cost three
    times the loss of its neighbours, and a least-squares curve through 15 points follows it. The noise scale is the
    median absolute residual of the best least-squares curve; noise-free points fall back to least squares.
    """
    steps_array = np.asarray(steps, dtype=int)
    loss_array = np.asarray(losses, dtype=float)
    lr_array = np.asarray(lrs, dtype=float) if lrs is not None and len(lrs) == len(steps) else None
    if schedule is None and lr_array is not None and total_steps:
        schedule = schedule_from_reported_lrs(steps_array, lr_array, total_steps)
    keep = np.isfinite(loss_array) & (_after_warmup(steps_array, lr_array if schedule is None else None))
    steps_array, loss_array = _thinned(steps_array[keep], loss_array[keep])
    if len(steps_array) < MIN_FIT_POINTS:
        return None
    x = _abscissa(steps_array, schedule)
    annealing_area = schedule.annealing_area(steps_array) if fit_annealing and schedule is not None else None
    coefficient_count = 2 if annealing_area is None or np.ptp(annealing_area) <= 0 else 3

    exponents, coefficients, objectives, covariances = _candidates(x, loss_array, annealing_area, math.inf)
    valid = _valid(coefficients)
    if not valid.any():
        return None
    best = int(np.argmin(np.where(valid, objectives, np.inf)))
    residuals = loss_array - _design_row(x, annealing_area, exponents[best], coefficient_count) @ coefficients[best]
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(residuals - np.median(residuals))))
    if sigma > NOISE_FREE_SIGMA * max(1.0, float(np.abs(loss_array).max())):
        exponents, coefficients, objectives, covariances = _candidates(x, loss_array, annealing_area,
                                                                    HUBER_THRESHOLD_SIGMAS * sigma)
        noise_variance = sigma**2
    else:
        noise_variance = 2.0 * float(objectives[best]) / max(1, len(x) - coefficient_count - 1)
    valid = _valid(coefficients)
    if not valid.any():
        return None
    candidates = CandidateCurves(exponents=exponents, coefficients=coefficients, objectives=objectives,
                                 covariances=covariances, valid=valid, noise_variance=noise_variance)
    best = int(np.argmin(np.where(valid, objectives, np.inf)))
    fit = LossFit(kind="power", offset=float(coefficients[best, 0]), scale=float(coefficients[best, 1]),
                  exponent=float(exponents[best]), fitted_points=len(x), residual_std=math.sqrt(noise_variance),
                  components=_averaged_components(candidates), schedule=schedule,
                  annealing=_annealing_of(coefficients, best))
    return fit, candidates


def _annealing_of(coefficients: np.ndarray, index: int) -> float:
    return float(coefficients[index, 2]) if coefficients.shape[1] == 3 else 0.0


def _design_row(x: np.ndarray, annealing_area: np.ndarray | None, exponent: float, coefficient_count: int) -> np.ndarray:
    columns = [np.ones_like(x), np.power(x, -exponent)]
    if coefficient_count == 3:
        columns.append(-annealing_area)
    return np.stack(columns, axis=1)


def _averaged_components(candidates: CandidateCurves) -> tuple[CurveComponent, ...]:
    """Each curve weighted by its likelihood under Gaussian noise of the estimated variance.

    The grid's exponents are evenly spaced in log: a log-uniform prior on the exponent. Curves below
    MIN_COMPONENT_WEIGHT of the best are dropped.
    """
    # Noise-free data (exact curves) have a zero best error: then only the best curve counts.
    scaled = (candidates.objectives - candidates.best_objective) / max(candidates.noise_variance, 1e-300)
    weights = np.where(candidates.valid, np.exp(-scaled), 0.0)
    keep = weights >= MIN_COMPONENT_WEIGHT
    total = float(weights[keep].sum())
    return tuple(CurveComponent(weight=float(weights[index]) / total, offset=float(candidates.coefficients[index, 0]),
                                scale=float(candidates.coefficients[index, 1]),
                                exponent=float(candidates.exponents[index]),
                                annealing=_annealing_of(candidates.coefficients, index))
                 for index in np.flatnonzero(keep))


def project_loss(steps: Sequence[int], losses: Sequence[float], total_steps: int, lrs: Sequence[float] | None = None,
                 curve_points: int = 40, *, schedule: LrSchedule | None = None,
                 exponent_prior: tuple[float, float] | None = None) -> LossProjection | None:
    """The projected loss at total_steps (the steady fall) with a band that holds both readings of the steps so far:
    the steady fall two standard errors either side, and the flattening curves that fit the data about as well as the
    best flattening one, each widened by two standard errors of its own coefficients.

    `exponent_prior` (mean, standard deviation) weighs the steady fall's exponent against a Gaussian prior (its band
    then also holds the fit of the points alone). The shipped projection uses none: a prior from recorded fine-tunes
    halved the error on the 50-step demo and from random weights, but on fine-tunes of repositories it was not drawn
    from it put fewer projections within 5 % (bench/results/projection-exponent-prior.txt).

    None until enough steps after the warm-up exist for a fit, or while the loss does not fall.
    """
    last_step = int(max(steps)) if len(steps) else 0
    end = max(total_steps, last_step)
    steady = fit_steady_fall(steps, losses, lrs, exponent_prior=exponent_prior)
    if steady is None:
        return None
    curve_steps = np.unique(np.linspace(max(last_step, 1), end, curve_points).round().astype(int))
    projected = steady.fit.loss_at(curve_steps)
    low, high = steady.band(curve_steps)
    # A prior narrows the projection's own band; the points alone still say how far off it may be (on the 1-4-epoch
    # fine-tunes, which fall faster than the prior's runs, the prior's band alone held 8 of 27 actuals).
    alone = fit_steady_fall(steps, losses, lrs) if exponent_prior is not None else None
    if alone is not None:
        alone_low, alone_high = alone.band(curve_steps)
        low, high = np.minimum(low, alone_low), np.maximum(high, alone_high)
    flattening = project_flattening(steps, losses, lrs, end, curve_steps, schedule=schedule)
    if flattening is not None:
        low, high = np.minimum(low, flattening[1]), np.maximum(high, flattening[2])
    low, high = np.maximum(np.minimum(low, projected), 0.0), np.maximum(high, projected)
    return LossProjection(
        fit=steady.fit, flattening=flattening[0] if flattening is not None else None, total_steps=end,
        final_loss=float(projected[-1]), final_loss_low=float(low[-1]), final_loss_high=float(high[-1]),
        curve_steps=tuple(int(s) for s in curve_steps), curve_loss=tuple(float(v) for v in projected),
        curve_low=tuple(float(v) for v in low), curve_high=tuple(float(v) for v in high),
    )


def project_flattening(steps: Sequence[int], losses: Sequence[float], lrs: Sequence[float] | None, total_steps: int,
                       curve_steps, *, schedule: LrSchedule | None = None
                       ) -> tuple[LossFit, np.ndarray, np.ndarray] | None:
    """The flattening fit (`fit_loss_curve`) and its band's low and high edges at `curve_steps`; None when no falling
    curve with a floor fits. The projection's band holds this band; alone, it was the projection before the steady
    fall (bench/projection_accuracy.py scores it beside)."""
    fitted = fit_loss_curve(steps, losses, lrs, total_steps=total_steps, schedule=schedule)
    if fitted is None:
        return None
    return (fitted[0], *_flattening_band(*fitted, np.asarray(curve_steps, dtype=int)))


def _flattening_band(fit: LossFit, candidates: CandidateCurves, curve_steps: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest of the flattening curves that fit about as well as the best (within BAND_DELTA_CHI2
    noise variances), each two standard errors of its fitted mean out, and the averaged curve itself."""
    x = _abscissa(curve_steps, fit.schedule)
    annealing_area = (fit.schedule.annealing_area(curve_steps) if candidates.coefficients.shape[1] == 3
                      else np.zeros(len(x)))
    accepted = candidates.valid & (candidates.objectives <= candidates.best_objective
                                   + BAND_DELTA_CHI2 / 2.0 * candidates.noise_variance)
    rows = candidates.design(x, annealing_area)[accepted]
    curves = np.einsum("mnp,mp->mn", rows, candidates.coefficients[accepted])
    spread = BAND_SIGMAS * np.sqrt(np.maximum(np.einsum("mnp,mpq,mnq->mn", rows, candidates.covariances[accepted],
                                                        rows), 0.0))
    averaged = fit.loss_at(curve_steps)
    return (np.minimum((curves - spread).min(axis=0), averaged), np.maximum((curves + spread).max(axis=0), averaged))


def effective_steps(steps, steps_per_epoch: int) -> np.ndarray:
    """Steps counted by what their windows are still worth: the first epoch's in full, each repeat less (a repeated
    epoch's worth decays as exp(-repeats / REPEATED_EPOCHS_WORTH), Muennighoff et al. 2023's effective data), so that
    no number of epochs is worth more than 1 + REPEATED_EPOCHS_WORTH fresh ones."""
    epochs = np.asarray(steps, dtype=float) / steps_per_epoch
    repeats = np.maximum(epochs - 1.0, 0.0)
    worth = np.minimum(epochs, 1.0) + REPEATED_EPOCHS_WORTH * (1.0 - np.exp(-repeats / REPEATED_EPOCHS_WORTH))
    return worth * steps_per_epoch


def recommend_epochs(fit: LossFit, steps_per_epoch: int, flat_improvement: float = FLAT_IMPROVEMENT,
                     max_epochs: int = MAX_RECOMMENDED_EPOCHS) -> int:
    """The first epoch count after which one more epoch lowers the projected final loss by less than
    `flat_improvement`. `fit` is a steady fall in effective steps; each count is a run of its own length, whose
    schedule decays over all of it."""
    for epochs in range(1, max_epochs):
        worth = effective_steps([epochs * steps_per_epoch, (epochs + 1) * steps_per_epoch], steps_per_epoch)
        now, following = fit.scale * worth ** -fit.exponent
        if now <= 0 or (now - following) / now < flat_improvement:
            return epochs
    return max_epochs


@dataclass(frozen=True)
class EpochAdvice:
    """Epochs worth training, and what says so (`basis`): the held-out loss bottomed out and rose ("held-out rose"),
    where the held-out loss's steady fall flattens ("held-out loss"), one when it does not fall ("held-out flat"),
    or, without evaluations, where the first epoch's training loss flattens ("training loss")."""

    epochs: int
    basis: str
    lowest_step: int | None = None
    """The held-out evaluation with the lowest loss, when the basis is the held-out loss."""


def advise_epochs(steps: Sequence[int], losses: Sequence[float], lrs: Sequence[float] | None, steps_per_epoch: int,
                  eval_steps: Sequence[int] = (), eval_losses: Sequence[float] = ()) -> EpochAdvice | None:
    """Epochs worth training, from the held-out evaluations when there are MIN_HELD_OUT_POINTS after the warm-up, else
    from the training loss of the first epoch. The training loss of later epochs is not used: those windows were seen
    and it keeps falling as they are learnt by heart (on the recorded fine-tunes the whole run's training loss
    recommended 5-20 epochs where 1-3 paid: bench/results/epochs-gpu.txt). None when neither has a fit."""
    if steps_per_epoch < 1:
        return None
    held_out = _advice_from_held_out(eval_steps, eval_losses, steps_per_epoch, steps, lrs)
    if held_out is not None:
        return held_out
    step_array = np.asarray(steps, dtype=int)
    first_epoch = step_array <= steps_per_epoch
    lr_array = np.asarray(lrs, dtype=float) if lrs is not None and len(lrs) == len(steps) else None
    steady = fit_steady_fall(step_array[first_epoch], np.asarray(losses, dtype=float)[first_epoch],
                             lr_array[first_epoch] if lr_array is not None else None)
    if steady is None:
        return None
    return EpochAdvice(epochs=recommend_epochs(steady.fit, steps_per_epoch), basis="training loss")


def _advice_from_held_out(eval_steps: Sequence[int], eval_losses: Sequence[float], steps_per_epoch: int,
                          steps: Sequence[int], lrs: Sequence[float] | None) -> EpochAdvice | None:
    """The held-out loss carries no window-to-window noise (every evaluation scores the same windows), so a few
    evaluations give a curve; those of the warm-up (before the peak of the run's rates) are left out."""
    eval_array = np.asarray(eval_steps, dtype=int)
    loss_array = np.asarray(eval_losses, dtype=float)
    keep = (eval_array > 0) & np.isfinite(loss_array) & (loss_array > 0)
    if lrs is not None and len(lrs) and len(lrs) == len(steps):
        keep &= eval_array >= int(np.asarray(steps)[int(np.argmax(lrs))])
    eval_array, loss_array = eval_array[keep], loss_array[keep]
    if len(eval_array) < MIN_HELD_OUT_POINTS:
        return None
    lowest = int(np.argmin(loss_array))
    lowest_step = int(eval_array[lowest])
    if loss_array[-1] > loss_array[lowest] * (1 + OVERFIT_RISE):
        return EpochAdvice(epochs=max(1, math.ceil(lowest_step / steps_per_epoch)), basis="held-out rose",
                           lowest_step=lowest_step)
    steady = fit_steady_fall(effective_steps(eval_array, steps_per_epoch), loss_array,
                             min_points=MIN_HELD_OUT_POINTS)
    if steady is None:  # no epoch paid, so none more will
        return EpochAdvice(epochs=1, basis="held-out flat", lowest_step=lowest_step)
    return EpochAdvice(epochs=recommend_epochs(steady.fit, steps_per_epoch), basis="held-out loss",
                       lowest_step=lowest_step)


def tail_count(count: int, tail_fraction: float = SMOOTHED_TAIL_FRACTION) -> int:
    """How many of a run's `count` steps its last tenth is (at least one)."""
    return max(1, int(round(count * tail_fraction)))


def smoothed_final_loss(losses: Sequence[float], tail_fraction: float = SMOOTHED_TAIL_FRACTION) -> float:
    """The mean loss over the last tenth of a run: what a projection of the curve (not of one noisy step) is judged by."""
    values = np.asarray(losses, dtype=float)
    values = values[np.isfinite(values)]  # a diverged step (inf, NaN) says nothing about where the curve ended
    if not len(values):
        return float("nan")
    return float(values[-tail_count(len(values), tail_fraction):].mean())


BAND_MARGIN = 0.5
"""The band is drawn at most this share of the losses' own span beyond them. On the demo's first fifth it spans
0.16-9.93 around losses of 1.1-2.3 (one window per step is that noisy): an axis fitted to it left the losses a fifth
of the plot (the monitor's and the report's)."""


def loss_axis_range(values, band_low, band_high) -> tuple[float, float]:
    """The loss plot's y-axis: the losses and the projected curve in full, the band as far as BAND_MARGIN reaches."""
    values = [value for value in values if math.isfinite(value)]  # one diverged step must not stretch the axis to inf
    low, high = min(values), max(values)
    margin = BAND_MARGIN * max(high - low, 1e-3 * abs(high))
    return min(low, max(min(band_low), low - margin)), max(high, min(max(band_high), high + margin))
