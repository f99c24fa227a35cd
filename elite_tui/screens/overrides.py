"""Step 4: training settings and how the run is launched (GPUs, nodes), each validated as it is typed, with the
predicted memory recomputed."""

from __future__ import annotations

import shlex
import sys
from typing import Any

from rich.markup import escape
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Input, Select, Static

from elite_core.config import CHECKPOINTING, DEEPSPEED_MODES, PRECISIONS, ConfigError, RunConfig, parse_field
from elite_tui.engine import check_launch, launch_commands, process_limit
from elite_tui.format import format_bytes
from elite_tui.screens.base import WizardScreen
from elite_tui.screens.tiers import cpu_ram_text, parallel_label

TEXT_FIELDS = (
    ("lora_rank", "LoRA rank"),
    ("lora_alpha", "LoRA alpha"),
    ("lora_dropout", "LoRA dropout"),
    ("learning_rate", "Learning rate"),
    ("micro_batch", "Micro-batch"),
    ("grad_accum", "Grad accum (0=auto)"),
    ("epochs", "Epochs"),
    ("max_steps", "Max steps (0=epochs)"),
)
CHOICE_FIELDS = (
    ("precision", "Precision", PRECISIONS),
    ("qlora", "QLoRA (4-bit base)", (False, True)),
    ("gradient_checkpointing", "Grad checkpointing", CHECKPOINTING),
    ("adamw_8bit", "8-bit AdamW", (False, True)),
    ("deepspeed", "DeepSpeed", DEEPSPEED_MODES),
    ("compile_layers", "Compile layers", ("auto", "on", "off")),
    ("on_save_failure", "If a save fails", ("continue", "pause", "stop")),
)


LAUNCH_TEXT_FIELDS = (
    ("nnodes", "Nodes"),
    ("master_addr", "Master address"),
    ("master_port", "Master port"),
    ("hostfile", "Hostfile (DeepSpeed)"),
)
LAUNCH_INT_FIELDS = ("nnodes", "master_port")
LAUNCHER_CHOICES = ("auto", "torchrun", "deepspeed")
LAUNCH_FIELDS = ("nproc", *(name for name, _ in LAUNCH_TEXT_FIELDS), "launcher")


def field_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def shown_command(command: list[str]) -> str:
    """A launch argv as a shell line, this interpreter written as "python" so the line stays short."""
    return shlex.join(["python" if command[0] == sys.executable else command[0], *command[1:]])


