"""The UI answers keys while an engine call runs in a worker: profiling and building the dataset are held open by the
test (the real call, made to wait on an event), and the app must still react to key presses."""

from __future__ import annotations

import asyncio
import threading

from elite_core.config import default_config
from elite_tui.app import EliteApp
from elite_tui.engine import Engine
from elite_tui.state import WizardState
from tui_helpers import press_to_exit, screen_name, wait_until


class HeldEngine(Engine):
    """The real engine; profiling and dataset building wait for `release` after they start."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def profile_hardware(self, output_dir, progress, use_cache=True):
        self.entered.set()
        progress("held by the test", 0.1)
        self.release.wait(30)
        return super().profile_hardware(output_dir, progress, use_cache)

    def build_dataset(self, config, progress, cancelled=None):
        def held_progress(update):
            progress(update)
            if not self.entered.is_set():
                self.entered.set()
                self.release.wait(30)

        return super().build_dataset(config, held_progress, cancelled)


def test_keys_work_while_profiling(tiny_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path / "cache"))
    engine = HeldEngine()

    async def scenario():
        app = EliteApp(default_config("demo", str(tiny_repo), str(tmp_path / "runs")), engine=engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("ctrl+n")
            await wait_until(pilot, engine.entered.is_set, 5, "profiling to start")
            await wait_until(pilot, lambda: "held" in str(app.screen.query_one("#profile-status").render()), 5,
                             "the progress message")
            await pilot.press("escape")  # back to setup while the profile is still being measured
            await wait_until(pilot, lambda: screen_name(pilot) == "SetupScreen", 2, "the setup screen")
            answered = not engine.release.is_set()
            engine.release.set()
            return answered

    assert asyncio.run(scenario())


def test_keys_work_while_building_the_dataset(tiny_repo, tmp_path, cpu_profile, monkeypatch):
    engine = HeldEngine()
    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), run_name="held")

    async def scenario():
        state = WizardState(config=config, profile=cpu_profile)
        app = EliteApp(config, start_at="dataset", state=state, engine=engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, engine.entered.is_set, 30, "the dataset build to start")
            await pilot.pause()
            status = str(app.screen.query_one("#dataset-status").render())
            await press_to_exit(pilot, "ctrl+q")  # quitting works while the build waits
            answered = not engine.release.is_set()
            engine.release.set()
            return answered, status

    answered, status = asyncio.run(scenario())
    assert answered
    assert "Reading files" in status
