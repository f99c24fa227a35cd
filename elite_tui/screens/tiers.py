"""Step 3: the seven context tiers with predicted memory per component; the highest that fits is preselected."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from elite_tui.format import format_gib, format_tokens
from elite_tui.screens.base import WizardScreen
from elite_tui.widgets.memory_breakdown import MemoryBreakdown

COLUMNS = ("#", "ctx", "tgt", "rank", "wts", "lora", "grad", "opt", "act", "logit", "ovh", "sum", "free", "fits")
LEGEND = ("GiB per component: wts weights, lora adapters, grad gradients, opt optimizer, act activations, "
          "logit logits+loss, ovh overhead; free = budget - sum.")


def component(plan: Any, *names: str) -> int:
    for name in names:
        value = getattr(plan.breakdown, f"{name}_bytes", None)
        if value is not None:
            return value
    return 0


def tier_row(plan: Any) -> tuple[Any, ...]:
    tier = plan.tier
    breakdown = plan.breakdown
    fits = Text("yes", style="bold green") if plan.fits else Text("no", style="bold red")
    headroom = Text(format_gib(plan.headroom_bytes), style="green" if plan.headroom_bytes >= 0 else "red")
    return (
        str(tier.number),
        format_tokens(tier.context_tokens),
        format_tokens(tier.target_tokens),
        str(plan.setup.lora_rank) if hasattr(plan.setup, "lora_rank") else str(tier.default_lora_rank),
        format_gib(breakdown.weights_bytes),
        format_gib(breakdown.lora_bytes),
        format_gib(breakdown.gradients_bytes),
        format_gib(breakdown.optimizer_bytes),
        format_gib(breakdown.activations_bytes),
        format_gib(breakdown.logits_bytes),
        format_gib(breakdown.overhead_bytes),
        Text(format_gib(breakdown.total_bytes), style="bold"),
        headroom,
        fits,
    )


class TiersScreen(WizardScreen):
    STEP_NAME = "Context tier"

    def compose(self) -> ComposeResult:
        yield self.step_title()
        yield Static("", id="tiers-help")
        yield DataTable(id="tiers", cursor_type="row", zebra_stripes=True, cell_padding=1)
        yield MemoryBreakdown(id="breakdown")
        yield self.error_panel()
        yield self.footer()

    def on_mount(self) -> None:
        table = self.query_one("#tiers", DataTable)
        table.add_columns(*COLUMNS)
        self.refresh_plans()

    def on_screen_resume(self) -> None:
        # Coming back from the overrides screen: the plans depend on the config, so redraw.
        self.refresh_plans()

    def refresh_plans(self) -> None:
        state = self.state
        try:
            plans = self.engine.plan_tiers(state.shape, state.profile, state.config)
            selected = self.engine.select_tier(plans)
        except Exception as exc:  # a planner bug must show on this screen, not as a traceback screen
            self.show_error("Cannot plan the tiers", f"{type(exc).__name__}: {exc}")
            return
        state.plans = tuple(plans)
        table = self.query_one("#tiers", DataTable)
        table.clear()
        for plan in plans:
            table.add_row(*tier_row(plan), key=str(plan.tier.number))
        budget = plans[0].budget_bytes if plans else 0
        self.query_one("#tiers-help", Static).update(
            f"Budget {format_gib(budget)} GiB; tier {selected} preselected (highest that fits); Enter chooses.\n"
            f"[dim]{LEGEND}[/dim]"
        )
        row = next((i for i, plan in enumerate(plans) if plan.tier.number == (selected or 1)), 0)
        table.move_cursor(row=row)
        self.show_breakdown(row)

    def show_breakdown(self, row: int) -> None:
        plans = self.state.plans
        self.query_one(MemoryBreakdown).show_plan(plans[row] if 0 <= row < len(plans) else None)

    @on(DataTable.RowHighlighted, "#tiers")
    def row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_breakdown(event.cursor_row)

    @on(DataTable.RowSelected, "#tiers")
    def row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_next()

    def can_advance(self) -> bool:
        return bool(self.state.plans)

    def advance(self) -> None:
        row = self.query_one("#tiers", DataTable).cursor_row
        plan = self.state.plans[row]
        if not plan.fits:
            self.notify(f"Tier {plan.tier.number} is predicted not to fit; pre-flight will check it.", severity="warning")
        self.state.config = self.engine.config_for_plan(self.state.config, plan)
        super().advance()