class OverridesScreen(WizardScreen):
    STEP_NAME = "Overrides"
    DEFAULT_CSS = """
    OverridesScreen .launch-title {
        margin: 1 1 0 1;
        text-style: bold;
    }
    OverridesScreen #launch-summary {
        height: auto;
        margin: 0 1 1 1;
    }
    """
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (80, "-wide")]
    """Under 80 columns the prediction goes below the form (elite.tcss): beside it, a field's message had no room."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: dict[str, str] = {}
        self.candidate: RunConfig | None = None
        self.launch: Any = None
        """distributed.LaunchSettings of the Launch fields, None while one of them is invalid."""

    def initial_launch(self) -> Any:
        """What the Launch group opens with: this session's choice, a resumed run's launch.json, or config.gpus here."""
        from elite_core.distributed import LaunchError, LaunchSettings, read_launch

        state = self.state
        if state.launch is not None:
            return state.launch
        if state.resume:
            try:
                return read_launch(state.config.run_dir)
            except (LaunchError, OSError, ValueError, TypeError):
                pass
        config = state.config
        return LaunchSettings(nproc=config.gpus // config.nodes, nnodes=config.nodes)

    def compose(self) -> ComposeResult:
        config = self.state.config
        yield self.step_title()
        with Horizontal(id="overrides-body"):
            with VerticalScroll(id="overrides-form"):
                for name, label in TEXT_FIELDS:
                    with Horizontal(classes="field-row"):
                        yield Static(label, classes="field-label")
                        yield Input(field_text(getattr(config, name)), id=f"field-{name}", compact=True,
                                    classes="field-input")
                        yield Static("", id=f"message-{name}", classes="field-side-message")
                for name, label, choices in CHOICE_FIELDS:
                    with Horizontal(classes="field-row"):
                        yield Static(label, classes="field-label")
                        options = [("yes" if c is True else "no" if c is False else str(c), c) for c in choices]
                        yield Select(options, value=getattr(config, name), allow_blank=False, id=f"field-{name}",
                                     compact=True, classes="field-input")
                        yield Static("", id=f"message-{name}", classes="field-side-message")
                yield from self.compose_launch()
            yield Static("", id="prediction")
        yield self.error_panel()
        yield self.footer()

    def compose_launch(self) -> ComposeResult:
        launch = self.initial_launch()
        limit = process_limit(self.state.config, self.state.profile)
        on_gpu = self.state.profile is not None and self.state.profile.for_device(self.state.config.device).has_gpu
        yield Static("Launch", classes="launch-title")
        with Horizontal(classes="field-row"):
            yield Static("GPUs per node" if on_gpu else "CPU processes", classes="field-label")
            yield Select([(str(count), count) for count in range(1, limit + 1)], value=min(max(1, launch.nproc), limit),
                         allow_blank=False, id="launch-nproc", compact=True, classes="field-input")
            yield Static("", id="launch-message-nproc", classes="field-side-message")
        for name, label in LAUNCH_TEXT_FIELDS:
            with Horizontal(classes="field-row"):
                yield Static(label, classes="field-label")
                yield Input(str(getattr(launch, name)), id=f"launch-{name}", compact=True, classes="field-input")
                yield Static("", id=f"launch-message-{name}", classes="field-side-message")
        with Horizontal(classes="field-row"):
            yield Static("Launcher", classes="field-label")
            yield Select([(choice, choice) for choice in LAUNCHER_CHOICES], value=launch.launcher, allow_blank=False,
                         id="launch-launcher", compact=True, classes="field-input")
            yield Static("", id="launch-message-launcher", classes="field-side-message")
        yield Static("", id="launch-summary")

    def launch_values(self) -> tuple[dict[str, Any], dict[str, str]]:
        values: dict[str, Any] = {"nproc": self.query_one("#launch-nproc", Select).value,
                                  "launcher": self.query_one("#launch-launcher", Select).value}
        errors: dict[str, str] = {}
        for name, _ in LAUNCH_TEXT_FIELDS:
            text = self.query_one(f"#launch-{name}", Input).value.strip()
            if name in LAUNCH_INT_FIELDS:
                try:
                    values[name] = int(text.replace(",", "").replace("_", ""))
                except ValueError:
                    errors[name] = f"{text!r} is not a whole number"
            else:
                values[name] = text
        return values, errors

    def on_mount(self) -> None:
        self.query_one(f"#field-{TEXT_FIELDS[0][0]}", Input).focus()
        self.revalidate()

    @on(Input.Changed)
    @on(Select.Changed)
    def field_changed(self) -> None:
        self.revalidate()

    @on(Input.Submitted)
    def field_submitted(self) -> None:
        self.focus_next()

    def revalidate(self) -> None:
        errors: dict[str, str] = {}
        changes: dict[str, Any] = {}
        for name, _ in TEXT_FIELDS:
            try:
                changes[name] = parse_field(name, self.query_one(f"#field-{name}", Input).value)
            except ConfigError as exc:
                errors.update(exc.errors)
        for name, _, _ in CHOICE_FIELDS:
            changes[name] = self.query_one(f"#field-{name}", Select).value
        launch_values, launch_errors = self.launch_values()
        if not launch_errors:
            # The planner sizes each GPU's share from the processes in all.
            changes["gpus"] = launch_values["nproc"] * launch_values["nnodes"]
            changes["nodes"] = launch_values["nnodes"]
        candidate = None
        if not errors:
            try:
                candidate = self.state.config.replace(**changes)
            except ConfigError as exc:
                errors.update(exc.errors)
                for field in ("gpus", "nodes"):  # set from the Launch group: shown on its nodes field
                    if field in errors:
                        launch_errors.setdefault("nnodes", errors.pop(field))
        if candidate is not None and self.state.profile is not None:
            errors.update(self.engine.missing_libraries(candidate, self.state.profile))
        launch = None
        if not launch_errors:
            launch, launch_errors = check_launch(candidate or self.state.config, self.state.profile, **launch_values)
            if "deepspeed" in launch_errors:
                errors["deepspeed"] = launch_errors.pop("deepspeed")
        self.errors = {**errors, **{f"launch {name}": message for name, message in launch_errors.items()}}
        self.candidate = candidate
        self.launch = launch
        for name, *_ in (*TEXT_FIELDS, *CHOICE_FIELDS):
            self.query_one(f"#message-{name}", Static).update(escape(errors.get(name, "")))
            self.query_one(f"#field-{name}").set_class(name in errors, "-invalid")
        for name in LAUNCH_FIELDS:
            self.query_one(f"#launch-message-{name}", Static).update(escape(launch_errors.get(name, "")))
            self.query_one(f"#launch-{name}").set_class(name in launch_errors, "-invalid")
        plan = self.show_prediction(candidate)
        self.show_launch(candidate, launch, plan)
        self.refresh_bindings()

    def show_prediction(self, candidate: RunConfig | None) -> Any:
        """Draw the predicted memory of the candidate config; returns its TierPlan (None when there is none)."""
        target = self.query_one("#prediction", Static)
        if candidate is None:
            target.update(Text("Fix the marked fields to see the predicted memory.", style="yellow"))
            return None
        state = self.state
        try:
            plan = self.engine.plan_for_config(state.shape, state.profile, candidate)
        except Exception as exc:  # a planner bug shows here instead of a traceback screen
            target.update(Text(f"Cannot predict memory: {type(exc).__name__}: {exc}", style="red"))
            return None
        lines = Text()
        lines.append(f"Tier {candidate.tier}  {plan.tier.label}\n", style="bold")
        split = parallel_label(candidate, state.profile)
        if split:
            lines.append(f"{split}\n", style="dim")
        for component, count in plan.breakdown.components():
            lines.append(f"{component:<12}{format_bytes(count):>11}\n")
        lines.append(f"{'total':<12}{format_bytes(plan.breakdown.total_bytes):>11}\n", style="bold")
        lines.append(f"{'budget':<12}{format_bytes(plan.budget_bytes):>11}\n")
        lines.append(f"{'headroom':<12}{format_bytes(plan.headroom_bytes):>11}\n",
                     style="green" if plan.headroom_bytes >= 0 else "red")
        if plan.cpu_ram_needed_bytes > 0:
            lines.append(f"{'CPU RAM':<12}{format_bytes(plan.cpu_ram_needed_bytes):>11}\n")
        lines.append("fits" if plan.fits else "does NOT fit", style="bold green" if plan.fits else "bold red")
        target.update(lines)
        return plan

    def show_launch(self, candidate: RunConfig | None, launch: Any, plan: Any) -> None:
        """The predicted memory per GPU with this many GPUs, and the command node 0 (this machine) will run."""
        target = self.query_one("#launch-summary", Static)
        if launch is None:
            target.update(Text("Fix the marked fields to see the launch command.", style="yellow"))
            return
        config = candidate or self.state.config
        text = Text()
        if plan is not None:
            split = parallel_label(config, self.state.profile) or "one process"
            ram = cpu_ram_text(plan)
            text.append(f"predicted {format_bytes(plan.breakdown.total_bytes)} of {format_bytes(plan.budget_bytes)} "
                        f"({split}){', ' + ram if ram else ''}\n")
        from elite_core.distributed import LaunchError

        try:
            commands = launch_commands(config, launch)
        except LaunchError as exc:  # deepspeed uninstalled since the check: say so, do not crash
            target.update(Text(f"Cannot build the launch command: {exc}", style="red"))
            return
        where = "this machine runs" if launch.nnodes == 1 else "node 0 (this machine) runs"
        text.append(f"{where}: ", style="bold")
        text.append(shown_command(commands[0]), style="dim")
        if len(commands) > 1:
            others = "node 1" if launch.nnodes == 2 else f"nodes 1..{launch.nnodes - 1}"
            text.append(f"\n{others}: the same with its --node_rank (elite-tui run ... --print-launch lists each)")
        elif launch.nnodes > 1:
            text.append("\nDeepSpeed starts the other nodes from the hostfile over ssh")
        target.update(text)

    def can_advance(self) -> bool:
        return not self.errors and self.candidate is not None and self.launch is not None

    def advance(self) -> None:
        self.state.config = self.candidate
        self.state.launch = self.launch
        super().advance()

    def action_back(self) -> None:
        # What was typed is kept (the tier table behind plans with it: each GPU's share follows the GPU count and ZeRO
        # chosen here), so coming back here, or picking a tier again, shows it; only a valid set of fields is kept.
        if self.candidate is not None and self.launch is not None:
            self.state.config = self.candidate
            self.state.launch = self.launch
        super().action_back()
