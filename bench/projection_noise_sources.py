"""Where the loss projection's error on the demo run comes from: the windows, and the schedule.

1. Each step's training loss is one window's loss, and windows differ: this scores every step's window with the
   model before training (the shipped demo weights, no adapter) and reports how much of the step-to-step scatter
   about the run's steady fall that window difficulty explains. What it explains is noise no curve fitted to the
   training loss can remove; what is left is the noise a projection from the first fifth would still face if the
   child also reported each window's difficulty.
2. The held-out loss scores the same windows at every evaluation, so it has no window noise at all. A run that
   evaluates at every step (`--set eval_every_steps=1`) gives its curve step by step; this projects it from the first
   fifth (estimates.project_loss, as the report projects the training loss) and compares with where it ended.
3. What a child that also reported difficulty would project: the steady fall fitted to loss / difficulty over the
   first fifth, times the difficulty of the last tenth's windows (known before they are trained on: the data order
   is the seed's), against the shipped projection of the raw loss, both scored on the mean loss of the last tenth.
   Run it on several demo runs (bench/projection_accuracy.py --runs-dir keeps them) for the summary line.

    elite-tui run --output /tmp/demo-eval --set eval_every_steps=1 --set compile_eval_prompts=0
    python bench/projection_noise_sources.py /tmp/demo-eval/run-* --out bench/results/projection-noise-sources-cpu
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from elite_core import protocol  # noqa: E402
from elite_core.config import DEMO_MODEL, RunConfig  # noqa: E402
from elite_core.dataset import IGNORE_INDEX, WindowDataset  # noqa: E402
from elite_core.estimates import (fit_steady_fall, project_loss,  # noqa: E402
                                  smoothed_final_loss, tail_count)
from elite_core.model_loading import load_causal_lm  # noqa: E402
from elite_core.report import PROJECTION_FROM_FRACTION, projection_check  # noqa: E402
from elite_core.runs import read_events  # noqa: E402
from projection_accuracy import errors_summary, machine_name, rebuilt_windows  # noqa: E402


@torch.no_grad()
def base_losses(config: RunConfig, data: WindowDataset, windows_per_step: list[list[int]]) -> np.ndarray:
    model = load_causal_lm(config.model, dtype=torch.float32, device="cpu")
    model.eval()
    losses = []
    for windows in windows_per_step:
        pairs = [data[i] for i in windows]
        ids = torch.from_numpy(np.stack([p[0] for p in pairs]))
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
        losses.append(float(model(input_ids=ids, labels=labels).loss))
    return np.asarray(losses)


def compressed_sizes(data: WindowDataset, windows_per_step: list[list[int]]) -> np.ndarray:
    """A free stand-in for difficulty: zlib's bytes per target token given the window's context (the last 30,000
    context tokens: zlib's window is 32 KB), for byte-level tokens."""
    sizes = []
    for windows in windows_per_step:
        total = 0.0
        for index in windows:
            ids, labels = data[index]
            target = labels != IGNORE_INDEX
            context = ids[~target][-30_000:].astype(np.uint8).tobytes()
            whole = context + ids[target].astype(np.uint8).tobytes()
            total += (len(zlib.compress(whole, 9)) - len(zlib.compress(context, 9))) / target.sum()
        sizes.append(total / len(windows))
    return np.asarray(sizes)


def explained_share(scatter: np.ndarray, covariate: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(share of the scatter's variance a line in log(covariate) explains, its slope, what is left)."""
    logged = np.log(covariate)
    slope, _ = np.polyfit(logged, scatter, 1)
    left = scatter - slope * (logged - logged.mean())
    return 1 - left.var() / scatter.var(), slope, left


def analyse(run_dir: Path) -> tuple[list[str], dict[str, float | None]]:
    config = RunConfig.load(run_dir / "config.yaml")
    events = read_events(run_dir)
    steps = [e for e in events if isinstance(e, protocol.StepMetrics)]
    evals = {e.step: e.loss for e in events if isinstance(e, protocol.EvalMetrics)}
    numbers = [s.step for s in steps]
    losses = np.asarray([s.loss for s in steps])
    lrs = [s.lr for s in steps]
    data = WindowDataset(run_dir / "dataset", "train", config.context_tokens, config.target_tokens)
    started = time.monotonic()
    windows = rebuilt_windows(len(data), config.seed, numbers, config.micro_batch * config.grad_accum)
    difficulty = base_losses(config, data, windows)
    seconds = time.monotonic() - started
    steady = fit_steady_fall(numbers, losses, lrs)
    lines = [f"{run_dir.name}: {len(steps)} steps of {config.micro_batch * config.grad_accum} window(s) of "
             f"{config.context_tokens:,} + {config.target_tokens:,} tokens, seed {config.seed}"]
    if steady is None:
        lines.append("1. the whole run's loss does not fall as a steady fall: no scatter to explain")
    else:
        scatter = np.log(losses) - np.log(steady.fit.loss_at(numbers))
        explained, slope, left = explained_share(scatter, difficulty)
        lines += [f"1. step loss about the run's steady fall: scatter {scatter.std():.1%} (of the loss, one sigma)",
                  f"   each step's windows scored by the model before training ({seconds:.0f} s for {len(steps)} "
                  f"steps): they explain {explained:.0%} of that scatter's variance (slope {slope:.2f} in log-log); "
                  f"{left.std():.1%} is left"]
    if steady is not None and config.model == DEMO_MODEL:  # byte tokens: zlib sees the text itself
        zlib_share, _, _ = explained_share(scatter, compressed_sizes(data, windows))
        lines.append(f"   zlib's compressed size of each target given its context explains {zlib_share:.0%}")
    ratio = losses / difficulty
    steady_ratio = fit_steady_fall(numbers, ratio, lrs)
    if steady_ratio is not None:
        lines.append("   the loss divided by its windows' difficulty scatters "
                     f"{np.std(np.log(ratio) - np.log(steady_ratio.fit.loss_at(numbers))):.1%} about its own "
                     "steady fall")
    errors = _normalised_projection(steps, losses, difficulty)
    lines.append("3. from the first fifth, against the last tenth's mean loss: " + ", ".join(
        f"{name} {error:+.1f}%" if error is not None else f"{name} none" for name, error in errors.items()))
    every_step = sorted(evals)
    if len(every_step) >= 0.9 * len(steps):
        lines += _held_out_lines(every_step, evals, numbers, lrs)
    return lines, errors


def _normalised_projection(steps: list[protocol.StepMetrics], losses: np.ndarray, difficulty: np.ndarray
                           ) -> dict[str, float | None]:
    """Errors in % of the shipped projection (the report's projection_check) and of the difficulty-normalised one,
    against the same actual (None: no projection)."""
    checked = projection_check(steps)
    actual = smoothed_final_loss(losses)
    count = int(len(steps) * PROJECTION_FROM_FRACTION)
    tail = tail_count(len(steps))
    numbers, rates = np.asarray([s.step for s in steps]), np.asarray([s.lr for s in steps])
    ratio = fit_steady_fall(numbers[:count], losses[:count] / difficulty[:count], rates[:count])
    normalised = float(np.mean(difficulty[-tail:] * ratio.fit.loss_at(numbers[-tail:]))) if ratio else None
    return {"shipped": (checked[0].final_loss - actual) / actual * 100 if checked else None,
            "difficulty-normalised": (normalised - actual) / actual * 100 if ratio else None}


def _held_out_lines(every_step: list[int], evals: dict[int, float], numbers: list[int], lrs: list[float]) -> list[str]:
    total = numbers[-1]
    rate_at = dict(zip(numbers, lrs))
    trained = [step for step in every_step if step > 0]
    held_out = np.asarray([evals[step] for step in trained])
    changes = np.diff(np.log(held_out))
    lines = [f"2. held-out loss at every step ({len(trained)} evaluations): {evals.get(0, float('nan')):.4f} before "
             f"training -> {held_out[-1]:.4f}; step-to-step change {changes.std():.1%} (one sigma)",
             "   by tenths of the run: " + ", ".join(f"{chunk.mean():.3f}" for chunk in
                                                    np.array_split(held_out, 10))]
    for fraction in (PROJECTION_FROM_FRACTION, 0.3, 0.5):
        shown = [step for step in trained if step <= fraction * total]
        projection = project_loss(shown, [evals[step] for step in shown], total, [rate_at[step] for step in shown])
        if projection is None:
            lines.append(f"   projected from the first {fraction:.0%}: none (no falling curve)")
            continue
        error = (projection.final_loss - held_out[-1]) / held_out[-1]
        lines.append(f"   projected from the first {fraction:.0%}: {projection.final_loss:.4f} (band "
                     f"{projection.final_loss_low:.3f}-{projection.final_loss_high:.3f}) against {held_out[-1]:.4f} "
                     f"reached ({error:+.1%})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", help="write the table to OUT.txt")
    args = parser.parse_args(argv)
    lines = [f"projection noise sources, on {machine_name()}", ""]
    errors: dict[str, list[float | None]] = {}
    for run_dir in args.run_dirs:
        run_lines, run_errors = analyse(run_dir)
        lines += run_lines + [""]
        for name, error in run_errors.items():
            errors.setdefault(name, []).append(error)
    lines += [f"{name}: {errors_summary(values)}" for name, values in errors.items()]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out + ".txt").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
