"""The recommended number of epochs against what more epochs really gave (issue 7, section 2).

tests/data/epoch-runs.jsonl holds fine-tunes of the pretrained demo model on an H200 (bench/epoch_recommendation.py,
table in bench/results/epochs-gpu.txt): for each of 8 repositories it never saw, separate runs of 1, 2, ... 4 epochs,
each `elite-tui run` with its schedule decaying over all of it, held-out loss evaluated every 5 steps. What those runs
reached is the truth: the epoch count after which one more lowered the final held-out loss by less than 1 %.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from elite_core.estimates import FLAT_IMPROVEMENT, advise_epochs

RUNS = [json.loads(line) for line in (Path(__file__).parent / "data" / "epoch-runs.jsonl").read_text().splitlines()
        if line]


def _final_held_out_by_epochs() -> dict[tuple[str, int], dict[int, float]]:
    finals: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for run in RUNS:
        finals[(run["label"], run["seed"])][run["epochs"]] = run["eval_losses"][-1]
    return finals


def _worth_training(finals: dict[int, float]) -> tuple[int, bool]:
    """(epochs, exact): the first count after which one more gained under FLAT_IMPROVEMENT; (longest, False) when
    every extra epoch recorded still gained more."""
    for epochs in sorted(finals)[:-1]:
        if (finals[epochs] - finals[epochs + 1]) / finals[epochs] < FLAT_IMPROVEMENT:
            return epochs, True
    return max(finals), False


TRUTH = {key: _worth_training(finals) for key, finals in _final_held_out_by_epochs().items()}


def test_the_recorded_runs_are_what_the_table_says():
    assert len(RUNS) == 27 and len(TRUTH) == 8
    assert all(len(run["eval_steps"]) >= 4 for run in RUNS)  # step 0, then every 5 steps


@pytest.mark.parametrize("with_evaluations", [True, False], ids=["held-out", "training-loss"])
def test_the_advice_is_within_one_epoch_of_what_more_epochs_gave(with_evaluations):
    for run in RUNS:
        evals = (run["eval_steps"], run["eval_losses"]) if with_evaluations else ((), ())
        advice = advise_epochs(run["steps"], run["losses"], run["lrs"], run["steps_per_epoch"], *evals)
        truth, exact = TRUTH[(run["label"], run["seed"])]
        label = f"{run['label']} seed {run['seed']}, {run['epochs']}-epoch run: said {advice.epochs}, truth {truth}"
        assert advice.basis == ("held-out loss" if with_evaluations else "training loss")
        if exact:
            assert abs(advice.epochs - truth) <= 1, label
        else:  # more epochs still paid at the longest run: the advice must not stop well before it
            assert advice.epochs >= truth - 1, label
