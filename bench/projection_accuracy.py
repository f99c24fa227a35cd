"""How well the loss projected from the first 20 % of a demo run's steps predicts the loss the run really reached.

Each configuration is a real `elite-tui run` of the demo model (the CLI in its own process, which starts the training
child as it always does), then the projection the report makes (elite_core.report.projection_check: the first
`--fraction` of the steps, their learning rates, elite_core.estimates.project_loss) is compared with the actual final
loss. "Actual" is the smoothed final loss, the mean training loss of the last tenth of the steps
(estimates.smoothed_final_loss): one step's loss depends on which window it drew, so a single last step is noise.

Beside the projection (the steady fall, with the band of both fits: elite_core.estimates), each table scores the
flattening fit alone with its own band, which was the projection before (commit c68c5bd), from the same steps.
--noise-floor (with --from-fixture) asks what the noise alone allows: each run's whole curve is taken as the truth and
redrawn with its own noise, and the projection from the first fifth is scored on the draws.

The fine-tunes on an H200 (tests/data/projection-finetune-runs.jsonl, bench/results/projection-gpu-finetunes.txt) are
trained by bench/projection_gpu.sh, which runs this script once per run. The CPU runs below are of the random-weight
demo model, from before the demo shipped pretrained weights.

Train 2 seeds x 100/200 steps x the default tier and tier 1, and score them:

    python bench/projection_accuracy.py

More seeds on the same tree (the validation set in the results):

    python bench/projection_accuracy.py --repo elite-runs/projection-bench/repo --seeds 11 12 --tiers 2 1
        --runs-dir elite-runs/projection-validation --out /tmp/validation

The runs trained after the warm-up change was chosen (projection-fresh in the fixture; `git archive 6a489d2`, the
same tree as the others, unpacked in /tmp/proj-repo; their rows were appended to the fixture):

    python bench/projection_accuracy.py --repo /tmp/proj-repo --seeds 13 14 --tiers 2 1 --runs-dir /tmp/projection-fresh
        --out /tmp/projection-fresh --fixture /tmp/projection-fresh-fixture.jsonl

Score the kept runs again after a change of the fit, and refresh the test fixture:

    python bench/projection_accuracy.py --rescore --runs-dir elite-runs/projection-bench elite-runs/projection-validation
        --fixture tests/data/projection-demo-runs.jsonl

Score the runs the fixture holds, without their run directories (how the committed table is made):

    python bench/projection_accuracy.py --from-fixture tests/data/projection-demo-runs.jsonl

Training writes the runs under --runs-dir (default elite-runs/projection-bench) and scores them; --rescore scores every
finished run under the given directories without training. --fixture also writes each run's steps, losses and
learning rates (tests/test_projection.py fits them).

The training set is this repository's committed tree (`git archive HEAD`, so edits in progress do not change it),
unless --repo names another. Evaluation and compile-rate prompts are turned off: they do not touch the training losses
(no dropout, data order from the seed) and would only add minutes.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from elite_core import protocol  # noqa: E402
from elite_core.config import RunConfig  # noqa: E402
from elite_core.estimates import (fit_steady_fall, project_flattening,  # noqa: E402
                                  project_loss, smoothed_final_loss, steady_fall_points, tail_count)
from elite_core.report import PROJECTION_FROM_FRACTION, projection_check  # noqa: E402
from elite_core.training import epoch_order  # noqa: E402

WITHIN_PCT = 5.0
LATER_FRACTIONS = (0.3, 0.4, 0.5)
"""Also scored from these shares of the steps: how much of a run the projection needs to hold the target."""
DEFAULT_RUNS_DIR = PROJECT_ROOT / "elite-runs" / "projection-bench"
META_FILE = "bench-meta.json"
NO_SIDE_WORK = ("compile_eval_prompts=0", "eval_every_steps=0", "checkpoint_every_seconds=0")
BEFORE_SCHEDULE = {
    "projection-bench": "3/8 within 5 %, mean |error| 8.6 %, max 18.0 %",
    "projection-validation": "2/8 within 5 %, mean |error| 9.5 %, max 17.6 %",
    "projection-fresh": "3/8 within 5 %, mean |error| 9.9 %, max 24.5 %",
    "all": "8/24 within 5 %, mean |error| 9.3 %, max 24.5 %",
}
"""What the projection scored on these same runs before it knew the schedule (commit 544cae8: least squares over a
grid of power and exponential curves in the step count), for comparison."""
BEFORE_WARMUP = {
    "projection-bench": "3/8 within 5 %, mean |error| 8.0 %, max 14.8 %; actual inside the band 6/8",
    "projection-validation": "3/8 within 5 %, mean |error| 5.8 %, max 11.3 %; actual inside the band 7/8",
    "projection-fresh": "4/8 within 5 %, mean |error| 5.6 %, max 18.9 %; actual inside the band 8/8",
    "all": "10/24 within 5 %, mean |error| 6.5 %, max 18.9 %; actual inside the band 21/24",
}
"""What the same fit scored with the warm-up steps left out of it (commit 2bcc1aa), for comparison."""


def machine_name() -> str:
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.split("\n")
        if gpus[0].strip():
            return f"{len([g for g in gpus if g.strip()])} x {gpus[0].strip()}"
    except (OSError, subprocess.CalledProcessError):
        pass
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model}), no GPU used"


def snapshot_repo(destination: Path) -> tuple[Path, str]:
    """This repository's committed tree in `destination`, and its commit."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    marker = destination / ".snapshot-commit"
    if marker.is_file() and marker.read_text() == commit:
        return destination, commit
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, check=True).stdout
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(destination, filter="data")
    marker.write_text(commit)
    return destination, commit


