"""Estimates: the ETA from the running step rate and the projected final loss, on exact curves and on a real CPU run."""

import math
import time

import numpy as np
import pytest
import torch

from elite_core import protocol
from elite_core.config import default_config
from elite_core.estimates import (REPEATED_EPOCHS_WORTH, STEADY_FALL, advise_epochs, effective_steps, epoch_seconds,
                                  estimate_eta, fit_loss_curve, fit_steady_fall, project_loss, recommend_epochs,
                                  steady_fall_points)
from elite_core.schedule import LrSchedule, lr_factor, schedule_from_reported_lrs

TINY_WINDOWS = {"context_tokens": 96, "target_tokens": 32, "lora_rank": 4, "lora_alpha": 8, "warmup_steps": 2,
                "eval_every_steps": 0, "checkpoint_every_seconds": 0, "eval_fraction": 0.0}
ETA_CHECK_AFTER_S = 30.0
RUN_TARGET_S = 60.0
ETA_TOLERANCE = 0.10
"""The issue's target: the ETA within 10 % of the remaining wall time."""
ETA_ATTEMPTS = 3
PROBE_STEPS = 60


def test_eta_ignores_setup_time_and_the_first_step():
    # 20 s of setup before step 1, then exactly 0.5 s a step
    steps = list(range(1, 21))
    elapsed = [20.0 + 0.5 * (s - 1) for s in steps]
    eta = estimate_eta(steps, elapsed, total_steps=100)
    assert eta.seconds_per_step == pytest.approx(0.5)
    assert eta.remaining_s == pytest.approx(80 * 0.5)
    assert estimate_eta([1], [20.0], 100) is None


def test_eta_follows_a_change_of_rate_through_its_window():
    # 1 s a step for 100 steps, then 2 s a step: after 200 s more, a 200-s window holds only the new rate.
    steps = list(range(1, 401))
    elapsed = [float(s) if s <= 100 else 100.0 + 2.0 * (s - 100) for s in steps]
    assert estimate_eta(steps, elapsed, 500, window_s=200.0).seconds_per_step == pytest.approx(2.0)
    # ...and minutes-long steps still average over the last 20, not over the one step the window holds.
    slow = [60.0 * s + (30.0 if s == 400 else 0.0) for s in steps]
    assert estimate_eta(steps, slow, 500, window_s=100.0).seconds_per_step == pytest.approx(60.0 + 30.0 / 20)


def test_a_steady_fall_with_noise_is_projected_within_two_percent_and_inside_its_band():
    rng = np.random.default_rng(0)
    steps = np.arange(1, 1001)
    truth = 2.0 * steps ** -0.08
    noisy = truth * np.exp(rng.normal(0, 0.05, size=steps.shape))
    projection = project_loss(steps[:200], noisy[:200], total_steps=1000)
    assert projection.fit.kind == STEADY_FALL and projection.fit.offset == 0.0
    assert projection.fit.exponent == pytest.approx(0.08, rel=0.1)
    assert projection.final_loss == pytest.approx(truth[-1], rel=0.02)
    assert projection.final_loss_low <= truth[-1] <= projection.final_loss_high
    assert projection.curve_steps[0] == 200 and projection.curve_steps[-1] == 1000


def test_a_curve_that_flattens_stays_inside_the_band():
    # A run from random weights falls to a floor: the steady fall projects below it, the band's flattening curves hold it.
    rng = np.random.default_rng(0)
    steps = np.arange(1, 1001)
    truth = 1.2 + 4.0 * steps ** -0.6
    noisy = truth + rng.normal(0, 0.05, size=steps.shape)
    projection = project_loss(steps[:200], noisy[:200], total_steps=1000)
    assert projection.final_loss < truth[-1]
    assert projection.final_loss_low <= truth[-1] <= projection.final_loss_high
    assert projection.flattening.final_loss(1000) == pytest.approx(truth[-1], rel=0.02)


