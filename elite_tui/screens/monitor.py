"""Step 7: the training child's live numbers: loss and memory plots, speed, progress; checkpoint, stop, quit."""

from __future__ import annotations

import bisect
import time
from collections import deque
from typing import Any, Sequence

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Static
from textual.worker import Worker, WorkerState

from elite_core import protocol
from elite_tui.format import format_bytes, format_duration, format_loss, format_lr, format_rate
from elite_tui.screens.base import WizardScreen
from elite_tui.screens.confirm import ConfirmScreen
from elite_tui.widgets.training_plots import LossPlot, MemoryPlot

REDRAW_INTERVAL_S = 0.25
PROJECTION_REFIT_S = 2.0
"""The loss curves are refitted at most this often, not at every redraw: a fit of 500 points took 183 ms of the UI
thread on a 2-core CPU (73 % of it at 4 fits a second), and the projected final loss moves slowly."""
NOTES_KEPT = 4
QUIT_KILL_AFTER_S = 120.0
FINISHED_STATES = (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED)


class TrainingEvent(Message):
    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event


class MonitorScreen(WizardScreen):
    STEP_NAME = "Training"
    BINDINGS = [
        Binding("c", "checkpoint", "Checkpoint now"),
        Binding("s", "stop", "Stop (checkpoint first)"),
        Binding("q", "quit_monitor", "Quit"),
    ]

    def __init__(self, replay_events: Sequence[Any] | None = None) -> None:
        super().__init__()
        self.replay_events = replay_events
        self.process: Any = None
        self.running = False
        self.quit_requested = False
        self.started: Any = None
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.memory_bytes: list[int] = []
        self.elapsed_s: list[float] = []
        self.lrs: list[float] = []
        self.session_start = 0
        """Where the steps of the latest start (a resume) begin in the lists above: the ETA reads one process's clock."""
        self.steps_per_epoch: int | None = None
        self.projection: Any = None
        self.epoch_advice: Any = None
        self.eval_steps: list[int] = []
        self.eval_losses: list[float] = []
        self.notes: deque[str] = deque(maxlen=NOTES_KEPT)
        self.plots_dirty = False
        self.projection_fitted_at = float("-inf")

    def compose(self) -> ComposeResult:
        yield self.step_title()
        yield Static("step -", id="stats")
        with Horizontal(id="plots"):
            yield LossPlot(id="loss-plot")
            yield MemoryPlot(id="memory-plot")
        yield Static("Starting the training process...", id="notes")
        yield self.error_panel()
        yield self.footer()

    def on_mount(self) -> None:
        if self.replay_events is not None:
            for event in self.replay_events:
                self.handle_event(event)
            self.redraw_plots()
            return
        self.set_interval(REDRAW_INTERVAL_S, self.redraw_if_dirty)
        self.running = True
        self.train(self.state.config, self.state.resume)

    @work(thread=True, exclusive=True, exit_on_error=False, group="training", name="training")
    def train(self, config: Any, resume: bool) -> None:
        if self.state.attach:
            self.process = self.engine.attach_training(config.run_dir)
        else:
            self.process = self.engine.start_training(config, resume=resume, launch=self.state.launch)
        for event in self.process.events():
            self.post_message(TrainingEvent(event))

    @on(TrainingEvent)
    def training_event(self, message: TrainingEvent) -> None:
        self.handle_event(message.event)

    def handle_event(self, event: Any) -> None:
        if isinstance(event, protocol.Started):
            self.started = event
            self.session_start = len(self.steps)
            where = "RAM" if event.device == "cpu" else "VRAM"
            self.query_one(MemoryPlot).memory_name = where
            resumed = f", resumed at step {event.start_step}" if event.start_step else ""
            self.note(f"started on {event.device}: {event.trainable_params:,} of {event.total_params:,} "
                      f"parameters trained, {event.tokens_per_step:,} tokens per step{resumed}")
            self.query_one("#stats", Static).update(f"step {event.start_step}/{event.total_steps}")
        elif isinstance(event, protocol.StepMetrics):
            self.state.last_step = event
            if self.steps and event.step <= self.steps[-1]:
                # Resumed from an older checkpoint: the steps trained again replace the ones a kill cut off.
                cut = bisect.bisect_left(self.steps, event.step)
                for series in (self.steps, self.losses, self.memory_bytes, self.elapsed_s, self.lrs):
                    del series[cut:]
                self.session_start = min(self.session_start, cut)
            self.steps.append(event.step)
            self.losses.append(event.loss)
            self.memory_bytes.append(event.memory_bytes)
            self.elapsed_s.append(event.elapsed_s)
            self.lrs.append(event.lr)
            if event.epoch > 0:
                self.steps_per_epoch = max(1, round(event.step / event.epoch))
            self.plots_dirty = True
            self.show_step(event)
        elif isinstance(event, protocol.EvalMetrics):
            self.eval_steps.append(event.step)
            self.eval_losses.append(event.loss)
            self.plots_dirty = True
            self.note(f"eval at step {event.step}: loss {format_loss(event.loss)}, perplexity {event.perplexity:.2f}")
        elif isinstance(event, protocol.CheckpointSaved):
            self.note(f"checkpoint ({event.reason}) at step {event.step} in {format_duration(event.seconds)}: "
                      f"{event.path}")
        elif isinstance(event, protocol.Warning):
            self.note(f"[yellow]warning:[/yellow] {escape(event.message)}", markup=True)
        elif isinstance(event, protocol.Error):
            self.training_ended()
            self.state.training_error = event
            where = self.started.run_dir if self.started else str(self.state.config.run_dir)
            title = {"oom": "Out of memory", "crash": "The training process crashed"}.get(event.kind, "Training failed")
            self.show_error(title, event.message, event.traceback,
                            f"Run directory: {where} (config, events, checkpoints and child.log are kept there).")
        elif isinstance(event, protocol.Finished):
            self.training_ended()
            self.state.finished = event
            ending = "stopped early" if event.stopped_early else "finished"
            self.note(f"[b]{ending}[/b] at step {event.step}, final loss {format_loss(event.final_loss)}, "
                      f"{format_duration(event.elapsed_s)}. Ctrl+N shows the report.", markup=True)

    def show_step(self, event: Any) -> None:
        total = self.started.total_steps if self.started else 0
        start_step = self.started.start_step if self.started else 0
        eta = self.eta_s(total) if event.step > start_step else None
        parts = [
            f"[b]step {event.step}/{total}[/b]" if total else f"[b]step {event.step}[/b]",
            f"loss [b]{format_loss(event.loss)}[/b]",
            format_rate(event.tokens_per_s),
            f"lr {format_lr(event.lr)}",
            f"epoch {event.epoch:.2f}",
            f"ETA {format_duration(eta)}",
            f"mem {format_bytes(event.memory_bytes)}",
        ]
        if self.projection is not None:
            projection = self.projection
            parts.append(f"final ~{format_loss(projection.final_loss)} "
                         f"({format_loss(projection.final_loss_low)}-{format_loss(projection.final_loss_high)})")
        if self.epoch_advice is not None:
            parts.append(f"epochs worth it {self.epoch_advice.epochs} ({self.epoch_advice.basis})")
        self.query_one("#stats", Static).update("  ".join(parts))

    def eta_s(self, total_steps: int) -> float | None:
        """From the wall time between recent steps, so setup time and the slow first step do not skew it."""
        from elite_core.estimates import estimate_eta

        if not total_steps:
            return None
        eta = estimate_eta(self.steps[self.session_start:], self.elapsed_s[self.session_start:], total_steps)
        return eta.remaining_s if eta is not None else None

    def update_projection(self) -> None:
        """The projected final loss and the epochs worth training (the projection and the advice: estimates)."""
        from elite_core.estimates import advise_epochs, project_loss

        total = self.started.total_steps if self.started else 0
        if not total or not self.steps:
            self.projection = self.epoch_advice = None
            return
        # A fit over at most ~2,000 points keeps a redraw cheap on runs of many thousand steps.
        stride = max(1, len(self.steps) // 2000)
        self.projection = project_loss(self.steps[::stride], self.losses[::stride], total, self.lrs[::stride])
        self.epoch_advice = advise_epochs(self.steps, self.losses, self.lrs, self.steps_per_epoch,
                                          self.eval_steps, self.eval_losses) if self.steps_per_epoch else None

    def note(self, text: str, markup: bool = False) -> None:
        self.notes.append(text if markup else escape(text))
        self.query_one("#notes", Static).update("\n".join(self.notes))

    def redraw_if_dirty(self) -> None:
        # Steps can arrive many times a second; plots redraw at most 1 / REDRAW_INTERVAL_S times a second.
        if self.plots_dirty:
            self.redraw_plots()

    def redraw_plots(self, final: bool = False) -> None:
        self.plots_dirty = False
        now = time.monotonic()
        if final or now - self.projection_fitted_at >= PROJECTION_REFIT_S:
            self.projection_fitted_at = now
            self.update_projection()
            if self.state.last_step is not None:  # the stats line shows the new projection and advice now
                self.show_step(self.state.last_step)
        self.query_one(LossPlot).draw(self.steps, self.losses, self.eval_steps, self.eval_losses, self.projection)
        predicted = self.started.predicted_peak_bytes if self.started else None
        self.query_one(MemoryPlot).draw(self.steps, self.memory_bytes, predicted)

    def training_ended(self) -> None:
        self.running = False
        self.redraw_plots(final=True)
        self.refresh_bindings()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        super().on_worker_state_changed(event)
        if event.worker.group != "training" or event.state not in FINISHED_STATES:
            return
        if event.state == WorkerState.ERROR:
            self.running = False
        if self.quit_requested:
            self.app.exit(1 if self.state.training_error else 0)

    def action_checkpoint(self) -> None:
        if self.running and self.process is not None and self.process.checkpoint_now():
            self.note("checkpoint requested...")

    def action_stop(self) -> None:
        if self.running and self.process is not None and self.process.stop():
            self.note("stopping: saving a checkpoint first...")

    def action_quit_monitor(self) -> None:
        if not self.running:
            self.app.exit(1 if self.state.training_error else 0)
            return

        def answered(stop: bool | None) -> None:
            if stop:
                self.quit_requested = True
                self.action_stop()
                self.set_timer(QUIT_KILL_AFTER_S, self.kill_and_exit)

        self.app.push_screen(ConfirmScreen("Training is running. Save a checkpoint, stop it and quit?"), answered)

    def kill_and_exit(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
        self.app.exit(1)

    def on_unmount(self) -> None:
        # Leaving the app any other way still stops the child gracefully, so the run stays resumable.
        if self.process is not None and self.process.is_alive():
            self.process.stop()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("checkpoint", "stop"):
            return True if self.running else None
        if action == "back":
            return False
        return super().check_action(action, parameters)

    def can_advance(self) -> bool:
        return self.state.finished is not None and not self.running