def run_name(tier: str, steps: int, seed: int) -> str:
    return f"tier{tier}-steps{steps}-seed{seed}"


def train(repo: Path, runs_dir: Path, tier: str, steps: int, seed: int, settings: tuple[str, ...] = ()) -> Path:
    """One `elite-tui run` of the demo; `tier` "default" lets the CLI preselect it, as a user's run does."""
    name = run_name(tier, steps, seed)
    command = [sys.executable, "-m", "elite_tui.cli", "run", "--repo", str(repo), "--output", str(runs_dir),
               "--max-steps", str(steps), "--run-name", name, "--set", f"seed={seed}"]
    for setting in (*NO_SIDE_WORK, *settings):
        command += ["--set", setting]
    if tier != "default":
        command += ["--tier", tier]
    env = dict(os.environ)
    # The child is started with `python -m elite_core.child`: it must find this checkout whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    run_dir = runs_dir / name
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / f"{name}.log", "w", encoding="utf-8") as log:
        result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: elite-tui run exited with {result.returncode}; see {runs_dir / name}.log")
    return run_dir


def read_steps(run_dir: Path) -> tuple[list[protocol.StepMetrics], protocol.Finished | None]:
    """The step events in order (the last report of a step wins, should a resume repeat it) and the end event."""
    by_step: dict[int, protocol.StepMetrics] = {}
    finished = None
    for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            event = protocol.decode_event(line)
        except protocol.ProtocolError:
            continue
        if isinstance(event, protocol.StepMetrics):
            by_step[event.step] = event
        elif isinstance(event, protocol.Finished):
            finished = event
    return [by_step[step] for step in sorted(by_step)], finished


def score(run_dir: Path, fraction: float, label_tier: str, seed: int) -> dict:
    config = RunConfig.load(run_dir / "config.yaml")
    steps, finished = read_steps(run_dir)
    row = score_steps(steps, fraction, run_dir.name, seed)
    row.update(tier=config.tier, tier_choice=label_tier, window_tokens=config.window_tokens,
               train_s=round(finished.elapsed_s, 1) if finished else None)
    return row


