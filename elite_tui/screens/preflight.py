"""Step 6: the pre-flight checks, one by one, each pass or fail with how to fix a failure; once they pass, an optional
learning-rate sweep (key l) whose suggestion the run can take over (key a)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Static
from textual.worker import Worker
from textual_plotext import PlotextPlot

from elite_core.lr_finder import LrFindRequest, describe_lr_find
from elite_core.units import format_coarse_duration
from elite_tui.format import format_rate
from elite_tui.screens.base import WizardScreen


class CheckDone(Message):
    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


class ChecksFinished(Message):
    pass


class LrFindProgress(Message):
    def __init__(self, step: Any, total_steps: int) -> None:
        super().__init__()
        self.step = step
        """protocol.StepMetrics of one step of the sweep."""
        self.total_steps = total_steps


class LrFindEnded(Message):
    def __init__(self, result: Any = None, error: str = "", hint: str = "") -> None:
        super().__init__()
        self.result = result
        """lr_finder.LrFindResult, or None when the sweep failed (error and hint say why)."""
        self.error = error
        self.hint = hint


class LrFindPlot(PlotextPlot):
    """Loss against learning rate on a log axis: each step's loss, the smoothed curve, the suggestion as a line."""

    def draw(self, result: Any) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(f"loss by learning rate (line: suggested {result.suggested_lr:.1e})")
        # log10 of the rate on a linear axis: plotext's xscale("log") takes the log again on every redraw
        exponents = [math.log10(lr) for lr in result.lrs]
        finite = [(x, loss) for x, loss in zip(exponents, result.losses) if math.isfinite(loss)]
        if finite:
            plt.scatter([x for x, _ in finite], [loss for _, loss in finite], marker="dot", color="gray")
        plt.plot(exponents, list(result.smoothed), marker="braille")
        plt.vline(math.log10(result.suggested_lr), "green")
        decades = list(range(math.floor(exponents[0]), math.ceil(exponents[-1]) + 1))
        plt.xticks(decades, [f"1e{decade}" for decade in decades])
        smoothed = [loss for loss in result.smoothed if math.isfinite(loss)]
        if smoothed:
            # A diverged step can be 10x the rest: zoom on the smoothed curve, the part that decides
            margin = 0.05 * (max(smoothed) - min(smoothed)) + 1e-3
            plt.ylim(min(smoothed) - margin, max(smoothed) + margin)
        self.refresh()


def result_markup(result: Any) -> str:
    mark = "[b green]PASS[/]" if result.ok else "[b red]FAIL[/]"
    text = f"{mark}  [b]{escape(result.name)}[/b]\n      {escape(result.message)}"
    if not result.ok and result.fix_hint:
        text += f"\n      [yellow]fix: {escape(result.fix_hint)}[/yellow]"
    return text


