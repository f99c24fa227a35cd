"""The exact text the model will be trained on, decoded back from the token file, one file after another."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import Footer, Static, TextArea

PREVIEW_FILES = 200
"""Files decoded for the pager; the CLI's `dataset --preview FILE` writes all of them."""


class PreviewScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q", "close", "Close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        yield Static(f"Training text as decoded from the token file (first {PREVIEW_FILES} files); "
                     "PgUp/PgDn to page, Esc to close.", id="preview-title")
        yield TextArea(self.text, read_only=True, show_line_numbers=True, id="preview-text")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    def action_close(self) -> None:
        self.dismiss(None)
