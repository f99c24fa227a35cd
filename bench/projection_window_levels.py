"""A loss projection with a level per training window, for runs whose windows repeat: tried, not shipped.

Each step's loss is the loss of the windows it drew, and windows differ (on the GPU demo up to 2.5x). Once every
window has been seen (the first epoch has ended) a level per window is identifiable from the training loss alone:
log(loss) = level[window] - exponent * log(x), fitted by least squares over the first fifth, warm-up included, with x
the learning-rate schedule's forward area (or the step count). The projection is the training set's average curve,
mean(exp(level)) * x**-exponent, at the last step; its band is Student's t standard errors of that fit, also holding
the same fit in the other abscissa. The steps report their windows (protocol.StepMetrics.windows); fixtures
recorded before that are rebuilt from the seed (projection_accuracy.fixture_windows). A variant scores the same fit at
the last tenth's own windows (WindowLevels.tail_mean), which the seed's data order fixes before training starts.

It is scored against the shipped projection (report.projection_check: the steady fall of the raw loss) on the same
runs, with the same actual (the mean loss of the last tenth):

    python bench/projection_window_levels.py bench/results/projection-gpu-demo50-h100-fixture.jsonl
        bench/results/projection-cpu-smallrepo-fixture.jsonl --out bench/results/projection-window-levels
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from elite_core.estimates import smoothed_final_loss, tail_count  # noqa: E402
from elite_core.report import PROJECTION_FROM_FRACTION, projection_check  # noqa: E402
from elite_core.schedule import LrSchedule, schedule_from_reported_lrs  # noqa: E402
from projection_accuracy import errors_summary, fixture_steps  # noqa: E402

MIN_DOF = 2
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 8: 2.31, 10: 2.23, 20: 2.09, 30: 2.04}


def t_975(dof: int) -> float:
    return next((value for limit, value in T_975.items() if dof <= limit), 2.0)


@dataclass(frozen=True)
class WindowLevels:
    levels: np.ndarray
    """One per window in `seen`."""
    seen: tuple[int, ...]
    exponent: float
    covariance: np.ndarray
    """Of (levels..., exponent)."""
    dof: int
    residual_std: float
    schedule: LrSchedule | None

    def abscissa(self, steps) -> np.ndarray:
        steps = np.asarray(steps, dtype=int)
        return self.schedule.forward_area(steps) if self.schedule is not None else steps.astype(float)

    def average_at(self, step: int) -> tuple[float, float, float]:
        """The training set's average loss after `step` steps, with its band's low and high edges."""
        x = float(self.abscissa([step])[0])
        centre = float(np.exp(self.levels).mean()) * x ** -self.exponent
        gradient = np.concatenate([np.exp(self.levels) / np.exp(self.levels).sum(), [-math.log(x)]])
        spread = t_975(self.dof) * math.sqrt(max(float(gradient @ self.covariance @ gradient), 0.0))
        return centre, centre * math.exp(-spread), centre * math.exp(spread)

    def tail_mean(self, steps, windows) -> float:
        """The mean loss of the given steps, each at the levels of the windows it will train on (the seed fixes the
        data order in advance), a window the fit has not seen at the average level."""
        average = float(np.exp(self.levels).mean())
        position = {index: column for column, index in enumerate(self.seen)}
        losses = [np.mean([math.exp(self.levels[position[w]]) if w in position else average for w in step_windows])
                  * float(self.abscissa([step])[0]) ** -self.exponent
                  for step, step_windows in zip(steps, windows)]
        return float(np.mean(losses))


def fit_window_levels(steps, losses, windows, epochs, schedule: LrSchedule | None) -> WindowLevels | None:
    """None before the first epoch has ended, with fewer than MIN_DOF points to spare, or while the loss does not
    fall. A step of several windows has each at its share."""
    if not len(steps) or max(epochs) < 1.0 or not all(len(w) for w in windows):
        return None
    seen = sorted({index for step_windows in windows for index in step_windows})
    column = {index: position for position, index in enumerate(seen)}
    dof = len(steps) - len(seen) - 1
    if dof < MIN_DOF:
        return None
    design = np.zeros((len(steps), len(seen) + 1))
    for row, step_windows in enumerate(windows):
        for index in step_windows:
            design[row, column[index]] += 1.0 / len(step_windows)
    x = schedule.forward_area(steps) if schedule is not None else np.asarray(steps, dtype=float)
    design[:, -1] = -np.log(x)
    log_losses = np.log(np.asarray(losses, dtype=float))
    coefficients, _, rank, _ = np.linalg.lstsq(design, log_losses, rcond=None)
    if rank < design.shape[1] or coefficients[-1] <= 0:
        return None
    residuals = log_losses - design @ coefficients
    noise_variance = float(residuals @ residuals) / dof
    return WindowLevels(levels=coefficients[:-1], seen=tuple(seen), exponent=float(coefficients[-1]),
                        covariance=noise_variance * np.linalg.inv(design.T @ design), dof=dof,
                        residual_std=math.sqrt(noise_variance), schedule=schedule)


def score(series: dict, fixture: str) -> dict:
    steps = fixture_steps(series)
    count = int(len(steps) * PROJECTION_FROM_FRACTION)
    total = steps[-1].step
    actual = smoothed_final_loss([s.loss for s in steps])
    shown = steps[:count]
    columns = ([s.step for s in shown], [s.loss for s in shown], [s.windows for s in shown], [s.epoch for s in shown])
    schedule = schedule_from_reported_lrs([s.step for s in steps], [s.lr for s in steps], total)
    row = {"run": series["run"], "group": f"{fixture}, peak rate {max(series['lrs']):.0e}",
           "epochs": steps[-1].epoch, "actual": actual}
    shipped = projection_check(steps)
    row["shipped"] = (shipped[0].final_loss - actual) / actual * 100 if shipped else None
    row["shipped_in_band"] = bool(shipped and shipped[0].final_loss_low <= actual <= shipped[0].final_loss_high)
    in_area, in_steps = fit_window_levels(*columns, schedule), fit_window_levels(*columns, None)
    whole = fit_window_levels([s.step for s in steps], [s.loss for s in steps], [s.windows for s in steps],
                              [s.epoch for s in steps], schedule)
    row["whole_run_scatter"] = whole.residual_std if whole else None
    for name, fitted in (("area", in_area), ("steps", in_steps)):
        row[name] = (fitted.average_at(total)[0] - actual) / actual * 100 if fitted else None
    tail = steps[-tail_count(len(steps)):]
    row["own_windows"] = ((in_area.tail_mean([s.step for s in tail], [s.windows for s in tail]) - actual) / actual * 100
                          if in_area else None)
    if in_area is not None:
        edges = [in_area.average_at(total)[1:]] + ([in_steps.average_at(total)[1:]] if in_steps else [])
        row["area_in_band"] = min(e[0] for e in edges) <= actual <= max(e[1] for e in edges)
    else:
        row["area_in_band"] = False
    return row


def render(rows: list[dict]) -> list[str]:
    def pct(value):
        return f"{value:+.1f}%" if value is not None else "none"

    lines = [f"{'run':<28}{'epochs':>7}{'actual':>8}{'shipped':>10}{'band':>6}{'levels, area':>14}"
             f"{'band':>6}{'levels, steps':>15}{'own windows':>13}{'whole-run scatter':>19}"]
    for row in rows:
        scatter = f"{row['whole_run_scatter']:.1%}" if row["whole_run_scatter"] is not None else "none"
        lines.append(f"{row['run']:<28}{row['epochs']:>7.2f}{row['actual']:>8.3f}"
                     f"{pct(row['shipped']):>10}{'yes' if row['shipped_in_band'] else 'no':>6}"
                     f"{pct(row['area']):>14}{'yes' if row['area_in_band'] else 'no':>6}{pct(row['steps']):>15}"
                     f"{pct(row['own_windows']):>13}{scatter:>19}")
    for name in dict.fromkeys(row["group"] for row in rows):
        group = [row for row in rows if row["group"] == name]
        lines += ["", f"{name} ({len(group)} runs):"]
        lines += [f"  shipped (steady fall): {errors_summary([r['shipped'] for r in group])}; band "
                  f"{sum(r['shipped_in_band'] for r in group)}/{len(group)}",
                  f"  levels per window, area: {errors_summary([r['area'] for r in group])}; band "
                  f"{sum(r['area_in_band'] for r in group)}/{len(group)}",
                  f"  levels per window, steps: {errors_summary([r['steps'] for r in group])}",
                  f"  levels per window, area, at the last tenth's own windows: "
                  f"{errors_summary([r['own_windows'] for r in group])}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixtures", nargs="+", type=Path)
    parser.add_argument("--out", help="write the table to OUT.txt")
    args = parser.parse_args(argv)
    rows = [score(json.loads(line), path.stem) for path in args.fixtures
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    text = "\n".join(render(rows))
    print(text)
    if args.out:
        Path(args.out + ".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
