"""Step 5: build the training set from the repository, with progress; then what went in and what was left out."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import ProgressBar, Static
from textual.worker import Worker, get_current_worker

from elite_tui.format import format_bytes, format_count
from elite_tui.screens.base import WizardScreen
from elite_tui.widgets.key_values import key_value_table

SKIPPED_SHOWN = 12


class DatasetProgress(Message):
    def __init__(self, progress: Any) -> None:
        super().__init__()
        self.progress = progress


class DatasetReady(Message):
    def __init__(self, summary: Any) -> None:
        super().__init__()
        self.summary = summary


def progress_text(progress: Any) -> str:
    return (f"Reading files: {progress.files_done:,}/{progress.files_total:,}, "
            f"{format_bytes(progress.bytes_done)} of {format_bytes(progress.bytes_total)} "
            f"({progress.mb_per_s:.1f} MB/s)")


def summary_renderable(summary: Any, window_tokens: int) -> Group:
    windows = summary.train_windows(window_tokens)
    overview = key_value_table(
        [
            ("files", format_count(summary.files)),
            ("size", format_bytes(summary.bytes)),
            ("tokens", format_count(summary.tokens)),
            ("train / eval tokens", f"{format_count(summary.train_tokens)} / {format_count(summary.eval_tokens)}"),
            ("train / eval files", f"{format_count(summary.train_files)} / {format_count(summary.eval_files)}"),
            (f"windows of {window_tokens:,}", format_count(windows)),
            ("duplicates removed", format_count(summary.duplicates_removed)),
            ("secrets excluded", format_count(len(summary.secrets_excluded))),
            ("skipped files", format_count(len(summary.skipped))),
        ]
    )
    languages = Table(box=None, pad_edge=False, header_style="bold")
    for column, justify in (("language", "left"), ("files", "right"), ("size", "right"), ("tokens", "right")):
        languages.add_column(column, justify=justify)
    for stats in summary.languages:
        languages.add_row(stats.language, format_count(stats.files), format_bytes(stats.bytes), format_count(stats.tokens))
    parts: list[Any] = [overview, Text(""), languages]
    left_out = [*summary.secrets_excluded, *summary.skipped]
    if left_out:
        parts.append(Text(""))
        parts.append(Text("Left out, and why:", style="bold"))
        for item in left_out[:SKIPPED_SHOWN]:
            parts.append(Text.from_markup(f"  {escape(item.path)}  [dim]{escape(item.reason)}[/dim]"))
        if len(left_out) > SKIPPED_SHOWN:
            parts.append(Text(f"  ... and {len(left_out) - SKIPPED_SHOWN} more", style="dim"))
    if windows == 0:
        parts.insert(0, Text(f"No training window of {window_tokens:,} tokens: pick a lower tier or a larger repo.\n",
                             style="bold red"))
    return Group(*parts)


class DatasetScreen(WizardScreen):
    STEP_NAME = "Dataset"
    BINDINGS = [Binding("r", "rebuild", "Rebuild"), Binding("p", "preview", "Preview text")]

    def compose(self) -> ComposeResult:
        yield self.step_title()
        # Text, not markup: a path may hold brackets ("[WIP] app")
        yield Static(Text(f"Building the training set from {self.state.config.repo} ..."), id="dataset-status")
        yield ProgressBar(total=1.0, show_eta=False, id="dataset-progress")
        with VerticalScroll(id="dataset-scroll"):
            yield Static("", id="dataset-summary")
        yield self.error_panel()
        yield self.footer()

    building = False
    """A build (or a resumed run's read of its own set) is under way in the worker."""

    def on_mount(self) -> None:
        if self.state.summary is not None:
            self.show_summary(self.state.summary)
        else:
            self.start_build()

    def start_build(self) -> None:
        self.building = True
        self.refresh_bindings()
        self.build()

    @work(thread=True, exclusive=True, exit_on_error=False, group="dataset", name="building the dataset")
    def build(self) -> None:
        # A resumed run goes on with the windows it trained on (its saved data position indexes them): its own
        # training set, not one rebuilt from the repository as it is now (built only if that one is gone).
        summary = self.engine.existing_dataset(self.state.config) if self.state.resume else None
        if summary is None:
            # Quitting or leaving the screen cancels the worker: the build stops at its next chunk of files, not
            # after the whole repository.
            from elite_core.dataset import BuildCancelled

            worker = get_current_worker()
            try:
                summary = self.engine.build_dataset(self.state.config,
                                                    lambda progress: self.post_message(DatasetProgress(progress)),
                                                    cancelled=lambda: worker.is_cancelled)
            except BuildCancelled:
                return
        self.post_message(DatasetReady(summary))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # One build at a time (a thread cannot be stopped: a second one beside it broke both); the preview once
        # there is a training set to show.
        if action == "rebuild":  # a resumed run keeps its own set: a rebuild would hand it other windows
            return None if self.building or self.state.resume else True
        if action == "preview":
            return True if self.state.summary is not None and not self.building else None
        return super().check_action(action, parameters)

    def action_preview(self) -> None:
        if self.state.summary is not None:
            self.load_preview()

    @work(thread=True, exclusive=True, exit_on_error=False, group="preview", name="decoding the training text")
    def load_preview(self) -> None:
        from elite_tui.screens.preview import PREVIEW_FILES, PreviewScreen

        text = self.engine.preview_text(self.state.config, PREVIEW_FILES)
        self.app.call_from_thread(self.app.push_screen, PreviewScreen(text))

    @on(DatasetProgress)
    def dataset_progress(self, message: DatasetProgress) -> None:
        self.query_one("#dataset-status", Static).update(progress_text(message.progress))
        self.query_one(ProgressBar).update(progress=message.progress.fraction)

    @on(DatasetReady)
    def dataset_ready(self, message: DatasetReady) -> None:
        self.building = False
        self.state.summary = message.summary
        self.state.preflight_results = []
        self.show_summary(message.summary)
        self.refresh_bindings()

    def show_summary(self, summary: Any) -> None:
        kept = " (the resumed run's own; later changes to the repository are not in it)" if self.state.resume else ""
        self.query_one("#dataset-status", Static).update(Text(f"Training set built from {self.state.config.repo}{kept}."))
        self.query_one(ProgressBar).update(progress=1.0)
        self.query_one("#dataset-summary", Static).update(summary_renderable(summary, self.state.config.window_tokens))

    def worker_failed(self, worker: Worker, error: BaseException) -> None:
        if worker.group == "dataset":
            self.building = False
            self.refresh_bindings()
        self.query_one("#dataset-status", Static).update(
            "The build failed; fix the repository (Esc goes back) or press r to retry."
        )

    def action_rebuild(self) -> None:
        if self.building:
            return
        self.clear_error()
        self.state.summary = None
        self.query_one(ProgressBar).update(progress=0.0)
        self.query_one("#dataset-summary", Static).update("")
        self.start_build()

    def can_advance(self) -> bool:
        summary = self.state.summary
        return summary is not None and summary.train_windows(self.state.config.window_tokens) > 0