def score_steps(steps: list[protocol.StepMetrics], fraction: float, name: str, seed: int) -> dict:
    """The scores of one run from its step events alone: the projection (the steady fall, with its band), and beside
    it the flattening fit alone with its own band, which is what the projection was before (commit c68c5bd)."""
    actual = smoothed_final_loss([s.loss for s in steps])
    count = int(len(steps) * fraction)
    checked = projection_check(steps, fraction)
    projection = checked[0] if checked is not None else None
    flattening = _flattening_projection(steps[:count], steps[-1].step)
    row = {
        "run": name,
        "seed": seed,
        "total_steps": steps[-1].step,
        "epochs": round(steps[-1].epoch, 3),
        "projected_from_steps": count,
        "projected": None, "band_low": None, "band_high": None, "error_pct": None, "within_5pct": False,
        "in_band": False, "fit": None, "fit_exponent": None,
        "actual_smoothed": round(actual, 5),
        "actual_standard_error_pct": round(_tail_standard_error_pct(steps), 2),
        "actual_last_step": round(steps[-1].loss, 5),
        "first_loss": round(steps[0].loss, 5),
        "flattening": None, "flattening_error_pct": None, "flattening_in_band": False,
        "error_pct_from": {f"{later:.0%}": _error_pct(steps, later) for later in LATER_FRACTIONS},
    }
    if projection is not None:
        error_pct = (projection.final_loss - actual) / actual * 100
        row.update(projected=round(projection.final_loss, 5), band_low=round(projection.final_loss_low, 5),
                   band_high=round(projection.final_loss_high, 5), error_pct=round(error_pct, 2),
                   within_5pct=abs(error_pct) <= WITHIN_PCT,
                   in_band=projection.final_loss_low <= actual <= projection.final_loss_high,
                   fit=projection.fit.kind, fit_exponent=round(projection.fit.exponent, 6))
    if flattening is not None:
        final, low, high = flattening
        row.update(flattening=round(final, 5), flattening_error_pct=_pct(final, actual),
                   flattening_in_band=low <= actual <= high)
    return row


def _flattening_projection(observed: list[protocol.StepMetrics], total: int) -> tuple[float, float, float] | None:
    """The flattening fit's final loss and band from the same steps: the projection before the steady fall."""
    projected = project_flattening([s.step for s in observed], [s.loss for s in observed], [s.lr for s in observed],
                                   total, [total])
    if projected is None:
        return None
    fit, low, high = projected
    return float(fit.loss_at([total])[0]), float(low[0]), float(high[0])


def _pct(projected: float | None, actual: float) -> float | None:
    return None if projected is None else round((projected - actual) / actual * 100, 2)


def _tail_standard_error_pct(steps: list[protocol.StepMetrics]) -> float:
    """The standard error of the smoothed final loss, in %: how exactly the last tenth's mean pins the actual."""
    tail = [s.loss for s in steps[-max(2, round(len(steps) * 0.1)):]]
    mean = sum(tail) / len(tail)
    variance = sum((loss - mean) ** 2 for loss in tail) / (len(tail) - 1)
    return math.sqrt(variance / len(tail)) / mean * 100


def _error_pct(steps: list[protocol.StepMetrics], fraction: float) -> float | None:
    checked = projection_check(steps, fraction)
    if checked is None:
        return None
    projection, actual = checked
    return round((projection.final_loss - actual) / actual * 100, 2)


def loss_series(run_dir: Path, row: dict) -> dict:
    steps, _ = read_steps(run_dir)
    return {"run": row["run"], "runs_dir": row["runs_dir"], "machine": row["machine"], "tier": row["tier"],
            "seed": row["seed"], "window_tokens": row["window_tokens"],
            "steps": [s.step for s in steps], "losses": [round(s.loss, 6) for s in steps],
            "lrs": [float(f"{s.lr:.6g}") for s in steps], "epochs": [round(s.epoch, 5) for s in steps],
            "windows": [list(s.windows) for s in steps]}


