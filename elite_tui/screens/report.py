"""Step 8: the run's report (RUN_DIR/report.md) and where every artefact is."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Markdown, Static

from elite_core.report import PLOT_FILES, PLOTS_DIR
from elite_tui.format import format_duration, format_loss
from elite_tui.screens.base import WizardScreen


def artefact_lines(run_dir: Path, finished) -> list[tuple[str, str]]:
    rows = [("run directory", str(run_dir))]
    if finished is not None:
        rows.append(("adapter", finished.adapter_path or f"none yet: the run stopped early (elite-tui resume {run_dir})"))
        rows.append(("report", finished.report_path))
    rows += [
        ("config", str(run_dir / "config.yaml")),
        ("events", str(run_dir / "events.jsonl")),
        ("checkpoints", str(run_dir / "checkpoints")),
        ("child log", str(run_dir / "child.log")),
    ]
    # Plots are PNG files: a terminal cannot show them, so their paths are what the screen gives.
    rows += [(f"{name} plot", str(run_dir / PLOTS_DIR / file_name)) for name, file_name in PLOT_FILES.items()
             if (run_dir / PLOTS_DIR / file_name).is_file()]
    for name, relative in (("evaluation", "evaluation.json"), ("tensorboard", "tensorboard"), ("merged model", "merged")):
        if (run_dir / relative).exists():
            rows.append((name, str(run_dir / relative)))
    return rows


class ReportScreen(WizardScreen):
    STEP_NAME = "Report"
    BINDINGS = [Binding("q", "app.quit", "Quit")]

    def compose(self) -> ComposeResult:
        finished = self.state.finished
        run_dir = self.state.config.run_dir
        yield self.step_title()
        if finished is not None:
            ending = "Stopped early" if finished.stopped_early else "Finished"
            summary = (f"[b]{ending}[/b] at step {finished.step}, final loss {format_loss(finished.final_loss)}, "
                       f"in {format_duration(finished.elapsed_s)}.")
        else:
            summary = "[b]No finished run[/b]"
        yield Static(summary, id="report-summary")
        rows = artefact_lines(run_dir, finished)
        width = max(len(name) for name, _ in rows) + 1
        # Text, not markup: a path may hold brackets
        yield Static(Text("\n").join(Text.assemble((f"{name:<{width}}", "bold"), path) for name, path in rows),
                     id="artefacts")
        with VerticalScroll(id="report-scroll"):
            yield Markdown(self.report_text(), id="report")
        yield self.error_panel()
        yield self.footer()

    def report_text(self) -> str:
        finished = self.state.finished
        # A run's report is RUN_DIR/report.md; a Finished event without one (a probe, an older run) points there too.
        path = (Path(finished.report_path) if finished is not None and finished.report_path
                else self.state.config.run_dir / "report.md")
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            return f"*No report at `{path}`: {exc.strerror or exc}.*"

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "back":
            return False
        return super().check_action(action, parameters)

    def advance(self) -> None:
        self.app.exit(0)
