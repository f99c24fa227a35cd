"""The run report: RUN_DIR/report.md, written by the child when a run finishes, shown by the Report screen."""

from __future__ import annotations

import json
from pathlib import Path

from elite_core import protocol
from elite_core.config import RunConfig
from elite_core.runs import read_events
from elite_core.units import format_bytes

REPORT_FILE = "report.md"
PLAN_FILE = "plan.json"


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
    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir / "config.yaml")
    events = read_events(run_dir)
    if finished is None:
        finished = next((e for e in reversed(events) if isinstance(e, protocol.Finished)), None)
    steps = [e for e in events if isinstance(e, protocol.StepMetrics)]
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
        first, last = steps[0].loss, steps[-1].loss
        drop = (first - last) / first * 100 if first else 0.0
        rate = sum(s.tokens_per_s for s in steps) / len(steps)
        lines += [
            f"- training loss: {first:.4f} at step {steps[0].step} -> {last:.4f} at step {steps[-1].step} ({drop:.1f} % lower)",
            f"- mean throughput: {rate:,.0f} tokens/s",
        ]
    if evals:
        lines.append(f"- held-out loss: {evals[-1].loss:.4f} (perplexity {evals[-1].perplexity:.2f}) at step {evals[-1].step}")
    if steps and plan:
        measured = max(s.memory_bytes for s in steps)
        predicted = plan["predicted_peak_bytes"]
        error = (predicted - measured) / measured * 100 if measured else 0.0
        where = "GPU" if started and started.device == "cuda" else "process RAM"
        lines.append(f"- peak memory ({where}): predicted {format_bytes(predicted)}, measured {format_bytes(measured)} ({error:+.1f} %)")
    lines.append("")
    if plan:
        lines += ["## Hardware and plan", "", f"- hardware: {_hardware_line(plan['hardware'])}",
                  f"- tier {plan['tier']}: {config.context_tokens:,} context + {config.target_tokens:,} target tokens",
                  f"- options: {', '.join(plan['options']) or 'none'}", ""]
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
    lines += [f"- {name}: `{path}`" for name, path in artefacts]
    return "\n".join(lines) + "\n"


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
