"""Helpers for pilot tests: wait for a condition while the app keeps running, without fixed sleeps."""

from __future__ import annotations

import time
from typing import Callable


async def wait_until(pilot, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    started = time.monotonic()
    deadline = started + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; screen: "
                                 f"{type(pilot.app.screen).__name__}")
        await pilot.pause(0.1)
    if time.monotonic() - started > 1.0:
        print(f"waited {time.monotonic() - started:.1f} s for {what}")


def screen_name(pilot) -> str:
    return type(pilot.app.screen).__name__


def error_text(pilot) -> str:
    from elite_tui.widgets.error_panel import ErrorPanel

    panels = pilot.app.screen.query(ErrorPanel)
    return str(panels.first().render()) if panels and panels.first().shown else ""
