"""Step 1: which model, which repository, where runs go; resumable runs in that place."""

from __future__ import annotations

import os
from pathlib import Path

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Input, Static
from textual.worker import get_current_worker

from elite_core.config import DEMO_MODEL, ConfigError, RunConfig, default_config
from elite_tui.screens.base import WizardScreen

FIELDS = (
    ("model", "Model", "hub id, local directory, or 'demo'"),
    ("repo", "Repository", "directory to train on"),
    ("output_dir", "Output dir", "where run directories go"),
    ("run_name", "Run name", "one directory name"),
)


def next_free_run_name(output_dir: str, stem: str = "run") -> str:
    """run-1, run-2, ...: the first name not taken in output_dir, so a new run never overwrites an old one."""
    number = 1
    while (Path(output_dir) / f"{stem}-{number}").exists():
        number += 1
    return f"{stem}-{number}"


def repo_problem(repo: str) -> str | None:
    path = Path(repo).expanduser()
    if not repo.strip():
        return "name the repository to train on"
    if not path.exists():
        return f"no such directory: {repo}"
    if not path.is_dir():
        return f"{repo} is a file; give a directory"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"cannot read {repo} (permissions)"
    try:
        if next(path.iterdir(), None) is None:
            return f"{repo} is empty: nothing to train on"
    except OSError as exc:
        return f"cannot list {repo}: {exc.strerror or exc}"
    return None


def output_dir_problem(output_dir: str) -> str | None:
    if not output_dir.strip():
        return "name an output directory"
    path = Path(output_dir).expanduser()
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write to {existing} (permissions)"
    return None


class SetupScreen(WizardScreen):
    STEP_NAME = "Setup"

    def __init__(self) -> None:
        super().__init__()
        self.problems: dict[str, str] = {}
        self.runs: list = []
        self.runs_listed_for: str | None = None

    def compose(self) -> ComposeResult:
        config = self.state.config
        run_name = config.run_name if config.run_name != "run" else next_free_run_name(config.output_dir)
        values = {"model": config.model, "repo": config.repo, "output_dir": config.output_dir, "run_name": run_name}
        yield self.step_title()
        with Vertical(id="form"):
            for name, label, placeholder in FIELDS:
                with Horizontal(classes="field-row"):
                    yield Static(label, classes="field-label")
                    yield Input(values[name], placeholder=placeholder, id=f"field-{name}", compact=True)
                yield Static("", id=f"message-{name}", classes="field-message")
        yield Static("Resumable and live runs in the output dir (Enter resumes or attaches):", id="runs-title")
        yield DataTable(id="runs", cursor_type="row")
        yield self.error_panel()
        yield self.footer()

    def on_mount(self) -> None:
        table = self.query_one("#runs", DataTable)
        table.add_columns("run", "status", "step", "updated")
        self.validate_fields()
        self.list_runs_in(self.value("output_dir"))

    def value(self, name: str) -> str:
        return self.query_one(f"#field-{name}", Input).value.strip()

    @on(Input.Changed)
    def field_changed(self, event: Input.Changed) -> None:
        self.validate_fields()
        if event.input.id == "field-output_dir":
            self.list_runs_in(self.value("output_dir"))

    @on(Input.Submitted)
    def field_submitted(self, event: Input.Submitted) -> None:
        self.focus_next()

    def validate_fields(self) -> None:
        problems: dict[str, str] = {}
        model_problem = self.engine.check_model_source(self.value("model"))
        if model_problem:
            problems["model"] = model_problem
        for name, check in (("repo", repo_problem), ("output_dir", output_dir_problem)):
            problem = check(self.value(name))
            if problem:
                problems[name] = problem
        try:
            RunConfig(run_name=self.value("run_name"))
        except ConfigError as exc:
            problems["run_name"] = next(iter(exc.errors.values()))
        self.problems = problems
        for name, _, _ in FIELDS:
            self.set_message(name, problems.get(name, ""))
            self.query_one(f"#field-{name}", Input).set_class(name in problems, "-invalid")
        self.refresh_bindings()

    def set_message(self, name: str, text: str) -> None:
        message = self.query_one(f"#message-{name}", Static)
        message.update(escape(text))  # it may quote what was typed: "[/b]" in a path is text, not markup
        message.display = bool(text)

    def list_runs_in(self, output_dir: str) -> None:
        # Input.Changed also fires for the initial value; listing the same directory twice would only flicker.
        if output_dir != self.runs_listed_for:
            self.runs_listed_for = output_dir
            self.load_runs(output_dir)

    @work(thread=True, exclusive=True, exit_on_error=False, group="runs", name="listing runs")
    def load_runs(self, output_dir: str) -> None:
        runs = [run for run in self.engine.list_runs(output_dir) if run.resumable or run.live]
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self.show_runs, runs)

    def show_runs(self, runs: list) -> None:
        self.runs = runs
        table = self.query_one("#runs", DataTable)
        table.clear()
        for run in runs:
            step = f"{run.step}/{run.total_steps}" if run.total_steps else str(run.step)
            updated = run.updated if isinstance(run.updated, str) else _format_time(run.updated)
            table.add_row(run.name, run.status, step, updated)
        if not runs:
            table.add_row("(none)", "", "", "")

    def can_advance(self) -> bool:
        return not self.problems

    def new_config(self) -> RunConfig:
        old = self.state.config
        model, repo, output_dir, run_name = (self.value(name) for name, _, _ in FIELDS)
        if (model == DEMO_MODEL) != old.is_demo:
            # Demo defaults (a high LR for a tiny model, 50 steps) only suit the demo model.
            return default_config(model, repo, output_dir, run_name=run_name)
        return old.replace(model=model, repo=repo, output_dir=output_dir, run_name=run_name)

    def advance(self) -> None:
        config = self.new_config()
        if self.engine.started_run(config.run_dir) is not None:
            self.set_message("run_name", f"{config.run_dir} already holds a run: pick another name, or resume it from "
                                         "the list below")
            return
        try:
            Path(config.output_dir).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.set_message("output_dir", f"cannot create it: {exc.strerror or exc}")
            return
        self.clear_error()
        self.state.take_config(config)
        self.state.resume = False
        super().advance()

    @on(DataTable.RowSelected, "#runs")
    def resume_run(self, event: DataTable.RowSelected) -> None:
        if event.cursor_row >= len(self.runs):
            return
        run = self.runs[event.cursor_row]
        try:
            config = RunConfig.load(Path(run.run_dir) / "config.yaml")
        except (OSError, ConfigError) as exc:
            self.show_error("Cannot resume", f"{run.run_dir}/config.yaml: {exc}")
            return
        self.state.take_config(config)
        if run.live:
            # Still training (its controller went away): follow it on the monitor instead of starting anything.
            from elite_tui.screens.monitor import MonitorScreen

            self.state.attach = True
            self.app.push_screen(self.wizard.make_screen(MonitorScreen))
            return
        self.state.resume = True
        self.wizard.next_step(self)


def _format_time(timestamp: float | None) -> str:
    import time

    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))
