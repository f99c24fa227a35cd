"""The loss projected from the first 20 % of a run's steps against the loss real runs reached (issue 7, section 2).

A live run short enough for this suite has too few steps in its first fifth to show anything. These tests fit the
recorded losses of real runs instead (tests/data; the tables are in bench/results/projection-gpu-finetunes.txt and
projection-cpu.txt). "Actual" is the smoothed final loss, the mean of the last tenth of the steps, as in the report.

The fine-tunes (tests/data/projection-finetune-runs.jsonl): the pretrained demo model fine-tuned on an H200 by
`elite-tui run` (bench/projection_gpu.sh), 100 to 300 steps, tiers 1 and 2, on seven repositories it never saw
(transformers, sympy, networkx, torch/_inductor, numpy, triton; its pretraining corpus was CPython's standard library).
- 15 runs at a user run's batch (grad_accum auto: about 32K tokens per update). The steady fall (the projection) was
  chosen on the first 9 (transformers, sympy, networkx); the other 6 (inductor, numpy, triton) were trained after.
- 8 runs at 4 times the tokens per update (micro_batch 4), trained after that, to test what the noise floor predicted.

The runs of the random-weight demo model (tests/data/projection-demo-runs.jsonl), from before it shipped pretrained
weights, are training from scratch: their loss falls to a floor, which the steady fall does not model (it projects
21 % low there), and the band's flattening curves hold it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elite_core import protocol
from elite_core.estimates import STEADY_FALL, project_flattening, smoothed_final_loss
from elite_core.report import PROJECTION_FROM_FRACTION, projection_check
from elite_core.schedule import LrSchedule

DATA = Path(__file__).parent / "data"
TARGET_PCT = 5.0
FINE_TUNES = [json.loads(line) for line in (DATA / "projection-finetune-runs.jsonl").read_text().splitlines() if line]
FROM_SCRATCH = [json.loads(line) for line in (DATA / "projection-demo-runs.jsonl").read_text().splitlines() if line]
USER_BATCH = [run for run in FINE_TUNES if run["tokens_per_update"] < 40_000]
FOUR_TIMES = [run for run in FINE_TUNES if run["tokens_per_update"] > 120_000]
CHOSEN_ON = ("transformers", "sympy", "networkx")
DEMO_WARMUP_STEPS = 5


def step_events(run: dict) -> list[protocol.StepMetrics]:
    return [protocol.StepMetrics(step=step, epoch=epoch, loss=loss, lr=lr, tokens_per_s=0.0, memory_bytes=0,
                                 elapsed_s=0.0)
            for step, epoch, loss, lr in zip(run["steps"], run["epochs"], run["losses"], run["lrs"])]


def scored(run: dict) -> tuple[float, bool]:
    """The projection's error in % of the actual, and whether its band holds the actual."""
    projection, actual = projection_check(step_events(run), PROJECTION_FROM_FRACTION)
    assert projection.fit.kind == STEADY_FALL
    return ((projection.final_loss - actual) / actual * 100,
            projection.final_loss_low <= actual <= projection.final_loss_high)


def flattening_scored(run: dict) -> tuple[float, bool]:
    """The same for the flattening fit alone: the projection before the steady fall (commit c68c5bd)."""
    count = int(len(run["steps"]) * PROJECTION_FROM_FRACTION)
    total = run["steps"][-1]
    fit, low, high = project_flattening(run["steps"][:count], run["losses"][:count], run["lrs"][:count], total,
                                        [total])
    actual = smoothed_final_loss(run["losses"])
    final = float(fit.loss_at([total])[0])
    return (final - actual) / actual * 100, bool(low[0] <= actual <= high[0])


def test_the_fine_tunes_are_real_runs_of_a_pretrained_model():
    assert len(USER_BATCH) == 15 and len(FOUR_TIMES) == 8
    assert {run["runs_dir"].removesuffix("-x4") for run in FINE_TUNES} == {
        "transformers", "sympy", "networkx", "inductor", "numpy", "triton"}
    for run in FINE_TUNES:
        # A model that already knows Python: it starts far below ln(259) = 5.56, the loss of random weights...
        assert 0.9 < run["losses"][0] < 2.4
        # ...and the fine-tune lowers it.
        tenth = len(run["losses"]) // 10
        assert sum(run["losses"][-tenth:]) < 0.9 * sum(run["losses"][:tenth])


def test_at_a_user_runs_batch_the_steady_fall_is_about_unbiased_where_the_flattening_fit_was_always_high():
    """Measured on the 15 runs: mean error +2.3 % (mean |error| 12.0 %) against +17.6 % (17.6 %); the flattening fit
    projected too high on all 15."""
    errors = [scored(run)[0] for run in USER_BATCH]
    before = [flattening_scored(run)[0] for run in USER_BATCH]
    assert abs(sum(errors) / len(errors)) <= 5.0
    assert sum(abs(error) for error in errors) / len(errors) <= 13.0
    assert all(error > 0 for error in before)
    assert sum(abs(error) for error in errors) < 0.75 * sum(abs(error) for error in before)


def test_on_the_runs_trained_after_the_choice():
    """inductor, numpy and triton at a user run's batch: mean |error| 6.8 %, 2 of 6 within 5 %, mean error -1.2 %."""
    errors = [scored(run)[0] for run in USER_BATCH if run["runs_dir"] not in CHOSEN_ON]
    assert len(errors) == 6
    assert sum(abs(error) for error in errors) / len(errors) <= 7.5
    assert abs(sum(errors) / len(errors)) <= 3.0


def test_the_band_holds_the_actual_where_the_flattening_band_did_not():
    """13 of 15 at a user run's batch and 6 of 8 at four times it; the flattening fit's band alone held 3 of 15 and
    0 of 8."""
    assert sum(scored(run)[1] for run in USER_BATCH) >= 13
    assert sum(scored(run)[1] for run in FOUR_TIMES) >= 6
    assert sum(flattening_scored(run)[1] for run in USER_BATCH) <= 3


def test_with_four_times_the_tokens_per_update_most_runs_are_within_five_percent():
    """The noise floor (bench/projection_accuracy.py --noise-floor) put 30 % of draws within 5 % at a user run's
    batch and 57 % at half its noise, which four times the tokens per update gives. Measured on 8 such runs: 6 within
    5 % (mean |error| 5.5 %); the two misses (+12.0 and +18.8 %) fell faster after the first fifth than before it."""
    errors = [scored(run)[0] for run in FOUR_TIMES]
    assert sum(abs(error) <= TARGET_PCT for error in errors) >= 6
    assert sum(abs(error) for error in errors) / len(errors) <= 6.0


def test_runs_from_random_weights_stay_inside_the_band():
    """Training from scratch falls to a floor: 22 of 24 inside the band, as before the steady fall."""
    held = sum(scored(run)[1] for run in FROM_SCRATCH)
    assert held >= 22


@pytest.mark.parametrize("run", FROM_SCRATCH[:4], ids=[run["run"] for run in FROM_SCRATCH[:4]])
def test_the_flattening_fit_reads_the_schedule_from_the_reported_rates(run):
    projection, _ = projection_check(step_events(run), PROJECTION_FROM_FRACTION)
    assert projection.flattening.schedule == LrSchedule(warmup_steps=DEMO_WARMUP_STEPS, total_steps=run["steps"][-1])
    # Every step of the first fifth is fitted by the flattening fit, the warm-up too; the steady fall starts at the peak.
    count = int(len(run["steps"]) * PROJECTION_FROM_FRACTION)
    assert projection.flattening.fitted_points == count
    assert projection.fit.fitted_points == count - (DEMO_WARMUP_STEPS - 1)
