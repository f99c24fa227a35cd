"""The run report: RUN_DIR/report.md, written by the child when a run finishes, shown by the Report screen."""

from __future__ import annotations

import json
import math
from pathlib import Path

from elite_core import protocol
from elite_core.config import RunConfig
from elite_core.runs import last_session_steps, read_events, surviving_steps
from elite_core.units import format_bytes, format_duration

REPORT_FILE = "report.md"
PLAN_FILE = "plan.json"
PLOTS_DIR = "plots"
PLOT_FILES = {"loss": "loss.png", "memory": "memory.png", "throughput": "throughput.png"}
ETA_CHECK_AFTER_S = 30.0
PROJECTION_FROM_FRACTION = 0.2


def write_plan(run_dir: Path, profile, plan) -> None:
    """What the planner predicted, kept beside the run so the report compares it with what happened."""
    data = {
        "hardware": profile.to_dict(),
        "tier": plan.tier.number,
        "options": list(plan.options),
        "predicted_peak_bytes": plan.breakdown.total_bytes,
        "budget_bytes": plan.budget_bytes,
        "components": plan.breakdown.components(),
        "note": plan.note,
    }
    (Path(run_dir) / PLAN_FILE).write_text(json.dumps(data, indent=1), encoding="utf-8")


def _hardware_line(hardware: dict) -> str:
    gpus = hardware.get("gpus") or []
    if gpus:
        gpu = gpus[0]
        return f"{len(gpus)} x {gpu['name']} ({format_bytes(gpu['total_bytes'])}), driver {gpu['driver']}"
    return f"CPU only: {hardware.get('cpu_name', '?')}, {hardware.get('cpu_cores', '?')} cores, {format_bytes(hardware.get('ram_total_bytes', 0))} RAM"


