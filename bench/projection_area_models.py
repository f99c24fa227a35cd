"""Would a curve in the learning-rate area project the final loss better than the shipped projection?

The demo run's held-out loss, evaluated at every step, fell by nearly the same amount per unit of learning-rate area
(S1, schedule.LrSchedule.forward_area) from step 10 to the end (bench/results/projection-noise-sources-cpu.txt),
which suggests the loss as a line, or an exponential, in S1. This fits both to the first fifth of every recorded
run (the fixtures the projection tests and benches use) and scores them, as the shipped projection is scored,
against the mean training loss of the last tenth (estimates.smoothed_final_loss). No training: the recorded losses.

    python bench/projection_area_models.py --out bench/results/projection-area-models
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elite_core.estimates import (  # noqa: E402
    HUBER_THRESHOLD_SIGMAS, MAD_TO_SIGMA, NOISE_FREE_SIGMA, _fit_grid, project_loss, smoothed_final_loss)
from elite_core.schedule import schedule_from_reported_lrs  # noqa: E402

FIXTURES = {
    "GPU fine-tunes of the pretrained demo model": ROOT / "tests/data/projection-finetune-runs.jsonl",
    "the 50-step CPU demo, pretrained": ROOT / "bench/results/projection-cpu-pretrained-demo50-fixture.jsonl",
    "the random-weight demo (from scratch)": ROOT / "tests/data/projection-demo-runs.jsonl",
    "GPU fine-tunes of 1-4 epochs (the epoch bench)": ROOT / "tests/data/epoch-runs.jsonl",
}
FROM_FRACTION = 0.2
TARGET_PCT = 5.0


def huber_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Intercept and slope of y on x, fitted as the steady fall is (estimates.fit_steady_fall): least squares, then
    Huber's loss at 1.345 robust sigmas of its residuals."""
    design = np.stack([np.ones_like(x), x], axis=1)[None]
    coefficients, _, _ = _fit_grid(design, y, math.inf)
    residuals = y - design[0] @ coefficients[0]
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(residuals - np.median(residuals))))
    threshold = HUBER_THRESHOLD_SIGMAS * sigma if sigma > NOISE_FREE_SIGMA else math.inf
    coefficients, _, _ = _fit_grid(design, y, threshold)
    return float(coefficients[0][0]), float(coefficients[0][1])


def projections(run: dict) -> dict[str, float]:
    steps = np.asarray(run["steps"])
    losses = np.asarray(run["losses"], dtype=float)
    lrs = np.asarray(run["lrs"], dtype=float)
    total = int(run.get("total_steps") or steps.max())
    count = max(1, int(round(FROM_FRACTION * len(steps))))
    first_steps, first_losses, first_lrs = steps[:count], losses[:count], lrs[:count]
    shipped = project_loss(first_steps, first_losses, total, first_lrs,
                           schedule=schedule_from_reported_lrs(steps, lrs, total))
    result = {"shipped projection": shipped.final_loss if shipped else float("nan")}
    schedule = schedule_from_reported_lrs(steps, lrs, total)
    if schedule is None:
        return result
    area, final_area = schedule.forward_area(first_steps), float(schedule.forward_area([total])[0])
    after_warmup = np.arange(count) >= int(np.argmax(first_lrs))
    for label, keep in (("after warm-up", after_warmup), ("warm-up included", np.ones(count, dtype=bool))):
        if keep.sum() < 3 or np.ptp(area[keep]) == 0:
            continue
        intercept, slope = huber_line(area[keep], first_losses[keep])
        result[f"line in S1, {label}"] = intercept + slope * final_area
        intercept, slope = huber_line(area[keep], np.log(first_losses[keep]))
        result[f"exponential in S1, {label}"] = float(np.exp(intercept + slope * final_area))
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, help="write OUT.txt")
    args = parser.parse_args()
    lines = [f"loss projected from the first {FROM_FRACTION:.0%} of steps against the mean training loss of the last "
             "tenth; recorded runs, no training (the machines are named in each fixture)"]
    for title, path in FIXTURES.items():
        runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        errors: dict[str, list[float]] = {}
        for run in runs:
            actual = smoothed_final_loss(run["losses"])
            for name, projected in projections(run).items():
                errors.setdefault(name, []).append(100.0 * (projected / actual - 1.0))
        lines.append(f"\n{title}: {len(runs)} runs ({path.relative_to(ROOT)})")
        lines.append(f"  {'curve':36} {'within 5 %':>10} {'mean |error|':>12} {'mean error':>10}  (runs without one count as misses)")
        for name, values in errors.items():
            error = np.asarray(values)
            finite = error[np.isfinite(error)]
            within = int(np.sum(np.abs(finite) <= TARGET_PCT))
            lines.append(f"  {name:36} {within:>4}/{len(runs):<5} {np.mean(np.abs(finite)):>11.1f}% "
                         f"{np.mean(finite):>+9.1f}%")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
