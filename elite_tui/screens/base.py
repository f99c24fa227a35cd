"""What every wizard step shares: a step title, the error panel, Next/Back keys and one handler for failed workers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState

from elite_tui.widgets.error_panel import ErrorPanel

if TYPE_CHECKING:
    from elite_tui.app import EliteApp
    from elite_tui.engine import Engine
    from elite_tui.state import WizardState


class WizardScreen(Screen):
    STEP_NAME = ""
    BINDINGS = [
        Binding("ctrl+n", "next", "Next", priority=True),
        Binding("escape", "back", "Back"),
    ]

    @property
    def wizard(self) -> "EliteApp":
        return self.app  # type: ignore[return-value]

    @property
    def state(self) -> "WizardState":
        return self.wizard.state

    @property
    def engine(self) -> "Engine":
        return self.wizard.engine

    def step_title(self) -> Static:
        number = self.wizard.step_number(self)
        return Static(f"[b]{number}/8  {self.STEP_NAME}[/b]", id="step-title", markup=True)

    def error_panel(self) -> ErrorPanel:
        return ErrorPanel(id="error")

    def footer(self) -> Footer:
        return Footer()

    def show_error(self, title: str, message: str, traceback: str = "", hint: str = "") -> None:
        self.query_one(ErrorPanel).show(title, message, traceback, hint)

    def clear_error(self) -> None:
        self.query_one(ErrorPanel).clear()

    def can_advance(self) -> bool:
        return True

    def advance(self) -> None:
        """Store what this step decided in the wizard state, then move on."""
        self.wizard.next_step(self)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "next":
            # None greys the binding out in the footer instead of hiding it.
            return True if self.can_advance() else None
        if action == "back":
            return self.wizard.step_number(self) > 1
        return True

    def action_next(self) -> None:
        if self.can_advance():
            self.advance()

    def action_back(self) -> None:
        if self.wizard.step_number(self) > 1:
            self.app.pop_screen()

    def worker_failed(self, worker: Worker, error: BaseException) -> None:
        """Screens override this to reset their own widgets; the message shows either way."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            message = getattr(error, "message", None) or str(error) or type(error).__name__
            self.show_error(f"{self.STEP_NAME}: {event.worker.name or 'task'} failed", message)
            self.worker_failed(event.worker, error)
        self.refresh_bindings()