def render_report(run_dir: Path, finished: protocol.Finished | None = None) -> str:
    from elite_core.hardware import PLANNING_PROFILE_FILE
    from elite_core.probe import PROBE_FILE

    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir / "config.yaml")
    events = read_events(run_dir)
    if finished is None:
        finished = next((e for e in reversed(events) if isinstance(e, protocol.Finished)), None)
    steps = surviving_steps(events)  # after a resume from an older checkpoint, the steps trained again count
    evals = [e for e in events if isinstance(e, protocol.EvalMetrics)]
    saved = [e for e in events if isinstance(e, protocol.CheckpointSaved)]
    started = next((e for e in events if isinstance(e, protocol.Started)), None)
    try:
        plan = json.loads((run_dir / PLAN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        plan = None

    lines = [f"# elite-tui report: {run_dir.name}", ""]
    if finished is not None:
        state = "stopped early" if finished.stopped_early else "finished"
        lines += [f"Run {state} after {finished.step} steps in {finished.elapsed_s:.0f} s.", ""]
    lines += ["## Results", ""]
    if steps:
        # Tokens over time: the harmonic mean of the step rates (their plain mean overweights the fast steps).
        timed = [s for s in steps if s.tokens_per_s > 0]
        rate = len(timed) / sum(1.0 / s.tokens_per_s for s in timed) if timed else 0.0
        lines += [_training_loss_line(steps), f"- mean throughput: {rate:,.0f} tokens/s"]
        lines += probe_lines(run_dir, rate)
    if evals:
        lines.append(_held_out_line(evals))
    if steps and plan:
        measured = max(s.memory_bytes for s in steps)
        predicted = plan["predicted_peak_bytes"]
        error = (predicted - measured) / measured * 100 if measured else 0.0
        where = "GPU" if started and started.device == "cuda" else "process RAM"
        lines.append(f"- peak memory ({where}): predicted {format_bytes(predicted)}, measured {format_bytes(measured)} ({error:+.1f} %)")
    lines.append("")
    lines += _estimates_section(steps, evals, started, last_session_steps(events))
    lines += _evaluation_section(run_dir)
    plots = write_plots(run_dir, steps, evals, plan, started)
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{name}]({path.relative_to(run_dir)})" for name, path in plots.items()]
        lines.append("")
    if plan:
        lines += ["## Hardware and plan", "", f"- hardware: {_hardware_line(plan['hardware'])}",
                  f"- tier {plan['tier']}: {config.context_tokens:,} context + {config.target_tokens:,} target tokens",
                  f"- options: {', '.join(plan['options']) or 'none'}"]
        if plan.get("note"):
            lines.append(f"- why this tier: {plan['note']}")
        lines.append("")
        lines += ["| component | predicted |", "|---|---|"]
        lines += [f"| {name} | {format_bytes(value)} |" for name, value in plan["components"]]
        lines.append("")
    lines += ["## Configuration", "", "```yaml", config.to_yaml().rstrip(), "```", ""]
    dataset_text = _dataset_section(run_dir / "dataset")
    if dataset_text:
        lines += ["## Dataset", "", "```", dataset_text.rstrip(), "```", ""]
    lines += ["## Artefacts", ""]
    artefacts = [("run directory", run_dir), ("run config", run_dir / "config.yaml"),
                 ("events", run_dir / "events.jsonl"), ("child log", run_dir / "child.log")]
    if finished is not None and finished.adapter_path:
        artefacts.append(("final adapter", Path(finished.adapter_path)))
    if saved:
        artefacts.append(("last checkpoint", Path(saved[-1].path)))
    artefacts.append(("dataset", run_dir / "dataset"))
    artefacts += [(f"{name} plot", path) for name, path in plots.items()]
    for name, relative in (("compile-rate evaluation", "evaluation.json"), ("TensorBoard events", "tensorboard"),
                           ("merged model", "merged"), ("plan", PLAN_FILE),
                           ("hardware profile planned with", PLANNING_PROFILE_FILE), ("pre-flight probe results", PROBE_FILE)):
        if (run_dir / relative).exists():
            artefacts.append((name, run_dir / relative))
    artefacts.append(("this report", run_dir / REPORT_FILE))
    lines += [f"- {name}: `{path}`" for name, path in artefacts]
    return "\n".join(lines) + "\n"


def probe_lines(run_dir: Path, training_tokens_per_s: float) -> list[str]:
    """The pre-flight probe's measured rate beside the training's, when a probe ran for this run."""
    from elite_core.probe import PROBE_FILE, ProbeResult

    probe = ProbeResult.load(run_dir / PROBE_FILE)
    if probe is None or probe.tokens_per_s <= 0:
        return []
    error = (probe.tokens_per_s - training_tokens_per_s) / training_tokens_per_s * 100 if training_tokens_per_s else 0.0
    return [f"- pre-flight probe: {probe.tokens_per_s:,.0f} tokens/s at micro-batch {probe.micro_batch} "
            f"({error:+.1f} % against the training's mean)"]


def _dataset_section(dataset_dir: Path) -> str:
    from elite_core.dataset import DatasetError, format_summary, load_summary

    try:
        return format_summary(load_summary(dataset_dir))
    except (DatasetError, OSError):
        return ""


def write_report(run_dir: Path, finished: protocol.Finished | None = None) -> Path:
    path = Path(run_dir) / REPORT_FILE
    path.write_text(render_report(run_dir, finished), encoding="utf-8")
    return path


def eta_check(steps: list[protocol.StepMetrics], total_steps: int, after_s: float = ETA_CHECK_AFTER_S):
    """The ETA the monitor showed at the first step `after_s` into training, beside the time the rest really took:
    (elapsed_s at that step, predicted remaining_s, actual remaining_s), or None for runs too short to tell."""
    from elite_core.estimates import estimate_eta

    if len(steps) < 3:
        return None
    origin = steps[0].elapsed_s
    for index, step in enumerate(steps[:-1]):
        if step.elapsed_s - origin >= after_s:
            eta = estimate_eta([s.step for s in steps[:index + 1]], [s.elapsed_s for s in steps[:index + 1]],
                               total_steps)
            if eta is None:
                return None
            return step.elapsed_s, eta.remaining_s, steps[-1].elapsed_s - step.elapsed_s
    return None


def _change(before: float, after: float) -> str:
    if not before:
        return ""
    change = (after - before) / before * 100
    return f" ({abs(change):.1f} % {'lower' if change < 0 else 'higher'})"


def _training_loss_line(steps: list[protocol.StepMetrics]) -> str:
    """First and last tenth of the steps, each a mean: one step's loss says mostly which window it drew."""
    from elite_core.estimates import smoothed_final_loss, tail_count

    finite = [s for s in steps if math.isfinite(s.loss)]
    if not finite:
        return f"- training loss: not finite at any of the {len(steps)} steps (the training diverged)"
    left_out = len(steps) - len(finite)
    diverged = (f"; {left_out} step{'s' if left_out > 1 else ''} with a non-finite loss (inf or NaN) left out"
                if left_out else "")
    steps = finite
    count = tail_count(len(steps))
    first = sum(s.loss for s in steps[:count]) / count
    last = smoothed_final_loss([s.loss for s in steps])
    change = _change(first, last) + diverged
    if count == 1:
        return f"- training loss: {first:.4f} at step {steps[0].step} -> {last:.4f} at step {steps[-1].step}{change}"
    return (f"- training loss (mean of each tenth of the steps): {first:.4f} in steps "
            f"{steps[0].step}-{steps[count - 1].step} -> {last:.4f} in steps {steps[-count].step}-{steps[-1].step}{change}")


def _held_out_line(evals: list[protocol.EvalMetrics]) -> str:
    last = evals[-1]
    line = f"- held-out loss: {last.loss:.4f} (perplexity {last.perplexity:.2f}) at step {last.step}"
    if evals[0].step == 0 and last.step > 0:
        before = evals[0]
        line += f"; before training {before.loss:.4f} (perplexity {before.perplexity:.2f}){_change(before.loss, last.loss)}"
    return line


WIDE_BAND = 0.4
"""A band wider than this share of the projected loss gets a line saying why it is wide and what narrows it."""


def projection_check(steps: list[protocol.StepMetrics], fraction: float = PROJECTION_FROM_FRACTION):
    """The loss projected from the first `fraction` of the steps beside the smoothed final loss actually reached."""
    from elite_core.estimates import project_loss, smoothed_final_loss

    count = int(len(steps) * fraction)
    if count < 2:
        return None
    projection = project_loss([s.step for s in steps[:count]], [s.loss for s in steps[:count]], steps[-1].step,
                              [s.lr for s in steps[:count]])
    if projection is None:
        return None
    return projection, smoothed_final_loss([s.loss for s in steps])


def _estimates_section(steps: list[protocol.StepMetrics], evals: list[protocol.EvalMetrics],
                       started: protocol.Started | None,
                       session_steps: list[protocol.StepMetrics] | None = None) -> list[str]:
    """`session_steps`: the steps of the last start (default: all), whose clock the ETA check reads."""
    if not steps or started is None:
        return []
    from elite_core.estimates import MIN_FIT_POINTS, fit_steady_fall, steady_fall_points

    lines = []
    total = steps[-1].step
    eta = eta_check(steps if session_steps is None else session_steps, total)
    if eta is not None:
        at_s, predicted_s, actual_s = eta
        error = (predicted_s - actual_s) / actual_s * 100 if actual_s > 0 else 0.0
        lines.append(f"- time: at {at_s:.0f} s the ETA said {format_duration(predicted_s)} to go; the rest took "
                     f"{format_duration(actual_s)} ({error:+.1f} %)")
    checked = projection_check(steps)
    first_fifth = steps[:int(len(steps) * PROJECTION_FROM_FRACTION)]
    fittable, _ = steady_fall_points([s.step for s in first_fifth], [s.loss for s in first_fifth],
                                     [s.lr for s in first_fifth])
    if checked is None and len(fittable) >= MIN_FIT_POINTS:
        # Enough steps after the warm-up for a fit, so the loss did not fall: say so rather than leave the line out.
        lines.append(f"- loss projection from the first {PROJECTION_FROM_FRACTION:.0%} of steps: none (no falling curve "
                     "fits those steps' losses)")
    if checked is not None:
        projection, actual = checked
        error = (projection.final_loss - actual) / actual * 100 if actual else 0.0
        lines.append(f"- loss projected from the first {PROJECTION_FROM_FRACTION:.0%} of steps: "
                     f"{projection.final_loss:.4f} (band {projection.final_loss_low:.4f} to "
                     f"{projection.final_loss_high:.4f}); reached {actual:.4f}, mean of the last tenth ({error:+.1f} %)")
        wide = projection.final_loss_high - projection.final_loss_low > WIDE_BAND * projection.final_loss
        # The scatter about the whole run's curve: a fifth's few points underrate it.
        whole_run = (fit_steady_fall([s.step for s in steps], [s.loss for s in steps], [s.lr for s in steps])
                     if wide else None)
        if whole_run is not None:
            lines.append(f"  - the band is wide: one step's loss scatters {whole_run.fit.residual_std:.0%} about the "
                         "run's curve. More tokens per update (grad_accum) narrow it: on the recorded fine-tunes 4 "
                         "times as many halved the scatter")
    lines += _epochs_lines(steps, evals)
    if not lines:
        return []
    return ["## Estimates against what happened", "", *lines, ""]


def _epochs_lines(steps: list[protocol.StepMetrics], evals: list[protocol.EvalMetrics]) -> list[str]:
    from elite_core.estimates import FLAT_IMPROVEMENT, advise_epochs

    steps_per_epoch = _steps_per_epoch(steps)
    if steps_per_epoch is None:
        return []
    advice = advise_epochs([s.step for s in steps], [s.loss for s in steps], [s.lr for s in steps], steps_per_epoch,
                           [e.step for e in evals], [e.loss for e in evals])
    if advice is None:
        return []
    flat = f"one more would lower it by less than {FLAT_IMPROVEMENT:.0%}"
    why = {
        "held-out rose": f"the held-out loss was lowest at step {advice.lowest_step} and rose after it: later steps "
                         "overfit",
        "held-out flat": "the held-out loss did not fall after the warm-up",
        "held-out loss": f"from the held-out loss: {flat}, a repeated epoch counted at its decaying worth",
        "training loss": f"from the first epoch's training loss (no held-out evaluations): {flat}, a repeated epoch "
                         "counted at its decaying worth",
    }[advice.basis]
    return [f"- recommended epochs: {advice.epochs} ({why})"]


def _steps_per_epoch(steps: list[protocol.StepMetrics]) -> int | None:
    last = steps[-1]
    return max(1, round(last.step / last.epoch)) if last.epoch > 0 else None


def _evaluation_section(run_dir: Path) -> list[str]:
    from elite_core.evaluation import MAX_COMPLETION_TOKENS, read_evaluation

    evaluation = read_evaluation(run_dir)
    if evaluation is None:
        return []
    completion_tokens = min(evaluation["target_tokens"], MAX_COMPLETION_TOKENS)
    lines = ["## Compile rate on held-out files", "",
             f"Greedy completions of up to {completion_tokens:,} tokens (KV cache) after up to "
             f"{evaluation['context_tokens']:,} tokens of context; the first unit written must parse in its file.", "",
             "| | prompts | parse | syntax error | unfinished | rate |", "|---|---|---|---|---|---|"]
    for key in ("before", "after"):
        result = evaluation[key]
        lines.append(f"| {key} training | {result['prompts']} | {result['parses']} | {result['syntax_errors']} | "
                     f"{result['unfinished']} | {result['rate']:.0%} |")
    lines.append("")
    return lines


def write_plots(run_dir: Path, steps: list[protocol.StepMetrics], evals: list[protocol.EvalMetrics],
                plan: dict | None, started: protocol.Started | None) -> dict[str, Path]:
    """PNG plots under RUN_DIR/plots: loss with the projection from the first fifth of the run, memory predicted vs
    measured, throughput. Empty when matplotlib is missing or there are no steps."""
    if not steps:
        return {}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    from elite_core.estimates import loss_axis_range

    plots_dir = Path(run_dir) / PLOTS_DIR
    plots_dir.mkdir(exist_ok=True)
    numbers = [s.step for s in steps]
    paths = {}

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(numbers, [s.loss for s in steps], lw=1, label="train loss")
    if evals:
        axes.plot([e.step for e in evals], [e.loss for e in evals], "o", label="held-out loss")
    checked = projection_check(steps)
    if checked is not None:
        projection, _ = checked
        axes.plot(projection.curve_steps, projection.curve_loss, "--", label=f"projection from first {PROJECTION_FROM_FRACTION:.0%}")
        axes.fill_between(projection.curve_steps, projection.curve_low, projection.curve_high, alpha=0.2, label="band")
        axes.set_ylim(*loss_axis_range([*(s.loss for s in steps), *(e.loss for e in evals), *projection.curve_loss],
                                       projection.curve_low, projection.curve_high))
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    paths["loss"] = _save(figure, plots_dir / PLOT_FILES["loss"])

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(numbers, [s.memory_bytes / 2**30 for s in steps], label="measured")
    predicted = plan["predicted_peak_bytes"] if plan else (started.predicted_peak_bytes if started else 0)
    if predicted:
        axes.axhline(predicted / 2**30, color="red", ls="--", label="predicted peak")
    where = "GPU" if started and started.device == "cuda" else "process RAM"
    axes.set_xlabel("step")
    axes.set_ylabel(f"{where} GiB")
    axes.legend()
    paths["memory"] = _save(figure, plots_dir / PLOT_FILES["memory"])

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(numbers, [s.tokens_per_s for s in steps], lw=1, label="per step")
    if len(steps) > 1:
        mean_rate = [(steps[i].step - steps[0].step) / max(steps[i].elapsed_s - steps[0].elapsed_s, 1e-9)
                     for i in range(1, len(steps))]
        tokens_per_step = started.tokens_per_step if started else 0
        if tokens_per_step:
            axes.plot(numbers[1:], [r * tokens_per_step for r in mean_rate], label="running mean (wall time)")
    axes.set_xlabel("step")
    axes.set_ylabel("tokens/s")
    axes.legend()
    paths["throughput"] = _save(figure, plots_dir / PLOT_FILES["throughput"])
    return paths


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
