"""The wizard: Setup -> Hardware -> Tiers -> Overrides -> Dataset -> Preflight -> Monitor -> Report."""

from __future__ import annotations

from typing import Any, Sequence

from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from elite_core.config import RunConfig
from elite_tui.engine import Engine
from elite_tui.screens.dataset import DatasetScreen
from elite_tui.screens.hardware import HardwareScreen
from elite_tui.screens.monitor import MonitorScreen
from elite_tui.screens.overrides import OverridesScreen
from elite_tui.screens.preflight import PreflightScreen
from elite_tui.screens.report import ReportScreen
from elite_tui.screens.setup import SetupScreen
from elite_tui.screens.tiers import TiersScreen
from elite_tui.state import WizardState

SCREEN_ORDER: tuple[type[Screen], ...] = (
    SetupScreen,
    HardwareScreen,
    TiersScreen,
    OverridesScreen,
    DatasetScreen,
    PreflightScreen,
    MonitorScreen,
    ReportScreen,
)
SCREEN_NAMES = {
    "setup": SetupScreen,
    "hardware": HardwareScreen,
    "tiers": TiersScreen,
    "overrides": OverridesScreen,
    "dataset": DatasetScreen,
    "preflight": PreflightScreen,
    "monitor": MonitorScreen,
    "report": ReportScreen,
}


class EliteApp(App[int]):
    TITLE = "elite-tui"
    CSS_PATH = "elite.tcss"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(
        self,
        config: RunConfig,
        hardware_profile: Any = None,
        shape: Any = None,
        *,
        engine: Engine | None = None,
        start_at: str = "setup",
        state: WizardState | None = None,
        replay_events: Sequence[Any] | None = None,
        reprofile: bool = False,
    ) -> None:
        """`start_at` opens one screen directly on a prepared `state` (snapshots, screenshots);
        `replay_events` makes the monitor show recorded events instead of starting a child."""
        super().__init__()
        if start_at not in SCREEN_NAMES:
            raise ValueError(f"start_at must be one of {', '.join(SCREEN_NAMES)}")
        self.state = state or WizardState(config=config)
        if hardware_profile is not None:
            self.state.profile = hardware_profile
        if shape is not None:
            self.state.shape = shape
        self.engine = engine or Engine()
        self.start_at = start_at
        self.replay_events = replay_events
        self.reprofile = reprofile
        """Measure the hardware again instead of reading the cached profile."""

    def on_mount(self) -> None:
        self.push_screen(self.make_screen(SCREEN_NAMES[self.start_at]))

    def make_screen(self, screen_class: type[Screen]) -> Screen:
        if screen_class is MonitorScreen:
            return MonitorScreen(replay_events=self.replay_events)
        return screen_class()

    def step_number(self, screen: Screen) -> int:
        return SCREEN_ORDER.index(type(screen)) + 1

    def next_step(self, screen: Screen) -> None:
        index = SCREEN_ORDER.index(type(screen))
        if index + 1 < len(SCREEN_ORDER):
            self.push_screen(self.make_screen(SCREEN_ORDER[index + 1]))
        else:
            self.exit(0)

    async def action_quit(self) -> None:
        # The monitor asks before a running training is stopped; every other screen quits at once.
        if isinstance(self.screen, MonitorScreen):
            self.screen.action_quit_monitor()
            return
        self.exit(0)


def run_wizard(config: RunConfig, **kwargs: Any) -> int:
    """Run the wizard in this terminal; the exit code is 0 unless training ended in an error."""
    app = EliteApp(config, **kwargs)
    result = app.run()
    return result if isinstance(result, int) else (app.return_code or 0)
