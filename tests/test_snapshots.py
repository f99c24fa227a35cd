"""Snapshots of every wizard screen at 80x24 on fixed data (fake H100, Qwen2.5-Coder-1.5B's shape, relative paths).

Update after an intended UI change: pytest tests/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

import pytest
from textual.widgets import Input

from elite_tui.showcase import showcase_app

TERMINAL = (80, 24)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


async def settle(pilot) -> None:
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    # A blinking cursor in a focused field made snapshots differ from run to run (overrides, setup).
    for field in pilot.app.screen.query(Input):
        field.cursor_blink = False
    await pilot.pause()


class TestWizardScreens:
    @pytest.mark.parametrize(
        "screen", ["setup", "hardware", "tiers", "overrides", "dataset", "preflight", "monitor", "report"]
    )
    def test_screen(self, screen, workdir, snap_compare):
        assert snap_compare(showcase_app(screen, workdir), terminal_size=TERMINAL, run_before=settle)


class TestErrors:
    def test_monitor_shows_a_crashed_child(self, workdir, snap_compare):
        assert snap_compare(showcase_app("monitor", workdir, "crash"), terminal_size=TERMINAL, run_before=settle)

    def test_overrides_mark_a_bad_value(self, workdir, snap_compare):
        async def type_bad_rank(pilot):
            await settle(pilot)
            field = pilot.app.screen.query_one("#field-lora_rank")
            field.value = "abc"
            await settle(pilot)

        assert snap_compare(showcase_app("overrides", workdir), terminal_size=TERMINAL, run_before=type_bad_rank)

    def test_setup_marks_a_missing_repo(self, workdir, snap_compare):
        async def missing_repo(pilot):
            await settle(pilot)
            field = pilot.app.screen.query_one("#field-repo")
            field.value = "no-such-repo"
            await pilot.pause()

        assert snap_compare(showcase_app("setup", workdir), terminal_size=TERMINAL, run_before=missing_repo)
