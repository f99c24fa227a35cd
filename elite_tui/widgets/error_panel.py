"""A red panel that says what went wrong, where, and what to do, in place of a traceback screen."""

from __future__ import annotations

from rich.markup import escape
from textual.widgets import Static

TRACEBACK_TAIL_LINES = 6


class ErrorPanel(Static):
    DEFAULT_CSS = """
    ErrorPanel {
        display: none;
        border: round $error;
        color: $text;
        background: $error 15%;
        padding: 0 1;
        height: auto;
        max-height: 12;
    }
    ErrorPanel.-shown { display: block; }
    """

    def show(self, title: str, message: str, traceback: str = "", hint: str = "") -> None:
        lines = [f"[b]{escape(title)}[/b]", escape(message)]
        tail = [line for line in traceback.rstrip().splitlines() if line.strip()][-TRACEBACK_TAIL_LINES:]
        if tail:
            lines.append("[dim]" + escape("\n".join(tail)) + "[/dim]")
        if hint:
            lines.append(escape(hint))
        self.update("\n".join(lines))
        self.add_class("-shown")

    def clear(self) -> None:
        self.update("")
        self.remove_class("-shown")

    @property
    def shown(self) -> bool:
        return self.has_class("-shown")