def rebuilt_windows(windows: int, seed: int, steps: list[int], per_step: int = 1) -> list[list[int]]:
    """The windows each step of a run that was not resumed trained on, for runs recorded before the steps reported
    them (StepMetrics.windows): the data order is the seed's permutation per epoch (training.epoch_order)."""
    stream = np.concatenate([epoch_order(windows, seed, epoch)
                             for epoch in range(max(steps) * per_step // windows + 1)])
    return [[int(index) for index in stream[(step - 1) * per_step:step * per_step]] for step in steps]


def fixture_windows(series: dict) -> list[list[int]]:
    """Each step's training windows: as recorded, or rebuilt (rebuilt_windows) where a step was one window and the
    run was not resumed, an epoch of n windows being n steps. Empty lists where neither is known."""
    if series.get("windows"):
        return series["windows"]
    one_window = series.get("tokens_per_update") in (None, series["window_tokens"])
    windows = round(1 / series["epochs"][0]) if series["epochs"] and series["epochs"][0] > 0 else 0
    if not one_window or not windows or series["steps"] != list(range(1, len(series["steps"]) + 1)):
        return [[] for _ in series["steps"]]
    return rebuilt_windows(windows, series["seed"], series["steps"])


def fixture_steps(series: dict) -> list[protocol.StepMetrics]:
    """A fixture line's steps as the step events they were recorded from (rates and timings not kept are 0)."""
    return [protocol.StepMetrics(step=step, epoch=epoch, loss=loss, lr=lr, tokens_per_s=0.0, memory_bytes=0,
                                 elapsed_s=0.0, windows=tuple(windows))
            for step, epoch, loss, lr, windows in zip(series["steps"], series["epochs"], series["losses"],
                                                      series["lrs"], fixture_windows(series))]


def score_fixture(path: Path, fraction: float) -> tuple[list[dict], list[str]]:
    """Every run of a fixture written by --fixture, grouped by the runs directory it was trained in."""
    groups: dict[str, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        series = json.loads(line)
        row = score_steps(fixture_steps(series), fraction, series["run"], series["seed"])
        row.update(tier=series["tier"], tier_choice=series["run"].split("-")[0].removeprefix("tier"),
                   window_tokens=series["window_tokens"], train_s=None, runs_dir=series["runs_dir"],
                   machine=series["machine"], tokens_per_update=series.get("tokens_per_update"))
        groups.setdefault(series["runs_dir"], []).append(row)
    rows, sections = [], []
    for runs_dir, group in groups.items():
        rows += group
        sections += [f"{runs_dir}: rescored from {path.name} (losses and rates as trained on {group[0]['machine']})",
                     format_table(group, fraction), ""]
    return rows, sections


NOISE_FLOOR_DRAWS = 200
NOISE_FLOOR_SCALES = (1.0, 0.5, 0.25)
"""The measured noise, and half and a quarter of it: what 4 and 16 times the tokens per update would leave."""


def noise_floor(path: Path, fraction: float, seed: int = 0) -> list[str]:
    """How often a projection could be within the target if the steady fall were exactly each run's curve.

    Each run's whole curve is fitted (the steady fall, all steps after the warm-up) and taken as the truth; its
    residuals (in log loss) are drawn again at random, scaled, onto that curve; the projection from the first
    `fraction` is scored against the mean of the last tenth of the same draw, as the real runs are. What misses here
    misses for the noise alone, whatever the curve model."""
    rng = np.random.default_rng(seed)
    lines = [f"{'run':<31}{'noise':>7}" + "".join(f"{f'x{scale:g}: within 5 %':>18}{'sd':>7}" for scale in NOISE_FLOOR_SCALES)]
    shares = {scale: [] for scale in NOISE_FLOOR_SCALES}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        series = json.loads(line)
        steps, losses, lrs = (np.asarray(series[key], dtype=float) for key in ("steps", "losses", "lrs"))
        steps = steps.astype(int)
        whole = fit_steady_fall(steps, losses, lrs)
        if whole is None:
            continue
        truth = whole.fit.loss_at(steps)
        fitted_steps, fitted_losses = steady_fall_points(steps, losses, lrs)
        residuals = np.log(fitted_losses) - np.log(whole.fit.loss_at(fitted_steps))
        count, tail = int(len(steps) * fraction), tail_count(len(steps))
        cells = ""
        for scale in NOISE_FLOOR_SCALES:
            errors = []
            for _ in range(NOISE_FLOOR_DRAWS):
                drawn = truth * np.exp(scale * rng.choice(residuals, size=len(steps)))
                projection = project_loss(steps[:count], drawn[:count], int(steps[-1]), lrs[:count])
                actual = float(drawn[-tail:].mean())
                errors.append(math.inf if projection is None else (projection.final_loss - actual) / actual * 100)
            errors = np.asarray(errors)
            share = float(np.mean(np.abs(errors) <= WITHIN_PCT))
            shares[scale].append(share)
            cells += f"{share:>18.0%}{np.std(errors[np.isfinite(errors)]):>6.1f}%"
        lines.append(f"{series['run'] + ' ' + series['runs_dir']:<31}{np.std(residuals) * 100:>6.1f}%{cells}")
    lines.append("mean share within 5 %: " + ", ".join(f"noise x{scale:g} {np.mean(values):.0%}"
                                                       for scale, values in shares.items() if values))
    lines.append(f"noise = the standard deviation of one step's log loss about the whole run's steady fall; each share "
                 f"of {NOISE_FLOOR_DRAWS} draws; sd = the spread of the error (no projection counts as a miss)")
    return lines


def format_table(rows: list[dict], fraction: float) -> str:
    header = (f"{'run':<31}{'tier':>5}{'steps':>6}{'epochs':>7}{'from':>5}{'projected':>10}{'band':>16}"
              f"{'actual':>9}{'+-se':>6}{'error':>9}  within 5 %  in band  {'flattening':>10}{'error':>9}  in its band")
    lines = [header]
    for row in rows:
        if row["projected"] is None:
            projected = f"{row['run']:<31}{row['tier']:>5}{row['total_steps']:>6}{row['epochs']:>7.2f}" \
                        f"{row['projected_from_steps']:>5}{'none':>10}{'':>16}{row['actual_smoothed']:>9.3f}" \
                        f"{row['actual_standard_error_pct']:>5.1f}%{'':>9}  {'NO':<10} {'no':<8}"
        else:
            band = f"{row['band_low']:.3f}-{row['band_high']:.3f}"
            projected = (f"{row['run']:<31}{row['tier']:>5}{row['total_steps']:>6}{row['epochs']:>7.2f}"
                         f"{row['projected_from_steps']:>5}{row['projected']:>10.3f}{band:>16}"
                         f"{row['actual_smoothed']:>9.3f}{row['actual_standard_error_pct']:>5.1f}%"
                         f"{row['error_pct']:>+8.1f}%  {'yes' if row['within_5pct'] else 'NO':<10} "
                         f"{'yes' if row['in_band'] else 'no':<8}")
        if row["flattening"] is None:
            lines.append(projected + f" {'none':>10}")
        else:
            lines.append(projected + f" {row['flattening']:>10.3f}{row['flattening_error_pct']:>+8.1f}%  "
                         f"{'yes' if row['flattening_in_band'] else 'no'}")
    lines.append(f"projection (steady fall): {summary(rows)}; actual inside the band "
                 f"{sum(row['in_band'] for row in rows)}/{len(rows)}")
    lines.append(f"flattening fit alone (the projection before): {summary(rows, 'flattening_error_pct')}; actual "
                 f"inside its band {sum(row['flattening_in_band'] for row in rows)}/{len(rows)}")
    if rows and rows[0].get("runs_dir") in BEFORE_WARMUP:
        lines.append(f"before (2bcc1aa, the warm-up left out of the fit): {BEFORE_WARMUP[rows[0]['runs_dir']]}")
    if rows and rows[0].get("runs_dir") in BEFORE_SCHEDULE:
        lines.append(f"before (544cae8, step-count curves, least squares): {BEFORE_SCHEDULE[rows[0]['runs_dir']]}")
    for later in LATER_FRACTIONS:
        later_errors = [row["error_pct_from"][f"{later:.0%}"] for row in rows]
        lines.append(f"from the first {later:.0%} instead: {errors_summary(later_errors)}")
    lines.append(f"projected from the first {fraction:.0%} of steps; actual = mean training loss of the last tenth of "
                 f"the steps, +-se its standard error (the reference is itself this uncertain); no projection counts "
                 f"as a miss")
    return "\n".join(lines)


def kept_runs(runs_dir: Path) -> list[tuple[Path, str, int]]:
    """(run directory, tier choice, seed) of every finished run under `runs_dir`, by name."""
    found = []
    for run_dir in sorted(runs_dir.iterdir()):
        if (run_dir / "events.jsonl").is_file() and (run_dir / "config.yaml").is_file():
            tier_choice = run_dir.name.split("-")[0].removeprefix("tier")
            found.append((run_dir, tier_choice, RunConfig.load(run_dir / "config.yaml").seed))
    return found


def summary(rows: list[dict], key: str = "error_pct") -> str:
    return errors_summary([row[key] for row in rows])


def errors_summary(errors_pct: list[float | None]) -> str:
    """How many of the runs' errors (None: no projection) are within the target, and their means."""
    signed = [error for error in errors_pct if error is not None]
    errors = [abs(error) for error in signed]
    within = f"{sum(e <= WITHIN_PCT for e in errors)}/{len(errors_pct)} within {WITHIN_PCT:.0f} %"
    if len(signed) < len(errors_pct):  # no projection counts as a miss; the means are over the projected runs
        within += f" ({len(errors_pct) - len(signed)} not projected)"
    if not signed:
        return within
    return (f"{within}, mean |error| {sum(errors) / len(errors):.1f} %, max {max(errors):.1f} %, "
            f"mean error {sum(signed) / len(signed):+.1f} % over the {len(signed)} projected")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="repository to train on (default: this repository's HEAD)")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 7])
    parser.add_argument("--tiers", nargs="+", default=["default", "1"],
                        help="'default' (the tier `elite-tui run` preselects here) and/or tier numbers")
    parser.add_argument("--fraction", type=float, default=PROJECTION_FROM_FRACTION)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override for every run (elite-tui run --set)")
    parser.add_argument("--runs-dir", type=Path, nargs="+", default=[DEFAULT_RUNS_DIR],
                        help="where the runs are kept (several with --rescore)")
    parser.add_argument("--rescore", action="store_true", help="score every kept run again instead of training")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "projection-cpu",
                        help="results prefix: writes PREFIX.jsonl and PREFIX.txt")
    parser.add_argument("--fixture", type=Path, help="also write each run's steps, losses and learning rates here")
    parser.add_argument("--from-fixture", type=Path, metavar="FILE",
                        help="score the runs a --fixture file holds instead of run directories (no training)")
    parser.add_argument("--noise-floor", action="store_true",
                        help="with --from-fixture: also score redrawn runs whose true curve is known (noise alone)")
    args = parser.parse_args(argv)

    if args.from_fixture:
        rows, sections = score_fixture(args.from_fixture, args.fraction)
        if len({row["runs_dir"] for row in rows}) > 1:
            sections += all_runs_summary(rows)
        if args.noise_floor:
            sections += ["", "What the noise allows: the same projection on each run's own steady fall, redrawn with "
                         "its measured noise", *noise_floor(args.from_fixture, args.fraction)]
        write_results(args.out, rows, "\n".join(sections))
        return 0

    if not args.rescore:
        if len(args.runs_dir) != 1:
            raise SystemExit("training writes to one --runs-dir")
        train_matrix(args)
    rows, series, sections = [], [], []
    for runs_dir in args.runs_dir:
        meta = json.loads((runs_dir / META_FILE).read_text(encoding="utf-8"))
        group = []
        for run_dir, tier_choice, seed in kept_runs(runs_dir):
            row = score(run_dir, args.fraction, tier_choice, seed)
            row.update(runs_dir=runs_dir.name, machine=meta["machine"])
            group.append(row)
            series.append(loss_series(run_dir, row))
        rows += group
        sections += [f"{runs_dir.name}: {meta['machine']}, {meta['date']}, training wall time {meta['wall_s']:.0f} s",
                     f"demo model (elite-tui run, no --model), repository: {meta['repo']}"
                     + (f"; --set {' '.join(meta['settings'])}" if meta.get("settings") else ""),
                     format_table(group, args.fraction), ""]
    if len(args.runs_dir) > 1:
        sections += all_runs_summary(rows)

    write_results(args.out, rows, "\n".join(sections))
    if args.fixture:
        args.fixture.parent.mkdir(parents=True, exist_ok=True)
        with open(args.fixture, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(item, separators=(",", ":")) + "\n" for item in series)
    return 0


