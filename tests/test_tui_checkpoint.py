"""The monitor's keys on a real training child: c saves a checkpoint while training goes on; s stops after a checkpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from elite_core import protocol
from elite_core.config import default_config
from elite_tui.app import EliteApp
from elite_tui.screens.monitor import TrainingEvent
from tui_helpers import wait_until

pytestmark = pytest.mark.slow


def test_checkpoint_key_saves_while_training_goes_on_and_stop_key_ends_it(tiny_repo, tmp_path):
    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), run_name="keys", max_steps=10_000,
                            checkpoint_every_seconds=0, eval_every_steps=0,
                            context_tokens=448, target_tokens=64)  # short windows: quick steps
    events: list = []

    def record(message) -> None:
        if isinstance(message, TrainingEvent):
            events.append(message.event)

    def saved(reason: str) -> list:
        return [e for e in events if isinstance(e, protocol.CheckpointSaved) and e.reason == reason]

    def steps() -> list:
        return [e for e in events if isinstance(e, protocol.StepMetrics)]

    async def scenario():
        app = EliteApp(config, start_at="monitor")
        async with app.run_test(size=(80, 24), message_hook=record) as pilot:
            await wait_until(pilot, lambda: len(steps()) >= 1, 90, "the first step")
            await pilot.press("c")
            await wait_until(pilot, lambda: saved("requested"), 60, "the requested checkpoint")
            step_at_checkpoint = saved("requested")[0].step
            await wait_until(pilot, lambda: steps()[-1].step >= step_at_checkpoint + 2, 60, "steps after it")
            await pilot.press("s")
            await wait_until(pilot, lambda: app.state.finished is not None, 60, "the graceful stop")
            return app.state.finished, step_at_checkpoint

    finished, step_at_checkpoint = asyncio.run(scenario())
    checkpoint_path = Path(saved("requested")[0].path)
    assert checkpoint_path.is_dir() and any(checkpoint_path.iterdir())
    assert finished.stopped_early
    assert finished.step >= step_at_checkpoint + 2
    assert saved("stop"), [e for e in events if isinstance(e, protocol.CheckpointSaved)]
