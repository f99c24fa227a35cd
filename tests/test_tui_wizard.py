"""The whole wizard, keyboard only, on the real engine: demo model, a tiny repository, an 8-step training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elite_core.config import default_config
from elite_tui.app import EliteApp
from tui_helpers import error_text, press_to_exit, run_pilot, screen_name, wait_until

pytestmark = pytest.mark.slow


def test_keyboard_walk_reaches_a_finished_run(tiny_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path / "cache"))
    output_dir = tmp_path / "runs"
    # Within pytest's 300-s timeout: a stuck walk then names what it waits for.
    app, finished = run_pilot(walk_the_wizard(tiny_repo, output_dir), timeout_s=270)
    run_dir = app.state.config.run_dir
    assert run_dir.parent == output_dir
    assert (Path(finished.adapter_path) / "adapter_config.json").is_file()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    steps = [event for event in events if event["type"] == "step"]
    assert [event["step"] for event in steps] == list(range(1, 9))
    assert all(isinstance(event["loss"], float) for event in steps)
    assert steps[-1]["loss"] < steps[0]["loss"], "the loss did not fall"
    assert (run_dir / "report.md").is_file()


async def walk_the_wizard(tiny_repo: Path, output_dir: Path):
    app = EliteApp(default_config("demo", str(tiny_repo), str(output_dir)))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: screen_name(pilot) == "SetupScreen", 5, "the setup screen")
        await pilot.press("ctrl+n")

        await wait_until(pilot, lambda: screen_name(pilot) == "HardwareScreen", 5, "the hardware screen")
        await wait_until(pilot, lambda: app.state.profile is not None and app.state.shape is not None, 60,
                         "the hardware profile and the model shape")
        assert not error_text(pilot)
        await pilot.press("ctrl+n")

        await wait_until(pilot, lambda: screen_name(pilot) == "TiersScreen", 5, "the tier table")
        assert len(app.state.plans) == 7
        assert "steps under 3 s on a CPU" in str(app.screen.query_one("#tiers-help").render())
        await pilot.press(*["up"] * 7, "enter")

        await wait_until(pilot, lambda: screen_name(pilot) == "OverridesScreen", 5, "the overrides screen")
        assert app.state.config.tier == 1
        # Focus starts on the first field; Tab selects a field's text, so typing replaces it.
        await pilot.press(*["tab"] * 7)
        assert app.focused is app.screen.query_one("#field-max_steps")
        await pilot.press("8")
        await pilot.pause()
        await pilot.press("ctrl+n")

        await wait_until(pilot, lambda: screen_name(pilot) == "DatasetScreen", 5, "the dataset screen")
        assert app.state.config.max_steps == 8
        await wait_until(pilot, lambda: app.state.summary is not None or error_text(pilot), 120, "the dataset")
        assert not error_text(pilot)
        assert app.state.summary.files > 0
        await pilot.press("ctrl+n")

        await wait_until(pilot, lambda: screen_name(pilot) == "PreflightScreen", 5, "the pre-flight screen")
        await wait_until(pilot, lambda: not app.screen.running or error_text(pilot), 180, "the pre-flight checks")
        results = app.state.preflight_results
        assert [r.ok for r in results] == [True] * len(results), [(r.name, r.message) for r in results if not r.ok]
        assert [r.name for r in results] == [
            "output directory writable", "model and tokenizer load", "options' libraries installed",
            "dataset has training windows", "memory fits with headroom", "training steps run"]
        await pilot.press("ctrl+n")

        await wait_until(pilot, lambda: screen_name(pilot) == "MonitorScreen", 5, "the monitor")
        await wait_until(pilot, lambda: app.state.finished is not None or app.state.training_error is not None, 240,
                         "the end of training")
        assert app.state.training_error is None, app.state.training_error
        assert app.screen.steps[-1] == 8
        await pilot.press("ctrl+n")

        await wait_until(pilot, lambda: screen_name(pilot) == "ReportScreen", 5, "the report")
        finished = app.state.finished
        await press_to_exit(pilot, "ctrl+n")
    return app, finished