def all_runs_summary(rows: list[dict]) -> list[str]:
    in_band = sum(row["in_band"] for row in rows)
    flattening_in_band = sum(row["flattening_in_band"] for row in rows)
    lines = ["all runs: " + summary(rows) + f"; actual inside the band {in_band}/{len(rows)}",
             "all runs, the flattening fit alone (the projection before): " + summary(rows, "flattening_error_pct")
             + f"; actual inside its band {flattening_in_band}/{len(rows)}"]
    batches: dict[int, list[dict]] = {}
    for row in rows:
        if row.get("tokens_per_update"):
            # Tiers 1 and 2 fill an update with 7 x 4,608 or 3 x 10,240 tokens: one batch size, to the nearest doubling.
            batches.setdefault(round(math.log2(row["tokens_per_update"] / 1000)), []).append(row)
    if len(batches) > 1:
        for doubling, group in sorted(batches.items()):
            lines.append(f"about {2 ** doubling}K tokens per update ({len(group)} runs): " + summary(group)
                         + f"; actual inside the band {sum(row['in_band'] for row in group)}/{len(group)}")
            lines.append("    the flattening fit alone: " + summary(group, "flattening_error_pct")
                         + f"; inside its band {sum(row['flattening_in_band'] for row in group)}/{len(group)}")
    if all(row.get("runs_dir") in BEFORE_WARMUP for row in rows):  # the recorded scores are of those runs only
        lines += ["all runs before (2bcc1aa, the warm-up left out of the fit): " + BEFORE_WARMUP["all"],
                  "all runs before (544cae8): " + BEFORE_SCHEDULE["all"]]
    return lines


def write_results(prefix: Path, rows: list[dict], text: str) -> None:
    print(text)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.with_suffix(".jsonl"), "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)
    prefix.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")


def train_matrix(args) -> None:
    """Every configuration of the matrix, one `elite-tui run` after another, and the notes a rescore reads."""
    runs_dir = args.runs_dir[0]
    repo = args.repo
    repo_note = str(repo)
    if repo is None:
        repo, commit = snapshot_repo(runs_dir / "repo")
        repo_note = f"this repository at {commit[:12]} (git archive HEAD)"
    started = time.time()
    for tier in args.tiers:
        for steps in args.steps:
            for seed in args.seeds:
                run_dir = runs_dir / run_name(tier, steps, seed)
                if run_dir.exists():
                    raise SystemExit(f"{run_dir} exists: remove it, or --rescore to score the kept runs")
                print(f"training {run_dir.name} ...", file=sys.stderr, flush=True)
                train(repo, runs_dir, tier, steps, seed, tuple(args.settings))
    meta = {"machine": machine_name(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "repo": repo_note, "settings": args.settings, "wall_s": round(time.time() - started, 1)}
    (runs_dir / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
