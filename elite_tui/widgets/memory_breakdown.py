"""The selected tier's predicted memory, one bar per component, against the memory budget."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from elite_tui.format import format_bytes, format_duration, format_rate

BAR_WIDTH = 24


def breakdown_table(plan: Any) -> Table:
    budget = max(int(plan.budget_bytes), 1)
    table = Table.grid(padding=(0, 1))
    table.add_column(min_width=11, no_wrap=True)
    table.add_column(min_width=10, justify="right", no_wrap=True)
    table.add_column(min_width=BAR_WIDTH, no_wrap=True)
    for name, count in plan.breakdown.components():
        filled = min(BAR_WIDTH, round(BAR_WIDTH * count / budget))
        if count > 0 and filled == 0:
            filled = 1
        table.add_row(name, format_bytes(count), Text("█" * filled, style="cyan"))
    total = plan.breakdown.total_bytes
    style = "green" if plan.fits else "red"
    filled = min(BAR_WIDTH, round(BAR_WIDTH * total / budget))
    table.add_row(Text("total", style="bold"), Text(format_bytes(total), style="bold"), Text("█" * filled, style=style))
    return table


class MemoryBreakdown(Static):
    """Shows one TierPlan: bars, headroom, the options the planner chose, and its note."""

    def show_plan(self, plan: Any | None) -> None:
        if plan is None:
            self.update("")
            return
        grid = Table.grid(padding=(0, 2))
        grid.add_column(min_width=47, no_wrap=True)
        grid.add_column(ratio=1)
        verdict = Text("fits" if plan.fits else "does not fit", style="bold green" if plan.fits else "bold red")
        side = Table.grid()
        side.add_column(overflow="fold")
        side.add_row(Text.assemble(f"Tier {plan.tier.number} ", (plan.tier.label, "bold"), "  ", verdict))
        side.add_row(f"headroom {format_bytes(plan.headroom_bytes)}")
        if plan.step_time_s:
            rate = f", {format_rate(plan.tokens_per_s)}" if getattr(plan, "tokens_per_s", 0) else ""
            side.add_row(f"step ~{format_duration(plan.step_time_s)}{rate}")
        if plan.options:
            side.add_row("with: " + ", ".join(plan.options))
        if plan.note:
            side.add_row(Text(plan.note, style="dim"))
        grid.add_row(breakdown_table(plan), side)
        self.update(grid)
