"""Step 3: the seven context tiers with predicted memory per component; the highest that fits is preselected."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.message import Message
from textual.widgets import DataTable, Static
from textual.widgets.data_table import ColumnKey

from elite_core.planner import CPU_MAX_STEP_S
from elite_core.units import format_coarse_duration
from elite_tui.format import format_bytes, format_gib, format_rate, format_tokens
from elite_tui.screens.base import WizardScreen
from elite_tui.widgets.memory_breakdown import MemoryBreakdown

COLUMNS = ("#", "ctx", "tgt", "r", "wts", "lora", "act", "logit", "ovh", "sum", "free", "fits", "epoch")
LEGEND = ("r LoRA rank; GiB: wts weights, lora adapters+gradients+optimizer, act activations, logit logits+loss, "
          "ovh overhead; free = budget - sum.")


def parallel_label(config: Any, profile: Any) -> str:
    """How the numbers are split when training runs on several processes or under ZeRO, e.g. "per GPU, 2 GPUs,
    ZeRO-2 offload"; empty for one process without ZeRO, whose numbers are the whole run's."""
    from elite_core.config import zero_offload, zero_stage

    on_gpu = profile is not None and profile.for_device(config.device).has_gpu
    stage = zero_stage(config.deepspeed) if on_gpu else 0
    if config.gpus <= 1 and not stage:
        return ""
    unit, units = ("GPU", "GPUs") if on_gpu else ("process", "processes")
    parts = [f"per {unit}", f"{config.gpus} {unit if config.gpus == 1 else units}"]
    if stage:
        parts.append(f"ZeRO-{stage}{' offload' if zero_offload(config.deepspeed) else ''}")
    elif config.gpus > 1:
        parts.append("DDP")
    return ", ".join(parts)


def cpu_ram_text(plan: Any) -> str:
    """CPU RAM beside the GPUs (ZeRO offload, offloaded checkpoints), or "" when none is needed."""
    needed = getattr(plan, "cpu_ram_needed_bytes", 0)
    return f"CPU RAM {format_bytes(needed)}" if needed > 0 else ""


def component(plan: Any, *names: str) -> int:
    for name in names:
        value = getattr(plan.breakdown, f"{name}_bytes", None)
        if value is not None:
            return value
    return 0


def epoch_cell(plan: Any) -> Text:
    """The time of one epoch: bold where the probe measured it, dim while it is the TFLOPS estimate alone."""
    if not plan.rate_source:
        return Text("...", style="dim")
    if plan.tokens_per_epoch <= 0:
        return Text("-", style="dim")  # nothing to train on in the repository
    style = {"probe": "bold", "calibrated": "", "estimate": "dim"}[plan.rate_source]
    return Text(format_coarse_duration(plan.epoch_s), style=style)


def epoch_header(plans: Any) -> str:
    """"epoch est." until the epoch's tokens are counted and the rates calibrated by a probe."""
    counted = any(plan.rate_source for plan in plans) and not any(plan.tokens_per_epoch_estimated for plan in plans)
    calibrated = any(plan.rate_source == "probe" for plan in plans)
    return "epoch" if counted and calibrated else "epoch est."


def epoch_basis(epoch_tokens: Any, calibration: Any) -> str:
    """One short line on where the epoch column comes from."""
    if epoch_tokens is None:
        return "epoch: counting the repository's text..."
    if epoch_tokens.estimated:
        tokens = (f"~{format_tokens(epoch_tokens.train_tokens)} tokens ({format_bytes(epoch_tokens.source_bytes)} / "
                  f"{epoch_tokens.bytes_per_token:g} bytes/token)")
    else:
        tokens = f"{format_tokens(epoch_tokens.train_tokens)} tokens in the dataset"
    label = "epoch est." if epoch_tokens.estimated or calibration is None else "epoch"
    if calibration is None:
        return f"{label}: {tokens}, speed from the measured FLOPS"
    return (f"{label}: {tokens}; tier {calibration.tier} probe {format_rate(calibration.measured_tokens_per_s)}, "
            f"others calibrated x{calibration.ratio:.2f}")


def tier_row(plan: Any) -> tuple[Any, ...]:
    tier = plan.tier
    breakdown = plan.breakdown
    fits = Text("yes", style="bold green") if plan.fits else Text("no", style="bold red")
    headroom = Text(format_gib(plan.headroom_bytes), style="green" if plan.headroom_bytes >= 0 else "red")
    adapters = breakdown.lora_bytes + breakdown.gradients_bytes + breakdown.optimizer_bytes
    return (
        str(tier.number),
        format_tokens(tier.context_tokens),
        format_tokens(tier.target_tokens),
        str(plan.setup.lora_rank) if hasattr(plan.setup, "lora_rank") else str(tier.default_lora_rank),
        format_gib(breakdown.weights_bytes),
        format_gib(adapters),
        format_gib(breakdown.activations_bytes),
        format_gib(breakdown.logits_bytes),
        format_gib(breakdown.overhead_bytes),
        Text(format_gib(breakdown.total_bytes), style="bold"),
        headroom,
        fits,
        epoch_cell(plan),
    )


class EpochBasisReady(Message):
    def __init__(self, epoch_tokens: Any, calibration: Any) -> None:
        super().__init__()
        self.epoch_tokens = epoch_tokens
        self.calibration = calibration


