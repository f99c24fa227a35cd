"""The loss projected from the first 20 % of a run's steps against the loss real demo runs reached (issue 7, section 2).

A live CPU run short enough for this suite (under 60 s: about 50 tier-1 steps on 2 cores) has 10 steps in its first
fifth, half of them warm-up, so the fit would not even start: it cannot show the target honestly. These tests fit the
losses of real 100- and 200-step demo runs (`elite-tui run`, demo model, this repository's tree, tiers 2 and 1, several
seeds) that `python bench/projection_accuracy.py --fixture tests/data/projection-demo-runs.jsonl` recorded; the
machine and the table are in bench/results/projection-cpu.txt. "Actual" is the smoothed final loss, the mean of the
last tenth of the steps, as in the report.

The projection fits a power law in the learning-rate area (the sum of the rates, known to the end from the schedule)
with Huber's loss, the warm-up steps included (the area models the ramp). Each change was chosen on the 8 runs of
projection-bench (seeds 1234 and 7) and then scored on the 8 held-out runs of projection-validation (seeds 11 and 12).
Fitting the warm-up too took the held-out runs from 3/8 within 5 % (mean |error| 5.8 %, max 11.3 %) to 6/8 (3.2 %,
max 9.3 %), and the bench runs from 3/8 (8.0 %, max 14.8 %) to 5/8 (4.5 %, max 8.4 %). Then 8 more runs were trained
with that fit fixed (projection-fresh, seeds 13 and 14, same tree and configurations): 6/8 within 5 %, mean 3.6 %,
max 9.7 % (with the warm-up left out they would have scored 4/8, 5.6 %, max 18.9 %). Tried on the bench runs and
not kept, no clear gain there: a Student-t likelihood, a fit of the log-loss, the Laplace evidence of each exponent, an
average with pure power laws (no offset). The issue's target (every run within 5 %) is still not met: 7 of 24 runs
miss by 5.0 to 9.7 %, the noise of 20 to 40 steps whose loss depends on the window drawn, against an actual that
itself has a standard error of 1.2 to 4.5 %. Repeated windows are not what is left: fitted to its whole first epoch,
each multi-epoch run's later epochs come out within -3.2 to +3.9 % of the curve (with the warm-up left out they fell
4 to 10 % below it by the fourth epoch, which looked like a repetition effect), so the fit has no epoch term.

These runs are of the random-weight demo model that the demo used before it shipped pretrained weights: they stay as
the record the fit was chosen on. On fine-tunes of the pretrained model the projection is worse (0/4 within 5 % on an
H200 with a user run's batch: bench/results/projection-gpu-accum.txt), which the README says.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from elite_core import protocol
from elite_core.estimates import project_loss
from elite_core.report import PROJECTION_FROM_FRACTION, projection_check
from elite_core.schedule import LrSchedule

RUNS_FILE = Path(__file__).parent / "data" / "projection-demo-runs.jsonl"
TARGET_PCT = 5.0
RUNS = [json.loads(line) for line in RUNS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
DEMO_WARMUP_STEPS = 5


def step_events(run: dict) -> list[protocol.StepMetrics]:
    return [protocol.StepMetrics(step=step, epoch=epoch, loss=loss, lr=lr, tokens_per_s=0.0, memory_bytes=0,
                                 elapsed_s=0.0)
            for step, epoch, loss, lr in zip(run["steps"], run["epochs"], run["losses"], run["lrs"])]


def errors_pct(run: dict) -> tuple[float, float]:
    """The projection's error and the most likely single curve's error, in % of the actual smoothed final loss."""
    projection, actual = projection_check(step_events(run), PROJECTION_FROM_FRACTION)
    single = dataclasses.replace(projection.fit, components=())
    best_curve = float(single.loss_at([projection.total_steps])[0])
    return (projection.final_loss - actual) / actual * 100, (best_curve - actual) / actual * 100


def test_the_fixture_holds_real_runs_of_each_configuration():
    assert len(RUNS) >= 8
    assert {run["tier"] for run in RUNS} == {1, 2}
    assert {run["steps"][-1] for run in RUNS} == {100, 200}
    for run in RUNS:
        # Real training: the loss starts near ln(259) (uniform over the demo vocabulary) and falls.
        assert 5.2 < run["losses"][0] < 5.9
        assert sum(run["losses"][-10:]) / 10 < 0.7 * run["losses"][0]


@pytest.mark.parametrize("run", RUNS, ids=[f"{run['run']}-seed{run['seed']}" for run in RUNS])
def test_the_projection_reads_the_schedule_from_the_reported_rates(run):
    projection, _ = projection_check(step_events(run), PROJECTION_FROM_FRACTION)
    assert projection.fit.schedule == LrSchedule(warmup_steps=DEMO_WARMUP_STEPS, total_steps=run["steps"][-1])
    # Every step of the first fifth is fitted, the warm-up too.
    assert projection.fit.fitted_points == int(len(run["steps"]) * PROJECTION_FROM_FRACTION)


@pytest.mark.parametrize("run", RUNS, ids=[f"{run['run']}-seed{run['seed']}" for run in RUNS])
def test_projection_from_the_first_fifth_has_no_wild_miss(run):
    # Measured: at most 9.3 %. With the warm-up left out runs missed by up to 14.8 %; before the projection knew the
    # schedule, by up to 18 %.
    error, _ = errors_pct(run)
    assert abs(error) <= 10.0, error


def test_projection_on_recorded_demo_runs():
    """What the recorded runs show (17 of 24 within 5 %, mean |error| 3.8 %; 10 and 6.5 % with the warm-up left out),
    held as a floor; it is not the issue's target of every run within 5 %, which these runs do not meet (see the
    module docstring)."""
    errors = [errors_pct(run)[0] for run in RUNS]
    within = sum(abs(error) <= TARGET_PCT for error in errors)
    mean_abs = sum(abs(error) for error in errors) / len(errors)
    print(f"within {TARGET_PCT} %: {within}/{len(errors)}, mean |error| {mean_abs:.1f} %")
    assert within >= 17
    assert mean_abs <= 4.0


def test_projection_on_the_held_out_runs():
    """The runs no choice of the fit was tuned on: seeds 11 and 12, and seeds 13 and 14, trained after the fit was
    chosen (projection-fresh): 12 of 16 within 5 %, mean |error| 3.4 % (each set 6 of 8)."""
    errors = [errors_pct(run)[0] for run in RUNS if run["runs_dir"] in ("projection-validation", "projection-fresh")]
    assert len(errors) == 16
    assert sum(abs(error) <= TARGET_PCT for error in errors) >= 12
    assert sum(abs(error) for error in errors) / len(errors) <= 3.5


def test_the_band_holds_the_actual_on_all_but_one_run():
    held = sum(projection.final_loss_low <= actual <= projection.final_loss_high
               for projection, actual in (projection_check(step_events(run), PROJECTION_FROM_FRACTION) for run in RUNS))
    assert held >= 22  # of 24


def test_the_learning_rate_area_beats_the_step_count_with_the_same_fit():
    """The same fit against the step count (the warm-up left out: the step count does not model the ramp) misses by
    8.6 % on average, 3.8 % against the area; the area is closer on 19 of the 24 runs."""
    area_errors, step_errors = [], []
    for run in RUNS:
        count = int(len(run["steps"]) * PROJECTION_FROM_FRACTION)
        projection, actual = projection_check(step_events(run), PROJECTION_FROM_FRACTION)
        against_steps = project_loss(run["steps"][DEMO_WARMUP_STEPS - 1:count],
                                     run["losses"][DEMO_WARMUP_STEPS - 1:count], run["steps"][-1])
        assert against_steps.fit.schedule is None
        area_errors.append(abs(projection.final_loss - actual) / actual)
        step_errors.append(abs(against_steps.final_loss - actual) / actual)
    closer = sum(area < steps for area, steps in zip(area_errors, step_errors))
    assert sum(area_errors) < 0.6 * sum(step_errors), (sum(area_errors), sum(step_errors))
    assert closer >= 18


def test_averaging_the_curves_that_fit_beats_the_best_curve_alone():
    # Measured: 3.8 % against 5.7 % (24 runs).
    pairs = [errors_pct(run) for run in RUNS]
    averaged = sum(abs(error) for error, _ in pairs) / len(pairs)
    single = sum(abs(error) for _, error in pairs) / len(pairs)
    assert averaged < 0.9 * single, (averaged, single)
