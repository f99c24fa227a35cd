"""Step 6: the pre-flight checks, one by one, each pass or fail with how to fix a failure."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Static
from textual.worker import Worker

from elite_core.units import format_coarse_duration
from elite_tui.format import format_rate
from elite_tui.screens.base import WizardScreen


class CheckDone(Message):
    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


class ChecksFinished(Message):
    pass


def result_markup(result: Any) -> str:
    mark = "[b green]PASS[/]" if result.ok else "[b red]FAIL[/]"
    text = f"{mark}  [b]{escape(result.name)}[/b]\n      {escape(result.message)}"
    if not result.ok and result.fix_hint:
        text += f"\n      [yellow]fix: {escape(result.fix_hint)}[/yellow]"
    return text


class PreflightScreen(WizardScreen):
    STEP_NAME = "Pre-flight checks"
    BINDINGS = [Binding("r", "rerun", "Run again")]

    def __init__(self) -> None:
        super().__init__()
        self.running = False

    def compose(self) -> ComposeResult:
        yield self.step_title()
        yield Static("", id="preflight-status")
        with VerticalScroll(id="checks"):
            yield Static("", id="check-results")
        yield self.error_panel()
        yield self.footer()

    def on_mount(self) -> None:
        # Results stay valid only for the config they checked; any change on an earlier screen reruns them.
        if self.state.preflight_results and self.state.preflight_config == self.state.config:
            self.show_results(finished=True)
        else:
            self.start_checks()

    def start_checks(self) -> None:
        self.state.preflight_results = []
        self.state.preflight_config = self.state.config
        self.running = True
        self.show_results(finished=False)
        self.run_checks()

    @work(thread=True, exclusive=True, exit_on_error=False, group="preflight", name="pre-flight checks")
    def run_checks(self) -> None:
        state = self.state
        for result in self.engine.run_preflight(state.config, state.profile, state.summary, state.shape):
            self.post_message(CheckDone(result))
        self.post_message(ChecksFinished())

    @on(CheckDone)
    def check_done(self, message: CheckDone) -> None:
        self.state.preflight_results.append(message.result)
        self.show_results(finished=False)

    @on(ChecksFinished)
    def checks_finished(self) -> None:
        self.running = False
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
        self.running = False
        self.show_results(finished=True)

    def action_rerun(self) -> None:
        if not self.running:
            self.clear_error()
            self.start_checks()

    def can_advance(self) -> bool:
        return not self.running and self.passed