def test_the_flattening_fit_reads_a_power_law_in_the_learning_rate_area_through_the_cosine_decay():
    # The schedule is read from the reported rates; the step count alone misreads the flattening the decay brings.
    schedule = LrSchedule(warmup_steps=10, total_steps=1000)
    steps = np.arange(1, 1001)
    truth = 0.5 + 4.0 * schedule.forward_area(steps) ** -0.3
    lrs = 2e-4 * schedule.factors(steps)
    fit, _ = fit_loss_curve(steps[:200], truth[:200], lrs[:200], total_steps=1000)
    assert fit.schedule == schedule and fit.abscissa == "learning-rate area"
    # Every step, the warm-up too: the learning-rate area grows slowly while the rate ramps up, so the curve covers it
    assert fit.fitted_points == 200
    assert fit.final_loss(1000) == pytest.approx(truth[-1], rel=0.002)
    against_steps, _ = fit_loss_curve(steps[9:200], truth[9:200], total_steps=1000)
    assert against_steps.abscissa == "steps"
    assert abs(against_steps.final_loss(1000) / truth[-1] - 1) > 0.01
    # ...and the projection's band reaches that curve's end (noise-free, the flattening band is the curve itself)
    projection = project_loss(steps[:200], truth[:200], 1000, lrs[:200])
    assert projection.final_loss_low <= truth[-1] <= projection.final_loss_high * 1.002


def test_the_annealing_term_is_recovered_when_asked_for_and_the_decay_is_seen():
    schedule = LrSchedule(warmup_steps=10, total_steps=1000)
    steps = np.arange(1, 1001)
    losses = 1.0 + 4.0 * schedule.forward_area(steps) ** -0.5 - 0.002 * schedule.annealing_area(steps)
    fit, _ = fit_loss_curve(steps, losses, total_steps=1000, schedule=schedule, fit_annealing=True)
    assert fit.annealing == pytest.approx(0.002, rel=0.01)
    assert fit.final_loss(1000) == pytest.approx(losses[-1], rel=0.001)
    # Off by default: the same curve without the term ends far above
    assert fit_loss_curve(steps, losses, total_steps=1000, schedule=schedule)[0].annealing == 0.0


def test_one_outlying_window_does_not_drag_the_projection():
    rng = np.random.default_rng(1)
    steps = np.arange(1, 301)
    truth = 2.0 * steps ** -0.1
    noisy = truth * np.exp(rng.normal(0, 0.05, size=steps.shape))
    noisy[40] *= 3.0  # one window three times as hard as its neighbours, as the demo runs show
    projection = project_loss(steps[:60], noisy[:60], total_steps=300)
    assert projection.final_loss == pytest.approx(truth[-1], rel=0.02)


def test_warmup_steps_before_the_peak_rate_are_left_out_of_the_steady_fall():
    steps = np.arange(1, 101)
    losses = 2.0 * steps ** -0.1
    losses[:9] = 8.0  # flat while the learning rate ramps up to its peak at step 10
    lrs = np.minimum(1.0, steps / 10)
    steady = fit_steady_fall(steps, losses, lrs)
    assert steady.fit.fitted_points == 91
    assert steady.fit.loss_at([100])[0] == pytest.approx(losses[-1], rel=1e-6)
    # the flattening fit, against the step count here (a linear ramp is not the schedule), leaves them out too
    fit, _ = fit_loss_curve(steps, losses, lrs)
    assert fit.fitted_points == 91


def test_an_exponent_prior_steadies_a_short_noisy_fall_and_gives_way_to_a_long_clean_one():
    # bench/projection_exponent_prior.py scores this option; the shipped projection fits the points alone
    rng = np.random.default_rng(0)
    steps = np.arange(1, 41)
    noisy = 2.0 * steps ** -0.3 * np.exp(rng.normal(0.0, 0.2, len(steps)))
    alone = fit_steady_fall(steps, noisy).fit.exponent
    pulled = fit_steady_fall(steps, noisy, exponent_prior=(0.1, 0.01)).fit.exponent
    assert abs(pulled - 0.1) < abs(alone - 0.1) and abs(pulled - 0.1) < 0.03
    # a long history of little noise outweighs the prior; noise-free points ignore it
    long_steps = np.arange(1, 2001)
    clean = 2.0 * long_steps ** -0.3 * np.exp(rng.normal(0.0, 0.01, len(long_steps)))
    assert fit_steady_fall(long_steps, clean, exponent_prior=(0.1, 0.01)).fit.exponent == pytest.approx(0.3, abs=0.01)
    exact = 2.0 * steps ** -0.3
    assert fit_steady_fall(steps, exact, exponent_prior=(0.1, 0.01)).fit.exponent == pytest.approx(0.3, rel=1e-6)
    # the projection's band still holds what the points alone say
    alone_projection = project_loss(steps, noisy, 400)
    with_prior = project_loss(steps, noisy, 400, exponent_prior=(0.1, 0.01))
    assert with_prior.final_loss_low <= alone_projection.final_loss <= with_prior.final_loss_high


