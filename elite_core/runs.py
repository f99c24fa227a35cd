"""Run directories under an output directory: naming new ones, reading their history, finding the resumable ones."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from elite_core import protocol
from elite_core.checkpoints import latest_valid, read_state
from elite_core.child import EVENTS_FILE


@dataclass(frozen=True)
class RunInfo:
    run_dir: str
    name: str
    status: str
    """"finished", "stopped", "failed", "running or interrupted", "new"."""
    step: int
    total_steps: int
    resumable: bool
    """A verified checkpoint exists and the run did not finish."""
    updated: float
    live: bool = False
    """Its training child is running now (started by a controller that may be gone): attach, do not resume."""


def new_run_name(now: float | None = None) -> str:
    return time.strftime("run-%Y%m%d-%H%M%S", time.localtime(now))


def read_events(run_dir: Path) -> list[protocol.Event]:
    """Every readable event of a run, in order; a torn last line (the child was killed mid-write) is skipped."""
    path = Path(run_dir) / EVENTS_FILE
    events = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return events
    for line in lines:
        try:
            events.append(protocol.decode_event(line))
        except protocol.ProtocolError:
            continue
    return events


def surviving_steps(events) -> list[protocol.StepMetrics]:
    """The steps of the run's surviving history, in order. A resume from a checkpoint older than the last step (the
    newer one was torn by a kill, or never written) trains those steps again, and their new records replace the old."""
    kept: list[protocol.StepMetrics] = []
    for event in events:
        if isinstance(event, protocol.StepMetrics):
            while kept and kept[-1].step >= event.step:
                kept.pop()
            kept.append(event)
    return kept


def last_session_steps(events) -> list[protocol.StepMetrics]:
    """The steps since the last start (the last resume): one process's clock, for rates and the ETA."""
    starts = [index for index, event in enumerate(events) if isinstance(event, protocol.Started)]
    return surviving_steps(events[starts[-1]:] if starts else events)


def run_info(run_dir: Path) -> RunInfo:
    run_dir = Path(run_dir)
    events = read_events(run_dir)
    status, step, total = "new", 0, 0
    for event in events:
        if isinstance(event, protocol.Started):
            status, total = "running or interrupted", event.total_steps
        elif isinstance(event, protocol.StepMetrics):
            step = event.step
        elif isinstance(event, protocol.Finished):
            status = "stopped" if event.stopped_early else "finished"
            step = event.step
        elif isinstance(event, protocol.Error):
            status = "failed"
    checkpoint = latest_valid(run_dir)
    if checkpoint is not None and status != "finished":
        step = max(step, read_state(checkpoint)["step"])
    from elite_core.runner import live_child_pid

    live = live_child_pid(run_dir) is not None
    if live:
        status = "training"
    updated = max((p.stat().st_mtime for p in (run_dir / EVENTS_FILE, run_dir / "config.yaml") if p.exists()), default=0.0)
    return RunInfo(
        run_dir=str(run_dir), name=run_dir.name, status=status, step=step, total_steps=total,
        resumable=checkpoint is not None and status not in ("finished", "training"), updated=updated, live=live,
    )


def started_run(run_dir: Path) -> RunInfo | None:
    """The run a training child started in `run_dir`, or None when none did. A new run must not start where one did:
    its history, checkpoints, adapter and report would be mixed with the new run's or overwritten. A directory that
    only holds a dataset or a pre-flight's probe (a run that never started) may be reused: its dataset cache applies."""
    if not (Path(run_dir) / EVENTS_FILE).is_file():
        return None
    info = run_info(Path(run_dir))  # one read of the history: its status says whether a child reported there
    return info if info.status != "new" else None


def list_runs(output_dir: str | Path) -> list[RunInfo]:
    """Runs under output_dir, newest first. A missing or unreadable directory has no runs."""
    root = Path(output_dir)
    try:
        candidates = [p for p in root.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    except OSError:
        return []
    return sorted((run_info(p) for p in candidates), key=lambda info: info.updated, reverse=True)


def loss_history(run_dir: Path) -> list[tuple[int, float]]:
    return [(e.step, e.loss) for e in read_events(run_dir) if isinstance(e, protocol.StepMetrics)]