class TiersScreen(WizardScreen):
    STEP_NAME = "Context tier"

    def __init__(self) -> None:
        super().__init__()
        self.epoch_tokens: Any = None
        """estimates.EpochTokens, once counted or estimated."""
        self.calibration: Any = None
        """estimates.RateCalibration from this run's pre-flight probe, if one ran."""
        self.selected = 1

    def compose(self) -> ComposeResult:
        yield self.step_title()
        yield Static("", id="tiers-help")
        yield DataTable(id="tiers", cursor_type="row", zebra_stripes=True, cell_padding=1)
        yield MemoryBreakdown(id="breakdown")
        yield self.error_panel()
        yield self.footer()

    def on_mount(self) -> None:
        # A resumed run's cursor starts on its own tier: Enter there keeps the run's settings as they are.
        self.refresh_plans(cursor_tier=self.state.config.tier if self.state.resume else None)

    picked = False
    """Whether the user chose a tier here and went on: coming back, the cursor returns to that tier."""

    def on_screen_resume(self) -> None:
        # Coming back from the overrides screen: the plans depend on the config, so redraw, the cursor on the tier the
        # user picked (the preselected one may be another).
        self.refresh_plans(cursor_tier=self.state.config.tier if self.picked or self.state.resume else None)

    def refresh_plans(self, cursor_tier: int | None = None) -> None:
        state = self.state
        try:
            plans = self.engine.plan_tiers(state.shape, state.profile, state.config)
            selected = self.engine.select_tier(plans)
        except Exception as exc:  # a planner bug must show on this screen, not as a traceback screen
            self.show_error("Cannot plan the tiers", f"{type(exc).__name__}: {exc}")
            return
        self.selected = selected or 1
        state.plans = self.timed(plans)
        self.show_plans(cursor_tier=cursor_tier or self.selected)
        self.find_epoch_basis()

    def timed(self, plans: Any) -> tuple[Any, ...]:
        if self.epoch_tokens is None:
            return tuple(plans)
        from elite_core.planner import with_epoch_times

        return with_epoch_times(plans, self.epoch_tokens, self.calibration)

    @work(thread=True, exclusive=True, exit_on_error=False, group="epoch-basis", name="epoch time")
    def find_epoch_basis(self) -> None:
        """The epoch's tokens (counted in the dataset once built, else estimated from the repository's size) and the
        probe's calibration: file reads and a directory walk, so off the UI thread."""
        from elite_core.estimates import epoch_tokens_from_repo, epoch_tokens_from_summary
        from elite_core.probe import saved_calibration

        config = self.state.config
        if self.state.summary is not None:
            epoch_tokens = epoch_tokens_from_summary(self.state.summary)
        else:
            epoch_tokens = epoch_tokens_from_repo(config.repo, config.model, config.eval_fraction)
        calibration = saved_calibration(config.run_dir, config, self.state.profile)
        self.post_message(EpochBasisReady(epoch_tokens, calibration))

    @on(EpochBasisReady)
    def epoch_basis_ready(self, message: EpochBasisReady) -> None:
        self.epoch_tokens, self.calibration = message.epoch_tokens, message.calibration
        self.state.plans = self.timed(self.state.plans)
        table = self.query_one("#tiers", DataTable)
        self.show_plans(cursor_tier=self.state.plans[table.cursor_row].tier.number if self.state.plans else 1)

    def show_plans(self, cursor_tier: int) -> None:
        plans = self.state.plans
        table = self.query_one("#tiers", DataTable)
        table.clear()
        if not table.columns:
            for label in COLUMNS:
                table.add_column(label, key=label)
        header = epoch_header(plans)
        if str(table.columns[ColumnKey("epoch")].label) != header:
            # A label is measured when its column is added, so a new label needs the column added again.
            table.remove_column("epoch")
            table.add_column(header, key="epoch")
        for plan in plans:
            table.add_row(*tier_row(plan), key=str(plan.tier.number))
        row = next((i for i, plan in enumerate(plans) if plan.tier.number == cursor_tier), 0)
        table.move_cursor(row=row)
        self.show_breakdown(row)

    def show_help(self, row: int) -> None:
        plans = self.state.plans
        budget = plans[0].budget_bytes if plans else 0
        split = parallel_label(self.state.config, self.state.profile)
        if split:
            # Several GPUs or ZeRO: every number is one GPU's share; the highlighted tier's CPU RAM beside it.
            ram = cpu_ram_text(plans[row]) if 0 <= row < len(plans) else ""
            split = f" {split}" + (f" (tier {plans[row].tier.number}: {ram})" if ram else "")
        why = "highest that fits" + (f", steps under {CPU_MAX_STEP_S:.0f} s on a CPU"
                                     if plans and plans[0].setup.device == "cpu" else "")
        self.query_one("#tiers-help", Static).update(
            f"Budget {format_gib(budget)} GiB{escape(split)}; tier {self.selected} preselected ({why}); "
            f"Enter chooses.\n"
            f"[dim]{escape(LEGEND)}\n{escape(epoch_basis(self.epoch_tokens, self.calibration))}[/dim]"
        )

    def show_breakdown(self, row: int) -> None:
        plans = self.state.plans
        self.show_help(row)
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
        config = self.state.config
        if not self.state.resume:
            self.state.config = self.engine.config_for_plan(config, plan)
        elif plan.tier.number != config.tier:
            # Another tier for a resumed run: its windows and memory options, the adapter's shape kept (the checkpoint
            # holds that adapter).
            self.state.config = self.engine.config_for_plan(config, plan).replace(
                lora_rank=config.lora_rank, lora_alpha=config.lora_alpha, lora_target_modules=config.lora_target_modules)
        self.picked = True
        super().advance()
