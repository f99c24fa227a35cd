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
            status = "[b green]All checks passed.[/] Ctrl+N starts training."
        else:
            status = "[b red]Some checks failed.[/] Fix them (Esc goes back) and press r to run them again."
        self.query_one("#preflight-status", Static).update(status)

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