def test_a_loss_that_does_not_fall_has_no_projection():
    steps = np.arange(1, 41)
    assert project_loss(steps, 1.0 + 0.001 * steps, 200) is None


def test_a_repeated_epoch_is_worth_less_than_a_fresh_one():
    # The first epoch counts in full; a second adds 1 - exp(-1) of one, and no number of them more than one.
    worth = effective_steps([50, 100, 200, 300, 100_000], steps_per_epoch=100)
    assert worth[:2].tolist() == [50.0, 100.0]
    assert worth[2] == pytest.approx(100 + 100 * (1 - math.exp(-1)))
    assert worth[2] < worth[3] < worth[4] <= 100 * (1 + REPEATED_EPOCHS_WORTH)


def test_recommended_epochs_is_where_an_epoch_stops_paying():
    # A steady fall lowers the loss by (W(e + 1) / W(e)) ** -exponent from e epochs to e + 1, W the effective
    # epochs (1, 1.632, 1.865, 1.950, 1.982): at exponent 0.05, -2.4 % then -0.7 % (stop at 2); at 0.5, -21.7, -6.5,
    # -2.2, then -0.8 % (stop at 4).
    steps = np.arange(1, 101)
    gentle = fit_steady_fall(steps, 2.0 * steps ** -0.05)
    steep = fit_steady_fall(steps, 2.0 * steps ** -0.5)
    assert recommend_epochs(gentle.fit, 100) == 2
    assert recommend_epochs(steep.fit, 100) == 4
    assert epoch_seconds(1_000_000, 2_000.0) == 500.0 and math.isinf(epoch_seconds(10, 0.0))


def test_epoch_advice_reads_the_held_out_loss_first_and_sees_it_rise():
    steps = np.arange(1, 201)
    lrs = np.full(len(steps), 1e-3)
    losses = 2.0 * steps ** -0.3
    # the held-out loss bottoms out at step 80 (epoch 2 of 50-step epochs) and rises 5 % by the end
    eval_steps = np.arange(10, 201, 10)
    eval_losses = np.where(eval_steps <= 80, 1.5 * eval_steps ** -0.05, 1.5 * 80 ** -0.05 * (1 + (eval_steps - 80) / 2400))
    rose = advise_epochs(steps, losses, lrs, 50, eval_steps, eval_losses)
    assert (rose.epochs, rose.basis, rose.lowest_step) == (2, "held-out rose", 80)
    falling = advise_epochs(steps, losses, lrs, 50, eval_steps, 1.5 * eval_steps ** -0.05)
    assert falling.basis == "held-out loss" and falling.epochs == 2
    # rising, but by under OVERFIT_RISE: no fall to fit, and no epoch paid
    flat = advise_epochs(steps, losses, lrs, 50, eval_steps, 1.2 * (1 + 4e-5 * eval_steps))
    assert (flat.epochs, flat.basis) == (1, "held-out flat")


def test_epoch_advice_without_evaluations_reads_the_first_epoch_only():
    # From epoch 2 on the training windows repeat and their loss plunges (learnt by heart): the advice must not follow
    steps = np.arange(1, 201)
    lrs = np.full(len(steps), 1e-3)
    fresh = 2.0 * steps ** -0.05
    memorised = np.where(steps <= 50, fresh, fresh * np.exp(-(steps - 50) / 40))
    one_epoch = advise_epochs(steps[:50], fresh[:50], lrs[:50], 50)
    four_epochs = advise_epochs(steps, memorised, lrs, 50)
    assert one_epoch.basis == four_epochs.basis == "training loss"
    assert four_epochs.epochs == one_epoch.epochs == 2
    assert advise_epochs(steps[:3], fresh[:3], lrs[:3], 50) is None


def test_no_projection_without_enough_points():
    assert project_loss([1, 2, 3], [3.0, 2.0, 1.5], 100) is None


def _engine(tmp_path, repo, run_name, **overrides):
    from elite_core.training import TrainingEngine

    config = default_config("demo", str(repo), str(tmp_path / "runs"), run_name=run_name, **TINY_WINDOWS, **overrides)
    config.run_dir.mkdir(parents=True)
    config.save(config.run_dir / "config.yaml")
    events: list = []
    probe = overrides.get("max_steps", 0) == 0
    engine = TrainingEngine(config, config.run_dir, emit=events.append, poll_commands=lambda: [],
                            probe_steps=PROBE_STEPS if probe else 0, dataset_dir=tmp_path / "dataset")
    return engine, events


