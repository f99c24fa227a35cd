"""Step 4: training settings, each validated as it is typed, with the predicted memory recomputed."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Input, Select, Static

from elite_core.config import CHECKPOINTING, DEEPSPEED_MODES, PRECISIONS, ConfigError, RunConfig, parse_field
from elite_tui.format import format_bytes
from elite_tui.screens.base import WizardScreen

TEXT_FIELDS = (
    ("lora_rank", "LoRA rank"),
    ("lora_alpha", "LoRA alpha"),
    ("lora_dropout", "LoRA dropout"),
    ("learning_rate", "Learning rate"),
    ("micro_batch", "Micro-batch"),
    ("grad_accum", "Grad accumulation (0 auto)"),
    ("epochs", "Epochs"),
    ("max_steps", "Max steps (0=epochs)"),
)
CHOICE_FIELDS = (
    ("precision", "Precision", PRECISIONS),
    ("gradient_checkpointing", "Grad checkpointing", CHECKPOINTING),
    ("adamw_8bit", "8-bit AdamW", (False, True)),
    ("deepspeed", "DeepSpeed", DEEPSPEED_MODES),
    ("compile_layers", "Compile layers", ("auto", "on", "off")),
    ("on_save_failure", "If a save fails", ("continue", "pause", "stop")),
)


def field_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class OverridesScreen(WizardScreen):
    STEP_NAME = "Overrides"

    def __init__(self) -> None:
        super().__init__()
        self.errors: dict[str, str] = {}
        self.candidate: RunConfig | None = None

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
            yield Static("", id="prediction")
        yield self.error_panel()
        yield self.footer()

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
        candidate = None
        if not errors:
            try:
                candidate = self.state.config.replace(**changes)
            except ConfigError as exc:
                errors.update(exc.errors)
        self.errors = errors
        self.candidate = candidate
        for name, *_ in (*TEXT_FIELDS, *CHOICE_FIELDS):
            self.query_one(f"#message-{name}", Static).update(errors.get(name, ""))
            self.query_one(f"#field-{name}").set_class(name in errors, "-invalid")
        self.show_prediction(candidate)
        self.refresh_bindings()

    def show_prediction(self, candidate: RunConfig | None) -> None:
        target = self.query_one("#prediction", Static)
        if candidate is None:
            target.update(Text("Fix the marked fields to see the predicted memory.", style="yellow"))
            return
        state = self.state
        try:
            plan = self.engine.plan_for_config(state.shape, state.profile, candidate)
        except Exception as exc:  # a planner bug shows here instead of a traceback screen
            target.update(Text(f"Cannot predict memory: {type(exc).__name__}: {exc}", style="red"))
            return
        lines = Text()
        lines.append(f"Tier {candidate.tier}  {plan.tier.label}\n", style="bold")
        for component, count in plan.breakdown.components():
            lines.append(f"{component:<12}{format_bytes(count):>11}\n")
        lines.append(f"{'total':<12}{format_bytes(plan.breakdown.total_bytes):>11}\n", style="bold")
        lines.append(f"{'budget':<12}{format_bytes(plan.budget_bytes):>11}\n")
        lines.append(f"{'headroom':<12}{format_bytes(plan.headroom_bytes):>11}\n",
                     style="green" if plan.headroom_bytes >= 0 else "red")
        lines.append("fits" if plan.fits else "does NOT fit", style="bold green" if plan.fits else "bold red")
        target.update(lines)

    def can_advance(self) -> bool:
        return not self.errors and self.candidate is not None

    def advance(self) -> None:
        self.state.config = self.candidate
        super().advance()