class PreflightScreen(WizardScreen):
    STEP_NAME = "Pre-flight checks"
    BINDINGS = [Binding("r", "rerun", "Run again"), Binding("l", "find_lr", "Find LR"),
                Binding("a", "use_lr", "Use found LR")]
    DEFAULT_CSS = """
    PreflightScreen #lr-find { display: none; height: auto; margin-top: 1; }
    PreflightScreen #lr-find-plot { display: none; height: 14; }
    PreflightScreen #lr-find.-shown, PreflightScreen #lr-find-plot.-shown { display: block; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.running = False
        self.finding_lr = False
        self.closed = False
        """Left or quit: the checks' thread (which cannot be stopped) runs no further check, the probe included."""
        self.lr_result: Any = None
        """The last sweep's lr_finder.LrFindResult on this screen."""

    def compose(self) -> ComposeResult:
        yield self.step_title()
        yield Static("", id="preflight-status")
        with VerticalScroll(id="checks"):
            yield Static("", id="check-results")
            yield Static("", id="lr-find")
            yield LrFindPlot(id="lr-find-plot")
        yield self.error_panel()
        yield self.footer()

    def on_mount(self) -> None:
        # Results stay valid only for the config they checked, and only once every check ran (preflight_config is
        # set when they finish); any change on an earlier screen, or checks left half-way, reruns them.
        if self.state.preflight_results and self.state.preflight_config == self.state.config:
            self.show_results(finished=True)
        else:
            self.start_checks()

    def on_unmount(self) -> None:
        # Left (Esc) or quit while a probe or a sweep trains: its result is thrown away, so end it now rather than
        # let it train beside the next child, or hold the exit until it ends.
        self.closed = True
        if self.running or self.finding_lr:
            self.engine.end_child_jobs()

    def start_checks(self) -> None:
        self.state.preflight_results = []
        self.state.preflight_config = None
        self.running = True
        self.show_results(finished=False)
        self.run_checks()

    @work(thread=True, exclusive=True, exit_on_error=False, group="preflight", name="pre-flight checks")
    def run_checks(self) -> None:
        state = self.state
        for result in self.engine.run_preflight(state.config, state.profile, state.summary, state.shape):
            if self.closed:  # the checks run one by one: a probe not started yet never starts
                return
            self.post_message(CheckDone(result))
        self.post_message(ChecksFinished())

    @on(CheckDone)
    def check_done(self, message: CheckDone) -> None:
        self.state.preflight_results.append(message.result)
        self.show_results(finished=False)

    @on(ChecksFinished)
    def checks_finished(self) -> None:
        self.running = False
        self.state.preflight_config = self.state.config
        self.show_results(finished=True)
        self.refresh_bindings()

    def show_results(self, finished: bool) -> None:
        results = self.state.preflight_results
        body = "\n".join(result_markup(result) for result in results)
        if not finished:
            body += ("\n" if body else "") + "[dim]....  running the next check[/dim]"
        self.query_one("#check-results", Static).update(body)
        if not finished:
            status = f"Running the checks ({len(results)} done)..."
        elif self.passed:
            status = "[b green]All checks passed.[/] " + self.probe_summary() + "Ctrl+N starts training."
        else:
            status = "[b red]Some checks failed.[/] Fix them (Esc goes back) and press r to run them again."
        self.query_one("#preflight-status", Static).update(status)

    def probe_summary(self) -> str:
        """What the run will use and how fast the probe found it, or nothing when no probe ran."""
        check = self.probe_check
        if check is None or check.config is None:
            return ""
        config, rate = check.config, check.probe.tokens_per_s
        text = f"Training uses micro-batch {config.micro_batch} x {config.grad_accum} accumulation"
        if rate > 0:
            text += f", {format_rate(rate)} measured"
            summary = self.state.summary
            if summary is not None:
                from elite_core.estimates import epoch_seconds, epoch_tokens_from_summary

                tokens = epoch_tokens_from_summary(summary).tokens_per_epoch(config.window_tokens)
                text += f", one epoch ~{format_coarse_duration(epoch_seconds(tokens, rate))}"
        return escape(text) + ". "

    @property
    def probe_check(self) -> Any:
        """The check that ran the probes, once it passed."""
        return next((result for result in self.state.preflight_results if result.ok and result.probe is not None),
                    None)

    def run_config(self) -> Any:
        """The config training will start with: the one the probes confirmed once they passed, else the wizard's."""
        check = self.probe_check
        return check.config if check is not None and check.config is not None else self.state.config

    def advance(self) -> None:
        check = self.probe_check
        if check is not None and check.config is not None:
            # The probes confirmed a micro-batch: the run takes it, and these results stay valid for that config.
            self.state.config = check.config
            self.state.preflight_config = check.config
        super().advance()

    @property
    def passed(self) -> bool:
        results = self.state.preflight_results
        return bool(results) and all(result.ok for result in results)

    def worker_failed(self, worker: Worker, error: BaseException) -> None:
        if worker.group == "lr-find":
            self.finding_lr = False
            self.show_lr_find("[b red]The learning-rate sweep failed[/] (the error is below).")
            return
        self.running = False
        self.show_results(finished=True)

    def action_rerun(self) -> None:
        if not self.running and not self.finding_lr:
            self.clear_error()
            self.start_checks()

    def can_advance(self) -> bool:
        return not self.running and not self.finding_lr and self.passed

    def can_find_lr(self) -> bool:
        """The sweep runs real steps like the probe: only after the checks passed, and never beside another child."""
        return not self.running and not self.finding_lr and self.passed

    def can_use_lr(self) -> bool:
        result = self.lr_result
        return (result is not None and not self.finding_lr
                and self.run_config().learning_rate != self.accepted_rate(result))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "find_lr":
            return True if self.can_find_lr() else None
        if action == "use_lr":
            return self.can_use_lr()  # hidden until there is a suggestion to take
        return super().check_action(action, parameters)

    def action_find_lr(self) -> None:
        if not self.can_find_lr():
            return
        self.clear_error()
        self.finding_lr = True
        self.lr_result = None
        self.query_one("#lr-find-plot").remove_class("-shown")
        request = LrFindRequest()
        self.show_lr_find(f"Sweeping the learning rate from {request.min_lr:.0e} to {request.max_lr:.0e} over "
                          f"{request.steps} real steps: loading the model...")
        self.refresh_bindings()
        self.find_lr(self.run_config(), request)

    @work(thread=True, exclusive=True, exit_on_error=False, group="lr-find", name="learning-rate finder")
    def find_lr(self, config: Any, request: LrFindRequest) -> None:
        from elite_core import protocol
        from elite_core.lr_finder import LrFindFailed
        from elite_core.preflight import find_learning_rate

        def progress(event: Any) -> None:
            if isinstance(event, protocol.StepMetrics):
                self.post_message(LrFindProgress(event, request.steps))

        try:
            result = find_learning_rate(config, request, on_event=progress)
        except LrFindFailed as exc:
            self.post_message(LrFindEnded(error=exc.message, hint=exc.hint))
            return
        self.post_message(LrFindEnded(result))

    @on(LrFindProgress)
    def lr_find_progress(self, message: LrFindProgress) -> None:
        step = message.step
        self.show_lr_find(f"Sweeping the learning rate: step {step.step}/{message.total_steps} at {step.lr:.1e}, "
                          f"loss {step.loss:.3f}")

    @on(LrFindEnded)
    def lr_find_ended(self, message: LrFindEnded) -> None:
        self.finding_lr = False
        if message.result is None:
            self.show_lr_find("[b red]The learning-rate sweep failed[/] (the error is below).")
            self.show_error(f"{self.STEP_NAME}: learning-rate finder failed", message.error, hint=message.hint)
        else:
            self.lr_result = message.result
            self.show_lr_result()
            plot = self.query_one("#lr-find-plot", LrFindPlot)
            plot.add_class("-shown")
            plot.draw(message.result)
            self.call_after_refresh(plot.scroll_visible)
        self.refresh_bindings()

    @staticmethod
    def accepted_rate(result: Any) -> float:
        return min(result.suggested_lr, 1.0)  # the config takes at most 1

    def show_lr_result(self) -> None:
        result = self.lr_result
        current = self.run_config().learning_rate
        text = escape(describe_lr_find(result))
        if current == self.accepted_rate(result):
            text += " [b green]The run uses it.[/]"
        else:
            text += f" The run uses {current:.1e}: [b]press a to use the suggestion.[/b]"
        self.show_lr_find(text)

    def action_use_lr(self) -> None:
        if not self.can_use_lr():
            return
        self.use_learning_rate(self.accepted_rate(self.lr_result))
        self.show_lr_result()
        self.refresh_bindings()

    def use_learning_rate(self, rate: float) -> None:
        """The run takes the rate; the checks stay valid (a learning rate changes no memory or step time), so the
        probe's confirmed config takes it too, or advancing would put the old rate back."""
        state = self.state
        state.preflight_results = [
            dataclasses.replace(result, config=result.config.replace(learning_rate=rate))
            if result.config is not None else result
            for result in state.preflight_results
        ]
        state.config = state.config.replace(learning_rate=rate)
        state.preflight_config = state.config

    def show_lr_find(self, markup: str) -> None:
        panel = self.query_one("#lr-find", Static)
        panel.update(markup)
        panel.add_class("-shown")
        panel.scroll_visible()