@pytest.mark.alone
def test_eta_after_30_s_is_within_10_percent_on_a_real_cpu_run(tmp_path, tiny_repo):
    """A real demo run of about RUN_TARGET_S (60 s), sized from a probe of PROBE_STEPS steps; the ETA at the first
    step 30 s in is compared with the wall time the remaining steps really took. (The loss projection's 5 % target is measured on a 200-step
    run over real code, not here: on the tiny repository the loss falls to near zero, where a relative error means
    nothing.)

    One torch thread: with two, every step waits for both cores, and whatever else runs on the machine (the
    neighbouring virtual machines of a shared host) drifted the 2-core rate by 10-20 % within a minute on an idle
    CI machine; on one thread the same runs kept within 5 %."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # A run whose machine changed speed mid-run says nothing about the ETA: run again, up to ETA_ATTEMPTS times
        # (two fresh-clone CI runs in a row skipped on one such run)
        unsteady, seconds_per_step = [], None
        for attempt in range(ETA_ATTEMPTS):
            result, seconds_per_step = _run_and_check_the_eta(tmp_path / f"attempt-{attempt}", tiny_repo, seconds_per_step)
            if result is None:
                return
            unsteady.append(result)
        pytest.skip("; ".join(unsteady))
    finally:
        torch.set_num_threads(threads)


def _run_and_check_the_eta(tmp_path, tiny_repo, seconds_per_step: float | None) -> tuple[str | None, float]:
    """(None when the ETA held on a steady machine (a wrong ETA there fails), else why the run could not tell; the
    run's seconds per step). The run is sized from seconds_per_step, or from a probe when there is none."""
    if seconds_per_step is None:
        probe, probe_events = _engine(tmp_path, tiny_repo, "probe")
        probe.run()
        probe_steps = [e for e in probe_events if isinstance(e, protocol.StepMetrics)]
        # from step 5 on: the first steps still allocate (the 8-step probe this test used to run overrated the step time
        # by half, which shortened the run to 40 s)
        first, last = probe_steps[4], probe_steps[-1]
        seconds_per_step = (last.elapsed_s - first.elapsed_s) / (last.step - first.step)
    total = max(60, int(RUN_TARGET_S / seconds_per_step))

    engine, events = _engine(tmp_path, tiny_repo, "timed", max_steps=total)
    asked_at: list = []

    steps: list = []
    read = [0]

    def poll():
        # only the events since the last poll: a rescan of thousands of events every step would itself slow the steps
        steps.extend(e for e in events[read[0]:] if isinstance(e, protocol.StepMetrics))
        read[0] = len(events)
        if not asked_at and len(steps) > 1 and steps[-1].elapsed_s - steps[0].elapsed_s >= ETA_CHECK_AFTER_S:
            eta = estimate_eta([s.step for s in steps], [s.elapsed_s for s in steps], total)
            asked_at.append((steps[-1].step, eta.remaining_s, time.monotonic()))
        return []

    engine.poll_commands = poll
    engine.run()
    last_step_at = time.monotonic()
    assert asked_at, "the run ended before 30 s of training"
    step, predicted_s, asked = asked_at[0]
    actual_s = last_step_at - asked
    assert step < total
    print(f"ETA at step {step}/{total}: predicted {predicted_s:.1f} s, actual {actual_s:.1f} s")
    # Other work on a shared machine can change the step rate mid-run, which no ETA from the steps so far can foresee:
    # when the rate after the check differs from the rate before it by more than the 10 % the ETA is allowed, no such
    # ETA could hold, and the comparison says nothing about this one (a fresh-clone CI run: 54.8 -> 62.3 steps/s, +14 %,
    # so the ETA was 14 % high). A wrong ETA on a steady machine still fails.
    steps = [e for e in events if isinstance(e, protocol.StepMetrics)]
    before = [s for s in steps if s.step <= step]
    rate_before = (before[-1].step - before[0].step) / (before[-1].elapsed_s - before[0].elapsed_s)
    rate_after = (steps[-1].step - step) / (steps[-1].elapsed_s - before[-1].elapsed_s)
    measured_seconds_per_step = 1.0 / rate_before
    if abs(rate_after - rate_before) > ETA_TOLERANCE * rate_before:
        return (f"the step rate changed from {rate_before:.1f} to {rate_after:.1f} steps/s mid-run (other load); "
                f"ETA {predicted_s:.0f} s vs {actual_s:.0f} s"), measured_seconds_per_step
    # The probe can overrate the step time (a fresh-clone CI run: 1,063 steps for 60 s, 772 done at 30 s), which leaves
    # the ETA a short remainder where the run's fixed end (about a second) is a tenth of it: sized again from this run.
    if actual_s < ETA_CHECK_AFTER_S / 2:
        return (f"the run was sized too short ({actual_s:.0f} s left at the check); ETA {predicted_s:.1f} s vs "
                f"{actual_s:.1f} s"), measured_seconds_per_step
    assert predicted_s == pytest.approx(actual_s, rel=ETA_TOLERANCE), (step, total, predicted_s, actual_s)
    return None, measured_seconds_per_step


@pytest.mark.parametrize("warmup_steps,total_steps", [(5, 100), (0, 50), (10, 1000), (40, 30), (3, 1)])
def test_the_schedule_is_the_one_training_steps_with(warmup_steps, total_steps):
    from elite_core.training import lr_lambda

    config = default_config("demo", ".", "elite-runs", warmup_steps=warmup_steps)
    trained = lr_lambda(config, total_steps)
    # Past the end too: a resumed or extended run asks for steps beyond total_steps.
    steps = list(range(total_steps + 3))
    expected = [trained(step) for step in steps]
    assert [lr_factor(step, warmup_steps, total_steps) for step in steps] == pytest.approx(expected, abs=1e-12)
    assert LrSchedule.for_config(config, total_steps).factors(steps) == pytest.approx(expected, abs=1e-12)


def test_forward_and_annealing_areas_of_a_hand_worked_schedule():
    # Warm-up 1, 4 steps: factors 1/2, 1, 0.1 + 0.45 * (1 + cos(pi/3)) = 0.775, 0.1 + 0.45 * (1 + cos(2 pi/3)) = 0.325,
    # then the floor 0.1; update i uses factor(i - 1).
    schedule = LrSchedule(warmup_steps=1, total_steps=4)
    assert schedule.factors([0, 1, 2, 3, 4, 5]) == pytest.approx([0.5, 1.0, 0.775, 0.325, 0.1, 0.1])
    assert schedule.forward_area([0, 1, 2, 3, 4, 5]) == pytest.approx([0.0, 0.5, 1.5, 2.275, 2.6, 2.7])
    # Drops: update 2 rises (warm-up, not counted), update 3 drops 0.225, update 4 0.45, update 5 0.225.
    # Momentum 0.5: m = 0, 0, 0.225, 0.5 * 0.225 + 0.45 = 0.5625, 0.5 * 0.5625 + 0.225 = 0.50625.
    assert schedule.annealing_area([0, 1, 2, 3, 4, 5], momentum=0.5) == pytest.approx(
        [0.0, 0.0, 0.0, 0.225, 0.7875, 1.29375])
    # The paper's momentum 0.999 keeps almost every drop: m_4 = 0.999 * 0.225 + 0.45
    assert schedule.annealing_area([4])[0] == pytest.approx(0.225 + 0.999 * 0.225 + 0.45)


def test_the_schedule_is_recovered_from_reported_rates():
    schedule = LrSchedule(warmup_steps=12, total_steps=500)
    steps = np.arange(1, 301)
    rates = 3e-4 * schedule.factors(steps)
    assert schedule_from_reported_lrs(steps, rates, 500) == schedule
    # Logged every 7th step: step 12 (the peak) is not among them
    assert schedule_from_reported_lrs(steps[6::7], rates[6::7], 500) == schedule
    # Another schedule (constant) is not mistaken for this one, and the fit then runs against the step count
    assert schedule_from_reported_lrs(steps, np.full(len(steps), 3e-4), 500) is None
    fit, _ = fit_loss_curve(steps, 1.0 + 2.0 * steps ** -0.5, np.full(len(steps), 3e-4), total_steps=500)
    assert fit.schedule is None and fit.abscissa == "steps"


def test_no_steps_fit_nothing_and_do_not_fail():
    # The report asks how many steps of a run's first fifth could be fitted; a run of under five steps has none.
    steps, losses = steady_fall_points([], [], [])
    assert len(steps) == 0 and len(losses) == 0
    assert fit_steady_fall([], [], []) is None and project_loss([], [], 10, []) is None
