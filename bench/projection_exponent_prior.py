"""Would a prior on the steady fall's exponent make the loss projection better? Scored on every recorded set of runs.

The projection (estimates.project_loss) fits the steady fall, loss = scale * steps**-exponent, to the first fifth of a
run. There the slope is fitted from a few dozen noisy points over a short span of log(steps), while whole runs of the
recorded fine-tunes fell with exponents close together. This weighs the exponent against a Gaussian prior
(`exponent_prior`) whose mean is the median whole-run exponent of recorded fine-tunes, and scores it beside the
shipped projection (the points alone), from the same first fifth of the same recorded runs (no training), against
the mean training loss of the last tenth:

- the 23 fine-tunes of tests/data/projection-finetune-runs.jsonl, each with the prior of the *other* repositories'
  runs (leave one repository out; its runs at four times the tokens per update count as the same repository);
- as tests/test_projection.py checks the shipped projection: a prior from the first three repositories only
  (transformers, sympy, networkx), applied to the 6 runs of the three trained after them;
- three sets whose runs the prior never saw: the epoch bench's 1-4-epoch fine-tunes, the 50-step CPU demo, and
  training the demo model from random weights.

Each at several widths of the prior; 0.03 is the spread of the fine-tunes' whole-run exponents (the others are for
comparison, and choosing among them on these scores would be in-sample).

    python bench/projection_exponent_prior.py --out bench/results/projection-exponent-prior
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from elite_core.estimates import fit_steady_fall, project_loss, smoothed_final_loss  # noqa: E402
from elite_core.report import PROJECTION_FROM_FRACTION  # noqa: E402

FINE_TUNES = PROJECT_ROOT / "tests" / "data" / "projection-finetune-runs.jsonl"
CHOSEN_ON = ("transformers", "sympy", "networkx")
"""The repositories tests/test_projection.py says the steady fall was chosen on; the others were trained after."""
USER_BATCH_MAX_TOKENS = 40_000
UNSEEN = {
    "1-4-epoch fine-tunes (the epoch bench, 8 repositories)": PROJECT_ROOT / "tests" / "data" / "epoch-runs.jsonl",
    "the 50-step CPU demo (pretrained demo model)":
        PROJECT_ROOT / "bench" / "results" / "projection-cpu-pretrained-demo50-fixture.jsonl",
    "the demo model from random weights (CPU)": PROJECT_ROOT / "tests" / "data" / "projection-demo-runs.jsonl",
}
WIDTHS = (None, 0.01, 0.02, 0.03, 0.05)
"""None: the points alone, as shipped."""
WITHIN_PCT = 5.0


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def repository(run: dict) -> str:
    return run["runs_dir"].removesuffix("-x4")


def whole_run_exponent(run: dict) -> float:
    steady = fit_steady_fall(run["steps"], run["losses"], run["lrs"])
    return steady.fit.exponent if steady is not None else float("nan")


def median_exponent(runs: list[dict]) -> float:
    return float(np.nanmedian([whole_run_exponent(run) for run in runs]))


def score(run: dict, prior: tuple[float, float] | None) -> tuple[float | None, bool]:
    """(error of the projection from the first fifth in % of the actual, or None without one; actual in the band)."""
    total = run["steps"][-1]
    count = sum(step <= PROJECTION_FROM_FRACTION * total for step in run["steps"])
    projection = project_loss(run["steps"][:count], run["losses"][:count], total, run["lrs"][:count],
                              exponent_prior=prior)
    if projection is None:
        return None, False
    actual = smoothed_final_loss(run["losses"])
    return ((projection.final_loss - actual) / actual * 100,
            projection.final_loss_low <= actual <= projection.final_loss_high)


def summary(results: list[tuple[float | None, bool]]) -> str:
    errors = [abs(error) if error is not None else float("inf") for error, _ in results]  # none: a miss
    finite = [error for error, _ in results if error is not None]
    mean_abs = float(np.mean(np.abs(finite))) if finite else float("nan")
    bias = float(np.mean(finite)) if finite else float("nan")
    return (f"{sum(e <= WITHIN_PCT for e in errors):>5}/{len(results):<4} {mean_abs:>9.1f} % {bias:>+8.1f} % "
            f"{len(finite):>5}/{len(results):<4} {sum(inside for _, inside in results):>4}/{len(results):<4}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table to OUT.txt")
    args = parser.parse_args(argv)
    fine_tunes = load(FINE_TUNES)
    exponents = np.array([whole_run_exponent(run) for run in fine_tunes])
    mean = median_exponent(fine_tunes)
    left_out = {name: median_exponent([run for run in fine_tunes if repository(run) != name])
                for name in {repository(run) for run in fine_tunes}}
    chosen_on = [run for run in fine_tunes if repository(run) in CHOSEN_ON]
    trained_after = [run for run in fine_tunes if repository(run) not in CHOSEN_ON
                     and run["tokens_per_update"] < USER_BATCH_MAX_TOKENS]
    early_mean = median_exponent(chosen_on)
    lines = [
        f"the loss projection from the first {PROJECTION_FROM_FRACTION:.0%} of steps with a Gaussian prior on the steady "
        "fall's exponent, beside the points alone (shipped); recorded runs, no training (machines in each fixture)",
        f"whole-run exponents of the {len(fine_tunes)} fine-tunes: median {mean:.4f}, standard deviation "
        f"{exponents.std(ddof=1):.4f}, range {exponents.min():.3f}-{exponents.max():.3f}; the prior's mean without "
        f"each repository in turn {min(left_out.values()):.4f}-{max(left_out.values()):.4f}; from "
        f"{', '.join(CHOSEN_ON)} alone {early_mean:.4f}",
        "",
        f"{'set':<58} {'prior width':<12} {'within 5 %':>10} {'mean |err|':>11} {'mean err':>10} {'projected':>10} "
        f"{'in band':>9}",
    ]
    sets = [
        (f"the {len(fine_tunes)} fine-tunes, each without its repository", fine_tunes,
         lambda run: left_out[repository(run)]),
        (f"the {len(trained_after)} trained after, prior from the first 3 repositories", trained_after,
         lambda run: early_mean),
    ] + [(name, load(path), lambda run: mean) for name, path in UNSEEN.items()]
    for name, runs, prior_mean in sets:
        for index, width in enumerate(WIDTHS):
            results = [score(run, None if width is None else (prior_mean(run), width)) for run in runs]
            label = "none" if width is None else f"{width}"
            lines.append(f"{name if index == 0 else '':<58} {label:<12} {summary(results)}")
    lines += ["",
              "actual = mean training loss of the last tenth of the steps; no projection counts as a miss; in band: the "
              "actual inside the projection's band (with a prior: the band of the prior's fit, of the points alone "
              "and of the flattening fit)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
